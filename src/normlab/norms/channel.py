"""Per-position channel norms of ConvNeXt-style nets: statistics over the channels at each pixel (tensor ops).

Not of the spec engine's shape (their statistics are per (sample, pixel), not per (sample, channel)), so they
are plain modules on torch ops: every device, autograd's backward, ``torch.compile``. Centred in two passes
(mean, then the mean of squared deviations), so large means cost no precision. Half-precision inputs are
computed in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms._functional import check_input, compute_dtype, init_affine
from normlab.norms.spec import positive


class _PixelNorm(nn.Module):
    def __init__(self, who: str, num_channels: int, eps: float, device, dtype) -> None:
        super().__init__()
        positive(who, "eps", eps, strict=False)
        self.num_channels = self.num_features = num_channels
        self.eps = eps
        init_affine(self, num_channels, device=device, dtype=dtype)

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y * self.weight.view(1, -1, 1, 1).to(y.dtype) + self.bias.view(1, -1, 1, 1).to(y.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class ChannelLayerNorm2d(_PixelNorm):
    """LayerNorm over the channels at each pixel (ConvNeXt's ``LayerNorm2d``; timm's is the test reference):
    ``y = γ·(x − μ) / sqrt(σ² + ε) + β`` with μ, σ² over C per (sample, h, w). ``eps`` 1e-6 as timm/ConvNeXt."""

    def __init__(self, num_channels: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__("ChannelLayerNorm2d", num_channels, eps, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels, type(self).__name__)
        xf = x.to(compute_dtype(x.dtype))
        d = xf - xf.mean(1, keepdim=True)
        return self._out(d * torch.rsqrt((d * d).mean(1, keepdim=True) + self.eps), x)


class ChannelRMSNorm2d(_PixelNorm):
    """RMSNorm over the channels at each pixel (timm's ``RmsNorm2d``, plus a bias): ``y = γ·x / sqrt(mean_C(x²) + ε)
    + β``. ``eps`` 1e-6 as timm."""

    def __init__(self, num_channels: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__("ChannelRMSNorm2d", num_channels, eps, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels, type(self).__name__)
        xf = x.to(compute_dtype(x.dtype))
        return self._out(xf * torch.rsqrt((xf * xf).mean(1, keepdim=True) + self.eps), x)
