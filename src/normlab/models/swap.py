"""Norm swapping for ANY model: :func:`replace_norms` swaps every 2-d normalization layer for another norm.

The layers it recognises are matched by EXACT type (``nn.BatchNorm2d``, ``nn.SyncBatchNorm``,
``nn.GroupNorm``, ``nn.InstanceNorm2d`` and every layer class of ``normlab.norms.NORMS``), because a subclass
may do more than normalize: timm's ``BatchNormAct2d``/``GroupNormAct`` subclass ``nn.BatchNorm2d``/
``nn.GroupNorm`` and apply an activation (and drop-path) in the same module. Such norm+activation layers are
replaced by the new norm followed by their own ``drop`` and ``act`` (:class:`NormAct`), so a same-kind swap
(BN -> bn) computes the same function; any other subclass of a norm is refused with a one-line error instead
of being changed silently.

What means the same thing is carried over: running statistics when both layers keep them (BN -> bn,
torch_bn, bin) and the per-channel affine ``weight``/``bias`` when both have one (-> in, ln, gn as well);
nothing for ``nn`` (identity). BIN's gate starts at 1 (pure BN), so a BN -> bin swap computes the same
function. The catalogue norms take the affine too, and BN's running statistics where they keep them
(evonorm_b0, sn, brn, gbn); their own parameters start at their initial values (sn's mixing weights uniform,
frn's τ at 0, EvoNorm's v at 1, dyt's α at 0.5). Only the norm is swapped: a norm with its own activation
(frn, evonorm_*) swapped into a model keeps the model's activations around it (build normlab's ResNet with
that norm to drop them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normlab.errors import NormlabError

_NATIVE: tuple[type, ...] = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d)


def norm_types() -> tuple[type, ...]:
    """The exact layer types :func:`replace_norms` swaps: torch's 2-d norms and normlab's own layers."""
    from normlab.norms import NORMS

    return _NATIVE + tuple(f for f in NORMS.values() if isinstance(f, type) and f not in _NATIVE)


def is_norm(module: nn.Module) -> bool:
    return type(module) in norm_types()


class NormAct(nn.Module):
    """A swapped-in norm followed by the activation (and drop) of the norm+activation layer it replaced."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def _channels(m: nn.Module) -> int:
    for attr in ("num_channels", "num_features"):
        value = getattr(m, attr, None)
        if isinstance(value, int):
            return value
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


def _swap(path: str, old: nn.Module, factory: Callable[[int], nn.Module]) -> nn.Module | None:
    """The replacement for ``old``, None when it is not a 2-d norm; raises for a norm subclass it cannot keep."""
    types = norm_types()
    if type(old) in types:
        return carry_over(old, factory(_channels(old)))
    if not isinstance(old, _NATIVE):
        return None
    act, drop = getattr(old, "act", None), getattr(old, "drop", nn.Identity())
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module):  # timm's *Act: norm, drop, act in one
        return NormAct(carry_over(old, factory(_channels(old))), drop, act)
    raise NormlabError(f"replace_norms: {path} is a {type(old).__module__}.{type(old).__name__}, a subclass of "
                       f"{next(t.__name__ for t in _NATIVE if isinstance(old, t))} that may do more than normalize; "
                       "swapping it could change the model silently, so it is refused (replace it by hand)")


def replace_norms(model: nn.Module, factory: Callable[[int], nn.Module], _prefix: str = "") -> nn.Module:
    """Replace every 2-d norm layer of ``model`` (in place) by ``factory(num_channels)``; returns ``model``.

    A norm+activation layer (timm's ``BatchNormAct2d``, ``GroupNormAct``) becomes :class:`NormAct` (the new
    norm, then the old layer's ``drop`` and ``act``); another subclass of a norm raises a NormlabError."""
    for name, child in list(model.named_children()):
        path = f"{_prefix}{name}"
        new = _swap(path, child, factory)
        if new is not None:
            setattr(model, name, new)
        else:
            replace_norms(child, factory, f"{path}.")
    return model


__all__ = ["NormAct", "carry_over", "is_norm", "norm_types", "replace_norms"]
