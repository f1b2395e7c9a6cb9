"""Norm swapping for ANY model: :func:`replace_norms` swaps every 2-d normalization layer for another norm.

The layers it swaps are matched by EXACT type, because a subclass may do more than normalize:

- torch's ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm2d``, and every layer
  class of ``normlab.norms.NORMS``;
- timm's 2-d norms (``LayerNorm2d``, ``RmsNorm2d``, ``GroupNorm``, ... on ``(N, C, H, W)`` maps) and its
  norm+activation layers (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``, ...), which become the new
  norm followed by their own ``drop`` and ``act`` (:class:`normlab.norms.NormAct2d`), so a same-kind swap
  (BN -> bn) computes the same function.

Every other normalization layer (:func:`is_normalization`: a torch or timm norm not listed, e.g. timm's
channels-last ``LayerNorm`` in a ConvNeXt built without ``conv_mlp``, a frozen BN, a 1-d norm, a subclass, timm's
EvoNorm, a layer of any library named as a norm) would stay as it is: the swap is then refused with the list of
what would stay, and the model is left unchanged; ``keep=`` names the types the caller means to keep.

:func:`is_normalization` is the one answer to "is this a normalization layer" (the refusal above,
:func:`norm_paths` for the swap record and the training loop's probe); :func:`is_norm` answers "does
:func:`replace_norms` swap it".

What means the same thing is carried over: running statistics when both layers keep them (BN -> bn,
torch_bn, bin) and the per-channel affine ``weight``/``bias`` when both have one (-> in, ln, gn as well;
timm's LayerNorm2d's per-channel affine too); nothing for ``nn`` (identity). BIN's gate starts at 1 (pure BN),
so a BN -> bin swap computes the same function. The catalogue norms take the affine too, and BN's running
statistics where they keep them (evonorm_b0, sn, brn, gbn); their own parameters start at their initial values
(sn's mixing weights uniform, frn's τ at 0, EvoNorm's v at 1, dyt's α at 0.5). A norm with its own activation
(frn, evonorm_*, given as ``norm_layer(name)``) takes the place of a timm norm+activation layer's pair, as timm's
EvoNorm/FRN layers do; swapped in for a plain norm, it keeps the model's activations around it (build normlab's
ResNet with that norm to drop them).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.norms import NORMS, NormAct2d, has_act

_NATIVE: tuple[type, ...] = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d)
# timm's layers on (N, C, H, W) maps, by module and class name (timm is not imported for this)
_TIMM_2D = {
    "timm.layers.norm": {"GroupNorm", "GroupNorm1", "LayerNorm2d", "LayerNorm2dFp32", "RmsNorm2d", "RmsNorm2dFp32",
                         "SimpleNorm2d", "SimpleNorm2dFp32"},
    "timm.layers.norm_act": {"BatchNormAct2d", "SyncBatchNormAct", "GroupNormAct", "GroupNorm1Act", "LayerNormAct2d",
                             "LayerNormAct2dFp32", "RmsNormAct2d", "RmsNormAct2dFp32"},
}
# what counts as a normalization layer (is_normalization): torch's norm bases, ...
_NORM_BASES: tuple[type, ...] = tuple(t for t in (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None))
    if t is not None)
# ... every layer of timm's normalization modules (EvoNorm2dB0, FilterResponseNormTlu2d, LayerNormExp2d: names that
# end otherwise) ...
_TIMM_NORM_MODULES = frozenset({"timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm",
                                "timm.layers.filter_response_norm"})
# ... and a layer of any library named as a norm (...Norm, ...Norm2d, ...NormAct2d, ...Fp32) that holds no conv or
# linear layer (a block named so is searched). A suffix, not a substring: torchvision's ``Normalize`` (fixed input
# constants) and timm's ``NormMlpClassifierHead`` are not normalization layers.
_NORM_NAME = re.compile(r"Norm(Act)?([123]d)?(Fp32)?$")


def norm_types() -> tuple[type, ...]:
    """The exact torch and normlab layer types :func:`replace_norms` swaps (timm's: :func:`is_norm`)."""
    from normlab.norms import NORMS

    return _NATIVE + tuple(f for f in NORMS.values() if isinstance(f, type) and f not in _NATIVE)


def _is_timm_2d(module: nn.Module) -> bool:
    return type(module).__name__ in _TIMM_2D.get(type(module).__module__, ())


def is_norm(module: nn.Module) -> bool:
    """Whether :func:`replace_norms` swaps ``module`` (a 2-d norm it knows, by exact type)."""
    return type(module) in norm_types() or _is_timm_2d(module)


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer, of any origin: torch's (every subclass of its norm bases),
    normlab's (the registered layers and the ``NormAct2d`` a swap leaves), timm's (its norms and norm+activation
    layers, EvoNorm and FRN included), and any other layer named as a norm that holds no conv or linear layer."""
    if isinstance(module, (NormAct2d,) + _NORM_BASES) or is_norm(module):
        return True
    cls = type(module)
    if cls.__module__ in _TIMM_NORM_MODULES:
        return True
    return bool(_NORM_NAME.search(cls.__name__)) and not any(
        isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in module.modules())


def norm_paths(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of the outermost normalization layers (a norm inside a norm+act wrapper is not listed)."""
    found: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if path and is_normalization(m) and not any(path.startswith(p + ".") for p in found):
            found[path] = m
    return found


def _channels(m: nn.Module) -> int:
    for attr in ("num_channels", "num_features"):
        value = getattr(m, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(m, "normalized_shape", None)  # timm's LayerNorm2d / RmsNorm2d: (C,)
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
        return int(shape[0])
    raise NormlabError(f"cannot tell the channel count of {type(m).__name__}")


@torch.no_grad()
def carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Copy ``weight``/``bias`` and running statistics from ``old`` to ``new`` where both have them."""
    ref = next(iter(list(old.parameters()) + list(old.buffers())), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(old, name, None), getattr(new, name, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            b.copy_(a)
    new.train(old.training)
    return new


def _swap(old: nn.Module, factory: Callable[[int], nn.Module]) -> nn.Module:
    act, drop = getattr(old, "act", None), getattr(old, "drop", None)
    drop = drop if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity) else None
    if type(old).__module__ == "timm.layers.norm_act" and isinstance(act, nn.Module):  # norm, drop, act in one
        name = getattr(factory, "norm", None)
        if name in NORMS and has_act(name):
            # a norm with its own activation (frn, evonorm_*) takes the place of the whole norm+activation pair,
            # as timm's EvoNorm/FRN layers do: the old activation goes, applying two would be a different net
            new = carry_over(old, factory(_channels(old), apply_act=not isinstance(act, nn.Identity)))
            return NormAct2d(new, None, drop) if drop is not None else new
        return NormAct2d(carry_over(old, factory(_channels(old))), act, drop)
    return carry_over(old, factory(_channels(old)))


def _plan(model: nn.Module, keep: tuple[type, ...], prefix: str = "") -> tuple[list[tuple[nn.Module, str, nn.Module]],
                                                                                  list[tuple[str, nn.Module]]]:
    """(parent, attribute, layer) of every layer to swap, and (path, layer) of the norms that would stay."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    stays: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if is_norm(child):
            swaps.append((model, name, child))
            continue
        # a NormAct2d (an earlier swap's) is searched: its norm is swapped, its activation kept
        if is_normalization(child) and not isinstance(child, (NormAct2d,) + keep):
            stays.append((path, child))
            continue
        more, left = _plan(child, keep, f"{path}.")
        swaps += more
        stays += left
    return swaps, stays


def replace_norms(model: nn.Module, factory: Callable[[int], nn.Module], *, keep: tuple[type, ...] = ()) -> nn.Module:
    """Replace every 2-d norm layer of ``model`` (in place) by ``factory(num_channels)``; returns ``model``.

    A norm+activation layer (timm's ``BatchNormAct2d``, ``GroupNormAct``, ...) becomes
    :class:`normlab.norms.NormAct2d` (the new norm, then the old layer's ``drop`` and ``act``). When a
    normalization layer it cannot swap would stay (see the module's docstring), nothing is changed and a
    NormlabError lists them; types in ``keep`` stay on purpose."""
    swaps, stays = _plan(model, tuple(keep))
    if stays:
        counts = Counter(f"{type(m).__module__}.{type(m).__name__}" for _, m in stays)
        kinds = ", ".join(f"{n} x{c}" for n, c in counts.items())
        paths = ", ".join(p for p, _ in stays[:3]) + (", ..." if len(stays) > 3 else "")
        raise NormlabError(
            f"replace_norms: {len(stays)} normalization layer(s) cannot be swapped for a 2-d norm and would stay: "
            f"{kinds} (at {paths}); nothing was changed. Build the model with 2-d norms where it offers them "
            "(e.g. timm's ConvNeXt with conv_mlp=True), or pass keep=(<type>, ...) to keep these on purpose")
    for parent, name, old in swaps:
        setattr(parent, name, _swap(old, factory))
    return model


def swap_counts(model: nn.Module) -> dict[str, int]:
    """How many layers of each type :func:`replace_norms` would swap in ``model`` (e.g. for a run's summary)."""
    swaps, _ = _plan(model, ())
    return dict(Counter(type(old).__name__ for _, _, old in swaps))


def _name(m: nn.Module) -> str:
    return ("nn." if type(m).__module__.startswith("torch.") else "") + type(m).__name__


def _label(m: nn.Module) -> str:
    inner = getattr(m, "norm", None)
    if isinstance(inner, nn.Module) and not isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        return f"{type(m).__name__}({_name(inner)})"
    return _name(m)


def _qualified(m: nn.Module) -> str:
    return f"{type(m).__module__.split('.')[0]}.{_label(m)}"


def norm_swaps(stock: dict[str, nn.Module], model: nn.Module, made: tuple[type, ...]) -> dict[str, Any]:
    """What became of each norm of the stock model (``{path: module}``, from :func:`norm_paths`):
    ``{"swapped": {"Old -> New": count}, "kept": {"Old": count}}``. A position counts as swapped when the model
    holds a layer of the chosen norm there (``made``: its types), directly or inside a norm+activation wrapper."""
    swapped: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for path, old in stock.items():
        try:
            new = model.get_submodule(path)
        except AttributeError:
            continue
        inner = getattr(new, "norm", None)
        if new is not old and (isinstance(new, made) or isinstance(inner, made)):
            a, b = _label(old), _label(new)
            if a == b:  # the same class name in another library: say which
                a, b = _qualified(old), _qualified(new)
            swapped[f"{a} -> {b}"] += 1
        else:
            kept[_label(new)] += 1
    return {"swapped": dict(swapped), "kept": dict(kept)}


__all__ = ["carry_over", "is_norm", "is_normalization", "norm_paths", "norm_swaps", "norm_types", "replace_norms",
           "swap_counts"]
