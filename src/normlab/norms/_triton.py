"""The norms' CUDA path: two Triton kernels shared by BN, BIN, IN, LN and GN.

Every norm needs the same two sweeps over the big tensor, so two kernels serve all of them:

* ``channel_sums``: per-(sample, channel) partial sums over a block of H*W positions, in float32, of either
  ``x - center`` and ``(x - center)²`` (forward statistics; ``center`` is one sample of the channel or
  group, so the sums are *shifted* and stay exact for inputs whose mean is far larger than their std), or
  ``g`` and ``g * (x - center)`` (backward; ``g = dy`` masked by ``y > 0`` under a fused ReLU, and written
  out because it is also the residual's gradient). BN adds the partials over samples and blocks, GN over
  blocks and the group's channels: in float64 on the small (N, blocks, C) tensor, so no atomics and a
  deterministic result.
* ``affine``: ``out = p * P[n, c] + (q - Qc[n, c]) * Q[n, c] + R[n, c] (+ residual) (ReLU)`` in memory order,
  which is the forward normalization (``q`` absent) and the input gradient (``p = g``, ``q = x``,
  ``Qc = mean``) of every norm; BN's coefficients are per channel (sample stride 0).

Inputs are float32, bfloat16 or float16 in NCHW or channels_last; statistics and coefficients are float32.
The small per-channel math stays in ``_functional`` (tensor ops), shared with the tensor-op path.

Selection (``usable``): CUDA tensors when triton imports, unless ``NORMLAB_TRITON=0``; ``NORMLAB_TRITON=1``
also takes CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported -- how the tests run
these kernels without a GPU.
"""

from __future__ import annotations

import os

import torch

from normlab.norms._kernels import NCHW, NHWC, dense_layout

_state: dict = {}


def kernels():
    """The kernel module, imported on first use; None when triton does not import (the tensor ops run)."""
    if "mod" not in _state:
        try:
            from normlab.norms import _triton_kernels
        except Exception:  # noqa: BLE001 -- no triton, or one that does not work with this torch
            _triton_kernels = None
        _state["mod"] = _triton_kernels
    return _state["mod"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def setting() -> str:
    """``NORMLAB_TRITON``: "0" off, "1" forced (CPU too, under the interpreter), anything else: CUDA only."""
    v = os.environ.get("NORMLAB_TRITON", "auto").strip().lower()
    return "0" if v in ("0", "false", "off", "no") else "1" if v in ("1", "true", "on", "yes") else "auto"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(x: torch.Tensor) -> str | None:
    """The layout to run ``x`` through the Triton kernels in, or None (tensor ops or C++ instead)."""
    fmt = dense_layout(x)
    if x.dtype not in DTYPES or fmt is None:
        return None
    mode = setting()
    if mode == "0" or not (x.is_cuda or (mode == "1" and x.is_cpu and interpreting())) or kernels() is None:
        return None
    return fmt


def like(t: torch.Tensor, fmt: str) -> torch.Tensor:
    return t.contiguous() if fmt == NCHW else t.contiguous(memory_format=torch.channels_last)


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def channel_sums(a: torch.Tensor, fmt: str, center: torch.Tensor, b: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
    """Partial sums of shape (N, blocks, C), float32: ``a - center`` and its square (``b`` None), or
    ``g`` and ``g * (b - center)`` with ``g = a * (mask > 0)`` (``mask`` optional). ``center`` is (C,)
    or (N, C). Returns ``(p1, p2, g)``; ``g`` is None without mask."""
    n, c, h, w = a.shape
    hw = h * w
    bc = min(_pow2(c), 64)
    bs = max(1, min(_pow2(hw), 4096 // bc))
    nsb = _cdiv(hw, bs)
    p1 = torch.empty(n, nsb, c, dtype=torch.float32, device=a.device)
    p2 = torch.empty_like(p1)
    g = torch.empty_like(a) if mask is not None else None
    center = _f32(center)
    s_n, s_c, s_s = (c * hw, hw, 1) if fmt == NCHW else (c * hw, 1, c)
    kernels()._sums_kernel[(n, nsb, _cdiv(c, bc))](
        a, a if b is None else b, a if mask is None else mask, a if g is None else g, center, p1, p2,
        c, hw, s_n, s_c, s_s, c if center.dim() == 2 else 0, nsb,
        PRODUCT=b is not None, HAS_MASK=mask is not None, BS=bs, BC=bc)
    return p1, p2, g


def affine(p: torch.Tensor, fmt: str, P: torch.Tensor, R: torch.Tensor, q: torch.Tensor | None = None,
           Q: torch.Tensor | None = None, Qc: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           relu: bool = False) -> torch.Tensor:
    """``p * P + (q - Qc) * Q + R (+ residual) (ReLU)`` with (C,) or (N, C) coefficients, in p's layout and
    dtype; ``q`` and ``residual`` must already be in that layout."""
    n, c, h, w = p.shape
    out = torch.empty_like(p)
    P, R = _f32(P), _f32(R)
    Q = P if Q is None else _f32(Q)
    Qc = P if Qc is None else _f32(Qc)
    total = p.numel()
    block = 1024
    kernels()._affine_kernel[(_cdiv(total, block),)](
        p, p if q is None else q, p if residual is None else residual, out, P, Q, Qc, R, total, c, h * w,
        c if P.dim() == 2 else 0, NHWC_=fmt == NHWC, HAS_Q=q is not None, HAS_RES=residual is not None,
        RELU=bool(relu), BLOCK=block)
    return out
