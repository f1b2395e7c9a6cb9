"""The norms' CUDA path: Triton kernels shared by BN, BIN, IN, LN and GN.

Every norm needs the same two sweeps over the big tensor, so two kernels serve all of them:

* ``channel_sums``: per-(sample, channel) partial sums over a block of H*W positions, in float32, of either
  ``x - center`` and ``(x - center)²`` (forward statistics; ``center`` is one sample of the channel or
  group, so the sums are *shifted* and stay exact for inputs whose mean is far larger than their std; with
  ``center=None`` the kernel reads that sample from x itself), or ``g`` and ``g * (x - center)`` (backward;
  ``g = dy`` masked by ``y > 0`` under a fused ReLU, and written out because it is also the residual's
  gradient).
* ``affine``: ``out = p * P[n, c] + (q - Qc[n, c]) * Q[n, c] + R[n, c] (+ residual) (ReLU)`` in memory order,
  which is the forward normalization (``q`` absent) and the input gradient (``p = g``, ``q = x``,
  ``Qc = mean``) of every norm; BN's coefficients are per channel (sample stride 0).

Between them, one small *finish* kernel turns the (N, blocks, C) partials into what the affine needs:
``bn_stats`` (BN forward: sums over samples and blocks, mean, rstd, the running-statistics update, scale
and shift), ``bn_grads`` (BN backward: weight/bias gradients, dx's coefficients), ``gn_stats`` and
``gn_grads`` (the same per (sample, group), summing over blocks and the group's channels), ``bin_stats`` and
``bin_grads`` (Batch-Instance Norm: BN's per-channel and IN's per-(sample, channel) statistics from the same
partials, the (N, C) affine's coefficients, the weight, bias and ρ gradients). They add the partials in
float64 in a fixed order (no atomics: deterministic). A forward or a backward is thus three launches (sums,
finish, affine), as many as native BN's kernels; with the small math as torch ops it would be 18-28 (BN, IN, LN,
GN) and 59-61 (BIN) launches, each a visible share of a layer's time (counted under the interpreter,
``tests/test_triton_norms.py`` asserts the bounds). Synced BN and BIN add
the packing of the local sums (``bn_pack`` / ``bn_grads(pack=True)``, ``bin_pack`` / ``bin_grads(pack=True)``)
and the all-reduce.

Inputs are float32, bfloat16 or float16 in NCHW or channels_last; statistics and coefficients are float32
(BIN's rstd and BN statistics, kept for its backward, float64); weights, their gradients and running statistics
keep their own dtype.

Selection (``usable``): non-empty CUDA tensors when triton imports, unless ``NORMLAB_TRITON=0``;
``NORMLAB_TRITON=1`` also takes CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported --
how the tests run these kernels without a GPU.
"""

from __future__ import annotations

import os
import re

import torch

from normlab.norms._kernels import NCHW, NHWC, dense_layout

_state: dict = {}


# The oldest Triton the kernels were checked on (interpreter tests against native layers, and compiled for sm_90:
# tests/test_triton_norms.py): 3.6, torch 2.11's. Triton 3.0 (torch 2.4's) computed wrong values under its
# interpreter, so older releases get the tensor ops.
MIN_TRITON = (3, 6)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:2])


def kernels():
    """The kernel module, imported on first use; None when triton does not import or is older than
    ``MIN_TRITON`` (the tensor ops run)."""
    if "mod" not in _state:
        try:
            import triton

            if _version(triton.__version__) < MIN_TRITON:
                raise ImportError(f"triton {triton.__version__} is older than {MIN_TRITON}")
            from normlab.norms import _triton_kernels
        except Exception:  # noqa: BLE001 -- no triton, an old one, or one that does not work with this torch
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
    if x.dtype not in DTYPES or fmt is None or x.numel() == 0:
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


def channel_sums(a: torch.Tensor, fmt: str, center: torch.Tensor | None, b: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, *, group_size: int | None = None):
    """Partial sums of shape (N, blocks, C), float32: ``a - center`` and its square (``b`` None), or
    ``g`` and ``g * (b - center)`` with ``g = a * (mask > 0)`` (``mask`` optional). ``center`` is (C,)
    or (N, C), or with ``group_size`` (N, C // group_size), one value per (sample, group); None: the shift is
    read from ``a`` itself inside the kernel (no separate slice): ``a[0, c, 0, 0]`` per channel, or with
    ``group_size`` ``a[n, first channel of c's group, 0, 0]`` (``_functional._sample_shift``'s values).
    Returns ``(p1, p2, g)``; ``g`` is None without mask."""
    n, c, h, w = a.shape
    hw = h * w
    bc = min(_pow2(c), 64)
    bs = max(1, min(_pow2(hw), 4096 // bc))
    nsb = _cdiv(hw, bs)
    p1 = torch.empty(n, nsb, c, dtype=torch.float32, device=a.device)
    p2 = torch.empty_like(p1)
    g = torch.empty_like(a) if mask is not None else None
    s_n, s_c, s_s = (c * hw, hw, 1) if fmt == NCHW else (c * hw, 1, c)
    cg = 1 if group_size is None else int(group_size)
    if center is None:
        ctr, ctr_sn = a, (0 if group_size is None else s_n)
    else:
        ctr = _f32(center)
        ctr_sn = ctr.shape[1] if ctr.dim() == 2 else 0
    kernels()._sums_kernel[(n, nsb, _cdiv(c, bc))](
        a, a if b is None else b, a if mask is None else mask, a if g is None else g, ctr, p1, p2,
        c, hw, s_n, s_c, s_s, ctr_sn, nsb, cg,
        PRODUCT=b is not None, HAS_MASK=mask is not None, CTR_FROM_A=center is None, BS=bs, BC=bc)
    return p1, p2, g


def affine(p: torch.Tensor, fmt: str, P: torch.Tensor, R: torch.Tensor, q: torch.Tensor | None = None,
           Q: torch.Tensor | None = None, Qc: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           relu: bool = False, Pc: torch.Tensor | None = None) -> torch.Tensor:
    """``(p - Pc) * P + (q - Qc) * Q + R (+ residual) (ReLU)`` with (C,) or (N, C) coefficients (all of one
    shape), in p's layout and dtype; ``q`` and ``residual`` must already be in that layout. ``Pc`` (None: 0)
    centres p value by value (the spec engine's forward, exact for large-mean inputs)."""
    n, c, h, w = p.shape
    out = torch.empty_like(p)
    P, R = _f32(P), _f32(R)
    Q = P if Q is None else _f32(Q)
    Qc = P if Qc is None else _f32(Qc)
    Pc_ = P if Pc is None else _f32(Pc)
    total = p.numel()
    block = 1024
    kernels()._affine_kernel[(_cdiv(total, block),)](
        p, p if q is None else q, p if residual is None else residual, out, P, Pc_, Q, Qc, R, total, c, h * w,
        c if P.dim() == 2 else 0, NHWC_=fmt == NHWC, HAS_Q=q is not None, HAS_PC=Pc is not None,
        HAS_RES=residual is not None, RELU=bool(relu), BLOCK=block)
    return out


# The finish kernels: (N, blocks, C) partials -> statistics and the affine's coefficients, one launch each.

FINISH_TILE, FINISH_WARPS = 4096, 8  # the finish kernels' row loops: few, wide iterations (they are latency-bound)


def _finish_blocks(rows: int, c: int, tile: int = FINISH_TILE) -> tuple[int, int]:
    """(channels per program, rows per iteration) of the finish kernels' loops over rows."""
    bc = min(_pow2(c), 32)
    return bc, max(1, min(_pow2(rows), tile // bc))


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """``t`` as a kernel argument (a 1-D parameter: contiguous), or a dummy pointer where the kernel skips it."""
    return dummy if t is None else t.contiguous()


def bn_stats(p1: torch.Tensor, p2: torch.Tensor, count, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
             momentum: float = 0.0, x: torch.Tensor | None = None):
    """BN forward's finish, one launch: per-channel sums of the partials ``p1``, ``p2`` (any rows x C, added in
    float64), mean, rstd, the running-statistics update in place (momentum, unbiased variance, the buffers'
    own dtype) and the affine's ``scale = rstd*weight``, ``shift = bias - mean*scale``. ``x``: the partials
    are shifted by ``x[0, c, 0, 0]`` (``channel_sums(x, fmt, None)``); None: they are plain sums, e.g. the
    float64 (C,) sums of synced BN after the all-reduce. ``count``: a number, or a 0-d tensor on the device
    (read in the kernel: no host sync). Returns float32 ``(mean, rstd, scale, shift)``, each (C,)."""
    c = p1.shape[-1]
    rows = p1.numel() // c if c else 0
    out = torch.empty(4, c, dtype=torch.float32, device=p1.device)
    cnt_t = count if torch.is_tensor(count) else None
    bc, br = _finish_blocks(rows, c)
    running = running_mean is not None
    rm, rv = _running_args(running_mean, running_var) if running else (p1, p1)
    kernels()._bn_stats_kernel[(_cdiv(c, bc),)](
        p1, p2, rows, c, _or(cnt_t, p1), 0 if cnt_t is not None else int(count), p1 if x is None else x,
        x.stride(1) if x is not None else 0, p1, _or(weight, p1), _or(bias, p1), rm, rv,
        out[0], out[1], out[2], out[3], p1, p1, float(eps), float(momentum), SHIFT=1 if x is not None else 0,
        CNT_PTR=cnt_t is not None, PACK=False, HAS_W=weight is not None, HAS_B=bias is not None, RUNNING=running,
        BR=br, BC=bc, num_warps=FINISH_WARPS)
    if running:
        _running_back(running_mean, running_var, rm, rv)
    return out[0], out[1], out[2], out[3]


def _running_args(running_mean: torch.Tensor, running_var: torch.Tensor):
    """The running buffers as kernel arguments: themselves, or contiguous copies (updated in place, then
    written back by ``_running_back``)."""
    if running_mean.is_contiguous() and running_var.is_contiguous():
        return running_mean, running_var
    return running_mean.contiguous(), running_var.contiguous()


def _running_back(running_mean: torch.Tensor, running_var: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor) -> None:
    if rm is not running_mean:
        running_mean.copy_(rm)
        running_var.copy_(rv)


def bn_pack(p1: torch.Tensor, p2: torch.Tensor, count: int, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Synced BN's local statistics, one launch: float64 ``[sum x (C), sum x² (C), count]`` from partials
    shifted by ``shift`` (C,) (un-shifted here), ready for the all-reduce and then ``bn_stats``."""
    c = p1.shape[-1]
    rows = p1.numel() // c if c else 0
    packed = torch.empty(2 * c + 1, dtype=torch.float64, device=p1.device)
    bc, br = _finish_blocks(rows, c)
    kernels()._bn_stats_kernel[(max(1, _cdiv(c, bc)),)](
        p1, p2, rows, c, p1, int(count), p1, 0, p1 if shift is None else _f32(shift), p1, p1, p1, p1,
        p1, p1, p1, p1, packed[:c], packed[c:], 0.0, 0.0, SHIFT=0 if shift is None else 2, CNT_PTR=False,
        PACK=True, HAS_W=False, HAS_B=False, RUNNING=False, BR=br, BC=bc, num_warps=FINISH_WARPS)
    return packed


def bn_grads(p1: torch.Tensor, p2: torch.Tensor, count, rstd: torch.Tensor, weight: torch.Tensor | None,
             grad_weight_dtype: torch.dtype | None = None, grad_bias_dtype: torch.dtype | None = None,
             pack: bool = False):
    """BN backward's finish, one launch: per-channel ``sum_dy`` and ``sum_dy_xc`` from the partials of
    ``channel_sums(g, fmt, mean, b=x)`` (or plain (C,) sums), the weight gradient ``sum_dy_xc*rstd`` and bias
    gradient ``sum_dy`` (only for the dtypes given), and either dx's coefficients ``(a, b, cst)``: float32 (C,)
    for ``affine(g, fmt, a, cst, q=x, Q=b, Qc=mean)`` or, with ``pack``, the float64 ``[sum_dy, sum_dy_xc]``
    for synced BN's all-reduce (then call again on the reduced halves). Returns
    ``(grad_weight, grad_bias, coefficients or packed)``."""
    c = p1.shape[-1]
    rows = p1.numel() // c if c else 0
    dev = p1.device
    gw = torch.empty(c, dtype=grad_weight_dtype, device=dev) if grad_weight_dtype is not None else None
    gb = torch.empty(c, dtype=grad_bias_dtype, device=dev) if grad_bias_dtype is not None else None
    out = torch.empty(2 * c, dtype=torch.float64, device=dev) if pack else torch.empty(3, c, dtype=torch.float32,
                                                                                         device=dev)
    cnt_t = count if torch.is_tensor(count) else None
    bc, br = _finish_blocks(rows, c)
    coef = (p1, p1, p1) if pack else (out[0], out[1], out[2])
    kernels()._bn_grad_kernel[(_cdiv(c, bc),)](
        p1, p2, rows, c, _or(cnt_t, p1), 0 if cnt_t is not None or pack else int(count), rstd, _or(weight, p1),
        _or(gw, p1), _or(gb, p1), *coef, out if pack else p1, CNT_PTR=cnt_t is not None,
        HAS_W=weight is not None, WANT_GW=gw is not None, WANT_GB=gb is not None, COEF=not pack, PACK=pack,
        BR=br, BC=bc, num_warps=FINISH_WARPS)
    return gw, gb, (out if pack else (out[0], out[1], out[2]))


def _group_blocks(nsb: int, cg: int, tile: int = 1024) -> tuple[int, int]:
    bcg = min(_pow2(cg), 256)
    return bcg, max(1, min(_pow2(nsb), tile // bcg))


def gn_stats(p1: torch.Tensor, p2: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float):
    """The group norms' forward finish, one launch: from ``channel_sums(x, fmt, None, group_size=C//G)``'s
    partials, per (sample, group) mean and rstd (float32 (N, G)) and the affine's (N, C) ``scale`` and
    ``shift``. Returns ``(mean, rstd, scale, shift)``."""
    n, nsb, c = p1.shape
    g = int(num_groups)
    cg = c // g
    count = cg * x.shape[2] * x.shape[3]
    stats = torch.empty(2, n, g, dtype=torch.float32, device=p1.device)
    coef = torch.empty(2, n, c, dtype=torch.float32, device=p1.device)
    bcg, br = _group_blocks(nsb, cg)
    kernels()._gn_stats_kernel[(n * g,)](
        p1, p2, nsb, c, cg, g, count, x, x.stride(0), x.stride(1), _or(weight, p1), _or(bias, p1),
        stats[0], stats[1], coef[0], coef[1], float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
        BR=br, BCG=bcg)
    return stats[0], stats[1], coef[0], coef[1]


def gn_grads(p1: torch.Tensor, p2: torch.Tensor, num_groups: int, count: int, mean: torch.Tensor,
             rstd: torch.Tensor, weight: torch.Tensor | None, grad_weight_dtype: torch.dtype | None = None,
             grad_bias_dtype: torch.dtype | None = None, coefficients: bool = True):
    """The group norms' backward finish, one launch: from ``channel_sums(g, fmt, mean, b=x, group_size=C//G)``'s
    (N, blocks, C) partials, the weight and bias gradients (summed over samples, only for the dtypes given) and,
    with ``coefficients``, dx's float32 (N, C) ``(a, b, cst, mean_c)`` for ``affine(g, fmt, a, cst, q=x, Q=b,
    Qc=mean_c)``. ``count``: values per group (C/G·H·W). Returns ``(grad_weight, grad_bias, coefficients or
    None)``."""
    n, nsb, c = p1.shape
    g = int(num_groups)
    cg = c // g
    dev = p1.device
    gw = torch.empty(c, dtype=grad_weight_dtype, device=dev) if grad_weight_dtype is not None else None
    gb = torch.empty(c, dtype=grad_bias_dtype, device=dev) if grad_bias_dtype is not None else None
    coef = torch.empty(4, n, c, dtype=torch.float32, device=dev) if coefficients else None
    bcg, br = _group_blocks(nsb, cg)
    bc, brc = _finish_blocks(n * nsb, c)
    nprog = (n * g if coefficients else 0) + (_cdiv(c, bc) if gw is not None or gb is not None else 0)
    if nprog:
        cf = (p1, p1, p1, p1) if coef is None else (coef[0], coef[1], coef[2], coef[3])
        kernels()._gn_grad_kernel[(nprog,)](
            p1, p2, n, nsb, c, cg, g, int(count), mean, rstd, _or(weight, p1), _or(gw, p1), _or(gb, p1), *cf,
            HAS_W=weight is not None, WANT_GW=gw is not None, WANT_GB=gb is not None, COEF=coefficients,
            BR=br, BCG=bcg, BC=bc, BRC=brc, num_warps=FINISH_WARPS)
    return gw, gb, (None if coef is None else (coef[0], coef[1], coef[2], coef[3]))


def _bin_blocks(n: int, nsb: int, c: int) -> tuple[int, int, int]:
    """(samples, blocks, channels) per iteration of the BIN finish kernels' loops: at most FINISH_TILE values,
    the blocks of a sample first."""
    bc = min(_pow2(c), 32)
    bsb = max(1, min(_pow2(nsb), FINISH_TILE // bc))
    return max(1, min(_pow2(n), FINISH_TILE // (bc * bsb))), bsb, bc


def bin_stats(p1: torch.Tensor, p2: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              rho: torch.Tensor, eps: float, running_mean: torch.Tensor | None = None,
              running_var: torch.Tensor | None = None, momentum: float = 0.0, batch_stats: bool = True,
              sums: torch.Tensor | None = None):
    """BIN forward's finish, one launch, from ``channel_sums(x, fmt, None, group_size=1)``'s (N, blocks, C)
    partials (shifted by x[n, c, 0, 0]). BN's statistics come from the partials, or from ``sums`` (synced: the
    all-reduced ``bin_pack``), or with ``batch_stats=False`` from the running buffers; with ``batch_stats`` and
    running buffers given, these are updated in place (momentum, unbiased variance). Returns ``(mean_in,
    rstd_in, bn, scale, shift)``: IN's float32 mean and float64 rstd (N, C), BN's float64 ``[mean, rstd]``
    (2, C), and the affine's float32 (N, C) scale and shift."""
    n, nsb, c = p1.shape
    dev = p1.device
    out = torch.empty(3, n, c, dtype=torch.float32, device=dev)  # mean_in, scale, shift
    stats64 = torch.empty(n + 2, c, dtype=torch.float64, device=dev)  # rstd_in (N rows), mean_bn, rstd_bn
    mode = 3 if not batch_stats else 2 if sums is not None else 0
    running = running_mean is not None and mode != 3
    rm, rv = _running_args(running_mean, running_var) if running_mean is not None else (p1, p1)
    _bin_stats_launch(p1, p2, x, mode, rm, rv, _or(sums, p1), out[0], stats64[:n], stats64[n:], out[1], out[2],
                      weight, bias, rho, eps, momentum, running)
    if running:
        _running_back(running_mean, running_var, rm, rv)
    return out[0], stats64[:n], stats64[n:], out[1], out[2]


def bin_pack(p1: torch.Tensor, p2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Synced BIN's local BN statistics, one launch: float64 ``[Σx (C), Σx² (C), count]`` from
    ``channel_sums(x, fmt, None, group_size=1)``'s partials, ready for the all-reduce and ``bin_stats(sums=)``."""
    c = p1.shape[2]
    packed = torch.empty(2 * c + 1, dtype=torch.float64, device=p1.device)
    _bin_stats_launch(p1, p2, x, 1, p1, p1, packed, p1, p1, p1, p1, p1, p1, p1, p1, 0.0, 0.0, False)
    return packed


def _bin_stats_launch(p1, p2, x, mode: int, rm, rv, sums, mean_in, rstd_in, bn, scale, shift, weight, bias, rho,
                      eps: float, momentum: float, running: bool) -> None:
    n, nsb, c = p1.shape
    hw = x.shape[2] * x.shape[3]
    bnb, bsb, bc = _bin_blocks(n, nsb, c)
    kernels()._bin_stats_kernel[(_cdiv(c, bc),)](
        p1, p2, n, nsb, c, hw, x, x.stride(0), x.stride(1), sums[2 * c:] if mode == 2 else p1, n * hw,
        weight.contiguous(), bias.contiguous(), rho.contiguous(), rm, rv, sums, mean_in, rstd_in, bn, scale, shift,
        float(eps), float(momentum), MODE=mode, RUNNING=running, BN=bnb, BSB=bsb, BC=bc, num_warps=FINISH_WARPS)


def bin_grads(p1: torch.Tensor, p2: torch.Tensor, hw: int, count, mean_in: torch.Tensor, rstd_in: torch.Tensor,
              mean_bn: torch.Tensor, rstd_bn: torch.Tensor, weight: torch.Tensor, rho: torch.Tensor,
              dtypes=(None, None, None), batch_stats: bool = True, coefficients: bool = True, pack: bool = False,
              sums: torch.Tensor | None = None):
    """BIN backward's finish, one launch, from ``channel_sums(g, fmt, mean_in, b=x)``'s (N, blocks, C)
    partials and ``bin_stats``' ``mean_in``, ``rstd_in`` and ``bn`` (as ``mean_bn``, ``rstd_bn``): the weight,
    bias and ρ gradients (in the dtypes ``dtypes`` gives, None: not wanted; local sums) and, with
    ``coefficients``, dx's float32 (N, C) ``(a, b, cst)`` for ``affine(g, fmt, a, cst, q=x, Q=b, Qc=mean_in)``,
    with BN's statistics' terms when ``batch_stats``. ``hw``: values per (sample, channel); ``count``: BN's
    per channel, a number or a 0-d device tensor (synced). Synced: ``pack=True`` returns BN's float64
    per-channel gradient sums (2C,) for the all-reduce; the reduced ones go back in as ``sums`` (with the
    partials again: the coefficients are per sample). Returns ``(grad_weight, grad_bias, grad_rho,
    coefficients or None, packed or None)``."""
    n, nsb, c = p1.shape
    dev = p1.device
    gw, gb, gr = (None if d is None else torch.empty(c, dtype=d, device=dev) for d in dtypes)
    coef = torch.empty(3, n, c, dtype=torch.float32, device=dev) if coefficients else None
    packed = torch.empty(2 * c, dtype=torch.float64, device=dev) if pack else None
    cnt_t = count if torch.is_tensor(count) else None
    bnb, bsb, bc = _bin_blocks(n, nsb, c)
    cf = (p1, p1, p1) if coef is None else (coef[0], coef[1], coef[2])
    kernels()._bin_grad_kernel[(_cdiv(c, bc),)](
        p1, p2, n, nsb, c, int(hw), _or(cnt_t, p1), 0 if cnt_t is not None else int(count), mean_in, rstd_in,
        mean_bn, rstd_bn, weight.contiguous(), rho.contiguous(), _or(gw, p1), _or(gb, p1), _or(gr, p1),
        _or(packed, _or(sums, p1)), *cf, CNT_PTR=cnt_t is not None, SUMS=sums is not None, PACK=pack,
        WANT_GW=gw is not None, WANT_GB=gb is not None, WANT_GR=gr is not None, COEF=coefficients,
        BATCH=bool(batch_stats), BN=bnb, BSB=bsb, BC=bc, num_warps=FINISH_WARPS)
    return gw, gb, gr, (None if coef is None else (coef[0], coef[1], coef[2])), packed
