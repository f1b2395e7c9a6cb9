"""BatchNorm2d from scratch: batch statistics in training, running statistics in eval; a spec with a fused override."""

from __future__ import annotations

import torch

from normlab.norms import _functional
from normlab.norms._functional import BatchNormFunction, batch_norm_eval, init_affine
from normlab.norms.override import FusedSpecNorm
from normlab.norms.spec import Moments, Stats


class BatchStatsNorm(FusedSpecNorm):
    """What BN and BIN's BN branch share: the running-statistics buffers and settings, the spec's BN statistics
    (:meth:`bn_moments`: the batch's in training, folded into the running ones; the running ones in eval) and
    the override's :meth:`batch_norm` (the same on ``BatchNormFunction``)."""

    batch_stats = True
    _who, _instead = "BatchNorm", "gn/ln/in"  # the one-line error for a single value per channel names these

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

    def _tracking(self) -> bool:
        return self.track_running_stats and self.running_mean is not None

    def _factor(self) -> float:
        """The running-statistics update's weight: ``momentum``, or with ``momentum=None`` the cumulative
        average's 1/(batches so far + 1) (reads the counter: a host sync, as native's does)."""
        return (1.0 / (float(self.num_batches_tracked) + 1.0)) if self.momentum is None else self.momentum

    # ------------------------------------------------------------------------------------------------ the spec

    def bn_moments(self, stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centre, var)`` of BN: the batch's per-channel statistics (synced with ``sync``; folded into the
        running statistics in training) or, in eval with running statistics, those."""
        if self.training or not self._tracking():
            _functional.batch_values(stats.x, self.sync, self._who, self._instead)
            m = stats.moments("batch")
            if self.training and self._tracking():
                self._update_running(m)
            return m.centre, m.var
        return stats.offset(self.running_mean), self.running_var.to(stats.ct)

    @torch.no_grad()
    def _update_running(self, m: Moments) -> None:
        """nn.BatchNorm2d's update from the batch mean and unbiased batch variance."""
        factor = self._factor()
        count = m.count
        mean, var = m.stat_mean[0], m.stat_var[0] * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype), alpha=factor)
        self.num_batches_tracked.add_(1)

    # ------------------------------------------------------------------------------------------- the override

    def batch_norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        """BN of ``x`` on the hand-fused ``BatchNormFunction`` with this module's statistics and the given
        affine; ``residual`` (x's shape and dtype) is added to the output and ``relu`` applied, fused in
        training."""
        tracking = self._tracking()
        if self.training or not tracking:
            update = self.training and tracking
            factor = self._factor() if update else 0.0
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

    The spec: ``y = γ·(x − μ)/sqrt(σ² + ε) + β`` with the batch moments of the engine
    (``Stats.moments("batch")``) or the running ones. The override (``override = True``, the default; see
    ``normlab.norms.override``): ``BatchNormFunction``, whose ``forward_relu`` also fuses the block's residual add
    and ReLU.
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

    def coefficients(self, stats: Stats):
        centre, var = self.bn_moments(stats)
        a = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            a = a * self.weight
        return a, centre, self.bias if self.bias is not None else a.new_zeros(())

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.batch_norm(x, self.weight, self.bias)

    def fused_forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.batch_norm(x, self.weight, self.bias, residual, relu=True)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, sync={self.sync}")

