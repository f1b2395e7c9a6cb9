"""The Triton kernels behind ``_triton`` (imported only when a tensor is headed for them: importing triton
costs about a second, and under ``TRITON_INTERPRET=1`` it must happen after that variable is set).

Two sweeps over the big tensor (``_sums_kernel``, ``_affine_kernel``) and, between them, one small "finish"
kernel per norm and direction that turns the (N, blocks, C) partial sums into statistics and the affine's
coefficients (``_bn_stats_kernel``, ``_bn_grad_kernel``, ``_gn_stats_kernel``, ``_gn_grad_kernel``,
``_bin_stats_kernel``, ``_bin_grad_kernel``).
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
def _affine_kernel(p_ptr, q_ptr, r_ptr, out_ptr, P_ptr, Pc_ptr, Q_ptr, Qc_ptr, R_ptr, total, C, HW, coef_sn,
                   NHWC_: tl.constexpr, HAS_Q: tl.constexpr, HAS_PC: tl.constexpr, HAS_RES: tl.constexpr,
                   RELU: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    if NHWC_:
        c = i % C
        n = i // (HW * C)
    else:
        c = (i // HW) % C
        n = i // (HW * C)
    k = n * coef_sn + c
    v = tl.load(p_ptr + i, mask=m, other=0.0).to(tl.float32)
    if HAS_PC:  # centred value by value: (p - Pc) * P
        v -= tl.load(Pc_ptr + k, mask=m, other=0.0)
    v = v * tl.load(P_ptr + k, mask=m, other=0.0)
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
def _count(cnt_ptr, count, CNT_PTR: tl.constexpr):
    """The number of values behind the sums, float64: read from the device (CNT_PTR) or the argument."""
    if CNT_PTR:
        cnt = tl.load(cnt_ptr).to(tl.float64)
    else:
        cnt = tl.zeros([], dtype=tl.float64) + count
    return cnt


@triton.jit
def _moments64(s1, s2, cnt, k):
    """Mean and biased variance from the float64 sums of ``x - k`` and its square over ``cnt`` values
    (``_functional._moments``)."""
    m = s1 / cnt
    return m + k, tl.maximum(s2 / cnt - m * m, 0.0)


@triton.jit
def _store_plain_sums(o1_ptr, o2_ptr, C, c, mc, s1, s2, k, cnt, BC: tl.constexpr):
    """Synced statistics' packing: the per-channel sums of ``x - k`` and its square un-shifted into the float64
    plain sums of x and x², and (program 0) the count after them."""
    tl.store(o1_ptr + c, s1 + cnt * k, mask=mc)
    tl.store(o2_ptr + c, s2 + k * (2 * s1 + cnt * k), mask=mc)
    tl.store(o2_ptr + C + tl.arange(0, BC), tl.zeros([BC], dtype=tl.float64) + cnt,
             mask=(tl.arange(0, BC) == 0) & (tl.program_id(0) == 0))


@triton.jit
def _running_update(rm_ptr, rv_ptr, c, mc, mean, var, cnt, momentum):
    """nn.BatchNorm2d's running-statistics update in place: batch mean and unbiased batch variance, computed
    in float64 and stored in the buffers' dtype (float64 buffers get the float64 update, unrounded)."""
    rm = tl.load(rm_ptr + c, mask=mc, other=0.0).to(tl.float64)
    rv = tl.load(rv_ptr + c, mask=mc, other=0.0).to(tl.float64)
    rm = rm * (1 - momentum) + mean * momentum
    rv = rv * (1 - momentum) + var * (cnt / (cnt - 1)) * momentum
    if rm_ptr.dtype.element_ty == tl.float64:  # float64 buffers keep the float64 update
        tl.store(rm_ptr + c, rm, mask=mc)
        tl.store(rv_ptr + c, rv, mask=mc)
    else:  # through float32: float64 -> bfloat16/float16 has no direct conversion everywhere
        tl.store(rm_ptr + c, rm.to(tl.float32).to(rm_ptr.dtype.element_ty), mask=mc)
        tl.store(rv_ptr + c, rv.to(tl.float32).to(rv_ptr.dtype.element_ty), mask=mc)


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
    cnt = _count(cnt_ptr, count, CNT_PTR)
    k = tl.zeros([BC], dtype=tl.float64)
    if SHIFT == 1:
        k = tl.load(x_ptr + c * sC, mask=mc, other=0.0).to(tl.float32).to(tl.float64)
    if SHIFT == 2:
        k = tl.load(k_ptr + c, mask=mc, other=0.0).to(tl.float64)
    if PACK:
        _store_plain_sums(o1_ptr, o2_ptr, C, c, mc, s1, s2, k, cnt, BC)
    else:
        mean, var = _moments64(s1, s2, cnt, k)
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
        if RUNNING:
            _running_update(rm_ptr, rv_ptr, c, mc, mean, var, cnt, momentum)


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
        cnt = _count(cnt_ptr, count, CNT_PTR)
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
    k = tl.load(x_ptr + n.to(tl.int64) * sN + (g * CG) * sC).to(tl.float32).to(tl.float64)
    mean, var = _moments64(s1, s2, tl.zeros([], dtype=tl.float64) + count, k)
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


# Batch-Instance Norm (``_bin``): BN statistics per channel and IN statistics per (sample, channel) from the
# same (N, NSB, C) partials. One program per block of BC channels walks the samples twice, BN samples at a
# time: once for the per-channel sums over samples, once for the per-(sample, channel) coefficients (the
# per-sample sums are formed again from the partials rather than kept: no scratch memory, no barrier).


@triton.jit
def _bin_block(p1_ptr, p2_ptr, x_ptr, n0, N, NSB, C, sN, sC, c, mc, SHIFT: tl.constexpr, BN: tl.constexpr,
               BSB: tl.constexpr, BC: tl.constexpr):
    """Samples n0 .. n0+BN of the channels c: the float64 (BN, BC) sums of the partials over their NSB blocks,
    the (BN, BC) mask and offsets of an (N, C) tensor, and (SHIFT) the sums' shift x[n, c, 0, 0] (else 0)."""
    n = n0 + tl.arange(0, BN)
    mn = n < N
    b = tl.arange(0, BSB)
    s1 = tl.zeros([BN, BC], dtype=tl.float64)
    s2 = tl.zeros([BN, BC], dtype=tl.float64)
    m3 = mn[:, None, None] & mc[None, None, :]
    for b0 in range(0, NSB, BSB):
        m = m3 & (b0 + b < NSB)[None, :, None]
        off = (n[:, None, None].to(tl.int64) * NSB + b0 + b[None, :, None]) * C + c[None, None, :]
        s1 += tl.sum(tl.load(p1_ptr + off, mask=m, other=0.0).to(tl.float64), axis=1)
        s2 += tl.sum(tl.load(p2_ptr + off, mask=m, other=0.0).to(tl.float64), axis=1)
    m2 = mn[:, None] & mc[None, :]
    k = tl.zeros([BN, BC], dtype=tl.float64)
    if SHIFT:
        k = tl.load(x_ptr + n[:, None].to(tl.int64) * sN + c[None, :] * sC, mask=m2, other=0.0)
        k = k.to(tl.float32).to(tl.float64)
    return s1, s2, k, m2, n[:, None] * C + c[None, :]


@triton.jit
def _bin_gate(w_ptr, rho_ptr, c, mc):
    """Per channel, float64: the branches' weights ρ·γ (BN) and (1−ρ)·γ (IN), γ, and ρ clamped to [0, 1]."""
    gam = tl.load(w_ptr + c, mask=mc, other=0.0).to(tl.float64)
    r = tl.minimum(tl.maximum(tl.load(rho_ptr + c, mask=mc, other=0.0).to(tl.float64), 0.0), 1.0)
    return r * gam, (1 - r) * gam, gam, r


@triton.jit
def _bin_stats_kernel(p1_ptr, p2_ptr, N, NSB, C, HW, x_ptr, sN, sC, cnt_ptr, count, w_ptr, b_ptr, rho_ptr,
                      rm_ptr, rv_ptr, sums_ptr, mean_in_ptr, rstd_in_ptr, bn_ptr, scale_ptr, shift_ptr, eps,
                      momentum, MODE: tl.constexpr, RUNNING: tl.constexpr, BN: tl.constexpr, BSB: tl.constexpr,
                      BC: tl.constexpr):
    """BIN forward from the partials of ``x - x[n, c, 0, 0]``. BN's per-channel statistics: MODE 0 from the
    partials (the per-sample sums re-shifted to x[0, c, 0, 0] and added over samples in float64), 1 the same
    but only packed as plain float64 sums with the count into ``sums`` (synced: for the all-reduce), 2 from
    such plain sums and count (after it), 3 the running buffers (eval). Then (not 1) the running-statistics
    update (RUNNING), BN's mean and rstd into ``bn`` (float64, (2, C)), and per (sample, channel) IN's mean
    (float32) and rstd (float64) and the affine's scale and shift (float32)."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = c < C
    kc = tl.zeros([BC], dtype=tl.float64)
    b1 = tl.zeros([BC], dtype=tl.float64)
    b2 = tl.zeros([BC], dtype=tl.float64)
    if MODE <= 1:
        kc = tl.load(x_ptr + c * sC, mask=mc, other=0.0).to(tl.float32).to(tl.float64)
        for n0 in range(0, N, BN):
            s1, s2, k, m2, _ = _bin_block(p1_ptr, p2_ptr, x_ptr, n0, N, NSB, C, sN, sC, c, mc, True, BN, BSB, BC)
            d = tl.where(m2, k - kc[None, :], 0.0)  # change of shift
            b1 += tl.sum(s1 + HW * d, axis=0)
            b2 += tl.sum(s2 + d * (2 * s1 + HW * d), axis=0)
    if MODE == 1:
        _store_plain_sums(sums_ptr, sums_ptr + C, C, c, mc, b1, b2, kc, _count(cnt_ptr, count, False), BC)
    else:
        if MODE == 3:
            mean_bn = tl.load(rm_ptr + c, mask=mc, other=0.0).to(tl.float64)
            var_bn = tl.load(rv_ptr + c, mask=mc, other=1.0).to(tl.float64)
        else:
            if MODE == 2:
                b1 = tl.load(sums_ptr + c, mask=mc, other=0.0)
                b2 = tl.load(sums_ptr + C + c, mask=mc, other=0.0)
            cnt = _count(cnt_ptr, count, MODE == 2)
            mean_bn, var_bn = _moments64(b1, b2, cnt, kc)
            if RUNNING:
                _running_update(rm_ptr, rv_ptr, c, mc, mean_bn, var_bn, cnt, momentum)
        rstd_bn = 1.0 / tl.sqrt(var_bn + eps)
        tl.store(bn_ptr + c, mean_bn, mask=mc)
        tl.store(bn_ptr + C + c, rstd_bn, mask=mc)
        wb, wi, _, _ = _bin_gate(w_ptr, rho_ptr, c, mc)
        shift_bn = tl.load(b_ptr + c, mask=mc, other=0.0).to(tl.float64) - wb * rstd_bn * mean_bn
        for n0 in range(0, N, BN):
            s1, s2, k, m2, o = _bin_block(p1_ptr, p2_ptr, x_ptr, n0, N, NSB, C, sN, sC, c, mc, True, BN, BSB, BC)
            mean_in, var_in = _moments64(s1, s2, tl.zeros([], dtype=tl.float64) + HW, k)
            rstd_in = 1.0 / tl.sqrt(var_in + eps)
            scale = wb[None, :] * rstd_bn[None, :] + wi[None, :] * rstd_in
            shift = shift_bn[None, :] - wi[None, :] * rstd_in * mean_in
            tl.store(mean_in_ptr + o, mean_in.to(tl.float32), mask=m2)
            tl.store(rstd_in_ptr + o, rstd_in, mask=m2)
            tl.store(scale_ptr + o, scale.to(tl.float32), mask=m2)
            tl.store(shift_ptr + o, shift.to(tl.float32), mask=m2)


@triton.jit
def _bin_grad_kernel(p1_ptr, p2_ptr, N, NSB, C, HW, cnt_ptr, count, mean_in_ptr, rstd_in_ptr, mbn_ptr, rbn_ptr,
                     w_ptr, rho_ptr, gw_ptr, gb_ptr, gr_ptr, sums_ptr, a_ptr, b_ptr, cst_ptr, CNT_PTR: tl.constexpr,
                     SUMS: tl.constexpr, PACK: tl.constexpr, WANT_GW: tl.constexpr, WANT_GB: tl.constexpr,
                     WANT_GR: tl.constexpr, COEF: tl.constexpr, BATCH: tl.constexpr, BN: tl.constexpr,
                     BSB: tl.constexpr, BC: tl.constexpr):
    """BIN backward from the partials of ``g`` and ``g·(x - mean_in)`` (G1, G2 per (sample, channel)). BN's
    per-channel sums h1 = Σ G1 and h2 = Σ (G2 + (mean_in - mean_bn)·G1) with in2 = Σ rstd_in·G2 give the
    weight, bias and ρ gradients (local sums); PACK writes h1, h2 (float64) into ``sums`` for synced BIN's
    all-reduce, SUMS reads them back from there instead (the reduced sums, for the coefficients only). COEF: dx's
    per-(sample, channel) coefficients a, b, cst for ``affine(g, a, cst, q=x, Q=b, Qc=mean_in)``, with the BN
    statistics' terms when BATCH (batch statistics in forward; the running ones are constants)."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = c < C
    mean_bn = tl.load(mbn_ptr + c, mask=mc, other=0.0)
    rstd_bn = tl.load(rbn_ptr + c, mask=mc, other=0.0)
    wb, wi, gam, r = _bin_gate(w_ptr, rho_ptr, c, mc)
    h1 = tl.zeros([BC], dtype=tl.float64)
    h2 = tl.zeros([BC], dtype=tl.float64)
    in2 = tl.zeros([BC], dtype=tl.float64)
    if SUMS:
        h1 = tl.load(sums_ptr + c, mask=mc, other=0.0)
        h2 = tl.load(sums_ptr + C + c, mask=mc, other=0.0)
    else:
        for n0 in range(0, N, BN):
            g1, g2, _, m2, o = _bin_block(p1_ptr, p2_ptr, p1_ptr, n0, N, NSB, C, 0, 0, c, mc, False, BN, BSB, BC)
            mi = tl.load(mean_in_ptr + o, mask=m2, other=0.0).to(tl.float64)
            h1 += tl.sum(g1, axis=0)
            h2 += tl.sum(g2 + (mi - mean_bn[None, :]) * g1, axis=0)
            in2 += tl.sum(tl.load(rstd_in_ptr + o, mask=m2, other=0.0) * g2, axis=0)
        if WANT_GW:
            tl.store(gw_ptr + c, (r * rstd_bn * h2 + (1 - r) * in2).to(tl.float32).to(gw_ptr.dtype.element_ty),
                     mask=mc)
        if WANT_GB:
            tl.store(gb_ptr + c, h1.to(tl.float32).to(gb_ptr.dtype.element_ty), mask=mc)
        if WANT_GR:  # straight-through: the clamped gate's gradient, unclamped
            tl.store(gr_ptr + c, (gam * (rstd_bn * h2 - in2)).to(tl.float32).to(gr_ptr.dtype.element_ty), mask=mc)
        if PACK:
            tl.store(sums_ptr + c, h1, mask=mc)
            tl.store(sums_ptr + C + c, h2, mask=mc)
    if COEF:
        bb = tl.zeros([BC], dtype=tl.float64)
        cb = tl.zeros([BC], dtype=tl.float64)
        if BATCH:  # the BN statistics' terms, on the (reduced) sums
            m = _count(cnt_ptr, count, CNT_PTR)
            bb = -wb * rstd_bn * rstd_bn * rstd_bn * h2 / m
            cb = -wb * rstd_bn * h1 / m - bb * mean_bn
        for n0 in range(0, N, BN):
            g1, g2, _, m2, o = _bin_block(p1_ptr, p2_ptr, p1_ptr, n0, N, NSB, C, 0, 0, c, mc, False, BN, BSB, BC)
            mi = tl.load(mean_in_ptr + o, mask=m2, other=0.0).to(tl.float64)
            ri = tl.load(rstd_in_ptr + o, mask=m2, other=0.0)
            a = wb[None, :] * rstd_bn[None, :] + wi[None, :] * ri
            b = bb[None, :] - wi[None, :] * ri * ri * ri * g2 / HW
            cst = cb[None, :] + bb[None, :] * mi - wi[None, :] * ri * g1 / HW
            tl.store(a_ptr + o, a.to(tl.float32), mask=m2)
            tl.store(b_ptr + o, b.to(tl.float32), mask=m2)
            tl.store(cst_ptr + o, cst.to(tl.float32), mask=m2)
