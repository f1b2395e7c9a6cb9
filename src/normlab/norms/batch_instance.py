"""Batch-Instance Normalization (Nam & Kim 2018): a learned per-channel mix of BN and IN; a spec with a fused
override."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from normlab.norms._bin import BatchInstanceFunction
from normlab.norms.batch import BatchStatsNorm
from normlab.norms.spec import Stats


class BatchInstanceNorm2d(BatchStatsNorm):
    """y = (ρ·x̂_BN + (1−ρ)·x̂_IN)·γ + β with a per-channel gate ρ ∈ [0, 1] (parameter ``rho``).

    * ``rho`` starts at 1 (pure BN). It is kept in [0, 1] two ways, as in the paper's code: the
      forward uses ``rho`` clamped to [0, 1] with a straight-through gradient (so the layer never sees
      an out-of-range gate, yet a gate at a bound still gets a gradient), and after every optimizer step
      the stored values are clipped back into range (so the gate cannot drift far outside [0, 1], where
      clamp's zero gradient would freeze it): normlab's training step (``normlab.train.step.TrainStep``)
      does that itself for the gates it found once; in your own loop, call :func:`normlab.norms.clamp_gates_`.
    * The BN branch keeps ``running_mean`` / ``running_var`` / ``num_batches_tracked`` (updated as in
      ``nn.BatchNorm2d``) and uses them in eval; the IN branch always uses per-sample statistics.
    * ``sync=True`` synchronizes the BN branch's statistics across ranks (no-op when not distributed).

    The spec (``coefficients``): IN's moments (``Stats.moments("hw")``) and BN's (``"batch"``, or the running
    ones), the gate clamped with a straight-through gradient, written as one per-(sample, channel) affine
    centred on IN's mean, BN's offset from it folded into the shift (exact for large means).

    The override (``override = True``, the default; see ``normlab.norms.override``): one autograd Function (``_bin``)
    that computes both branches' statistics from the same per-(sample, channel) sums and writes the output as
    one per-(sample, channel) affine -- the sweeps over the input of one BN, forward and backward -- on the
    Triton kernels (CUDA), the C++ kernels (the CPU tensors they take: float32/float64/bfloat16, NCHW or
    channels_last, with the small per-(sample, channel) math in C too) or tensor ops otherwise.
    """

    _who, _instead = "BatchInstanceNorm", "in/gn"

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1, *,
                 sync: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_channels, eps=eps, momentum=momentum, track_running_stats=True, sync=sync,
                         device=device)
        f = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **f))
        self.bias = nn.Parameter(torch.zeros(num_channels, **f))
        self.rho = nn.Parameter(torch.ones(num_channels, **f))
        if dtype is not None:
            self.running_mean, self.running_var = self.running_mean.to(dtype), self.running_var.to(dtype)

    def coefficients(self, stats: Stats):
        ct = stats.ct
        bn_centre, bn_var = self.bn_moments(stats)
        inst = stats.moments("hw")
        rho = self.rho.to(ct)
        r = rho + (rho.detach().clamp(0, 1) - rho.detach())  # clamped, with a straight-through gradient
        w = self.weight.to(ct)
        a_bn = r * w * torch.rsqrt(bn_var + self.eps)
        a_in = (1 - r) * w * torch.rsqrt(inst.var + self.eps)
        # a_bn·(x − μ_BN) + a_in·(x − μ_IN) + β = (a_bn + a_in)·(x − μ_IN) + β − a_bn·(μ_BN − μ_IN)
        return a_bn + a_in, inst.centre, self.bias - a_bn * (bn_centre - inst.centre)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``BatchInstanceFunction`` with this module's statistics: batch statistics in training (running ones
        updated as ``BatchStatsNorm.batch_norm`` does), running ones in eval; it clamps ``rho`` itself."""
        tracking = self._tracking()
        batch = self.training or not tracking
        update = self.training and tracking
        factor = self._factor() if update else 0.0
        stats = update or not batch
        y = BatchInstanceFunction.apply(x, self.weight, self.bias, self.rho,
                                        self.running_mean if stats else None, self.running_var if stats else None,
                                        factor, self.eps, self.sync, batch)
        if update:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"


_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its BIN gates, found once


@torch.no_grad()
def clamp_gates_(module: nn.Module, *, refresh: bool = False) -> nn.Module:
    """Clamp every BatchInstanceNorm2d gate ``rho`` in ``module`` into [0, 1], in place; returns ``module``.

    Call it after each optimizer step of your own training loop (works through DDP / torch.compile wrappers;
    normlab's ``TrainStep`` clamps its gates itself). The gates are found by one walk over the modules on the
    first call and remembered, so calling it every step is cheap; pass ``refresh=True`` after adding or
    replacing BIN layers in ``module``. No gates: nothing runs at all.
    """
    gates = None if refresh else _GATES.get(module)
    if gates is None:
        gates = _GATES[module] = [m.rho for m in module.modules() if isinstance(m, BatchInstanceNorm2d)]
    for rho in gates:
        rho.clamp_(0, 1)
    return module
