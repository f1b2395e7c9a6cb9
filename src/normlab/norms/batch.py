"""BatchNorm2d from scratch: batch statistics in training, running statistics in eval."""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms._functional import BatchNormFunction, batch_norm_eval, check_input, fusable_residual, init_affine
from normlab.norms._hooks import HookWatched


class BatchStatsNorm(HookWatched, nn.Module):
    """What BN and BIN's BN branch share: the running-statistics buffers and settings, and
    :meth:`batch_norm` (batch statistics in training, running statistics in eval)."""

    def __init__(self, num_channels: int, *, eps: float, momentum: float | None, track_running_stats: bool,
                 sync: bool, device=None) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_channels
        self.eps, self.momentum, self.sync = eps, momentum, sync
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels, device=device))
            self.register_buffer("running_var", torch.ones(num_channels, device=device))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def batch_norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        """BN of ``x`` with this module's statistics and the given affine; ``residual`` (x's shape and dtype)
        is added to the output and ``relu`` applied, fused in training."""
        tracking = self.track_running_stats and self.running_mean is not None
        if self.training or not tracking:
            update = self.training and tracking
            factor = 0.0
            if update:  # momentum None: cumulative average (reads the counter: a host sync, as native's does)
                factor = (1.0 / (float(self.num_batches_tracked) + 1.0)) if self.momentum is None else self.momentum
            y = BatchNormFunction.apply(x, weight, bias, self.running_mean if update else None,
                                        self.running_var if update else None, factor, self.eps, self.sync,
                                        residual, relu)
            if update:
                self.num_batches_tracked.add_(1)
            return y
        y = batch_norm_eval(x, self.running_mean, self.running_var, weight, bias, self.eps)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y


class BatchNorm2d(BatchStatsNorm):
    """Batch normalization (Ioffe & Szegedy 2015) over (N, H, W) per channel.

    Drop-in for ``nn.BatchNorm2d``: same parameters (``weight``, ``bias``) and buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``), so state_dicts load either way, and the
    same ``device``/``dtype`` factory keywords. Running statistics are updated with ``momentum`` (``None`` =
    cumulative average) and the *unbiased* batch variance; eval mode uses them. ``sync=True`` all-reduces
    the statistics (and their gradients) across ranks when torch.distributed runs with more than one
    process -- a no-op otherwise. Training with a single value per channel raises ``NormlabError``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, sync: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, eps=eps, momentum=momentum, track_running_stats=track_running_stats,
                         sync=sync, device=device)
        self.affine = affine
        init_affine(self, num_channels, affine, device, dtype)
        if dtype is not None and track_running_stats:
            self.running_mean, self.running_var = self.running_mean.to(dtype), self.running_var.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels, type(self).__name__)
        return self.batch_norm(x, self.weight, self.bias)

    def forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``relu(self(x) + residual)`` (``relu(self(x))`` without residual), fused into the norm's own
        passes in training; the same result as the three ops, without their three extra sweeps over the
        tensor. Forward hooks on this module are not called (the block that calls this checks for them)."""
        check_input(x, self.num_channels, type(self).__name__)
        if not fusable_residual(x, residual):
            return torch.relu(self.batch_norm(x, self.weight, self.bias) + residual)  # the general case
        return self.batch_norm(x, self.weight, self.bias, residual, relu=True)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, sync={self.sync}")
