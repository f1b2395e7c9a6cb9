"""Evaluation passes shared by training (per-epoch validation, the summary) and the analyses (predictions,
confusion matrices from checkpoints): below both, so neither imports the other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.data import DataBundle, normalize
from normlab.device import autocast


def confusion(target: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """``k x k`` confusion counts (rows true, columns predicted) on the inputs' device."""
    return confusion_add_(torch.zeros(k, k, dtype=torch.long, device=target.device), target, pred)


def confusion_add_(cm: torch.Tensor, target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Add the pairs ``(target, pred)`` into the ``k x k`` long tensor ``cm`` in place.

    A scatter-add into a fixed-size tensor, not ``bincount``: on CUDA, bincount reads the largest value back
    to the host to size its output, a synchronisation in every training step."""
    k = cm.shape[0]
    cm.view(-1).index_add_(0, target.long() * k + pred.long(), torch.ones_like(target, dtype=cm.dtype))
    return cm


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums on the device, except where the device has none (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: DataBundle, device: torch.device,
             batch_size: int, precision: str = "fp32", memory_format: torch.memory_format = torch.contiguous_format,
             ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean loss, confusion matrix (rows = true, on the CPU) and predictions (CPU) of ``model`` in eval mode
    on uint8 ``x`` (batches in ``memory_format``, the model's own).

    Sums stay on the device and come back once at the end: one synchronisation per pass, not per batch."""
    model.eval()
    k = data.num_classes
    total = torch.zeros((), dtype=sum_dtype(device), device=device)
    cm = torch.zeros(k, k, dtype=torch.long, device=device)
    preds = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size].to(device, non_blocking=True), data.mean, data.std)
        xb = xb.contiguous(memory_format=memory_format)
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(xb)
        total += F.cross_entropy(logits.float(), yb, reduction="sum").to(total.dtype)
        p = logits.argmax(1)
        confusion_add_(cm, yb, p)
        preds.append(p)
    pred = torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)
    return total.item() / max(1, len(x)), cm.cpu(), pred
