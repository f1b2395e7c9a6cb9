"""Weight-standardized convolutions and the normalizer-free 6n+2 ResNet.

* :class:`StdConv2d` -- weight standardization (Qiao et al. 2019): each output filter's weights are
  standardized to zero mean and unit variance over (C_in, k, k) before the convolution. ``--conv ws`` swaps
  every conv of the model for it (:func:`standardize_convs`), with any norm.
* :class:`ScaledStdConv2d` -- the NF-ResNets' scaled WS (Brock et al. 2021): ``Ŵ = g · (W − μ) / (σ·sqrt(fan_in))``
  with a learned per-filter gain ``g`` (ones), so a unit-variance input gives a unit-variance output.
* :class:`NFResNet` (``--model nf``): the 6n+2 CIFAR ResNet with no norm at all. Pre-activation residual blocks
  ``h + α·f(act(h)/β)``, ``β`` the expected standard deviation of ``h`` (its variance grows by α² per block and
  is reset by each transition block, whose 1×1 projection shortcut sees the normalized input), the ReLU scaled
  by γ = sqrt(2 / (1 − 1/π)) so it keeps unit variance, and a final activation before the pooling. Train with
  adaptive gradient clipping (``--agc``, ``normlab.train.agc``) as the paper does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError

RELU_GAMMA = math.sqrt(2 / (1 - 1 / math.pi))  # 1.7139: the std of relu(z) for z ~ N(0, 1) is 1/γ


class StdConv2d(nn.Conv2d):
    """A Conv2d whose weights are standardized per output filter (biased variance, ``eps`` 1e-5) on every call."""

    def __init__(self, *args, eps: float = 1e-5, **kw) -> None:
        super().__init__(*args, **kw)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        return (w - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class ScaledStdConv2d(nn.Conv2d):
    """Scaled weight standardization: ``g · (W − μ) / (sqrt(σ² + ε)·sqrt(fan_in))`` per output filter (``eps`` 1e-6 as
    timm's ``ScaledStdConv2d``, the test reference), learned gain ``g`` per filter."""

    def __init__(self, *args, eps: float = 1e-6, **kw) -> None:
        super().__init__(*args, **kw)
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1, device=self.weight.device,
                                            dtype=self.weight.dtype))

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        return self.gain * (w - mean) * (torch.rsqrt(var + self.eps) / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def standardize_convs(model: nn.Module) -> nn.Module:
    """Swap every plain ``nn.Conv2d`` of ``model`` (in place) for a :class:`StdConv2d` holding the same weights."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Conv2d:
            new = StdConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                            child.dilation, child.groups, child.bias is not None, child.padding_mode,
                            device=child.weight.device, dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            standardize_convs(child)
    return model


class GammaReLU(nn.Module):
    """ReLU scaled by γ = sqrt(2 / (1 − 1/π)): unit variance out for a unit-variance Gaussian in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) * RELU_GAMMA


class NFBlock(nn.Module):
    """``h + α · conv2(act(conv1(act(h) / β)))``; a transition block (stride or width change) takes its
    shortcut as a 1×1 scaled-WS projection of ``act(h) / β``."""

    def __init__(self, cin: int, cout: int, stride: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.act1, self.act2 = GammaReLU(), GammaReLU()
        self.conv1 = ScaledStdConv2d(cin, cout, 3, stride, 1, bias=True)
        self.conv2 = ScaledStdConv2d(cout, cout, 3, 1, 1, bias=True)
        self.shortcut = (ScaledStdConv2d(cin, cout, 1, stride, bias=True)
                         if stride != 1 or cin != cout else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.act1(h) / self.beta
        skip = h if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.act2(self.conv1(out)))
        return skip + self.alpha * out


class NFResNet(nn.Module):
    """The normalizer-free 6n+2 ResNet (see the module docstring); ``alpha`` 0.2 as the paper's."""

    def __init__(self, n: int, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64),
                 alpha: float = 0.2, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise NormlabError(f"NF-ResNet depth n must be an integer >= 1 (6n+2 layers), got {n!r}: use --n 1, 2, 3, ...")
        self.n, self.widths = n, tuple(widths)
        self.stem = nn.Sequential(ScaledStdConv2d(in_channels, widths[0], 3, 1, 1, bias=True))
        stages, cin, var = [], widths[0], 1.0  # the stem's output has unit variance (scaled WS)
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                block = NFBlock(cin, w, stride, alpha, math.sqrt(var))
                blocks.append(block)
                var = (1.0 if block.shortcut is not None else var) + alpha ** 2
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_act = GammaReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.weight)  # as the NF-ResNets: the classifier starts at zero
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def build_nf(cfg, in_channels: int, num_classes: int, norm_kwargs: dict) -> NFResNet:
    """``--model nf``: the normalizer-free ResNet of depth 6n+2 (``--norm`` does not apply)."""
    return NFResNet(cfg.n, num_classes, in_channels=in_channels, dropout=cfg.dropout)
