"""From-scratch normalization layers (BN, IN, BIN, LN, GN) and the name -> factory registry.

Every layer takes the channel count first and torch's ``device``/``dtype`` factory keywords
(``Layer(num_channels, eps=..., *, device=None, dtype=None)``), so ``norm_layer(name, **kw)`` can be handed to
normlab's ResNet, to torchvision's models and to ``timm.create_model(..., norm_layer=...)`` (timm models
built from norm+activation layers get :class:`NormAct2d` with each layer's own activation).

| name | layer |
|---|---|
| ``bn`` | :class:`BatchNorm2d` (``sync`` supported) |
| ``in`` | :class:`InstanceNorm2d` |
| ``bin`` | :class:`BatchInstanceNorm2d` (``sync`` supported; call :func:`clamp_gates_`) |
| ``ln`` | :class:`LayerNorm2d` |
| ``gn`` | :class:`GroupNorm2d` (``num_groups``, default 8) |
| ``nn`` | :class:`NoNorm2d`: no normalization (an identity) |
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
| ``mobn`` | :class:`MeanOnlyBatchNorm2d` (batch mean subtracted, no division; ``sync``) |

The norms of the shared shape are specs on the engine of ``normlab.norms.spec``: the catalogue ones (frn,
evonorm_*, sn, brn, gbn, rms, mobn) run on it, and bn, in, ln, gn and bin keep their hand-fused autograd Functions as
the default override (``normlab.norms.override``: ``NORMLAB_FUSED=0``, or ``layer.override = False`` on one
layer, takes the engine path). Norms whose class sets ``has_act`` contain their activation: :func:`norm_layer` hands
them timm's ``apply_act`` instead of wrapping them in another activation, and normlab's ResNet drops the ReLU
that follows them.

The common trainer keywords ``num_groups``, ``sync`` and ``virtual_batch`` are dropped silently by norms they
do not apply to, so ``norm_layer(any_name, num_groups=g, sync=s)`` always works.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.errors import NormlabError
from normlab.norm_table import NORM_PATHS
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
from normlab.norms.mean_only import MeanOnlyBatchNorm2d
from normlab.norms.none import NoAffineError, NoNorm2d
from normlab.norms.norm_act import NORM_ACT_KWARGS, NormAct2d, make_activation
from normlab.norms.rms import RMSNorm2d
from normlab.norms.switchable import SwitchableNorm2d


def _resolve(path: str) -> Callable[..., nn.Module]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# name -> layer class (or factory), resolved from the one table of registered norms (normlab.norm_table)
NORMS: dict[str, Callable[..., nn.Module]] = {name: _resolve(path) for name, path in NORM_PATHS.items()}

# the keywords a study or run hands every norm: a norm whose constructor names one takes it, the others drop it
OPTIONAL_KWARGS = ("num_groups", "sync", "virtual_batch")


@functools.cache
def _takes(name: str) -> frozenset[str]:
    """Which of ``OPTIONAL_KWARGS`` the constructor of norm ``name`` names (read from its signature, so a new
    norm needs no entry anywhere; a ``**kwargs`` catch-all names none)."""
    params = inspect.signature(NORMS[name]).parameters
    return frozenset(k for k in OPTIONAL_KWARGS if k in params and params[k].kind is not params[k].VAR_KEYWORD)


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
    kw = {k: v for k, v in kw.items() if k not in OPTIONAL_KWARGS or k in _takes(name)}
    return NORMS[name](num_channels, **kw)


class NormLayer:
    """Base of the factories :func:`norm_layer` returns: calling one builds a module (``__new__`` returns it).

    They are classes, not functions, for timm: ``timm.layers.get_norm_act_layer`` hands a norm+activation layer
    its activation (``act_layer=``, each block's own: mixnet mixes ReLU and SiLU) only for the types it knows,
    and passes a plain function through without it. Each factory is added to those types (once timm is
    imported), so every timm call names the activation the model asks for."""

    norm: str = ""
    settings: dict[str, Any] = {}

    def __new__(cls, num_channels: int, **call_kw: Any) -> nn.Module:  # type: ignore[misc]
        extra = {k: call_kw.pop(k) for k in NORM_ACT_KWARGS if k in call_kw}
        if extra and has_act(cls.norm):  # the norm is norm + activation itself (timm's EvoNorm/FRN convention)
            norm = make_norm(cls.norm, num_channels, **cls.settings, **call_kw, apply_act=extra.get("apply_act", True))
            drop = extra.get("drop_layer")
            return NormAct2d(norm, None, drop()) if drop is not None else norm
        norm = make_norm(cls.norm, num_channels, **cls.settings, **call_kw)
        if not extra:
            return norm
        apply_act = extra.get("apply_act", True)
        if apply_act and "act_layer" not in extra:
            raise NormlabError(
                f"{cls.__name__} was asked for a norm+activation layer ({', '.join(sorted(extra))} given) without "
                "its activation; timm names it for the norm layers it knows: import timm before building the "
                "model, or build it with timm's own norm and swap afterwards: "
                f"normlab.models.replace_norms(model, norm_layer({cls.norm!r})) keeps each layer's activation")
        act = make_activation(extra.get("act_layer"), extra.get("act_kwargs"), extra.get("inplace", True)) \
            if apply_act else None
        drop = extra.get("drop_layer")
        return NormAct2d(norm, act, drop() if drop is not None else None)


_FACTORIES: dict[tuple, type[NormLayer]] = {}  # (name, settings) -> its factory class: one per setting
_TIMM_PENDING: list[type[NormLayer]] = []


def _tell_timm(factory: type[NormLayer]) -> None:
    """Make timm's ``get_norm_act_layer`` treat ``factory`` like its own norm+act layers (it then binds each
    block's ``act_layer``): now if timm is loaded, else when it is (a one-shot import hook)."""
    module = sys.modules.get("timm.layers.create_norm_act")
    if module is not None:
        _register(module, [factory])
        return
    _TIMM_PENDING.append(factory)
    if not any(isinstance(f, _TimmHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmHook())


def _register(module: Any, factories: list[type[NormLayer]]) -> None:
    for name in ("_NORM_ACT_TYPES", "_NORM_ACT_REQUIRES_ARG"):
        known = getattr(module, name, None)
        if isinstance(known, set):
            known.update(factories)


class _TimmHook:
    """Registers the pending factories right after ``timm.layers.create_norm_act`` is first imported."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm.layers.create_norm_act":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register(module, _TIMM_PENDING)
            _TIMM_PENDING.clear()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def norm_layer(name: str, **kw: Any) -> type[NormLayer]:
    """A factory ``(num_channels, *, device=None, dtype=None) -> module`` for normlab's ResNet, for
    ``torchvision.models.*(norm_layer=...)`` and for ``timm.create_model(..., norm_layer=...)``.

    The settings are bound inside it (timm's ``get_norm_layer`` keeps only a ``functools.partial``'s keywords).
    The name is checked now, so a typo fails before any model is built.

    timm's EfficientNet, MixNet, RegNet, ... build norm+activation layers (``BatchNormAct2d``) with each block's
    own activation: the factory then builds :class:`NormAct2d` with the activation timm hands it for that
    layer, so the model keeps every activation it asks for. There is no ``act_layer=`` to bind: a bound
    activation would override each block's own (to change a timm model's activation, pass ``act_layer=`` to
    ``timm.create_model``). Norms that contain their activation (frn, evonorm_b0, evonorm_s0) replace the
    norm+activation pair instead: they get ``apply_act`` and the model's activation is not added.
    """
    _check_name(name)
    if "act_layer" in kw:
        raise NormlabError(
            "norm_layer() takes no act_layer: timm hands each norm+activation layer the activation its block asks "
            "for, and a bound one would override them all; to change a timm model's activation pass act_layer= "
            "to timm.create_model")
    try:
        key: tuple | None = (name, tuple(sorted(kw.items())))
        hash(key)
    except TypeError:  # unhashable settings: a factory of its own
        key = None
    factory = _FACTORIES.get(key) if key is not None else None
    if factory is None:
        factory = type(f"normlab_{name}", (NormLayer,), {"norm": name, "settings": dict(kw),
                                                          "__module__": __name__})
        if key is not None:
            _FACTORIES[key] = factory
        _tell_timm(factory)
    return factory


__all__ = [
    "DEFAULT_GROUPS", "NORMS", "BatchInstanceNorm2d", "BatchNorm2d", "BatchRenorm2d", "ChannelLayerNorm2d",
    "ChannelRMSNorm2d", "DynamicTanh2d", "EvoNormB0", "EvoNormS0", "FilterResponseNorm2d", "GhostBatchNorm2d",
    "GroupNorm2d", "InstanceNorm2d", "LayerNorm2d", "MeanOnlyBatchNorm2d", "NoAffineError", "NoNorm2d", "NormAct2d",
    "NormLayer", "RMSNorm2d", "SwitchableNorm2d", "clamp_gates_", "has_act", "make_norm", "norm_layer",
]
