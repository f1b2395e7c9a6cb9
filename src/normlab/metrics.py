"""Classification metrics as pure functions of tensors (torchmetrics underneath).

Accuracy here is plain top-1 accuracy (torchmetrics' ``MulticlassAccuracy`` averages per class
unless told ``average="micro"``); in single-label classification it equals micro-F1.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def scores_from_confusion(cm: torch.Tensor) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1 from a confusion matrix (rows true, columns predicted).

    The confusion matrix is expanded back into (pred, target) pairs so torchmetrics computes the
    scores, with no hand-written F1.
    """
    cm = cm.detach().to("cpu", torch.long)
    k = cm.shape[0]
    idx = torch.arange(k * k)
    counts = cm.flatten()
    target = (idx // k).repeat_interleave(counts)
    preds = (idx % k).repeat_interleave(counts)
    if target.numel() == 0:
        return {"acc": float("nan"), "micro_f1": float("nan"), "macro_f1": float("nan")}
    return {
        "acc": multiclass_accuracy(preds, target, num_classes=k, average="micro").item(),
        "micro_f1": multiclass_f1_score(preds, target, num_classes=k, average="micro").item(),
        "macro_f1": multiclass_f1_score(preds, target, num_classes=k, average="macro").item(),
    }


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    cm = cm.to(torch.float64)
    return cm.diagonal() / cm.sum(1).clamp_min(1)


def most_confused_pairs(cm: torch.Tensor, k: int = 5) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first."""
    off = cm.clone().to(torch.long)
    off.fill_diagonal_(0)
    values, flat = off.flatten().topk(min(k, off.numel()))
    n = cm.shape[0]
    return [(int(i) // n, int(i) % n, int(v)) for v, i in zip(values, flat) if v > 0]


def quantiles(x: torch.Tensor, qs: tuple[float, ...] = (0.01, 0.2, 0.8, 0.99), max_values: int = 2**22) -> list[float]:
    """Quantiles of all values of ``x`` (a strided subsample if it is huge: torch.quantile has a size cap)."""
    flat = x.detach().float().flatten()
    if flat.numel() > max_values:
        flat = flat[:: flat.numel() // max_values + 1]
    return torch.quantile(flat, torch.tensor(qs, dtype=flat.dtype, device=flat.device)).tolist()


# ----------------------------------------------------------------------------------------- robustness


def corruption_errors(errors: dict[str, dict[int, float]], baseline: dict[str, dict[int, float]] | None = None,
                      clean_error: float | None = None, baseline_clean_error: float | None = None
                      ) -> dict[str, Any]:
    """Hendrycks & Dietterich's corruption errors from top-1 errors ``errors[corruption][severity]``.

    Without a baseline: the mean error per corruption and over all of them. With ``baseline`` (the same
    corruptions and severities, e.g. the ``torch_bn`` model's errors), per corruption ``c``:

    * ``CE_c = Σ_s E_{s,c} / Σ_s E^base_{s,c}`` and ``mCE`` = mean of ``CE_c`` over corruptions;
    * relative ``CE_c = Σ_s (E_{s,c} − E_clean) / Σ_s (E^base_{s,c} − E^base_clean)``, relative ``mCE`` their
      mean (needs both clean errors): how much *more* a model degrades than the baseline.

    Only the severities both sides have count; a zero denominator gives NaN (never a division error).
    """
    nan = float("nan")
    mean_error = {c: sum(s.values()) / len(s) for c, s in errors.items() if s}
    out: dict[str, Any] = {"mean_error": mean_error,
                           "mean_corruption_error": (sum(mean_error.values()) / len(mean_error)) if mean_error else nan}
    if baseline is None:
        return out
    ce, rel = {}, {}
    for c, sev in errors.items():
        base = baseline.get(c) or {}
        shared = [s for s in sev if s in base]
        if not shared:
            continue
        num, den = sum(sev[s] for s in shared), sum(base[s] for s in shared)
        ce[c] = num / den if den else nan
        if clean_error is not None and baseline_clean_error is not None:
            rn = sum(sev[s] - clean_error for s in shared)
            rd = sum(base[s] - baseline_clean_error for s in shared)
            rel[c] = rn / rd if rd else nan
    out["ce"], out["mce"] = ce, (sum(ce.values()) / len(ce)) if ce else nan
    out["relative_ce"] = rel
    out["relative_mce"] = (sum(rel.values()) / len(rel)) if rel else nan
    return out


# ----------------------------------------------------------------------------------------- calibration


def calibration_metrics(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error (``n_bins`` equal-width confidence bins, torchmetrics' L1
    ``MulticlassCalibrationError``), negative log-likelihood, Brier score (Σ over classes of the squared
    difference to the one-hot label, mean over images) and the reliability diagram's bins
    (``confidence``, ``accuracy``, ``count`` per bin; a confidence of exactly 1 falls in the last bin).

    ``probs``: ``N × K`` probabilities (rows sum to 1), ``target``: ``N`` class indices."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = probs.detach().to("cpu", torch.float64)
    target = target.detach().to("cpu", torch.long)
    n, k = probs.shape
    if n == 0:
        nan = float("nan")
        return {"ece": nan, "nll": nan, "brier": nan, "images": 0,
                "bins": {"confidence": [], "accuracy": [], "count": []}}
    ece = multiclass_calibration_error(probs, target, num_classes=k, n_bins=n_bins, norm="l1").item()
    nll = -probs.gather(1, target[:, None]).clamp_min(1e-12).log().mean().item()
    brier = (probs - torch.nn.functional.one_hot(target, k).to(probs.dtype)).square().sum(1).mean().item()
    conf, pred = probs.max(1)
    right = (pred == target).to(torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    csum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    asum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, right)
    div = count.clamp_min(1)
    return {"ece": ece, "nll": nll, "brier": brier, "images": n, "acc": right.mean().item(),
            "bins": {"confidence": (csum / div).tolist(), "accuracy": (asum / div).tolist(),
                     "count": [int(c) for c in count.tolist()]}}


def ece_from_confidence(confidence: Any, correct: Any, n_bins: int = 15) -> float:
    """The L1 expected calibration error from per-image top-1 confidence and correctness (numpy arrays),
    binned as torchmetrics bins (equal widths, right-closed; a confidence of exactly 1 on its own): fast
    enough to bootstrap."""
    import numpy as np

    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return float("nan")
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.searchsorted(edges, conf, side="right") - 1
    gaps = np.bincount(idx, weights=right - conf, minlength=n_bins + 1)
    return float(np.abs(gaps).sum() / conf.size)
