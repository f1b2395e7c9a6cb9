"""GroupNorm2d from scratch: per-sample statistics over groups of channels; a spec with a fused override."""

from __future__ import annotations

import torch

from normlab.errors import NormlabError
from normlab.norms._functional import GroupNormFunction, check_input, init_affine
from normlab.norms.override import FusedSpecNorm
from normlab.norms.spec import Moments, Stats

DEFAULT_GROUPS = 8  # divides the CIFAR ResNet's 16, 32 and 64 channels (2, 4 and 8 channels per group)


class GroupStatsNorm(FusedSpecNorm):
    """What the norms with per-(sample, group) statistics share (GroupNorm, InstanceNorm, LayerNorm); subclasses
    set ``num_channels``, ``eps``, ``weight``, ``bias`` and ``groups()``.

    The spec: ``y = γ·(x − μ)/sqrt(σ² + ε) + β`` with μ, σ² per (sample, group) from
    ``Stats.moments("groups", G)`` (IN: ``"hw"``). The override (``override = True``, the default; see ``normlab.norms.override``):
    ``GroupNormFunction``, whose ``forward_relu`` also fuses the block's residual add and ReLU."""

    num_channels: int
    eps: float

    def groups(self) -> int:
        raise NotImplementedError

    def check(self, x: torch.Tensor) -> None:
        check_input(x, self.num_channels, type(self).__name__, self.num_channels // self.groups())

    def moments(self, stats: Stats) -> Moments:
        """The statistics per (sample, group of channels)."""
        return stats.moments("groups", self.groups())

    def coefficients(self, stats: Stats):
        m = self.moments(stats)
        a = torch.rsqrt(m.var + self.eps)
        if self.weight is not None:
            a = a * self.weight
        return a, m.centre, self.bias if self.bias is not None else a.new_zeros(())

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return GroupNormFunction.apply(x, self.weight, self.bias, self.groups(), self.eps)

    def fused_forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return GroupNormFunction.apply(x, self.weight, self.bias, self.groups(), self.eps, residual, True)


class GroupNorm2d(GroupStatsNorm):
    """Group normalization (Wu & He 2018): channels split into ``num_groups`` groups, one mean/std per
    (sample, group) over (C/G, H, W), per-channel affine. Equals ``nn.GroupNorm(G, C)``.

    ``num_groups=None`` means 8, which divides 16, 32 and 64 (the ResNet's widths). G = 1 is LayerNorm,
    G = C is InstanceNorm. A ``num_groups`` that does not divide the channel count raises NormlabError.
    """

    def __init__(self, num_channels: int, num_groups: int | None = None, eps: float = 1e-5, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        groups = DEFAULT_GROUPS if num_groups is None else num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise NormlabError(f"GroupNorm: num_groups must be a positive integer, got {groups!r}; "
                               "use --gn-groups 1, 2, 4, 8, ...")
        if num_channels % groups:
            divisors = ", ".join(str(d) for d in range(1, num_channels + 1) if num_channels % d == 0)
            raise NormlabError(f"GroupNorm: {groups} groups do not divide {num_channels} channels; "
                               f"use --gn-groups with a divisor of {num_channels} ({divisors})")
        self.num_channels = self.num_features = num_channels
        self.num_groups, self.eps = groups, eps
        init_affine(self, num_channels, device=device, dtype=dtype)

    def groups(self) -> int:
        return self.num_groups

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"
