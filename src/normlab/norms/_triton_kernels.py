"""The Triton kernels behind ``_triton`` (imported only when a tensor is headed for them: importing triton
costs about a second, and under ``TRITON_INTERPRET=1`` it must happen after that variable is set)."""

import triton
import triton.language as tl


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
