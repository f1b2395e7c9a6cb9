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
import functools
import importlib
import sys
import types
from pathlib import Path
from typing import Any

from normlab.version import __version__
__all__ = ["__version__", "load_run", "load_study", "preserved_torch_state", "study", "train"]


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
    """Train one model with ``TrainConfig`` settings given as keywords (``norm="gn", epochs=5, out=...``),
    or continue the run folder ``resume``. Returns its ``summary.json`` as a dict, plus ``run_dir``."""
    from normlab.errors import NormlabError

    if resume is not None and settings:
        raise NormlabError(f"normlab.train(resume=...) takes the run's saved settings; drop {', '.join(settings)}")
    with preserved_torch_state():  # imports inside: some of torch's lazily imported modules draw from `random`
        from normlab import runfolder
        from normlab.config import make_config
        from normlab.train import loop

        if resume is not None:
            out = loop.train(None, resume_dir=resume, log=log)  # type: ignore[arg-type]
        else:
            out = loop.train(make_config(settings, where="normlab.train()"), force=force, log=log)
    summary = runfolder.read_summary(out) or {}
    return {**summary, "run_dir": str(out)}


def study(spec: str = "quick", out: str | Path | None = None, *, jobs: int = 1, force: bool = False,
          seeds: int | None = None, norms: list[str] | None = None, classes: list[str] | None = None,
          log=print, **train_settings: Any) -> Path:
    """Run the study ``spec`` (a preset name or a YAML path) with any train setting overridden by keyword;
    returns the study folder (``results.csv``, ``report.html``; ``load_study`` reads it as a DataFrame)."""
    over = {k: v for k, v in {"seeds": seeds, "norms": norms, "gradcam_classes": classes}.items() if v is not None}
    with preserved_torch_state():
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
    the function, ``normlab.train.loop`` (and ``import normlab.train.loop as m``) reach the subpackage."""

    def __init__(self, fn, subpackage: str) -> None:
        functools.update_wrapper(self, fn)
        self._subpackage = subpackage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

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


train = _Entry(train, "normlab.train")
study = _Entry(study, "normlab.study")
sys.modules[__name__].__class__ = _Package
