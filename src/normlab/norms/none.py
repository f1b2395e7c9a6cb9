"""``nn``: no normalization, an identity that takes a norm's constructor arguments."""

from __future__ import annotations

from typing import Any

from torch import nn

from normlab.errors import NormlabError


class NoAffineError(NormlabError, AttributeError):
    """A model reached for the affine of "no normalization". An AttributeError too, so ``hasattr`` and
    ``getattr(m, "weight", None)`` still answer "none" without raising."""


class NoNorm2d(nn.Identity):
    """No normalization: returns its input. Accepts (and ignores) the channel count and any norm settings.

    It has no ``weight`` or ``bias``, and reaching for them is a one-line error rather than torch's bare
    AttributeError: models that zero-initialise the last norm of each residual block (torchvision's
    ``zero_init_residual``, timm's ``zero_init_last``) mean "start each residual branch at zero". An identity
    with unused ``weight``/``bias`` attributes would let that zeroing silently do nothing, and one that applied
    them would turn "no normalization" into a per-channel affine layer with parameters of its own; neither is
    the comparison ``nn`` stands for, so the model's option has to be turned off instead."""

    def __init__(self, num_channels: int, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_channels

    def __getattr__(self, name: str) -> Any:
        if name in ("weight", "bias"):
            raise NoAffineError(
                f"norm 'nn' (no normalization) has no {name}: the model reaches for its norms' affine, e.g. to "
                "zero-initialise the last norm of each residual block (torchvision: zero_init_residual=True, "
                "timm: zero_init_last=True); with no normalization there is nothing to zero, so build the model "
                "with that option off (zero_init_residual=False / zero_init_last=False) or choose a norm")
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


__all__ = ["NoAffineError", "NoNorm2d"]
