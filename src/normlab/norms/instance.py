"""InstanceNorm2d from scratch: per-sample, per-channel statistics over (H, W); a spec with a fused override."""

from __future__ import annotations

from normlab.norms._functional import init_affine
from normlab.norms.group import GroupStatsNorm
from normlab.norms.spec import Moments, Stats


class InstanceNorm2d(GroupStatsNorm):
    """Instance normalization (Ulyanov et al. 2016): each (sample, channel) map normalized on its own.

    The same computation in train and eval (no running statistics). Equals
    ``nn.InstanceNorm2d(C, affine=True)`` and ``nn.GroupNorm(C, C)``. The spec takes the engine's
    per-(sample, channel) moments (``Stats.moments("hw")``); the fused override is ``GroupNormFunction`` with
    G = C (see ``GroupStatsNorm``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_channels
        self.eps, self.affine = eps, affine
        init_affine(self, num_channels, affine, device, dtype)

    def groups(self) -> int:
        return self.num_channels

    def moments(self, stats: Stats) -> Moments:
        return stats.moments("hw")

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
