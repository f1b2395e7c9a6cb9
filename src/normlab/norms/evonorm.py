"""EvoNorm-B0 and EvoNorm-S0 (Liu et al. 2020): normalization and activation in one layer, as specs.

Both take their statistics from the engine's per-(sample, channel) sums; their output is not an affine of x
(a per-element max or sigmoid), so they override ``output``. Their activation is their own (``has_act``):
normlab's ResNet drops the ReLU after them. ``apply_act=False`` follows timm (the test reference): the layer is
then only its affine, as timm's ``EvoNorm2dB0`` / ``EvoNorm2dS0`` are.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.norms._functional import init_affine
from normlab.norms.group import DEFAULT_GROUPS
from normlab.norms.spec import RunningStats, SpecNorm, Stats, positive


def _nc(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, 1, 1) if t.dim() == 2 else t.view(1, -1, 1, 1)


class _Evo(SpecNorm):
    has_act = True

    def _init(self, who: str, num_channels: int, eps: float, apply_act: bool, device, dtype) -> None:
        positive(who, "eps", eps)
        self.num_channels = self.num_features = num_channels
        self.eps, self.apply_act, self.has_act = eps, bool(apply_act), bool(apply_act)
        init_affine(self, num_channels, device=device, dtype=dtype)
        self.v = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype)) if apply_act else None

    def _affine(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y * _nc(self.weight.to(y.dtype)) + _nc(self.bias.to(y.dtype))
        return y if y.dtype == x.dtype else y.to(x.dtype)


class EvoNormB0(RunningStats, _Evo):
    """EvoNorm-B0: ``y = x / max(sqrt(σ²_batch + ε), v·x + sqrt(σ²_instance + ε)) · γ + β``.

    Batch variance per channel over (N, H, W) in training (synced over ranks with ``sync``), its running value
    (unbiased, ``momentum``) in eval; the instance variance per (sample, channel) over (H, W). ``eps`` 1e-3 as
    in the paper and timm. ``running_mean`` is kept too (as BN's, so state carries over) but not used.

    Test-time statistics (``normlab robustness``): re-estimation recomputes the running variance (and the unused
    mean) on the corrupted data, the prior-weighted mix replaces the running variance by the mix of running and
    evaluation-batch variances, and the batch-statistics sweep uses the batch's variance; the instance variance
    is per sample throughout. With ``apply_act=False`` the layer is an affine that uses no statistics, and
    ``track_running_stats`` is False: there is nothing to re-estimate.
    """

    batch_stats = True

    def __init__(self, num_channels: int, eps: float = 1e-3, momentum: float | None = 0.1, apply_act: bool = True,
                 *, sync: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self._init("EvoNormB0", num_channels, eps, apply_act, device, dtype)
        self.sync = sync
        self.init_running(num_channels, momentum, device)
        self.track_running_stats = self.apply_act  # without its activation the layer uses no statistics

    def output(self, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        xf = x.to(stats.ct)
        if self.v is None:
            return self._affine(xf, x)
        if self.training:
            m = self.batch_moments(stats)
            self.update_running(m)
            var = m.stat_var[0]
        else:
            var = self.running_var.to(stats.ct)
        left = torch.sqrt(var + self.eps).view(1, -1, 1, 1)
        right = xf * _nc(self.v.to(stats.ct)) + _nc(torch.sqrt(stats.moments("hw").var + self.eps))
        return self._affine(xf / torch.maximum(left, right), x)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, apply_act={self.apply_act}, sync={self.sync}"


class EvoNormS0(_Evo):
    """EvoNorm-S0: ``y = x·sigmoid(v·x) / sqrt(σ²_group + ε) · γ + β``, the group variance per (sample, group)
    over (C/G, H, W) (``num_groups``, default 8 as normlab's GN; ``--gn-groups`` sets it). No batch statistics."""

    def __init__(self, num_channels: int, num_groups: int | None = None, eps: float = 1e-5, apply_act: bool = True,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        groups = DEFAULT_GROUPS if num_groups is None else num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or num_channels % groups:
            raise NormlabError(f"EvoNormS0: {groups!r} groups do not divide {num_channels} channels; use --gn-groups "
                               f"with a divisor of {num_channels}")
        self._init("EvoNormS0", num_channels, eps, apply_act, device, dtype)
        self.num_groups = groups

    def output(self, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        xf = x.to(stats.ct)
        if self.v is None:
            return self._affine(xf, x)
        std = torch.sqrt(stats.moments("groups", self.num_groups).var + self.eps)
        return self._affine(xf * torch.sigmoid(xf * _nc(self.v.to(stats.ct))) / _nc(std), x)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, apply_act={self.apply_act}"
