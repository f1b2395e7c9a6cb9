"""From-scratch normalization layers (BN, IN, BIN, LN, GN) and the name -> factory registry.

Every layer takes the channel count first (``Layer(num_channels, *, eps=...)``), so
``norm_layer(name, **kw)`` can be handed to normlab's ResNet or to ``torchvision.models.resnet18``.

=========  ===================================================================
name       layer
=========  ===================================================================
bn         :class:`BatchNorm2d` (``sync`` supported)
in         :class:`InstanceNorm2d`
bin        :class:`BatchInstanceNorm2d` (``sync`` supported; call :func:`clamp_gates_`)
ln         :class:`LayerNorm2d`
gn         :class:`GroupNorm2d` (``num_groups``, default 8)
nn         no normalization (``nn.Identity``)
torch_bn   PyTorch's native ``nn.BatchNorm2d`` (reference / speed baseline)
=========  ===================================================================

The common trainer keywords ``num_groups`` and ``sync`` are dropped silently by norms they do not
apply to, so ``norm_layer(any_name, num_groups=g, sync=s)`` always works.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.errors import NormlabError
from normlab.norms.batch import BatchNorm2d
from normlab.norms.batch_instance import BatchInstanceNorm2d, clamp_gates_
from normlab.norms.group import DEFAULT_GROUPS, GroupNorm2d
from normlab.norms.instance import InstanceNorm2d
from normlab.norms.layer import LayerNorm2d


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
}

# keyword -> the norms it applies to; other norms drop it silently
_OPTIONAL_KWARGS: dict[str, tuple[str, ...]] = {"num_groups": ("gn",), "sync": ("bn", "bin")}


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


def norm_layer(name: str, **kw: Any) -> Callable[[int], nn.Module]:
    """A one-argument factory ``channels -> module`` (e.g. for ``torchvision.models.resnet18(norm_layer=...)``).

    The name is checked now, so a typo fails before any model is built.
    """
    _check_name(name)
    return functools.partial(make_norm, name, **kw)


__all__ = [
    "DEFAULT_GROUPS", "NORMS", "BatchInstanceNorm2d", "BatchNorm2d", "GroupNorm2d", "InstanceNorm2d",
    "LayerNorm2d", "clamp_gates_", "make_norm", "norm_layer",
]
