"""The one norm+activation layer: a norm, then an optional drop layer, then an activation.

It is what timm's norm+activation layers (``BatchNormAct2d``, ``GroupNormAct``, ...) compute, for any norm:
``norm_layer(name)`` builds it when a timm model asks for a norm+activation layer, and
``models.replace_norms`` builds it when it swaps one of timm's own. The activation is always the one the model
asked for (timm hands it over with every call), never one bound in advance.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

# what timm hands a norm+activation layer beyond a norm's own settings
NORM_ACT_KWARGS = ("apply_act", "act_layer", "act_kwargs", "inplace", "drop_layer")


class NormAct2d(nn.Module):
    """``act(drop(norm(x)))``. Parameters live under ``norm.`` (and ``act.`` for an activation with parameters).

    ``weight`` and ``bias`` are the norm's: model code reaches for them as it would on timm's norm+act layers
    (e.g. RegNet's ``zero_init_last``: ``nn.init.zeros_(block.conv3.bn.weight)``)."""

    def __init__(self, norm: nn.Module, act: nn.Module | None = None, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def __getattr__(self, name: str) -> Any:
        if name in ("weight", "bias", "num_features", "num_channels"):  # the norm's (its own error if it has none)
            return getattr(self._modules["norm"], name)
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def make_activation(act_layer: Any, act_kwargs: dict | None = None, inplace: bool = False) -> nn.Module:
    """The activation a norm+activation layer was asked for, built the way timm's own layers build it (timm's
    ``create_act_layer`` when timm is loaded: the same layer from a type or a name such as ``"swish"``)."""
    if act_layer is None:
        return nn.Identity()
    kw = dict(act_kwargs or {})
    if "timm" in sys.modules or isinstance(act_layer, str):  # a string only comes from timm
        from timm.layers import create_act_layer

        act = create_act_layer(act_layer, inplace=inplace, **kw)
        return nn.Identity() if act is None else act
    try:
        return act_layer(inplace=inplace, **kw)
    except TypeError:  # activations without an inplace option (GELU, Tanh, ...)
        return act_layer(**kw)


__all__ = ["NORM_ACT_KWARGS", "NormAct2d", "make_activation"]
