"""Switchable Normalization (Luo et al. 2019) as a spec: learned softmax mixes of IN, LN and BN statistics."""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms._functional import init_affine
from normlab.norms.spec import RunningStats, SpecNorm, Stats, positive


class SwitchableNorm2d(RunningStats, SpecNorm):
    """``y = γ·(x − Σ wₖμₖ) / sqrt(Σ w'ₖσ²ₖ + ε) + β`` over k ∈ (IN, LN, BN), ``w = softmax(mean_weight)``,
    ``w' = softmax(var_weight)`` (both start uniform). Biased variances throughout; the BN branch keeps BN's
    running statistics (eval uses them, IN and LN stay per sample) and is synced over ranks with ``sync``.

    Test-time statistics (``normlab robustness``) concern the BN branch alone: re-estimation recomputes its
    running statistics on the corrupted data, the prior-weighted mix replaces them by the mix of running and
    evaluation-batch statistics, and the batch-statistics sweep uses the batch's; the IN and LN branches and
    the learned weights of the three are unchanged.
    """

    batch_stats = True

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1, *, sync: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        positive("SwitchableNorm", "eps", eps)
        self.num_channels = self.num_features = num_channels
        self.eps, self.sync = eps, sync
        init_affine(self, num_channels, device=device, dtype=dtype)
        self.mean_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.init_running(num_channels, momentum, device)

    def coefficients(self, stats: Stats):
        inst, layer = stats.moments("hw"), stats.moments("groups", 1)
        if self.training:
            bn = self.batch_moments(stats)
            self.update_running(bn)
            bn_centre, bn_var = bn.centre, bn.var
        else:
            bn_centre, bn_var = stats.offset(self.running_mean), self.running_var.to(stats.ct).expand(inst.var.shape)
        wm = torch.softmax(self.mean_weight.to(stats.ct), 0)
        wv = torch.softmax(self.var_weight.to(stats.ct), 0)
        centre = wm[0] * inst.centre + wm[1] * layer.centre + wm[2] * bn_centre
        var = wv[0] * inst.var + wv[1] * layer.var + wv[2] * bn_var
        return self.weight * torch.rsqrt(var + self.eps), centre, self.bias

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"
