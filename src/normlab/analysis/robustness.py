"""Corruption robustness and test-time statistics of a finished run, from its best weights: nothing is retrained.

``run_robustness(run_dir)`` evaluates the best weights on every corruption × severity of the run's test split
(val when the data set has none; the corrupted images come from ``normlab.data.corruptions``, cached and
shared by every run of a study) and writes ``robustness.json`` (``normlab.runfolder``):

Every pass sees the images in one fixed random order (``seed``), so that batches mix classes even where a
split is stored sorted by class: batch statistics of a one-class batch are not the data's.

* **plain**: the model as saved, eval mode (running statistics from training);
* **adapted**: for norms with batch statistics, the statistics re-estimated on the corrupted images — running
  statistics reset, then a cumulative average (``momentum=None``) over the whole corrupted set in a train-mode
  forward of the norm layers only (dropout and the rest stay in eval mode), without gradients; then eval;
* **mixed**: Schneider et al. (2020)'s prior-weighted statistics at the evaluation batch size: per layer and
  batch, ``N/(N+n)·source + n/(N+n)·batch`` for mean and (unbiased) variance, ``N = prior_n``;
* clean accuracy in eval mode and with batch statistics (the norm layers in train mode) at evaluation batch
  sizes 1, 8, 32 and 128 (on a fixed random subset); a batch whose maps have a single value per channel cannot be normalized with batch
  statistics, and that size is reported as not applicable (None).

Norms with batch statistics are found by a property, not a list of names
(``normlab.norms.traits.uses_batch_statistics``): any module with ``track_running_stats`` True and
``running_mean`` / ``running_var`` tensors. The three evaluations rely on
torch's BatchNorm conventions, which every such norm of the catalogue follows (torch's BatchNorm, normlab's
BN and BIN through ``BatchStatsNorm``, EvoNorm-B0, Switchable Norm, Batch Renorm and Ghost BN through the
spec engine's ``RunningStats``), and a norm added later gets all three by following them too:

* ``reset_running_stats()`` (else the buffers are set to 0 and 1) and ``momentum=None`` as a cumulative
  average over the batches since the reset: full re-estimation;
* train mode normalizes with batch statistics and folds them into the running ones: re-estimation and the
  batch-statistics sweep;
* eval mode reads ``running_mean`` / ``running_var`` at every forward: the mix writes them from a forward
  pre-hook. The batch part of the mix is ``batch_statistics(x)`` where the norm has it (mean and unbiased
  variance per channel as its training step estimates them: GBN's mean over ghost batches), else the mean
  and unbiased variance of the batch over (N, H, W);
* a norm whose training forward corrects the batch statistics towards the running ones (Batch Renorm's r
  and d) has a ``renorm`` attribute, set False on the copy: the running statistics are the ones being
  replaced, so it normalizes as BN does.

What that means per norm: BN, torch's BN and GBN normalize with the re-estimated / mixed statistics (GBN's
batch statistics, in re-estimation and the sweep, are per ghost batch, as in training); BIN and Switchable
Norm in their BN branch only (the IN and LN branches stay per sample); EvoNorm-B0 in its batch variance (the
instance variance stays per sample); Batch Renorm as BN. Every change is made on a copy of the model; the
saved weights are never modified.

``normalize_runs`` turns plain errors into corruption errors against a baseline (``torch_bn``), the mCE and
relative mCE of Hendrycks & Dietterich (``normlab.metrics.corruption_errors``).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab import runfolder
from normlab.errors import NormlabError
from normlab.metrics import corruption_errors
from normlab.norms.traits import uses_batch_statistics

SEVERITIES = (1, 2, 3, 4, 5)
BATCH_SIZES = (1, 8, 32, 128)
PRIOR_N = 16  # Schneider et al.'s prior strength N (in images): the source statistics count as N images
_ONE_VALUE = re.compile(r"(more than 1 value|1 value|single value) per channel", re.I)


# --------------------------------------------------------------------------- which layers have batch statistics


def batch_stat_modules(model: nn.Module) -> list[nn.Module]:
    """The layers that normalize with batch statistics in training and keep running estimates for eval
    (:func:`normlab.norms.traits.uses_batch_statistics`)."""
    return [m for m in model.modules() if uses_batch_statistics(m)]


def has_batch_stats(model: nn.Module) -> bool:
    return bool(batch_stat_modules(model))


def _reset(m: nn.Module) -> None:
    if hasattr(m, "reset_running_stats"):
        m.reset_running_stats()
        return
    m.running_mean.zero_()
    m.running_var.fill_(1)
    if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor):
        m.num_batches_tracked.zero_()


# --------------------------------------------------------------------------- evaluation passes


def _batches(x: torch.Tensor, batch_size: int) -> Iterable[tuple[int, int]]:
    for i in range(0, len(x), batch_size):
        yield i, min(i + batch_size, len(x))


def memory_format(cfg: Any) -> torch.memory_format:
    """The activation layout the run trained in (channels_last: faster on the CPU)."""
    return torch.channels_last if getattr(cfg, "memory_format", "") == "channels_last" else torch.contiguous_format


def _layout(model: nn.Module) -> torch.memory_format:
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    return torch.channels_last if w is not None and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              device: torch.device, batch_size: int) -> torch.Tensor:
    """The model's logits (float32, CPU) on uint8 ``x`` in the model's current mode (not switched here), the
    batches in the model's own layout (its convolution weights')."""
    from normlab.data import normalize

    fmt = _layout(model)
    out = []
    for i, j in _batches(x, batch_size):
        out.append(model(normalize(x[i:j].to(device), mean, std).contiguous(memory_format=fmt)).float())
    return torch.cat(out).cpu() if out else torch.empty(0)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y.to(logits.device)).double().mean()) if len(y) else float("nan")


def _batch_mode(mods: Sequence[nn.Module]) -> list[Any]:
    """Put the layers in train mode with plain batch statistics (``renorm`` off where a norm has it);
    returns what :func:`_restore` needs."""
    saved = []
    for mod in mods:
        saved.append(getattr(mod, "renorm", None))
        if saved[-1] is not None:
            mod.renorm = False
        mod.train()
    return saved


def _restore(mods: Sequence[nn.Module], saved: Sequence[Any]) -> None:
    for mod, renorm in zip(mods, saved):
        if renorm is not None:
            mod.renorm = renorm
        mod.eval()


def _batch_statistics(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (mean, unbiased variance) of ``x`` the norm's training step would use."""
    own = getattr(mod, "batch_statistics", None)
    if callable(own):
        return own(x)
    # the batch's mean and unbiased variance from the native batch-norm kernel (momentum 1 writes them into the
    # scratch buffers): one fused pass, faster than mean() and var() on the CPU
    xf = x.detach().float()
    bmean = torch.zeros(x.shape[1], device=x.device)
    bvar = torch.ones(x.shape[1], device=x.device)
    F.batch_norm(xf, bmean, bvar, training=True, momentum=1.0)
    return bmean, bvar


@torch.no_grad()
def reestimated(model: nn.Module, x: torch.Tensor, mean, std, device: torch.device, batch_size: int) -> nn.Module:
    """A copy of ``model`` whose running statistics are recomputed on ``x`` (full re-estimation), in eval mode."""
    m = copy.deepcopy(model).eval()
    mods = batch_stat_modules(m)
    momenta = [mod.momentum for mod in mods]
    for mod in mods:
        _reset(mod)
        mod.momentum = None  # cumulative average over every batch of x
    saved = _batch_mode(mods)
    from normlab.data import normalize

    fmt = _layout(m)  # the model's own layout: an NCHW batch into a channels_last model is converted per layer
    for i, j in _batches(x, batch_size):
        m(normalize(x[i:j].to(device), mean, std).contiguous(memory_format=fmt))
    _restore(mods, saved)
    for mod, mom in zip(mods, momenta):
        mod.momentum = mom
    return m


class PriorMixed:
    """A copy of the model whose batch-statistics layers normalize each batch with Schneider et al.'s mix
    ``N/(N+n)·source + n/(N+n)·batch`` (n: images in the batch; batch: the norm's own estimate, see
    :func:`_batch_statistics`), through forward pre-hooks that set the copy's running buffers before the layer
    runs in eval mode. Use as a context manager."""

    def __init__(self, model: nn.Module, prior_n: int = PRIOR_N) -> None:
        self.model = copy.deepcopy(model).eval()
        self.prior_n = prior_n
        self.mods = batch_stat_modules(self.model)
        self.source = [(m.running_mean.clone(), m.running_var.clone()) for m in self.mods]
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.mods)]

    def _hook(self, i: int) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.numel() // x.shape[1] < 2:
                raise NormlabError(f"{type(mod).__name__} got 1 value per channel: batch statistics need more")
            bmean, bvar = _batch_statistics(mod, x)
            w = self.prior_n / (self.prior_n + x.shape[0])
            smean, svar = self.source[i]
            mod.running_mean.copy_(w * smean + (1 - w) * bmean.to(smean.dtype))
            mod.running_var.copy_(w * svar + (1 - w) * bvar.to(svar.dtype))
        return hook

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def with_batch_stats(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode but for its batch-statistics layers, which normalize every batch with
    its own statistics (train mode, Batch Renorm's corrections off; their running statistics, updated by the
    copy's forwards, are not read)."""
    m = copy.deepcopy(model).eval()
    _batch_mode(batch_stat_modules(m))
    return m


def batch_stats_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std, device: torch.device,
                         batch_sizes: Sequence[int] = BATCH_SIZES, eval_batch_size: int = 512
                         ) -> dict[str, float | None]:
    """Clean accuracy in eval mode (``"eval"``) and with batch statistics at each evaluation batch size
    (the norm layers in train mode on a copy, Batch Renorm's corrections off; None where a batch has one value
    per channel)."""
    out: dict[str, float | None] = {"eval": accuracy(logits_of(model.eval(), x, mean, std, device, eval_batch_size),
                                                     y)}
    m = with_batch_stats(model)
    for b in batch_sizes:
        try:
            out[str(b)] = accuracy(logits_of(m, x, mean, std, device, b), y)
        except (ValueError, RuntimeError, NormlabError) as exc:
            if not _ONE_VALUE.search(str(exc)):
                raise
            out[str(b)] = None
    return out


# --------------------------------------------------------------------------- the corruptions


def check_severities(severities: Iterable[int]) -> list[int]:
    out = []
    for s in severities:
        try:
            v = int(s)
        except (TypeError, ValueError):
            raise NormlabError(f"severity {s!r} is not a whole number: use severities from 1 to 5, "
                               "e.g. --severities 1,3,5") from None
        if not 1 <= v <= 5 or v != float(s):
            raise NormlabError(f"severity {s} is outside 1–5: use severities from 1 to 5, e.g. --severities 1,3,5")
        if v not in out:
            out.append(v)
    if not out:
        raise NormlabError("no severity given: use severities from 1 to 5, e.g. --severities 1,3,5")
    return sorted(out)


def check_corruptions(names: Iterable[str] | None, data: Any) -> list[str]:
    """The corruptions asked for (default: every corruption that fits the data set's images), each checked."""
    from normlab.data import corruptions as dc

    fitting = list(dc.corruptions_for(tuple(data.train_x.shape)))
    if names is None:
        return fitting
    out = []
    for name in names:
        if name not in dc.CORRUPTIONS:
            close = difflib.get_close_matches(name, list(dc.CORRUPTIONS), n=1)
            raise NormlabError(f"unknown corruption {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f": use one of {', '.join(dc.CORRUPTIONS)}")
        if name not in fitting:
            raise NormlabError(f"corruption {name!r} does not apply to the grey images of {data.name}: "
                               f"use one of {', '.join(fitting)}")
        if name not in out:
            out.append(name)
    return out


def corrupted_images(x: torch.Tensor, name: str, severity: int, seed: int = 0, key: str | None = None) -> torch.Tensor:
    """The corrupted copy of uint8 ``x`` (N×C×H×W) through the corruptions module's on-disk cache, so every
    run of a study on the same images shares one generated set (``key``: ``fingerprint(x)``, computed once)."""
    from normlab.data import corruptions as dc

    return dc.corrupted_set(x, name, severity, seed=seed, key=key)


# --------------------------------------------------------------------------- one run


class _Bar:
    """A rich progress bar on a terminal (``NORMLAB_PROGRESS`` plain/off or no TTY: nothing)."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        mode = os.environ.get("NORMLAB_PROGRESS", "auto")
        self.progress = None
        if enabled and mode in ("auto", "bar") and (mode == "bar" or sys.stderr.isatty()):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[what]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(description, total=total, what="")

    def advance(self, what: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, what=what)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def robustness_settings(corruptions: Sequence[str] | None, severities: Sequence[int], test_time: bool,
                        prior_n: int, batch_sizes: Sequence[int], seed: int,
                        batch_stats_images: int | None = None) -> dict[str, Any]:
    """What a saved result was computed with: a study re-evaluates a run only when these change."""
    return {"corruptions": list(corruptions) if corruptions is not None else None,
            "severities": list(severities), "test_time": bool(test_time), "prior_n": int(prior_n),
            "batch_sizes": list(batch_sizes), "seed": int(seed), "batch_stats_images": batch_stats_images}


def run_robustness(run_dir: str | Path, *, corruptions: Sequence[str] | None = None,
                   severities: Sequence[int] = SEVERITIES, test_time: bool = True, prior_n: int = PRIOR_N,
                   batch_sizes: Sequence[int] = BATCH_SIZES, seed: int = 0, batch_stats_images: int | None = None,
                   device: str = "cpu", progress: bool = True, loaded: Any = None) -> dict[str, Any]:
    """Evaluate the run's best weights on every corruption × severity; write and return ``robustness.json``.

    ``batch_stats_images`` caps the images of the clean batch-statistics sweep (its batch size 1 is one
    forward per image); None: the whole split."""
    from normlab.analysis.galleries import load_run

    severities = check_severities(severities)
    if prior_n < 0:
        raise NormlabError(f"prior N={prior_n} must be >= 0 (0: batch statistics alone)")
    if batch_stats_images is not None and int(batch_stats_images) < 1:
        raise NormlabError(f"--batch-stats-images {batch_stats_images}: must be >= 1 (or left out: the whole split)")
    if any(int(b) < 1 for b in batch_sizes):
        raise NormlabError(f"batch sizes {list(batch_sizes)} must be >= 1")
    run_dir = Path(run_dir)
    settings = robustness_settings(corruptions, severities, test_time, prior_n, batch_sizes, seed, batch_stats_images)
    run = loaded or load_run(run_dir, device)
    data, cfg, dev = run.data, run.cfg, run.device
    model = run.model.eval().to(memory_format=memory_format(cfg))  # layout only: the weights' values stay
    names = check_corruptions(corruptions, data)
    split = "test" if data.test_x is not None else "val"
    x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
    bs = cfg.eval_batch_size
    t0 = time.perf_counter()
    from normlab.data.corruptions import fingerprint

    key = fingerprint(x)  # of the split as stored: the cached corrupted sets are shared by every run
    # one fixed shuffle for every pass: splits may be stored sorted by class (image folders), and batch
    # statistics of a one-class batch are not the data's (the plain accuracy does not depend on the order)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    adapt = test_time and has_batch_stats(model)
    clean_logits = logits_of(model, x, data.mean, data.std, dev, bs)
    result: dict[str, Any] = {
        "settings": settings, "split": split, "images": len(x), "corruptions": names, "severities": severities,
        "checkpoint": run.checkpoint.name, "norm": cfg.norm, "eval_batch_size": bs,
        "batch_statistics": has_batch_stats(model), "prior_n": prior_n,
        "clean": {"acc": accuracy(clean_logits, y)},
        "accuracy": {}, "adapted": {} if adapt else None, "mixed": {} if adapt else None,
    }
    bar = _Bar(len(names) * len(severities), f"robustness {run_dir.name}", progress)
    try:
        for name in names:
            for s in severities:
                xc = corrupted_images(getattr(data, f"{split}_x"), name, s, seed, key)[order]
                result["accuracy"].setdefault(name, {})[str(s)] = accuracy(
                    logits_of(model, xc, data.mean, data.std, dev, bs), y)
                if adapt:
                    m = reestimated(model, xc, data.mean, data.std, dev, bs)
                    result["adapted"].setdefault(name, {})[str(s)] = accuracy(
                        logits_of(m, xc, data.mean, data.std, dev, bs), y)
                    del m
                    with PriorMixed(model, prior_n) as mm:
                        result["mixed"].setdefault(name, {})[str(s)] = accuracy(
                            logits_of(mm, xc, data.mean, data.std, dev, bs), y)
                bar.advance(f"{name} {s}")
    finally:
        bar.stop()
    if test_time:
        k = len(x) if batch_stats_images is None else min(len(x), int(batch_stats_images))
        result["batch_stats_images"] = k
        result["batch_stats_clean"] = (batch_stats_accuracy(model, x[:k], y[:k], data.mean, data.std, dev, batch_sizes,
                                                            bs) if has_batch_stats(model) else None)
    result["seconds"] = time.perf_counter() - t0
    runfolder.write_robustness(run_dir, result)
    return result


# --------------------------------------------------------------------------- corruption errors against a baseline


def errors_of(result: dict[str, Any], key: str = "accuracy") -> dict[str, dict[int, float]]:
    return {c: {int(s): 1.0 - a for s, a in sev.items() if a is not None} for c, sev in (result.get(key) or {}).items()}


def mean_errors(results: Sequence[dict[str, Any]], key: str = "accuracy") -> tuple[dict[str, dict[int, float]], float]:
    """Errors per corruption × severity and clean error, averaged over several runs (a baseline's seeds)."""
    tables = [errors_of(r, key) for r in results]
    out: dict[str, dict[int, float]] = {}
    for c in tables[0] if tables else {}:
        for s in tables[0][c]:
            vals = [t[c][s] for t in tables if s in t.get(c, {})]
            out.setdefault(c, {})[s] = sum(vals) / len(vals)
    clean = [1.0 - r["clean"]["acc"] for r in results]
    return out, (sum(clean) / len(clean) if clean else float("nan"))


def normalized(result: dict[str, Any], baseline: Sequence[dict[str, Any]], label: str) -> dict[str, Any]:
    """CE per corruption, mCE and relative mCE of ``result`` against the baseline runs (plain errors), and
    the mCE of its adapted / mixed evaluations against the same baseline."""
    base, base_clean = mean_errors(baseline)
    clean = 1.0 - result["clean"]["acc"]
    plain = corruption_errors(errors_of(result), base, clean, base_clean)
    out = {"baseline": label, "baseline_runs": len(baseline), "ce": plain["ce"], "mce": plain["mce"],
           "relative_ce": plain["relative_ce"], "relative_mce": plain["relative_mce"]}
    for key in ("adapted", "mixed"):
        if result.get(key):
            out[f"mce_{key}"] = corruption_errors(errors_of(result, key), base)["mce"]
    return out


def normalize_runs(results: dict[str, dict[str, Any]], baseline_names: Sequence[str], label: str = "torch_bn"
                   ) -> dict[str, dict[str, Any]]:
    """Add ``normalized`` to every result (``{name: robustness.json contents}``) against the baseline runs; the
    results without a baseline get none. Returns the updated results (nothing is written here)."""
    base = [results[n] for n in baseline_names if (results.get(n) or {}).get("accuracy")]
    out = {}
    for name, res in results.items():
        res = dict(res)
        if base and res.get("accuracy"):
            res["normalized"] = normalized(res, base, label)
        else:
            res.pop("normalized", None)
        out[name] = res
    return out
