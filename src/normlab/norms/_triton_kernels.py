"""The Triton kernels behind ``_triton`` (imported only when a tensor is headed for them: importing triton
costs about a second, and under ``TRITON_INTERPRET=1`` it must happen after that variable is set).

Two sweeps over the big tensor (``_sums_kernel``, ``_affine_kernel``) and, between them, one small "finish"
kernel per norm and direction that turns the (N, blocks, C) partial sums into statistics and the affine's
coefficients (``_bn_stats_kernel``, ``_bn_grad_kernel``, ``_gn_stats_kernel``, ``_gn_grad_kernel``).
The finish kernels add the float32 partials in float64 (in a fixed order: deterministic, no atomics).
"""

import triton
import triton.language as tl


@triton.jit
def _sums_kernel(a_ptr, b_ptr, m_ptr, g_ptr, ctr_ptr, p1_ptr, p2_ptr, C, HW, sN, sC, sS, ctr_sn, NSB, CG,
                 PRODUCT: tl.constexpr, HAS_MASK: tl.constexpr, CTR_FROM_A: tl.constexpr, BS: tl.constexpr,
                 BC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    sb = tl.program_id(1)
    cb = tl.program_id(2)
    s = sb * BS + tl.arange(0, BS)
    c = cb * BC + tl.arange(0, BC)
    mc = c < C
    msk = (s < HW)[:, None] & mc[None, :]
    off = n * sN + s[:, None].to(tl.int64) * sS + c[None, :] * sC
    if CTR_FROM_A:  # the shift is a value of a itself: a[n or 0, first channel of c's group, 0, 0]
        ctr = tl.load(a_ptr + n * ctr_sn + (c // CG * CG) * sC, mask=mc, other=0.0).to(tl.float32)[None, :]
    else:  # a (C,), (N, C) or, with CG > 1, (N, C // CG) tensor
        ctr = tl.load(ctr_ptr + n * ctr_sn + c // CG, mask=mc, other=0.0).to(tl.float32)[None, :]
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


@triton.jit
def _rows_sums(p1_ptr, p2_ptr, R, C, c, mc, BR: tl.constexpr, BC: tl.constexpr):
    """Float64 sums over the R rows of two (R, C) float32/float64 tensors, for the channels ``c``: one loop,
    so that the loads of both are in flight together."""
    s1 = tl.zeros([BC], dtype=tl.float64)
    s2 = tl.zeros([BC], dtype=tl.float64)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        m = (r < R)[:, None] & mc[None, :]
        off = r[:, None].to(tl.int64) * C + c[None, :]
        s1 += tl.sum(tl.load(p1_ptr + off, mask=m, other=0.0).to(tl.float64), axis=0)
        s2 += tl.sum(tl.load(p2_ptr + off, mask=m, other=0.0).to(tl.float64), axis=0)
    return s1, s2


@triton.jit
def _bn_stats_kernel(p1_ptr, p2_ptr, R, C, cnt_ptr, count, x_ptr, sC, k_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
                     mean_ptr, rstd_ptr, scale_ptr, shift_ptr, o1_ptr, o2_ptr, eps, momentum,
                     SHIFT: tl.constexpr, CNT_PTR: tl.constexpr, PACK: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, RUNNING: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """BN forward: the per-channel sums over the R rows of the partials, then either (PACK) the plain sums
    of x and x² in float64 (un-shifted by ``k``; program 0 also writes the count after them: synced BN
    all-reduces that), or mean, rstd, the running-statistics update and the affine's scale and shift.
    SHIFT: 0 plain sums, 1 shifted by x[0, c, 0, 0], 2 shifted by the tensor ``k``."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = c < C
    s1, s2 = _rows_sums(p1_ptr, p2_ptr, R, C, c, mc, BR, BC)
    if CNT_PTR:
        cnt = tl.load(cnt_ptr).to(tl.float64)
    else:
        cnt = tl.zeros([], dtype=tl.float64) + count
    k = tl.zeros([BC], dtype=tl.float64)
    if SHIFT == 1:
        k = tl.load(x_ptr + c * sC, mask=mc, other=0.0).to(tl.float32).to(tl.float64)
    if SHIFT == 2:
        k = tl.load(k_ptr + c, mask=mc, other=0.0).to(tl.float64)
    if PACK:
        tl.store(o1_ptr + c, s1 + cnt * k, mask=mc)
        tl.store(o2_ptr + c, s2 + k * (2 * s1 + cnt * k), mask=mc)
        tl.store(o2_ptr + C + tl.arange(0, BC), tl.zeros([BC], dtype=tl.float64) + cnt,
                 mask=(tl.arange(0, BC) == 0) & (tl.program_id(0) == 0))
    else:
        m = s1 / cnt
        var = tl.maximum(s2 / cnt - m * m, 0.0)
        mean = m + k
        rstd = 1.0 / tl.sqrt(var + eps)
        scale = rstd
        if HAS_W:
            scale = rstd * tl.load(w_ptr + c, mask=mc, other=1.0).to(tl.float64)
        shift = -mean * scale
        if HAS_B:
            shift += tl.load(b_ptr + c, mask=mc, other=0.0).to(tl.float64)
        tl.store(mean_ptr + c, mean.to(tl.float32), mask=mc)
        tl.store(rstd_ptr + c, rstd.to(tl.float32), mask=mc)
        tl.store(scale_ptr + c, scale.to(tl.float32), mask=mc)
        tl.store(shift_ptr + c, shift.to(tl.float32), mask=mc)
        if RUNNING:  # nn.BatchNorm2d's update: batch mean and unbiased batch variance, in the buffers' dtype
            rm = tl.load(rm_ptr + c, mask=mc, other=0.0).to(tl.float64)
            rv = tl.load(rv_ptr + c, mask=mc, other=0.0).to(tl.float64)
            rm = rm * (1 - momentum) + mean * momentum
            rv = rv * (1 - momentum) + var * (cnt / (cnt - 1)) * momentum
            tl.store(rm_ptr + c, rm.to(tl.float32).to(rm_ptr.dtype.element_ty), mask=mc)
            tl.store(rv_ptr + c, rv.to(tl.float32).to(rv_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _bn_grad_kernel(p1_ptr, p2_ptr, R, C, cnt_ptr, count, rstd_ptr, w_ptr, gw_ptr, gb_ptr, a_ptr, b_ptr, cst_ptr,
                    o_ptr, CNT_PTR: tl.constexpr, HAS_W: tl.constexpr, WANT_GW: tl.constexpr,
                    WANT_GB: tl.constexpr, COEF: tl.constexpr, PACK: tl.constexpr, BR: tl.constexpr,
                    BC: tl.constexpr):
    """BN backward: sum_dy and sum_dy_xc per channel over the R rows, the weight and bias gradients
    (sum_dy_xc·rstd, sum_dy), and either the float64 sums (PACK, for synced BN's all-reduce) or dx's
    coefficients a = rstd·w, b = -a·rstd²·sum_dy_xc/m, cst = -a·sum_dy/m."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = c < C
    s1, s2 = _rows_sums(p1_ptr, p2_ptr, R, C, c, mc, BR, BC)
    rstd = tl.load(rstd_ptr + c, mask=mc, other=0.0).to(tl.float64)
    if WANT_GW:
        tl.store(gw_ptr + c, (s2 * rstd).to(tl.float32).to(gw_ptr.dtype.element_ty), mask=mc)
    if WANT_GB:
        tl.store(gb_ptr + c, s1.to(tl.float32).to(gb_ptr.dtype.element_ty), mask=mc)
    if PACK:
        tl.store(o_ptr + c, s1, mask=mc)
        tl.store(o_ptr + C + c, s2, mask=mc)
    if COEF:
        if CNT_PTR:
            cnt = tl.load(cnt_ptr).to(tl.float64)
        else:
            cnt = tl.zeros([], dtype=tl.float64) + count
        a = rstd
        if HAS_W:
            a = rstd * tl.load(w_ptr + c, mask=mc, other=1.0).to(tl.float64)
        tl.store(a_ptr + c, a.to(tl.float32), mask=mc)
        tl.store(b_ptr + c, (-a * rstd * rstd * s2 / cnt).to(tl.float32), mask=mc)
        tl.store(cst_ptr + c, (-a * s1 / cnt).to(tl.float32), mask=mc)


@triton.jit
def _group_sums(p1_ptr, p2_ptr, w_ptr, n, g, NSB, C, CG, HAS_W: tl.constexpr, BR: tl.constexpr,
                BCG: tl.constexpr):
    """Float64 sums of the partials (N, NSB, C) over the blocks and the channels of group g of sample n,
    weighted per channel by w when HAS_W."""
    acc1 = tl.zeros([BCG], dtype=tl.float64)
    acc2 = tl.zeros([BCG], dtype=tl.float64)
    for c0 in range(0, CG, BCG):
        j = c0 + tl.arange(0, BCG)
        mj = j < CG
        ch = g * CG + j
        wv = tl.zeros([BCG], dtype=tl.float64) + 1.0
        if HAS_W:
            wv = tl.load(w_ptr + ch, mask=mj, other=0.0).to(tl.float64)
        for r0 in range(0, NSB, BR):
            r = r0 + tl.arange(0, BR)
            m = (r < NSB)[:, None] & mj[None, :]
            off = (n * NSB + r[:, None]).to(tl.int64) * C + ch[None, :]
            acc1 += tl.sum(tl.load(p1_ptr + off, mask=m, other=0.0).to(tl.float64), axis=0) * wv
            acc2 += tl.sum(tl.load(p2_ptr + off, mask=m, other=0.0).to(tl.float64), axis=0) * wv
    return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)


@triton.jit
def _gn_stats_kernel(p1_ptr, p2_ptr, NSB, C, CG, G, count, x_ptr, sN, sC, w_ptr, b_ptr, mean_ptr, rstd_ptr,
                     scale_ptr, shift_ptr, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BR: tl.constexpr,
                     BCG: tl.constexpr):
    """GN forward, one program per (sample n, group g): mean and rstd from the partials shifted by
    x[n, g·CG, 0, 0], then the (N, C) scale and shift of the group's channels."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    s1, s2 = _group_sums(p1_ptr, p2_ptr, w_ptr, n, g, NSB, C, CG, False, BR, BCG)
    cnt = tl.zeros([], dtype=tl.float64) + count
    m = s1 / cnt
    var = tl.maximum(s2 / cnt - m * m, 0.0)
    mean = m + tl.load(x_ptr + n.to(tl.int64) * sN + (g * CG) * sC).to(tl.float32).to(tl.float64)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean.to(tl.float32))
    tl.store(rstd_ptr + pid, rstd.to(tl.float32))
    for c0 in range(0, CG, BCG):
        j = c0 + tl.arange(0, BCG)
        mj = j < CG
        ch = g * CG + j
        scale = tl.zeros([BCG], dtype=tl.float64) + rstd
        if HAS_W:
            scale = scale * tl.load(w_ptr + ch, mask=mj, other=1.0).to(tl.float64)
        shift = -mean * scale
        if HAS_B:
            shift += tl.load(b_ptr + ch, mask=mj, other=0.0).to(tl.float64)
        tl.store(scale_ptr + n * C + ch, scale.to(tl.float32), mask=mj)
        tl.store(shift_ptr + n * C + ch, shift.to(tl.float32), mask=mj)


@triton.jit
def _gn_grad_kernel(p1_ptr, p2_ptr, N, NSB, C, CG, G, count, mean_ptr, rstd_ptr, w_ptr, gw_ptr, gb_ptr,
                    a_ptr, b_ptr, cst_ptr, mc_ptr, HAS_W: tl.constexpr, WANT_GW: tl.constexpr,
                    WANT_GB: tl.constexpr, COEF: tl.constexpr, BR: tl.constexpr, BCG: tl.constexpr,
                    BC: tl.constexpr, BRC: tl.constexpr):
    """GN backward. Programs [0, N·G) when COEF, one per (sample, group): dx's (N, C) coefficients
    a = rstd·w, b = -rstd³·Σ(w·dy·(x - mean))/m and cst = -rstd·Σ(w·dy)/m (Σ over the group, m its count),
    written per channel with the mean (expanded to (N, C) for the affine's centring). The programs after them,
    one per block of BC channels: the weight and bias gradients, sums over samples and blocks of
    rstd[n, group]·sum_dy_xc and of sum_dy."""
    pid = tl.program_id(0)
    ncoef = 0
    if COEF:
        ncoef = N * G
    if pid < ncoef:
        n = pid // G
        g = pid % G
        s1, s2 = _group_sums(p1_ptr, p2_ptr, w_ptr, n, g, NSB, C, CG, HAS_W, BR, BCG)
        cnt = tl.zeros([], dtype=tl.float64) + count
        rstd = tl.load(rstd_ptr + pid).to(tl.float64)
        mean = tl.load(mean_ptr + pid)
        bq = -rstd * rstd * rstd * s2 / cnt
        cst = -rstd * s1 / cnt
        for c0 in range(0, CG, BCG):
            j = c0 + tl.arange(0, BCG)
            mj = j < CG
            ch = n * C + g * CG + j
            a = tl.zeros([BCG], dtype=tl.float64) + rstd
            if HAS_W:
                a = a * tl.load(w_ptr + g * CG + j, mask=mj, other=1.0).to(tl.float64)
            tl.store(a_ptr + ch, a.to(tl.float32), mask=mj)
            tl.store(b_ptr + ch, (tl.zeros([BCG], dtype=tl.float64) + bq).to(tl.float32), mask=mj)
            tl.store(cst_ptr + ch, (tl.zeros([BCG], dtype=tl.float64) + cst).to(tl.float32),
                     mask=mj)
            tl.store(mc_ptr + ch, tl.zeros([BCG], dtype=tl.float32) + mean,
                     mask=mj)
    else:
        c = (pid - ncoef) * BC + tl.arange(0, BC)
        mc = c < C
        acc1 = tl.zeros([BC], dtype=tl.float64)
        acc2 = tl.zeros([BC], dtype=tl.float64)
        rows = N * NSB
        for r0 in range(0, rows, BRC):
            r = r0 + tl.arange(0, BRC)
            mr = r < rows
            m = mr[:, None] & mc[None, :]
            off = r[:, None].to(tl.int64) * C + c[None, :]
            rs = tl.load(rstd_ptr + (r // NSB)[:, None] * G + (c // CG)[None, :], mask=m, other=0.0)
            acc1 += tl.sum(tl.load(p1_ptr + off, mask=m, other=0.0).to(tl.float64), axis=0)
            acc2 += tl.sum(tl.load(p2_ptr + off, mask=m, other=0.0).to(tl.float64) * rs.to(tl.float64), axis=0)
        if WANT_GW:
            tl.store(gw_ptr + c, acc2.to(tl.float32).to(gw_ptr.dtype.element_ty), mask=mc)
        if WANT_GB:
            tl.store(gb_ptr + c, acc1.to(tl.float32).to(gb_ptr.dtype.element_ty), mask=mc)
