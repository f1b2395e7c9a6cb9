"""Classification metrics as pure functions of tensors (torchmetrics underneath).

Accuracy here is plain top-1 accuracy (torchmetrics' ``MulticlassAccuracy`` averages per class
unless told ``average="micro"``); in single-label classification it equals micro-F1.
"""

from __future__ import annotations

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
