"""The course norms (bn, in, ln, gn, bin) as specs with a hand-fused override.

Each of the five states its (N, C) math as a spec on the engine of ``normlab.norms.spec`` (``coefficients``
on ``Stats.moments``), like every catalogue norm, and keeps its hand-fused autograd Function
(``_functional.BatchNormFunction`` / ``GroupNormFunction``, ``_bin.BatchInstanceFunction``: C++, Triton and
tensor-op sweeps with the small math fused in) as an override, :meth:`FusedSpecNorm.fused_forward`, taken by
default. Two switches send a norm to the engine path instead:

* ``module.override = False`` on one layer (a class attribute, True, settable per instance);
* the environment variable ``NORMLAB_FUSED=0`` (``false``/``off``/``no``) for every one of the five, read at
  each forward (under ``torch.compile``: when the graph is traced).

Both paths compute the same function (forward, every gradient, running statistics; ``tests/test_engine_paths.py``
checks them against each other and against native torch); the override stays the default because it was
measured faster (``bench/bench_norms.py --engine`` times one against the other).
"""

from __future__ import annotations

import os

import torch

from normlab.norms._functional import check_input, fusable_residual
from normlab.norms.spec import SpecNorm


def override_enabled() -> bool:
    """False when ``NORMLAB_FUSED`` is 0/false/off/no: every course norm then takes the engine path."""
    return os.environ.get("NORMLAB_FUSED", "1").strip().lower() not in ("0", "false", "off", "no")


class FusedSpecNorm(SpecNorm):
    """A spec norm with a hand-fused override. Subclasses write the spec (:meth:`coefficients` or
    :meth:`output`), the override (:meth:`fused_forward`) and :meth:`check` (the one-line input errors, the
    same on both paths)."""

    override = True  # take the hand-fused override (when NORMLAB_FUSED allows); False: the engine path

    def use_override(self) -> bool:
        """Whether this forward takes the hand-fused override."""
        return bool(self.override) and override_enabled()

    def check(self, x: torch.Tensor) -> None:
        """One-line errors for inputs the norm cannot take (both paths)."""
        check_input(x, self.num_channels, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        if self.use_override():
            return self.fused_forward(x)
        return self.engine_forward(x)

    def forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``relu(self(x) + residual)`` (``relu(self(x))`` without residual), which normlab's blocks call
        (``models/resnet.py``): on the override, :meth:`fused_forward_relu`; on the engine, the residual add and
        ReLU inside the engine's affine sweep. Forward hooks on this module are not called (the block that calls
        this checks for them)."""
        self.check(x)
        if not self.use_override():
            return self.engine_forward_relu(x, residual)
        if not fusable_residual(x, residual):
            return torch.relu(self.fused_forward(x) + residual)  # the general case, unfused
        return self.fused_forward_relu(x, residual)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The hand-fused override of the spec (input already checked)."""
        raise NotImplementedError

    def fused_forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The override with the residual add and ReLU (``residual``: None or x's shape and dtype): fused into
        the norm's own passes where its Function takes them (BN, IN, LN, GN override this); here the three ops."""
        y = self.fused_forward(x)
        return torch.relu(y if residual is None else y + residual)


__all__ = ["FusedSpecNorm", "override_enabled"]
