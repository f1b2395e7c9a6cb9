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

try:  # triton is optional: without it (or on a torch without it) the norms use the tensor-op path
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NCHW, NHWC = "rows", "nhwc"


def setting() -> str:
    """``NORMLAB_TRITON``: "0" off, "1" forced (CPU too, under the interpreter), anything else: CUDA only."""
    v = os.environ.get("NORMLAB_TRITON", "auto").strip().lower()
    return "0" if v in ("0", "false", "off", "no") else "1" if v in ("1", "true", "on", "yes") else "auto"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(x: torch.Tensor) -> str | None:
    """The layout to run ``x`` through the Triton kernels in, or None (tensor ops or C++ instead)."""
    if triton is None or x.dtype not in DTYPES or x.dim() != 4 or x.numel() == 0:
        return None
    mode = setting()
    if mode == "0" or not (x.is_cuda or (mode == "1" and x.is_cpu and interpreting())):
        return None
    if x.is_contiguous():
        return NCHW
    if x.is_contiguous(memory_format=torch.channels_last):
        return NHWC
    return None


def like(t: torch.Tensor, fmt: str) -> torch.Tensor:
    return t.contiguous() if fmt == NCHW else t.contiguous(memory_format=torch.channels_last)


if triton is not None:

    @triton.jit
    def _sums_kernel(a_ptr, b_ptr, m_ptr, g_ptr, ctr_ptr, p1_ptr, p2_ptr, C, HW, sN, sC, sS, ctr_sn, NSB,
                     PRODUCT: tl.constexpr, HAS_MASK: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        sb = tl.program_id(1)
        cb = tl.program_id(2)
        s = sb * BS + tl.arange(0, BS)
        c = cb * BC + tl.arange(0, BC)
        mc = c < C
        msk = (s < HW)[:, None] & mc[None, :]
        off = n * sN + s[:, None].to(tl.int64) * sS + c[None, :] * sC
        ctr = tl.load(ctr_ptr + n * ctr_sn + c, mask=mc, other=0.0)[None, :]
        a = tl.load(a_ptr + off, mask=msk, other=0.0).to(tl.float32)
        if PRODUCT:  # backward: g and g * (x - mean)
            if HAS_MASK:
                y = tl.load(m_ptr + off, mask=msk, other=0.0).to(tl.float32)
                a = tl.where(y > 0, a, 0.0)
                tl.store(g_ptr + off, a.to(g_ptr.dtype.element_ty), mask=msk)
            b = tl.load(b_ptr + off, mask=msk, other=0.0).to(tl.float32)
            f1 = a
            f2 = a * tl.where(msk, b - ctr, 0.0)
        else:  # forward: shifted sums
            f1 = tl.where(msk, a - ctr, 0.0)
            f2 = f1 * f1
        out = (n * NSB + sb) * C + c
        tl.store(p1_ptr + out, tl.sum(f1, axis=0), mask=mc)
        tl.store(p2_ptr + out, tl.sum(f2, axis=0), mask=mc)

    @triton.jit
    def _affine_kernel(p_ptr, q_ptr, r_ptr, out_ptr, P_ptr, Q_ptr, Qc_ptr, R_ptr, total, C, HW, coef_sn,
                       NHWC_: tl.constexpr, HAS_Q: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                       BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < total
        if NHWC_:
            c = i % C
            n = i // (HW * C)
        else:
            c = (i // HW) % C
            n = i // (HW * C)
        k = n * coef_sn + c
        v = tl.load(p_ptr + i, mask=m, other=0.0).to(tl.float32) * tl.load(P_ptr + k, mask=m, other=0.0)
        v += tl.load(R_ptr + k, mask=m, other=0.0)
        if HAS_Q:
            q = tl.load(q_ptr + i, mask=m, other=0.0).to(tl.float32)
            v += (q - tl.load(Qc_ptr + k, mask=m, other=0.0)) * tl.load(Q_ptr + k, mask=m, other=0.0)
        if HAS_RES:
            v += tl.load(r_ptr + i, mask=m, other=0.0).to(tl.float32)
        if RELU:
            v = tl.maximum(v, 0.0)
        tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=m)


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
    nsb = triton.cdiv(hw, bs)
    p1 = torch.empty(n, nsb, c, dtype=torch.float32, device=a.device)
    p2 = torch.empty_like(p1)
    g = torch.empty_like(a) if mask is not None else None
    center = _f32(center)
    s_n, s_c, s_s = (c * hw, hw, 1) if fmt == NCHW else (c * hw, 1, c)
    _sums_kernel[(n, nsb, triton.cdiv(c, bc))](
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
    _affine_kernel[(triton.cdiv(total, block),)](
        p, p if q is None else q, p if residual is None else residual, out, P, Q, Qc, R, total, c, h * w,
        c if P.dim() == 2 else 0, NHWC_=fmt == NHWC, HAS_Q=q is not None, HAS_RES=residual is not None,
        RELU=bool(relu), BLOCK=block)
    return out
