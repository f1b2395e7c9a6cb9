"""BatchNorm2d from scratch: batch statistics in training, running statistics in eval."""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms._functional import BatchNormFunction, batch_norm_eval, check_input, fusable_residual


class BatchNorm2d(nn.Module):
    """Batch normalization (Ioffe & Szegedy 2015) over (N, H, W) per channel.

    Drop-in for ``nn.BatchNorm2d``: same parameters (``weight``, ``bias``) and buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``), so state_dicts load either way.
    Running statistics are updated with ``momentum`` (``None`` = cumulative average) and the
    *unbiased* batch variance; eval mode uses them. ``sync=True`` all-reduces the statistics (and
    their gradients) across ranks when torch.distributed runs with more than one process -- a no-op
    otherwise. Training with a single value per channel raises ``NormlabError``.
    """

    def __init__(self, num_channels: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, sync: bool = False) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_channels
        self.eps, self.momentum, self.affine = eps, momentum, affine
        self.track_running_stats, self.sync = track_running_stats, sync
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels))
            self.register_buffer("running_var", torch.ones(num_channels))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels, type(self).__name__)
        return bn_forward(self, x, self.weight, self.bias)

    def forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``relu(self(x) + residual)`` (``relu(self(x))`` without residual), fused into the norm's own
        passes in training; the same result as the three ops, without their three extra sweeps over the
        tensor. Forward hooks on this module are not called (the block that calls this checks for them)."""
        check_input(x, self.num_channels, type(self).__name__)
        if not fusable_residual(x, residual):
            return torch.relu(bn_forward(self, x, self.weight, self.bias) + residual)  # the general case
        return bn_forward(self, x, self.weight, self.bias, residual, relu=True)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, sync={self.sync}")


def bn_forward(m: nn.Module, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """The BN forward shared by BatchNorm2d and BIN's BN branch (``m`` holds buffers and settings);
    ``residual`` (x's shape and dtype) is added to the output and ``relu`` applied, fused in training."""
    tracking = m.track_running_stats and m.running_mean is not None
    if m.training or not tracking:
        update = m.training and tracking
        factor = 0.0
        if update:
            factor = (1.0 / (float(m.num_batches_tracked) + 1.0)) if m.momentum is None else m.momentum
        y = BatchNormFunction.apply(x, weight, bias, m.running_mean if update else None,
                                    m.running_var if update else None, factor, m.eps, m.sync, residual, relu)
        if update:
            m.num_batches_tracked.add_(1)
        return y
    y = batch_norm_eval(x, m.running_mean, m.running_var, weight, bias, m.eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y
