"""What kind of statistics a norm layer uses, asked of the layer itself.

:func:`uses_batch_statistics` is the one module-level answer to "does this layer normalize with statistics over
the batch": in training it normalizes with the batch's statistics and folds them into running estimates, which
eval mode reads (``track_running_stats`` True and ``running_mean`` / ``running_var`` tensors, torch's BatchNorm
convention). It holds for any layer following that convention, torch's, timm's or a norm added later, so the
robustness analysis finds such layers in any model by this property.

The name-level answer, for code that imports no torch (``config``'s settings validation), is
:data:`normlab.norm_table.BATCH_STATISTICS`: the registered norms whose layer, built with its defaults, answers
True here; a test checks the two for every registered norm.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.norm_table import BATCH_STATISTICS


def uses_batch_statistics(layer: nn.Module) -> bool:
    """Whether ``layer`` normalizes with batch statistics in training and keeps running estimates for eval."""
    return (getattr(layer, "track_running_stats", False) is True
            and isinstance(getattr(layer, "running_mean", None), torch.Tensor)
            and isinstance(getattr(layer, "running_var", None), torch.Tensor))


def norm_uses_batch_statistics(name: str) -> bool:
    """The same answer for a registered norm's name (its layer built with the defaults), without building it."""
    return name in BATCH_STATISTICS


__all__ = ["BATCH_STATISTICS", "norm_uses_batch_statistics", "uses_batch_statistics"]
