"""Run-time choices made once per run: device, threads, precision, torch.compile, the run-folder lock."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from normlab.errors import NormlabError


def pick_device(name: str) -> torch.device:
    """``auto`` prefers CUDA, then Apple's MPS, then the CPU; an unavailable explicit choice is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NormlabError("device=cuda but no CUDA GPU is visible: use --device cpu (or auto)")
    if name == "mps" and not has_mps:
        raise NormlabError("device=mps but Apple's MPS backend is not available: use --device cpu (or auto)")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; the normlab norms compute their statistics in float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling on CUDA; bf16 (same exponent range as fp32) does not."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def maybe_compile(model: nn.Module, mode: str, device: torch.device, log=print) -> nn.Module:
    """``torch.compile`` the model (``on``; ``auto`` = on for CUDA only), falling back to eager with a
    warning when no compiler works here."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return model
    try:
        compiled = torch.compile(model)
        return compiled
    except Exception as exc:  # pragma: no cover - depends on the machine's toolchain
        warnings.warn(f"torch.compile is not available here ({type(exc).__name__}); running eager", stacklevel=2)
        log(f"warning: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100]}); running eager")
        return model


class RunLock:
    """A lock file stopping two processes from writing one run folder; a stale lock (dead pid) is taken over."""

    def __init__(self, folder: Path, log=print) -> None:
        self.path = Path(folder) / ".lock"
        self.log = log

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is not None and _alive(pid) and pid != os.getpid():
                    raise NormlabError(f"run folder {self.path.parent} is in use by process {pid}: wait for it "
                                       f"to finish or stop it (or use another --out)") from None
                self.log(f"taking over a stale lock in {self.path.parent} (process {pid} is gone)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise NormlabError(f"could not lock {self.path}: remove the file if no normlab process uses the folder")

    def __exit__(self, *exc) -> None:
        if _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "-1")
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
