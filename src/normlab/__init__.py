"""normlab: from-scratch normalization layers, CIFAR-style ResNets, and studies that compare them.

The Python API (each call leaves torch's thread count and the global random generators as it found them)::

    import normlab
    summary = normlab.train(dataset="fashion-mnist", norm="gn", n=1, epochs=2, out="runs/gn")
    summary["test"]["acc"], summary["run_dir"]
    folder = normlab.study("quick", out="studies/quick", epochs=2)   # preset name or YAML path
    df = normlab.load_study(folder)                                   # pandas: pip install 'normlab[data]'
    run = normlab.load_run(summary["run_dir"])                        # .model (best weights), .config, .summary
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any

from normlab.version import __version__
__all__ = ["__version__", "keyword_message", "load_run", "load_study", "preserved_torch_state", "study", "train"]


@contextlib.contextmanager
def preserved_torch_state():
    """Restore torch's intra-op thread count, the default dtype and every global RNG (torch CPU and CUDA,
    Python's ``random``, NumPy's legacy one) on exit: a library call must not change its caller's process."""
    import random

    import numpy as np
    import torch

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    cpu_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(cpu_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def train(*, force: bool = False, resume: str | Path | None = None, log=None, **settings: Any) -> dict[str, Any]:
    """Train one model; returns its ``summary.json`` as a dict, plus ``run_dir``."""
    from normlab.errors import NormlabError

    if resume is not None and settings:
        raise NormlabError(f"normlab.train(resume=...) takes the run's saved settings; drop {', '.join(settings)}")
    if log is None and settings.get("progress") == "off":
        log = _silent  # off means nothing at all from a library call, the result lines included
    with preserved_torch_state(), _keywords():  # imports inside: some of torch's lazy imports draw from `random`
        from normlab import runfolder
        from normlab.config import make_config
        from normlab.train import loop

        if resume is not None:
            out = loop.train(None, resume_dir=resume, log=log)  # type: ignore[arg-type]
        else:
            out = loop.train(make_config(settings, where="normlab.train()"), force=force, log=log)
    summary = runfolder.read_summary(out) or {}
    return {**summary, "run_dir": str(out)}


def _silent(*_: Any, **__: Any) -> None:
    return None


# how an error message that names a command-line flag reads through the API: `--force` -> force=True
_FLAG = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(:?)(?: ([^\s,;:()`]+))?")
_BOOLEAN_FLAGS = {"force": "force=True", "plan-only": "plan_only=True"}
_NOT_VALUES = {"to", "or", "and", "with", "budget", "of", "does", "is", "for", "as", "in", "needs", "must",
               "takes", "cannot", "can", "only", "from", "the", "a", "an", "when", "if"}


def keyword_message(text: str) -> str:
    """``text`` with every command-line flag written as the API keyword that does the same thing
    (``--force`` -> ``force=True``, ``--data-root PATH`` -> ``data_root=PATH``, ``normlab train --resume RUN`` ->
    ``normlab.train(resume=RUN)``)."""
    text = re.sub(r"`normlab train --resume ([^`]+)`", r"`normlab.train(resume=\1)`", text)

    def keyword(m: re.Match) -> str:
        flag, colon, value = m.group(1), m.group(2), m.group(3)
        rest = f" {value}" if value else ""
        if flag in _BOOLEAN_FLAGS:
            return _BOOLEAN_FLAGS[flag] + colon + rest
        name = flag.replace("-", "_")
        if colon:  # "--resume: ..." names the setting
            return f"{name}:{rest}"
        if value and value not in _NOT_VALUES:
            return f"{name}={value}"
        return f"{name}=...{rest}"

    return _FLAG.sub(keyword, text)


@contextlib.contextmanager
def _keywords():
    """Errors raised inside an API call name keywords, not command-line flags."""
    from normlab.errors import NormlabError

    try:
        yield
    except NormlabError as exc:
        text = keyword_message(str(exc))
        if text == str(exc):
            raise
        exc.args = (text,)  # the same error (its type, exit code and cause): only its wording changes
        raise


def _train_signature() -> inspect.Signature:
    """``normlab.train``'s signature: the API's own keywords, then every ``TrainConfig`` setting with its default."""
    from dataclasses import MISSING, fields

    from normlab.config import TrainConfig

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("force", kw, default=False, annotation=bool),
              inspect.Parameter("resume", kw, default=None, annotation="str | Path | None"),
              inspect.Parameter("log", kw, default=None, annotation="Callable[[str], None] | None")]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        params.append(inspect.Parameter(f.name, kw, default=default, annotation=f.type))
    return inspect.Signature(params, return_annotation="dict[str, Any]")


def _train_doc() -> str:
    from dataclasses import MISSING, fields

    from normlab.config import TrainConfig

    lines = ["Train one model (what ``normlab train`` does) and return its ``summary.json`` as a dict, plus",
             "``run_dir`` (the run folder).", "",
             "force: overwrite an output folder that already holds a run [default: False]",
             "resume: continue the run folder RESUME from its last.pt, with its saved settings (no other setting",
             "    may be given) [default: None]",
             "log: a function called with each line the run reports (default: the console; with progress='off'",
             "    nothing is printed)", "",
             "Every TrainConfig setting is a keyword:", ""]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        choices = f.metadata.get("choices")
        allowed = f" (one of {', '.join(map(str, choices))})" if choices is not None else ""
        lines.append(f"{f.name}: {f.metadata.get('help', '')}{allowed} [default: {default!r}]")
    return "\n".join(lines)


def study(spec: str = "quick", out: str | Path | None = None, *, jobs: int = 1, force: bool = False,
          seeds: int | None = None, norms: list[str] | None = None, classes: list[str] | None = None,
          log=print, **train_settings: Any) -> Path:
    """Run the study ``spec`` (a preset name or a YAML path) with any train setting overridden by keyword;
    returns the study folder (``results.csv``, ``report.html``; ``load_study`` reads it as a DataFrame)."""
    over = {k: v for k, v in {"seeds": seeds, "norms": norms, "gradcam_classes": classes}.items() if v is not None}
    with preserved_torch_state(), _keywords():
        from normlab.study import run_study

        report = run_study(spec, out, study_overrides=over, train_overrides=train_settings, jobs=jobs, force=force,
                           log=log)
    return Path(report).parent


def load_study(study_dir: str | Path):
    """One row per planned run of a study folder (settings it varies, seed, status, train/val/test metrics,
    epochs, time) as a pandas DataFrame."""
    from normlab.studyfolder import load_study as load

    return load(study_dir)


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu"):
    """A trained run in one call: its model with the ``best`` (best val accuracy) or ``last`` weights, in eval
    mode on ``device``, as ``.model``, with ``.config`` (``TrainConfig``), ``.summary`` (``summary.json``, None
    while unfinished), ``.epoch``, ``.classes`` and the input normalization ``.mean``/``.std``; unpacks as
    ``model, config = normlab.load_run(run_dir)``. Nothing is trained and no data is loaded."""
    with preserved_torch_state():  # building a model draws initial weights from the global generator
        from normlab.analysis.evaluate import load_trained

        return load_trained(run_dir, which, device)


class _Entry:
    """An API function that also stands for the subpackage of the same name: ``normlab.train(...)`` calls
    the function, ``normlab.train.loop`` (and ``import normlab.train.loop as m``) reach the subpackage.

    ``help()`` and ``inspect.signature`` see the function: its signature and docstring (generated on first use
    for ``train``, from ``TrainConfig``, without importing torch when normlab is imported)."""

    def __init__(self, fn, subpackage: str, signature=None, doc=None) -> None:
        for name in ("__module__", "__name__", "__qualname__", "__wrapped__"):
            object.__setattr__(self, name, getattr(fn, "__wrapped__", fn) if name == "__wrapped__"
                               else getattr(fn, name))
        self._subpackage, self._signature, self._doc, self._fn = subpackage, signature, doc, fn

    @property
    def __signature__(self) -> inspect.Signature:  # type: ignore[override]
        return self._signature() if self._signature else inspect.signature(self._fn)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._doc() if self._doc else self._fn.__doc__

    def __get__(self, obj, objtype=None):  # a routine to pydoc (help() shows it as a function)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(self._subpackage), name)

    def __repr__(self) -> str:
        return f"<normlab API function {self.__name__} (and package {self._subpackage})>"


class _Package(types.ModuleType):
    """Importing ``normlab/train/`` or ``normlab/study/`` makes the import system set ``normlab.train`` /
    ``normlab.study`` to the subpackage; keep the API entries, which reach the subpackages too."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("train", "study") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_Entry.__name__ = _Entry.__qualname__ = "function"  # help()'s header names the object's type: "function train"
train = _Entry(train, "normlab.train", _train_signature, _train_doc)
study = _Entry(study, "normlab.study")
sys.modules[__name__].__class__ = _Package
