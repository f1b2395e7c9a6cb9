"""RMS normalization of conv maps (LayerNorm without centring) as a spec."""

from __future__ import annotations

import torch

from normlab.norms._functional import init_affine
from normlab.norms.spec import SpecNorm, Stats, positive


class RMSNorm2d(SpecNorm):
    """``y = γ·x / sqrt(mean(x²) + ε) + β`` with the mean over (C, H, W) per sample (Zhang & Sennrich 2019's
    RMSNorm applied as LN is to conv maps). No batch statistics; train = eval."""

    def __init__(self, num_channels: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__()
        positive("RMSNorm", "eps", eps, strict=False)
        self.num_channels = self.num_features = num_channels
        self.eps = eps
        init_affine(self, num_channels, device=device, dtype=dtype)

    def coefficients(self, stats: Stats):
        m = stats.moments("groups", 1)
        return self.weight * torch.rsqrt(m.var + m.mean * m.mean + self.eps), None, self.bias

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
