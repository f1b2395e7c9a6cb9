"""From-scratch normalization layers (BN, IN, BIN, LN, GN) and the name -> factory registry.

Every layer takes the channel count first and torch's ``device``/``dtype`` factory keywords
(``Layer(num_channels, eps=..., *, device=None, dtype=None)``), so ``norm_layer(name, **kw)`` can be handed to
normlab's ResNet, to torchvision's models and to ``timm.create_model(..., norm_layer=...)`` (for timm models
built from norm+activation layers, name the activation: ``norm_layer("gn", act_layer=nn.SiLU)``).

| name | layer |
|---|---|
| ``bn`` | :class:`BatchNorm2d` (``sync`` supported) |
| ``in`` | :class:`InstanceNorm2d` |
| ``bin`` | :class:`BatchInstanceNorm2d` (``sync`` supported; call :func:`clamp_gates_`) |
| ``ln`` | :class:`LayerNorm2d` |
| ``gn`` | :class:`GroupNorm2d` (``num_groups``, default 8) |
| ``nn`` | no normalization (``nn.Identity``) |
| ``torch_bn`` | PyTorch's native ``nn.BatchNorm2d`` (reference / speed baseline) |
| ``frn`` | :class:`FilterResponseNorm2d` with TLU (contains its activation) |
| ``evonorm_b0`` | :class:`EvoNormB0` (batch variance; ``sync``; contains its activation) |
| ``evonorm_s0`` | :class:`EvoNormS0` (``num_groups``; contains its activation) |
| ``sn`` | :class:`SwitchableNorm2d` (IN/LN/BN mix; ``sync``) |
| ``brn`` | :class:`BatchRenorm2d` (``r_max``, ``d_max``, ``warmup``; ``sync``) |
| ``gbn`` | :class:`GhostBatchNorm2d` (``virtual_batch``) |
| ``rms`` | :class:`RMSNorm2d` (per sample over (C, H, W), no centring) |
| ``ln2d`` | :class:`ChannelLayerNorm2d` (over channels at each pixel, ConvNeXt-style) |
| ``rms2d`` | :class:`ChannelRMSNorm2d` (RMS over channels at each pixel) |
| ``dyt`` | :class:`DynamicTanh2d` (``γ·tanh(α·x) + β``, no statistics) |

The catalogue norms of the shared shape (frn, evonorm_*, sn, brn, gbn, rms) are specs on the engine of
``normlab.norms.spec``. Norms whose class sets ``has_act`` contain their activation: :func:`norm_layer` hands
them timm's ``apply_act`` instead of wrapping them in another activation, and normlab's ResNet drops the ReLU
that follows them.

The common trainer keywords ``num_groups``, ``sync`` and ``virtual_batch`` are dropped silently by norms they
do not apply to, so ``norm_layer(any_name, num_groups=g, sync=s)`` always works.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.errors import NormlabError
from normlab.norms.batch import BatchNorm2d
from normlab.norms.batch_instance import BatchInstanceNorm2d, clamp_gates_
from normlab.norms.batch_renorm import BatchRenorm2d
from normlab.norms.channel import ChannelLayerNorm2d, ChannelRMSNorm2d
from normlab.norms.dyt import DynamicTanh2d
from normlab.norms.evonorm import EvoNormB0, EvoNormS0
from normlab.norms.frn import FilterResponseNorm2d
from normlab.norms.ghost import GhostBatchNorm2d
from normlab.norms.group import DEFAULT_GROUPS, GroupNorm2d
from normlab.norms.instance import InstanceNorm2d
from normlab.norms.layer import LayerNorm2d
from normlab.norms.rms import RMSNorm2d
from normlab.norms.switchable import SwitchableNorm2d


def _no_norm(num_channels: int, **_: Any) -> nn.Module:
    """"nn": no normalization (accepts and ignores the channel count and any settings)."""
    return nn.Identity()


def _torch_bn(num_channels: int, **kw: Any) -> nn.Module:
    """"torch_bn": PyTorch's native BatchNorm2d, the reference the from-scratch layers are tested against."""
    return nn.BatchNorm2d(num_channels, **kw)


NORMS: dict[str, Callable[..., nn.Module]] = {
    "bn": BatchNorm2d,
    "in": InstanceNorm2d,
    "bin": BatchInstanceNorm2d,
    "ln": LayerNorm2d,
    "gn": GroupNorm2d,
    "nn": _no_norm,
    "torch_bn": _torch_bn,
    "frn": FilterResponseNorm2d,
    "evonorm_b0": EvoNormB0,
    "evonorm_s0": EvoNormS0,
    "sn": SwitchableNorm2d,
    "brn": BatchRenorm2d,
    "gbn": GhostBatchNorm2d,
    "rms": RMSNorm2d,
    "ln2d": ChannelLayerNorm2d,
    "rms2d": ChannelRMSNorm2d,
    "dyt": DynamicTanh2d,
}

# keyword -> the norms it applies to; other norms drop it silently
_OPTIONAL_KWARGS: dict[str, tuple[str, ...]] = {
    "num_groups": ("gn", "evonorm_s0"),
    "sync": ("bn", "bin", "evonorm_b0", "sn", "brn"),
    "virtual_batch": ("gbn",),
}


def has_act(name: str) -> bool:
    """Whether the norm ``name`` contains its own activation (FRN's TLU, EvoNorm's)."""
    return bool(getattr(NORMS.get(name), "has_act", False))


def _check_name(name: str) -> None:
    if name not in NORMS:
        close = difflib.get_close_matches(str(name), list(NORMS), n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NormlabError(f"unknown norm {name!r}: {hint}choose one of {', '.join(NORMS)}")


def make_norm(name: str, num_channels: int, **kw: Any) -> nn.Module:
    """Build the norm ``name`` for ``num_channels`` channels; ``num_groups``/``sync`` are dropped where
    they do not apply, other keywords go to the layer's constructor."""
    _check_name(name)
    kw = {k: v for k, v in kw.items() if k not in _OPTIONAL_KWARGS or name in _OPTIONAL_KWARGS[k]}
    return NORMS[name](num_channels, **kw)


# what timm hands a norm+activation layer (BatchNormAct2d & co.) beyond a norm's own settings
_NORM_ACT_KWARGS = ("apply_act", "act_layer", "act_kwargs", "inplace", "drop_layer")


class NormAct2d(nn.Sequential):
    """A norm followed by an activation (and optionally a drop layer): what timm's norm+activation layers
    (``BatchNormAct2d``, ...) are, for any normlab norm. Parameters live under ``norm.``."""

    def __init__(self, norm: nn.Module, act: nn.Module, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act

    # timm's norm+act layers are norms themselves; model code reaches for their affine (e.g. RegNet's
    # zero_init_last: nn.init.zeros_(block.conv3.bn.weight))
    @property
    def weight(self):
        return self.norm.weight

    @property
    def bias(self):
        return self.norm.bias


def _activation(act_layer: Any, act_kwargs: dict | None, inplace: bool) -> nn.Module:
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, str):
        from timm.layers import get_act_layer  # a string only comes from timm

        act_layer = get_act_layer(act_layer)
    kw = dict(act_kwargs or {})
    try:
        return act_layer(inplace=inplace, **kw)
    except TypeError:  # activations without an inplace option (GELU, Tanh, ...)
        return act_layer(**kw)


def norm_layer(name: str, **kw: Any) -> Callable[..., nn.Module]:
    """A factory ``(num_channels, *, device=None, dtype=None) -> module`` for normlab's ResNet, for
    ``torchvision.models.*(norm_layer=...)`` and for ``timm.create_model(..., norm_layer=...)``.

    It is a plain function with the settings bound inside it, because timm's ``get_norm_layer`` keeps only a
    ``functools.partial``'s keywords and passes functions through untouched. The name is checked now, so a
    typo fails before any model is built.

    timm's EfficientNet, RegNet, ... build norm+activation layers (``BatchNormAct2d``) and call the factory with
    ``apply_act``/``inplace`` but without saying which activation (timm looks it up only for its own norm
    classes): give it with ``act_layer=`` (e.g. ``norm_layer("gn", act_layer=nn.SiLU)`` for efficientnet_b0,
    ``nn.ReLU`` for regnetx) and the factory builds :class:`NormAct2d`; without it such a call is refused with a
    one-line error, never silently built without the model's activation. Norms that contain their activation
    (frn, evonorm_b0, evonorm_s0) replace the norm+activation pair instead: they get ``apply_act`` and the
    model's activation is not added.
    """
    _check_name(name)
    act_layer = kw.pop("act_layer", None)

    def factory(num_channels: int, **call_kw: Any) -> nn.Module:
        extra = {k: call_kw.pop(k) for k in _NORM_ACT_KWARGS if k in call_kw}
        if extra and has_act(name):  # the norm is norm + activation itself (timm's EvoNorm/FRN convention)
            norm = make_norm(name, num_channels, **kw, **call_kw, apply_act=extra.get("apply_act", True))
            drop = extra.get("drop_layer")
            return NormAct2d(norm, nn.Identity(), drop()) if drop else norm
        norm = make_norm(name, num_channels, **kw, **call_kw)
        if not extra:
            return norm
        act = extra.get("act_layer", act_layer)
        if act is None:
            raise NormlabError(
                f"this model asks for a norm+activation layer ({', '.join(sorted(extra))} given) but not for "
                f"its activation: use normlab.norms.norm_layer({name!r}, act_layer=<the model's activation, "
                "e.g. torch.nn.SiLU for efficientnet, torch.nn.ReLU for regnetx>)")
        drop = extra.get("drop_layer")
        return NormAct2d(norm, _activation(act, extra.get("act_kwargs"), extra.get("inplace", True))
                         if extra.get("apply_act", True) else nn.Identity(), drop() if drop else None)

    factory.__name__ = factory.__qualname__ = f"normlab_{name}"
    return factory


__all__ = [
    "DEFAULT_GROUPS", "NORMS", "BatchInstanceNorm2d", "BatchNorm2d", "BatchRenorm2d", "ChannelLayerNorm2d",
    "ChannelRMSNorm2d", "DynamicTanh2d", "EvoNormB0", "EvoNormS0", "FilterResponseNorm2d", "GhostBatchNorm2d",
    "GroupNorm2d", "InstanceNorm2d", "LayerNorm2d", "NormAct2d", "RMSNorm2d", "SwitchableNorm2d", "clamp_gates_",
    "has_act", "make_norm", "norm_layer",
]
