"""InstanceNorm2d from scratch: per-sample, per-channel statistics over (H, W)."""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms._functional import GroupNormFunction, check_input


class InstanceNorm2d(nn.Module):
    """Instance normalization (Ulyanov et al. 2016): each (sample, channel) map normalized on its own.

    The same computation in train and eval (no running statistics). Equals
    ``nn.InstanceNorm2d(C, affine=True)`` and ``nn.GroupNorm(C, C)``.
    """

    def __init__(self, num_channels: int, *, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_channels
        self.eps, self.affine = eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels, type(self).__name__)
        return GroupNormFunction.apply(x, self.weight, self.bias, self.num_channels, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
