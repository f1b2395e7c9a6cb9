"""Batch-Instance Norm as one autograd Function: the cost of one BN instead of BN + IN.

``y = (ρ·x̂_BN + (1−ρ)·x̂_IN)·γ + β`` needs per-channel (BN) and per-(sample, channel) (IN) statistics, and
both come from the same per-(n, c) sums. Forward, one statistics sweep and one output sweep over x:

* ``S1[n, c] = Σ (x − k[n, c])`` and ``S2[n, c] = Σ (x − k[n, c])²`` over (H, W), with ``k[n, c] = x[n, c, 0, 0]``
  (shifted sums: exact for large-mean inputs, as in ``_functional``). IN's mean and variance come from them
  directly; BN's per-channel shifted sums (shift ``k[0, c]``, as ``BatchNormFunction`` takes) are combined
  over n in float64 with the change of shift ``d = k[n, c] − k[0, c]``: ``Σ_n S1 + HW·d`` and
  ``Σ_n S2 + 2·d·S1 + HW·d²``. With ``sync`` those per-channel sums go through ``_functional._synced_sums``,
  the all-reduce ``BatchNormFunction`` uses.
* the output is one per-(n, c) affine ``y = x·A + B``, ``A = γ(ρ·rstd_BN + (1−ρ)·rstd_IN)``,
  ``B = β − γ(ρ·rstd_BN·mean_BN + (1−ρ)·rstd_IN·mean_IN)``.

Backward, one sweep for the per-(n, c) sums ``G1 = Σ g`` and ``G2 = Σ g·(x − mean_IN)`` (g = dy); BN's
per-channel sums ``Σ g`` and ``Σ g·(x − mean_BN) = Σ_n G2 + (mean_IN − mean_BN)·G1`` follow in float64, then
the gradients of ρ (``γ·Σ g·(x̂_BN − x̂_IN)``), γ and β, and one sweep for
``dx = a·g + b·(x − mean_IN) + c`` with (n, c) coefficients.

``batch_stats=False`` (eval) takes the BN branch's statistics from the running buffers (constants for
autograd); the IN branch always uses the sample's. ``rho`` is clamped to [0, 1] in forward and its gradient
passed through unclamped (straight-through). Small per-(n, c) math runs in float64; the big tensor is read in
``compute_dtype`` (float32 for bf16/fp16). Back-ends: the Triton kernels, the C++ kernels for the CPU tensors
they take, or tensor ops.

On the C++ kernels (``_bin_cpp_forward`` / ``_bin_cpp_backward``) the sweeps are ``_kernels.nc_sums`` and
``_kernels.nc_affine`` and the small float64 math above is two C calls per direction, around the all-reduce of
synced BIN: forward ``_kernels.bin_moments`` (IN statistics, BN's per-channel shifted sums) and
``_kernels.bin_scale`` (BN statistics, the running-statistics update of float64 buffers -- others are updated
here with ``_update_running`` --, the (N, C) scale and shift); backward ``_kernels.bin_grad_sums`` (BN's
per-channel gradient sums, the weight, bias and ρ gradients) and ``_kernels.bin_grad_coefs`` (dx's (N, C)
coefficients). They evaluate the tensor-op path's expressions in the same order, so the two agree to float64
rounding (and a layer dispatches a few torch ops per direction instead of dozens of small ones).

On Triton (``_bin_triton_forward`` / ``_bin_triton_backward``) each direction is three launches: the sweep
(``_triton.channel_sums``), one finish kernel that does all the small float64 math above (``_triton.bin_stats``:
both branches' statistics, the running-statistics update, the (N, C) scale and shift; ``_triton.bin_grads``:
the weight, bias and ρ gradients and dx's (N, C) coefficients), and the sweep ``_triton.affine``. Synced, the
per-channel BN sums are all-reduced between two launches of the finish (``_triton.bin_pack`` forward).
"""

from __future__ import annotations

import torch

from normlab.norms import _functional, _kernels, _triton
from normlab.norms._functional import (CPP, TRITON, _affine_out, _fresh, _into, _moments, _sample_shift,
                                       _update_running, compute_dtype)


def _sums(xf, center):
    """Forward on the tensor ops: the (N, C) float64 sums of ``xf - center`` and its square (center (N, C)), and
    the compute-dtype buffer they were formed in (it will hold the output)."""
    n, c = xf.shape[:2]
    buf = torch.sub(xf, center.view(n, c, 1, 1), out=_fresh(xf))
    s1 = buf.sum((2, 3))
    s2 = buf.mul_(buf).sum((2, 3))
    return s1.double(), s2.double(), buf


class BatchInstanceFunction(torch.autograd.Function):
    """BIN in one Function (see the module docstring). Arguments: ``x`` (N, C, H, W); ``weight``, ``bias``,
    ``rho`` (C,); ``running_mean`` / ``running_var``: updated with ``momentum`` when ``batch_stats`` (or None:
    no update), the BN statistics themselves when not; ``sync``: all-reduce the BN branch's sums (forward) and
    gradient sums (backward) when torch.distributed is active; the weight, bias and ρ gradients stay local."""

    @staticmethod
    def forward(ctx, x, weight, bias, rho, running_mean, running_var, momentum: float, eps: float, sync: bool,
                batch_stats: bool = True):  # noqa: D102
        n, c, h, w = x.shape
        hw = h * w
        ct = compute_dtype(x.dtype)
        be = _functional.backend(x)
        kind, fmt = be if be else (None, None)
        if batch_stats:
            local, sync = _functional.batch_values(x, sync, "BatchInstanceNorm", "in/gn")
        else:  # eval: the running statistics, nothing to sync
            local, sync = n * hw, False
        ctx.cpp = kind == CPP
        if kind is not None:
            run = (ctx, x, fmt, weight, bias, rho, running_mean, running_var, momentum, eps, sync, batch_stats, local)
            return (_bin_cpp_forward if kind == CPP else _bin_triton_forward)(*run)
        xf = x if x.dtype == ct else x.to(ct)
        k = _sample_shift(x, ct, 1)  # (N, C): x[n, c, 0, 0]
        s1, s2, buf = _sums(xf, k)
        k64 = k.double()
        mean_in, var_in = _moments(s1, s2, hw, torch.float64, k64)  # (N, C)
        total = local
        if batch_stats:
            kc = k64[0] if n else torch.zeros(c, dtype=torch.float64, device=x.device)
            d = k64 - kc  # change of shift, per (n, c)
            b1 = (s1 + hw * d).sum(0)
            b2 = (s2 + d * (2 * s1 + hw * d)).sum(0)
            if sync:
                b1, b2, total = _functional._synced_sums(b1, b2, kc, local)
                kc = None
            mean_bn, var_bn = _moments(b1, b2, total, torch.float64, kc)
            if running_mean is not None:
                _update_running(running_mean, running_var, mean_bn, var_bn, total, momentum)
        else:
            # copies: saved for backward, while the buffers may change in place before it runs
            mean_bn = running_mean.detach().to(torch.float64, copy=True)
            var_bn = running_var.detach().to(torch.float64, copy=True)
        rstd_bn = torch.rsqrt(var_bn + eps)
        rstd_in = torch.rsqrt(var_in + eps)
        r = rho.detach().double().clamp(0, 1)
        g64 = weight.detach().double()
        wb, wi = r * g64, (1 - r) * g64  # the branches' weights, (C,)
        scale = wb * rstd_bn + wi * rstd_in  # (N, C)
        shift_y = bias.detach().double() - wb * rstd_bn * mean_bn - wi * rstd_in * mean_in
        y = _affine_out(kind, fmt, x, xf, buf, scale.to(ct), shift_y.to(ct), (n, c, 1, 1), None, False)
        # the backward sweep centres x on mean_in in the compute dtype: the small math uses that rounded value
        mean_in = mean_in.to(ct)
        ctx.total, ctx.sync, ctx.batch_stats = total, sync, batch_stats
        ctx.dtypes = (weight.dtype, bias.dtype, rho.dtype)
        ctx.save_for_backward(x, weight, rho, mean_in, rstd_in, mean_bn, rstd_bn)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        if ctx.cpp:
            return _bin_cpp_backward(ctx, dy)
        x, weight, rho, mean_in, rstd_in, mean_bn, rstd_bn = ctx.saved_tensors
        n, c, h, w = x.shape
        hw = h * w
        ct = mean_in.dtype
        be = _functional.backend(x)
        kind, fmt = be if be else (None, None)
        if kind == TRITON:
            return _bin_triton_backward(ctx, dy, fmt, x, weight, rho, mean_in, rstd_in, mean_bn, rstd_bn)
        dyf = dy if dy.dtype == ct else dy.to(ct)
        xf = x if x.dtype == ct else x.to(ct)
        g1 = dyf.sum((2, 3)).double()
        # centred before the product (exact for large-mean inputs), in the buffer that becomes grad_x
        buf = torch.sub(xf, mean_in.view(n, c, 1, 1), out=_fresh(xf)).mul_(dyf)
        g2 = buf.sum((2, 3)).double()
        mi = mean_in.double()
        r = rho.detach().double().clamp(0, 1)
        gam = weight.detach().double()
        wb, wi = r * gam, (1 - r) * gam
        h1 = g1.sum(0)  # BN branch: Σ g and Σ g·(x − mean_bn), per channel (local)
        h2 = (g2 + (mi - mean_bn) * g1).sum(0)
        in2 = (rstd_in * g2).sum(0)  # Σ g·x̂_in per channel
        grads = [None] * 10
        if ctx.needs_input_grad[1]:
            grads[1] = (r * rstd_bn * h2 + (1 - r) * in2).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            grads[2] = h1.to(ctx.dtypes[1])
        if ctx.needs_input_grad[3]:  # straight-through: the clamped gate's gradient, unclamped
            grads[3] = (gam * (rstd_bn * h2 - in2)).to(ctx.dtypes[2])
        if ctx.needs_input_grad[0]:
            a = wb * rstd_bn + wi * rstd_in
            b = -wi * rstd_in ** 3 * g2 / hw
            cst = -wi * rstd_in * g1 / hw
            if ctx.batch_stats:  # BN statistics depend on x: their terms, on the (synced) sums
                if ctx.sync:
                    both = _functional._all_reduce(torch.cat([h1, h2]))
                    h1, h2 = both[:c], both[c:]
                m = ctx.total
                bb = -wb * rstd_bn ** 3 * h2 / m
                b = b + bb
                cst = cst - wb * rstd_bn * h1 / m + bb * (mi - mean_bn)
            # dx = a*g + b*(x - mean_in) + cst (uncentred here, as in _functional; centred on the C++ kernels)
            gx = torch.addcmul((cst - b * mi).to(ct).view(n, c, 1, 1), xf, b.to(ct).view(n, c, 1, 1),
                               out=_into(buf))
            gx.addcmul_(dyf, a.to(ct).view(n, c, 1, 1))
            grads[0] = gx if gx.dtype == x.dtype else gx.to(x.dtype)
        return tuple(grads)


def _bin_cpp_forward(ctx, x, fmt, weight, bias, rho, running_mean, running_var, momentum, eps, sync: bool,
                     batch_stats: bool, local: int) -> torch.Tensor:
    """BIN forward on the C++ kernels: the sums sweep (shift ``x[n, c, 0, 0]`` read by the kernel), the small
    math in two C calls (BN's per-channel sums all-reduced between them when synced) and the affine sweep. The
    running statistics are updated by ``bin_scale`` when they are float64 and contiguous, else here as on the
    tensor ops (``_update_running``: the same values, rounded to their dtype)."""
    hw = x.shape[2] * x.shape[3]
    s, k = _kernels.nc_sums(x, None, fmt)
    ins, mean_in, sums = _kernels.bin_moments(s, k, hw, eps, x.dtype)  # IN mean / rstd, BN's shifted sums
    total, shifted, moments, run = local, True, False, (None, None)
    if not batch_stats:  # eval: BN's statistics are the running ones (copied into bn by bin_scale: saved below)
        sums, moments = (_kernels._as(running_mean, torch.float64), _kernels._as(running_var, torch.float64)), True
    elif sync:
        b1, b2, total = _functional._synced_sums(sums[0], sums[1], sums[2], local)
        sums, shifted = (b1, b2), False
    update = batch_stats and running_mean is not None
    in_c = update and all(t.dtype == torch.float64 and t.is_contiguous() for t in (running_mean, running_var))
    if in_c:
        run = (running_mean, running_var)
    coef, bn = _kernels.bin_scale(ins, sums, total, weight, bias, rho, eps, momentum, *run, x.dtype,
                                  shifted=shifted, moments=moments)  # bn: BN mean, variance, rstd (float64)
    if update and not in_c:
        _update_running(running_mean, running_var, bn[0], bn[1], total, momentum)
    y = _kernels.nc_affine(x, fmt, coef[0], coef[1])
    ctx.total, ctx.sync, ctx.batch_stats, ctx.fmt = total, sync, batch_stats, fmt
    ctx.dtypes = (weight.dtype, bias.dtype, rho.dtype)
    ctx.save_for_backward(x, weight, rho, mean_in, ins, bn)  # mean_in: rounded to the compute dtype
    return y


def _bin_cpp_backward(ctx, dy):
    """BIN backward on the C++ kernels: the sums sweep (g and g*(x - mean_in) per (n, c)), the weight, bias and
    ρ gradients and BN's per-channel gradient sums in one C call, the all-reduce of those sums when synced, dx's
    (N, C) coefficients in a second C call, and the dx sweep."""
    x, weight, rho, mean_in, ins, bn = ctx.saved_tensors
    fmt = ctx.fmt
    g = _kernels.like(dy if dy.dtype == x.dtype else dy.to(x.dtype), fmt)
    s, _ = _kernels.nc_sums(g, x, fmt, mean_in)
    h, grads, grads_t = _kernels.bin_grad_sums(s, mean_in, ins, bn, weight, rho, x.dtype)
    out = [None] * 10
    for i, dt in enumerate(ctx.dtypes):  # rounded once from float64, to the parameter's dtype
        if ctx.needs_input_grad[i + 1]:
            out[i + 1] = grads_t[i] if dt == mean_in.dtype else grads[i].to(dt)
    if ctx.needs_input_grad[0]:
        if ctx.batch_stats and ctx.sync:
            _functional._all_reduce(h)
        coef = _kernels.bin_grad_coefs(s, mean_in, ins, bn, weight, rho, h if ctx.batch_stats else None, ctx.total,
                                       x.shape[2] * x.shape[3], x.dtype)
        out[0] = _kernels.nc_affine(g, fmt, coef[0], coef[2], q=x, Q=coef[1], Qc=mean_in)  # a*g + b*(x - m) + cst
    return tuple(out)


def _bin_triton_forward(ctx, x, fmt, weight, bias, rho, running_mean, running_var, momentum, eps, sync: bool,
                        batch_stats: bool, local: int) -> torch.Tensor:
    """BIN forward on the Triton kernels: the sums kernel (per-(n, c) shift read from x inside it), the finish
    kernel (both branches' statistics in float64, the running-statistics update, the (N, C) scale and shift)
    and the affine: three launches. Synced: one more launch packs the per-channel BN sums (plain float64, with
    the count) for the all-reduce, and the finish takes the reduced ones."""
    c = x.shape[1]
    p1, p2, _ = _triton.channel_sums(x, fmt, None, group_size=1)
    run = dict(running_mean=running_mean, running_var=running_var, momentum=momentum, batch_stats=batch_stats)
    total, sums = local, None
    if sync:
        sums = _functional._all_reduce(_triton.bin_pack(p1, p2, x))
        total = sums[2 * c]  # a device tensor: no host sync
    mean_in, rstd_in, bn, scale, shift = _triton.bin_stats(p1, p2, x, weight, bias, rho, eps, sums=sums, **run)
    y = _triton.affine(x, fmt, scale, shift)
    ctx.total, ctx.sync, ctx.batch_stats = total, sync, batch_stats
    ctx.dtypes = (weight.dtype, bias.dtype, rho.dtype)
    ctx.save_for_backward(x, weight, rho, mean_in, rstd_in, bn[0], bn[1])
    return y


def _bin_triton_backward(ctx, dy, fmt, x, weight, rho, mean_in, rstd_in, mean_bn, rstd_bn):
    """BIN backward on the Triton kernels: the (N, C) sums of g and g*(x - mean_in) in one pass, the finish
    kernel (weight, bias and ρ gradients, dx's (N, C) coefficients), the affine for dx: three launches.
    Synced: the finish packs BN's per-channel gradient sums, which are all-reduced, then runs again for the
    coefficients."""
    h, w = x.shape[2:]
    g = _triton.like(dy if dy.dtype == x.dtype else dy.to(x.dtype), fmt)
    p1, p2, _ = _triton.channel_sums(g, fmt, mean_in, b=x)
    dtypes = tuple(d if ctx.needs_input_grad[i] else None for i, d in zip((1, 2, 3), ctx.dtypes))
    want_x = ctx.needs_input_grad[0]
    pack = want_x and ctx.sync
    args = (p1, p2, h * w, ctx.total, mean_in, rstd_in, mean_bn, rstd_bn, weight, rho)
    gw, gb, gr, coef, packed = _triton.bin_grads(*args, dtypes, ctx.batch_stats, want_x and not pack, pack)
    if pack:
        coef = _triton.bin_grads(*args, sums=_functional._all_reduce(packed))[3]
    grad_x = None
    if want_x:
        a, b, cst = coef
        grad_x = _triton.affine(g, fmt, a, cst, q=x, Q=b, Qc=mean_in)  # dx = a*g + b*(x - mean_in) + cst
    return grad_x, gw, gb, gr, None, None, None, None, None, None
