"""Dynamic Tanh (Zhu et al. 2025): a normalization-free replacement for a norm layer, on tensor ops."""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms._functional import check_input, init_affine
from normlab.norms.spec import positive


class DynamicTanh2d(nn.Module):
    """``y = γ·tanh(α·x) + β``: one learned scalar α (``alpha_init``, 0.5 as the paper's default) and a
    per-channel affine; no statistics at all (train = eval, any batch size)."""

    def __init__(self, num_channels: int, alpha_init: float = 0.5, *, device=None, dtype=None) -> None:
        super().__init__()
        positive("DynamicTanh", "alpha_init", alpha_init)
        self.num_channels = self.num_features = num_channels
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init), device=device, dtype=dtype))
        init_affine(self, num_channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels, type(self).__name__)
        y = torch.tanh(self.alpha.to(x.dtype) * x)
        return y * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, alpha_init={float(self.alpha.detach()[0]) if self.alpha.numel() else None}"
