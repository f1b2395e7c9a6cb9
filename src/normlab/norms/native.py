"""``torch_bn``: PyTorch's own BatchNorm2d, the reference the from-scratch layers are tested against."""

from __future__ import annotations

from typing import Any

from torch import nn


def torch_batch_norm(num_channels: int, **kw: Any) -> nn.Module:
    """PyTorch's native ``nn.BatchNorm2d`` (the sanity-check reference and speed baseline)."""
    return nn.BatchNorm2d(num_channels, **kw)


__all__ = ["torch_batch_norm"]
