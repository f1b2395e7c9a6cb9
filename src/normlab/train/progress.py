"""Progress display: a rich bar with images/s and ETA on a terminal, plain lines otherwise."""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class EpochProgress:
    """One bar per epoch (``mode``: bar | plain | off | auto = bar on a TTY, plain otherwise)."""

    def __init__(self, mode: str = "auto", enabled: bool = True) -> None:
        mode = os.environ.get("NORMLAB_PROGRESS", mode)  # a study running several jobs asks for plain lines
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "off"
        self.console = Console(stderr=True)
        self._progress: Progress | None = None

    def log(self, text: str) -> None:
        if self.mode == "bar":
            self.console.print(text, highlight=False)
        elif self.mode == "plain":
            print(text, file=sys.stderr, flush=True)

    def say(self, text: str) -> None:
        """A result line: like :meth:`log`, but shown also when the display is off (plain, on stderr)."""
        if self.mode == "off":
            print(text, file=sys.stderr, flush=True)
        else:
            self.log(text)

    def start(self, description: str, total: int) -> None:
        self._t0, self._images, self._desc, self._total = time.perf_counter(), 0, description, total
        self._loss: float | None = None
        if self.mode == "bar":
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, rate="")

    def advance(self, images: int, loss: float | None = None) -> None:
        """Count one step of ``images``; ``loss`` (a float the caller already has on the host) replaces the
        loss shown, which otherwise stays: the trainer reads it once per check interval, not per step."""
        self._images += images
        if loss is not None:
            self._loss = loss
        if self._progress is not None:
            rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
            text = f"{rate:,.0f} img/s" + (f"  loss {self._loss:.3f}" if self._loss is not None else "")
            self._progress.update(self._task, advance=1, rate=text)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
