"""The hand-fused autograd Functions of the course norms, with analytic backward passes: the default override
of their specs (``override.py``; ``NORMLAB_FUSED=0`` runs the specs on the engine instead), kept because they
measured faster (``bench/bench_norms.py --engine``).

* ``BatchNormFunction``: statistics per channel over (N, H, W) -- BatchNorm.
* ``GroupNormFunction``: statistics per (sample, group) over (C/G, H, W) -- InstanceNorm (G = C),
  LayerNorm (G = 1), GroupNorm. (BIN has its own Function, ``_bin``, built from this module's helpers.)

Design (shared by both):

* Statistics are single pass: sums of ``x - k`` and ``(x - k)²`` with ``k`` one sample of the channel or
  group (shifted sums: exact for large-mean inputs), combined in float64, computed in float32 when the
  input is bf16/fp16 (autocast); the output comes back in the input dtype, while the weight and bias
  gradients come back in the parameters' dtype. Backward centres x on the mean before the products.
* The per-channel affine is fused: ``y = x * scale + shift`` with ``scale = rstd * weight`` and
  ``shift = bias - mean * scale``, one ``addcmul`` over the big tensor (one pass instead of normalizing first and
  applying the affine as separate ops).
* Only the input and the small per-channel / per-group ``mean`` and ``rstd`` are saved; x̂ is
  recomputed in backward. Saving the input (not the output) keeps the in-place ReLU that follows
  every norm in a ResNet legal, and uses the same memory as the native kernels.
* Outputs follow the input's memory format (channels_last in, channels_last out).
* Back-ends (``backend``): float32, float64 and bfloat16 CPU tensors in NCHW or channels_last go through the
  C++ kernels of ``_kernels`` (shifted sums, float64 across runs; one pass per sweep over the big tensor, the small per-channel
  math in C too); CUDA tensors (float32, bfloat16, float16; NCHW or channels_last) through the Triton
  kernels of ``_triton`` (sums, a small finish kernel for the statistics and coefficients, the affine: three
  launches per forward and per backward, about as many as native BN's (not counted on a GPU); the shift is read from x inside the sums kernel);
  everything else (other strides, float16 on CPU, torch.compile tracing, no
  compiler, ``NORMLAB_KERNELS=0`` / ``NORMLAB_TRITON=0``) through the tensor ops below. Tests run every
  norm test on the C++ and tensor-op paths, and the Triton kernels under ``TRITON_INTERPRET=1``.
* The spec engine (``spec.py``: every spec norm, the course norms' engine path included) makes the same choice,
  through ``backend``, for its per-(sample, channel) sweeps in ``sweeps.py``.
"""

from __future__ import annotations

import torch

from normlab.errors import NormlabError
from normlab.norms import _kernels, _triton


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs, otherwise the input dtype (float32 / float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


CPP, TRITON = "cpp", "triton"


def backend(x: torch.Tensor) -> tuple[str, str] | None:
    """``(back-end, layout)`` for ``x``: the Triton kernels for CUDA tensors (see ``_triton.usable``), the
    C++ kernels for the CPU tensors they take, or None for the tensor ops -- always the tensor ops under
    torch.compile, which traces them into fused kernels of its own (opaque kernel calls would break the
    graph)."""
    if torch.compiler.is_compiling():
        return None
    fmt = _triton.usable(x)
    if fmt:
        return TRITON, fmt
    fmt = _kernels.usable(x)
    return (CPP, fmt) if fmt else None


def fast_layout(x: torch.Tensor) -> str | None:
    """The C++ kernels' layout for ``x`` when they are the back-end that takes it, else None."""
    be = backend(x)
    return be[1] if be and be[0] == CPP else None


def distributed_active() -> bool:
    """True when torch.distributed is initialized with more than one rank (then ``sync`` matters)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank, in place."""
    import torch.distributed as dist

    dist.broadcast(t, src=0)
    return t


def _common_shift(x: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """Synced BN's shift: rank 0's ``_sample_shift`` (one value of every channel), broadcast to every rank.

    With one shift on every rank the shifted sums simply add up in the all-reduce, and every rank's float
    partial sums of ``x - shift`` are those one process on the whole batch computes (it picks the same value:
    the first sample's). Each rank shifting by its own value and un-shifting into float64 plain
    sums (what the Triton path, BIN and compiled graphs do) is as exact, but rounds the float partial sums
    differently from one process: mean / rstd may differ from one process's by an ulp, and where a fused
    ReLU's input is within that of 0 its mask flips; a test comparing a synced two-process ResNet with one
    process on the whole batch (tests/test_distributed.py) would see single gradient entries off by several
    percent -- rounding, amplified, not an error of the statistics. The common shift makes the C++ and tensor-op
    paths agree with one process to the rounding of float64 sums, at the price of one small broadcast per
    layer."""
    return _broadcast(_sample_shift(x, ct).clone(memory_format=torch.contiguous_format))  # a copy, not a view of x


def batch_values(x: torch.Tensor, sync: bool, who: str, instead: str) -> tuple[int, bool]:
    """``(values per channel on this rank, whether the statistics are synced)`` for batch statistics of ``x``
    (BN, BIN's BN branch); a one-line error when an unsynced batch has a single value per channel (no
    variance to normalize by). ``who`` names the layer, ``instead`` the per-sample norms to suggest."""
    c = x.shape[1]
    local = x.numel() // c if c else 0
    sync = bool(sync) and distributed_active()
    if not sync and local <= 1:
        raise NormlabError(
            f"{who} got {local} value per channel (input shape {tuple(x.shape)}) and cannot compute batch "
            f"statistics in training: use a batch size of 2 or more, or a per-sample norm ({instead})")
    return local, sync


def _moments(s1: torch.Tensor, s2: torch.Tensor, count, ct: torch.dtype, shift: torch.Tensor | None = None):
    """Mean and biased variance from the sums of ``x - shift`` and ``(x - shift)²``, combined in float64.

    E[x²] − E[x]² on plain float32 sums loses ~1e-7·(mean/std)² relative precision (5e-2 at
    |mean|/std = 1000); with ``shift`` one sample of the same channel or group, |mean − shift| is of the
    order of std and the loss is gone, at the price of no extra pass (Welford would cost a slower one).
    The C++ kernels shift the same way, value by value. ``count`` may be a tensor (synced BN: no host sync).
    """
    m64 = s1.double() / count
    v64 = (s2.double() / count - m64 * m64).clamp_min(0)
    if shift is not None:
        m64 = m64 + shift.double()
    return m64.to(ct), v64.to(ct)


def _update_running(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                    var: torch.Tensor, total, momentum: float) -> None:
    """nn.BatchNorm2d's running-statistics update, in place: the batch mean and unbiased batch variance."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (total / (total - 1))).to(running_var.dtype), alpha=momentum)


# The big buffers below are allocated with empty_like(x) and written with out=: a broadcast sub with an
# (N, C, 1, 1) operand otherwise allocates through a slower path on channels_last.
# Not under torch.compile: Inductor plans its own buffers, and torch 2.4's dynamo refuses out= wherever an
# operand requires grad (it traces a Function's forward with the inputs' requires_grad).


def _fresh(like: torch.Tensor) -> torch.Tensor | None:
    """A new buffer shaped like ``like`` for an op's ``out=``; None (the op allocates) under torch.compile."""
    return None if torch.compiler.is_compiling() else torch.empty_like(like)


def _into(buf: torch.Tensor | None) -> torch.Tensor | None:
    """``buf`` for an op's ``out=``, reused; None under torch.compile (see above)."""
    return None if torch.compiler.is_compiling() else buf


def _sample_shift(x: torch.Tensor, ct: torch.dtype, group_size: int | None = None) -> torch.Tensor:
    """The origin of the shifted sums: one value of every channel (shape (C,), from sample 0), or with
    ``group_size`` one value of every (sample, group) (shape (N, G), from the group's first channel)."""
    n, c = x.shape[:2]
    if x.numel() == 0:
        return torch.zeros(c if group_size is None else (n, c // group_size), dtype=ct, device=x.device)
    k = x[0, :, 0, 0] if group_size is None else x[:, ::group_size, 0, 0]
    return k.detach().to(ct)


def _affine_out(kind, fmt, x, xf, buf, scale, shift_y, shape, residual, relu: bool) -> torch.Tensor:
    """``y = x*scale + shift_y`` (+ residual, ReLU) in x's dtype, for the Triton and tensor-op back-ends of both
    Functions. ``scale``/``shift_y``: (C,) for BN, (N, C) for the group norms, broadcast over (H, W) as
    ``shape``; ``xf`` is x in the compute dtype and ``buf`` the compute-dtype buffer the output is written into
    (tensor ops only)."""
    if kind == TRITON:
        res = None if residual is None else _triton.like(residual, fmt)
        return _triton.affine(x, fmt, scale, shift_y, residual=res, relu=relu)
    y = torch.addcmul(shift_y.view(shape), xf, scale.view(shape), out=_into(buf))
    if residual is not None:
        y.add_(residual)
    if relu:
        y.clamp_min_(0)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class BatchNormFunction(torch.autograd.Function):
    """Batch statistics over (N, H, W) per channel; optionally updates running stats in place.

    ``running_mean`` / ``running_var`` (or None) are updated with ``momentum`` and the unbiased
    batch variance, as ``nn.BatchNorm2d`` does. With ``sync`` and an active process group, every rank
    shifts its sums by rank 0's shift (broadcast, see ``_common_shift``; the Triton path and compiled graphs
    instead turn each rank's own shifted sums into float64 plain sums), the per-channel sum, sum
    of squares and count are all-reduced in forward, and the two per-channel
    gradient sums (of dy and dy·x̂) in backward, so every rank computes exactly the gradient of
    single-process BN on the concatenated batch. Weight/bias gradients stay local (DDP averages them).
    The synced count stays a device tensor (no host sync, nothing that breaks a torch.compile graph),
    except for the C++ kernels, which take it as a number on the CPU, where reading it costs nothing.

    ``residual`` (x's shape, dtype and memory format, or None) and ``relu`` fuse the ResNet block's
    ``relu(bn(x) + residual)`` into the norm: the output is computed in one pass, and backward masks
    dy with (y > 0) inside the gradient sums; the masked gradient is also the residual's. The output y
    is then saved too (the next conv keeps it anyway), so it must not be modified in place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float,
                sync: bool, residual=None, relu: bool = False):  # noqa: D102
        c = x.shape[1]
        ct = compute_dtype(x.dtype)
        dims = (0, 2, 3)
        local, sync = batch_values(x, sync, "BatchNorm", "gn/ln/in")
        be = backend(x)
        kind, fmt = be if be else (None, None)
        if kind == TRITON:
            return _bn_triton_forward(ctx, x, fmt, weight, bias, running_mean, running_var, momentum, eps, sync,
                                      local, residual, relu)
        buf = xf = None
        # one shift for every rank, so the shifted sums add up (not under torch.compile, which cannot trace the
        # broadcast: there each rank shifts by its own value and un-shifts before the all-reduce)
        common = _common_shift(x, ct) if sync and not torch.compiler.is_compiling() else None
        if kind == CPP:  # C++: both shifted sums in one pass over x (shift: `common`, else picked as below)
            s = _kernels.bn_sums(x, None, fmt, center=common)[0]
            s1, s2, shift = s[0], s[1], s[2]
        else:
            shift = common if common is not None else _sample_shift(x, ct)
            xf = x if x.dtype == ct else x.to(ct)
            # x - shift, in the buffer that will hold y
            buf = torch.sub(xf, shift.view(1, c, 1, 1), out=_fresh(xf))
            s1 = buf.sum(dims)
            s2 = buf.mul_(buf).sum(dims)
        total = local
        if sync:
            s1, s2, total = _synced_sums(s1, s2, None if common is not None else shift, local)
            if common is None:  # un-shifted into plain sums
                shift = None
            if kind == CPP:
                total = int(round(total.item()))
        ctx.total, ctx.sync, ctx.relu = total, sync, bool(relu)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if kind == CPP:  # C++: statistics, running-statistics update and the affine (+ residual, ReLU) in one call
            res = None if residual is None else _kernels.like(residual.to(x.dtype), fmt)
            y, mean, rstd, updated = _kernels.bn_forward(x, fmt, s1, s2, total, weight, bias, eps, momentum,
                                                         running_mean, running_var, res, ctx.relu, shift)
            if not updated:  # running statistics of another dtype (rare): updated here
                _update_running(running_mean, running_var, *_moments(s1, s2, total, torch.float64, shift), total,
                                momentum)
            ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
            return y
        mean, var = _moments(s1, s2, total, ct, shift)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, total, momentum)
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight.to(ct)
        shift_y = -mean * scale if bias is None else bias.to(ct) - mean * scale
        y = _affine_out(kind, fmt, x, xf, buf, scale, shift_y, (1, c, 1, 1), residual, ctx.relu)
        ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, mean, rstd, y = ctx.saved_tensors
        c = x.shape[1]
        ct = mean.dtype
        dims = (0, 2, 3)
        be = backend(x)
        kind, fmt = be if be else (None, None)
        want_res = ctx.has_residual and ctx.needs_input_grad[8]
        if kind == CPP:  # C++: sums of dy and dy*(x - mean) in one pass (+ weight/bias grads), then dx in one
            dyf = _kernels.like(dy if dy.dtype == x.dtype else dy.to(x.dtype), fmt)
            s, grad_weight, grad_bias, g = _kernels.bn_sums(
                dyf, x, fmt, center=mean, rstd=rstd, grad_weight=weight is not None and ctx.needs_input_grad[1],
                grad_bias=ctx.has_bias and ctx.needs_input_grad[2],  # weight/bias grads: local sums
                mask=_kernels.like(y, fmt) if ctx.relu else None)  # ReLU: g = dy * (y > 0), written out
            if g is not None:
                dyf = g
            grad_res = _residual_grad(dyf, ctx) if want_res else None
            if grad_weight is not None and grad_weight.dtype != weight.dtype:
                grad_weight = grad_weight.to(weight.dtype)
            if grad_bias is not None and grad_bias.dtype != ctx.bias_dtype:
                grad_bias = grad_bias.to(ctx.bias_dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                if ctx.sync:
                    s = _all_reduce(s)
                grad_x = _kernels.bn_backward(dyf, x, fmt, s, ctx.total, weight, mean, rstd)
            return grad_x, grad_weight, grad_bias, None, None, None, None, None, grad_res, None
        if kind == TRITON:
            return _bn_triton_backward(ctx, dy, fmt, x, weight, mean, rstd, y, want_res)
        g = torch.where(y > 0, dy, 0) if ctx.relu else dy
        dyf = g if g.dtype == ct else g.to(ct)
        xf = x if x.dtype == ct else x.to(ct)
        sum_dy = dyf.sum(dims)
        # centred before the product: sum(dy*x) - mean*sum(dy) would cancel for large-mean inputs
        # dy*(x - mean), in the buffer that becomes grad_x
        buf = torch.sub(xf, mean.view(1, c, 1, 1), out=_fresh(xf)).mul_(dyf)
        sum_dy_xc = buf.sum(dims)
        grad_res = _residual_grad(g, ctx) if want_res else None
        grad_weight = grad_bias = grad_x = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xc * rstd).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)  # local sum, before any all-reduce
        if ctx.needs_input_grad[0]:
            if ctx.sync:
                both = _all_reduce(torch.cat([sum_dy, sum_dy_xc]))
                sum_dy, sum_dy_xc = both[:c], both[c:]
            m = ctx.total
            a = rstd if weight is None else rstd * weight.to(ct)
            b = -a * rstd * rstd * sum_dy_xc / m
            cst = -a * sum_dy / m
            # dx = a*dy + b*(x - mean) + cst (uncentred here: b*mean vs b*x costs ~1e-7·mean/std, harmless)
            grad_x = torch.addcmul((cst - b * mean).view(1, c, 1, 1), xf, b.view(1, c, 1, 1), out=_into(buf))
            grad_x.addcmul_(dyf, a.view(1, c, 1, 1))
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, grad_res, None


def _residual_grad(g: torch.Tensor, ctx) -> torch.Tensor:
    """The residual's gradient: the (ReLU-masked) output gradient, in the residual's dtype."""
    return g if g.dtype == ctx.residual_dtype else g.to(ctx.residual_dtype)


def _bn_triton_forward(ctx, x, fmt, weight, bias, running_mean, running_var, momentum, eps, sync: bool, local: int,
                       residual, relu: bool) -> torch.Tensor:
    """BN forward on the Triton kernels: the sums kernel (shift read from x inside it), the finish kernel
    (statistics, running-statistics update, scale and shift) and the affine: three launches. Synced: the
    sums shifted by ``_sample_shift`` (each rank its own), un-shifted into float64 plain sums and packed with
    the count by one more launch, all-reduced, then finished from those sums."""
    c = x.shape[1]
    ctx.sync, ctx.relu = sync, bool(relu)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    run = dict(running_mean=running_mean, running_var=running_var, momentum=momentum)
    if sync:
        shift = _sample_shift(x, compute_dtype(x.dtype))
        p1, p2, _ = _triton.channel_sums(x, fmt, shift)
        packed = _all_reduce(_triton.bn_pack(p1, p2, local, shift))
        ctx.total = packed[2 * c]  # a device tensor: no host sync
        mean, rstd, scale, shift_y = _triton.bn_stats(packed[:c], packed[c:2 * c], ctx.total, weight, bias, eps, **run)
    else:
        p1, p2, _ = _triton.channel_sums(x, fmt, None)
        ctx.total = local
        mean, rstd, scale, shift_y = _triton.bn_stats(p1, p2, local, weight, bias, eps, x=x, **run)
    y = _affine_out(TRITON, fmt, x, None, None, scale, shift_y, None, residual, ctx.relu)
    ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
    return y


def _bn_triton_backward(ctx, dy, fmt, x, weight, mean, rstd, y, want_res: bool):
    """BN backward on the Triton kernels: the sums of g and g*(x - mean) in one pass (g = dy masked by the
    ReLU, written out), the finish kernel (weight/bias gradients and dx's coefficients), the affine for dx:
    three launches. Synced: the finish packs the local sums, which are all-reduced and finished again."""
    c = x.shape[1]
    g = _triton.like(dy if dy.dtype == x.dtype else dy.to(x.dtype), fmt)
    p1, p2, gm = _triton.channel_sums(g, fmt, mean, b=x, mask=_triton.like(y, fmt) if ctx.relu else None)
    g = g if gm is None else gm
    gw_dtype = weight.dtype if weight is not None and ctx.needs_input_grad[1] else None
    gb_dtype = ctx.bias_dtype if ctx.has_bias and ctx.needs_input_grad[2] else None  # local sums, before any all-reduce
    grad_x = None
    if ctx.sync and ctx.needs_input_grad[0]:
        grad_weight, grad_bias, packed = _triton.bn_grads(p1, p2, ctx.total, rstd, weight, gw_dtype, gb_dtype,
                                                          pack=True)
        packed = _all_reduce(packed)
        coef = _triton.bn_grads(packed[:c], packed[c:], ctx.total, rstd, weight)[2]
    else:
        grad_weight, grad_bias, coef = _triton.bn_grads(p1, p2, ctx.total, rstd, weight, gw_dtype, gb_dtype)
    if ctx.needs_input_grad[0]:
        a, b, cst = coef
        grad_x = _triton.affine(g, fmt, a, cst, q=x, Q=b, Qc=mean)  # dx = a*g + b*(x - mean) + cst
    grad_res = _residual_grad(g, ctx) if want_res else None
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, grad_res, None


class GroupNormFunction(torch.autograd.Function):
    """Statistics per (sample, group of C/G channels) over (C/G, H, W); per-channel affine.
    ``residual`` and ``relu``: the fused ``relu(norm(x) + residual)``, as in ``BatchNormFunction``."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups: int, eps: float, residual=None, relu: bool = False):  # noqa: D102
        n, c = x.shape[:2]
        g = num_groups
        cg = c // g
        ct = compute_dtype(x.dtype)
        ctx.num_groups, ctx.relu = g, bool(relu)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        be = backend(x)
        kind, fmt = be if be else (None, None)
        if kind == CPP:  # C++: sums, statistics and affine (+ residual, ReLU) in one call (two passes over x)
            res = None if residual is None else _kernels.like(residual.to(x.dtype), fmt)
            y, mean, rstd = _kernels.gn_forward(x, fmt, g, weight, bias, eps, res, ctx.relu)
            ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
            return y
        if kind == TRITON:  # sums (shift read from x inside), statistics and coefficients, affine: three launches
            p1, p2, _ = _triton.channel_sums(x, fmt, None, group_size=cg)
            mean, rstd, scale, shift_y = _triton.gn_stats(p1, p2, x, g, weight, bias, eps)
            y = _affine_out(kind, fmt, x, None, None, scale, shift_y, None, residual, ctx.relu)
            ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
            return y
        shift = _sample_shift(x, ct, cg)  # (N, G)
        shift_c = shift.repeat_interleave(cg, dim=1)  # (N, C)
        xf = x if x.dtype == ct else x.to(ct)
        # x - shift, in the buffer that will hold y
        buf = torch.sub(xf, shift_c.view(n, c, 1, 1), out=_fresh(xf))
        s1 = buf.sum((2, 3)).view(n, g, cg).sum(2)
        s2 = buf.mul_(buf).sum((2, 3)).view(n, g, cg).sum(2)
        mean, var = _moments(s1, s2, cg * x.shape[2] * x.shape[3], ct, shift)  # (N, G)
        rstd = torch.rsqrt(var + eps)
        rstd_c = rstd.repeat_interleave(cg, dim=1)  # (N, C)
        mean_c = mean.repeat_interleave(cg, dim=1)
        scale = rstd_c if weight is None else rstd_c * weight.to(ct)
        shift_y = -mean_c * scale if bias is None else bias.to(ct) - mean_c * scale
        y = _affine_out(kind, fmt, x, xf, buf, scale, shift_y, (n, c, 1, 1), residual, ctx.relu)
        ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, mean, rstd, y = ctx.saved_tensors
        n, c, h, w = x.shape
        g = ctx.num_groups
        cg = c // g
        ct = mean.dtype
        be = backend(x)
        kind, fmt = be if be else (None, None)
        want_res = ctx.has_residual and ctx.needs_input_grad[5]
        if kind == CPP:  # C++: one pass for the (N, C) sums of dy and dy*(x - mean) (ReLU: dy masked, written out), one for dx
            gx, gw, gb, gm = _kernels.gn_backward(
                _kernels.like(dy if dy.dtype == x.dtype else dy.to(x.dtype), fmt), x, fmt, g, weight, mean, rstd,
                ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2], mask=_kernels.like(y, fmt) if ctx.relu else None)
            if gw is not None and gw.dtype != weight.dtype:
                gw = gw.to(weight.dtype)
            if gb is not None and gb.dtype != ctx.bias_dtype:
                gb = gb.to(ctx.bias_dtype)
            grad_res = _residual_grad(dy if gm is None else gm, ctx) if want_res else None
            return gx, gw, gb, None, None, grad_res, None
        if kind == TRITON:  # (N, C) sums of g and g*(x - mean) in one pass (g: dy masked by the ReLU), finish, dx
            gr = _triton.like(dy if dy.dtype == x.dtype else dy.to(x.dtype), fmt)
            p1, p2, gm = _triton.channel_sums(gr, fmt, mean, b=x, mask=_triton.like(y, fmt) if ctx.relu else None,
                                              group_size=cg)
            gr = gr if gm is None else gm
            grad_weight, grad_bias, coef = _triton.gn_grads(
                p1, p2, g, cg * h * w, mean, rstd, weight,
                weight.dtype if weight is not None and ctx.needs_input_grad[1] else None,
                ctx.bias_dtype if ctx.has_bias and ctx.needs_input_grad[2] else None, ctx.needs_input_grad[0])
            grad_x = None
            if coef is not None:
                a, b, cst, mean_c = coef
                grad_x = _triton.affine(gr, fmt, a, cst, q=x, Q=b, Qc=mean_c)
            return grad_x, grad_weight, grad_bias, None, None, _residual_grad(gr, ctx) if want_res else None, None
        rstd_c = rstd.repeat_interleave(cg, dim=1)
        mean_c = mean.repeat_interleave(cg, dim=1)
        gr = torch.where(y > 0, dy, 0) if ctx.relu else dy
        dyf = gr if gr.dtype == ct else gr.to(ct)
        xf = x if x.dtype == ct else x.to(ct)
        s1 = dyf.sum((2, 3))  # (N, C): sum of dy
        # centred before the product (exact for large-mean inputs), in the buffer that becomes grad_x
        buf = torch.sub(xf, mean_c.view(n, c, 1, 1), out=_fresh(xf)).mul_(dyf)
        s2 = buf.sum((2, 3))  # (N, C): sum of dy * (x - mean)
        grad_res = _residual_grad(gr, ctx) if want_res else None
        grad_x = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (s2 * rstd_c).sum(0).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = s1.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            wf = None if weight is None else weight.to(ct)
            ws1 = s1 if wf is None else s1 * wf
            ws2 = s2 if wf is None else s2 * wf
            m = cg * h * w
            m1 = ws1.view(n, g, cg).sum(2) / m  # (N, G): mean of w*dy over the group
            m2 = rstd * ws2.view(n, g, cg).sum(2) / m  # (N, G): mean of w*dy*x̂
            b = (-rstd * rstd * m2).repeat_interleave(cg, dim=1)
            cst = (-rstd * m1).repeat_interleave(cg, dim=1)
            a = rstd_c if wf is None else rstd_c * wf
            # dx = a*dy + b*(x - mean) + cst (uncentred on the tensor-op path, as for BN)
            grad_x = torch.addcmul((cst - b * mean_c).view(n, c, 1, 1), xf, b.view(n, c, 1, 1), out=_into(buf))
            grad_x.addcmul_(dyf, a.view(n, c, 1, 1))
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, grad_res, None


def batch_norm_eval(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Inference with running statistics: a per-channel ``x * scale + shift`` (plain autograd)."""
    c = x.shape[1]
    ct = compute_dtype(x.dtype)
    scale = torch.rsqrt(running_var.to(ct) + eps)
    if weight is not None:
        scale = scale * weight.to(ct)
    shift = -running_mean.to(ct) * scale
    if bias is not None:
        shift = shift + bias.to(ct)
    xf = x if x.dtype == ct else x.to(ct)
    y = torch.addcmul(shift.view(1, c, 1, 1), xf, scale.view(1, c, 1, 1))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def fusable_residual(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether a norm's fused ``relu(norm(x) + residual)`` can take ``residual`` in its own pass: None, or a
    tensor of x's shape and dtype (anything else is added unfused, with broadcasting and type promotion)."""
    return residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)


def init_affine(module: torch.nn.Module, num_channels: int, affine: bool = True, device=None, dtype=None) -> None:
    """The per-channel ``weight`` (ones) and ``bias`` (zeros) every norm has, or both registered as None, as
    torch's layers do (``device``/``dtype``: the factory keywords)."""
    if affine:
        module.weight = torch.nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        module.bias = torch.nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def check_input(x: torch.Tensor, num_channels: int, who: str, group_channels: int = 0) -> None:
    """One-line errors for the mistakes worth naming: wrong rank, wrong channel count, and (for per-sample
    statistics over ``group_channels`` channels and the map: IN, GN, LN) a single value per statistic, where
    the output would be the bias whatever the input (BIN is not refused: its BN part still carries the input). Shapes are known on the host, so these
    checks cost no device sync."""
    if x.dim() != 4:
        raise NormlabError(f"{who} expects a 4D (N, C, H, W) input, got shape {tuple(x.shape)}: "
                           "reshape the input or use a norm made for it")
    if x.shape[1] != num_channels:
        raise NormlabError(f"{who} was built for {num_channels} channels but got {x.shape[1]} "
                           f"(input shape {tuple(x.shape)}): build it with num_channels={x.shape[1]}")
    if group_channels and group_channels * x.shape[2] * x.shape[3] == 1:
        # native InstanceNorm2d refuses these too ("Expected more than 1 spatial element")
        raise NormlabError(f"{who} got 1x1 maps (input shape {tuple(x.shape)}): its per-sample statistics would "
                           "cover a single value, so its output would be its bias whatever the input; feed larger "
                           "maps (a larger input size or less down-sampling) or use a norm whose statistics span "
                           "more values (bn, ln, gn with fewer groups)")


def _synced_sums(s1: torch.Tensor, s2: torch.Tensor, shift: torch.Tensor | None, local: int):
    """Synced BN's all-reduce (BN and BIN): the per-channel sums of ``x - shift`` and its square over this rank's
    ``local`` values per channel, all-reduced in float64 with the count. With ``shift`` (this rank's own, as
    BIN's per-(sample, channel) shifts are) they are first turned into plain float64 sums; ``shift=None``: the
    sums are plain, or shifted by a value common to every rank (BN's ``_common_shift``), and add up as they are.
    Returns ``(s1, s2, total)``; ``total`` stays a float64 device tensor (no host sync)."""
    c = s1.shape[0]
    if shift is not None:
        k, s1 = shift.double(), s1.double()
        s1, s2 = s1 + local * k, s2.double() + k * (2 * s1 + local * k)
    packed = torch.cat([s1.double(), s2.double(), s1.new_full((1,), float(local), dtype=torch.float64)])
    packed = _all_reduce(packed)
    return packed[:c], packed[c:2 * c], packed[2 * c]
