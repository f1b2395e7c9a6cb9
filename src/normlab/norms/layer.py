"""LayerNorm2d from scratch: per-sample statistics over (C, H, W), per-channel affine; a spec with a fused
override."""

from __future__ import annotations

from normlab.norms._functional import init_affine
from normlab.norms.group import GroupStatsNorm


class LayerNorm2d(GroupStatsNorm):
    """Layer normalization (Ba et al. 2016) for conv maps: one mean/std per sample over (C, H, W).

    The affine is per channel (not per element), so this equals ``nn.GroupNorm(1, C)`` and works for
    any input size. No running statistics; train and eval are the same. The spec takes the engine's moments
    over one group of all channels (``Stats.moments("groups", 1)``); the fused override is
    ``GroupNormFunction`` with G = 1 (see ``GroupStatsNorm``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_channels
        self.eps = eps
        init_affine(self, num_channels, device=device, dtype=dtype)

    def groups(self) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
