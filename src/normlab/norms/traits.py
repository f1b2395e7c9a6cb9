"""What kind of statistics a norm layer uses, asked of the layer itself.

:func:`uses_batch_statistics` is the one module-level answer to "does this layer normalize with statistics over
the batch": in training it normalizes with the batch's statistics and folds them into running estimates, which
eval mode reads (``track_running_stats`` True and ``running_mean`` / ``running_var`` tensors, torch's BatchNorm
convention). It holds for any layer following that convention, torch's, timm's or a norm added later, so the
robustness analysis finds such layers in any model by this property.

:func:`norm_uses_batch_statistics` gives the answer for a registered norm's name, from its layer built with the
defaults (``config`` refuses a batch of one with it, the studies' ``batch-statistics`` keyword expands with it).
"""

from __future__ import annotations

import functools

import torch
from torch import nn



def uses_batch_statistics(layer: nn.Module) -> bool:
    """Whether ``layer`` normalizes with batch statistics in training and keeps running estimates for eval."""
    return (getattr(layer, "track_running_stats", False) is True
            and isinstance(getattr(layer, "running_mean", None), torch.Tensor)
            and isinstance(getattr(layer, "running_var", None), torch.Tensor))


@functools.cache
def norm_uses_batch_statistics(name: str) -> bool:
    """The same answer for a registered norm's name: its layer, built with the defaults, asked."""
    from normlab.norms import make_norm

    return uses_batch_statistics(make_norm(name, 16))


__all__ = ["norm_uses_batch_statistics", "uses_batch_statistics"]
