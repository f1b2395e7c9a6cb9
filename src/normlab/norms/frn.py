"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020), as a spec."""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms._functional import init_affine
from normlab.norms.spec import SpecNorm, Stats, positive


class FilterResponseNorm2d(SpecNorm):
    """FRN + TLU: ``y = max(γ·x / sqrt(ν² + ε) + β, τ)`` with ``ν² = mean(x²)`` over (H, W) per (sample, channel).

    No centring and no batch statistics (train = eval). The TLU threshold ``τ`` (zeros) is the layer's own
    activation (``has_act``): normlab's ResNet drops the ReLU after it; ``apply_act=False`` leaves it out (as
    timm's ``FilterResponseNormTlu2d``, its test reference). ``eps`` 1e-6 as in the paper.
    """

    has_act = True

    def __init__(self, num_channels: int, eps: float = 1e-6, apply_act: bool = True, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        positive("FilterResponseNorm", "eps", eps, strict=False)
        self.num_channels = self.num_features = num_channels
        self.eps, self.apply_act, self.has_act = eps, bool(apply_act), bool(apply_act)
        init_affine(self, num_channels, device=device, dtype=dtype)
        self.tau = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype)) if apply_act else None

    def coefficients(self, stats: Stats):
        m = stats.moments("hw")
        nu2 = m.var + m.mean * m.mean  # mean(x²) from the shifted sums
        return self.weight * torch.rsqrt(nu2 + self.eps), None, self.bias

    def output(self, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        y = super().output(x, stats)
        return y if self.tau is None else torch.maximum(y, self.tau.view(1, -1, 1, 1).to(y.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, apply_act={self.apply_act}"
