"""The two autograd Functions behind every normlab norm, with analytic backward passes.

* ``BatchNormFunction``: statistics per channel over (N, H, W) -- BatchNorm and BIN's BN branch.
* ``GroupNormFunction``: statistics per (sample, group) over (C/G, H, W) -- InstanceNorm (G = C),
  LayerNorm (G = 1), GroupNorm, and BIN's IN branch.

Design (shared by both):

* Statistics are single pass (sum and sum of squares, combined in float64) and computed in float32 when
  the input is bf16/fp16 (autocast); the output comes back in the input dtype, while the weight and
  bias gradients come back in the parameters' dtype.
* The per-channel affine is fused: ``y = x * scale + shift`` with ``scale = rstd * weight`` and
  ``shift = bias - mean * scale``, one ``addcmul`` over the big tensor (measured faster on CPU than
  normalizing first and applying the affine as separate ops).
* Only the input and the small per-channel / per-group ``mean`` and ``rstd`` are saved; x̂ is
  recomputed in backward. Saving the input (not the output) keeps the in-place ReLU that follows
  every norm in a ResNet legal, and uses the same memory as the native kernels.
* Outputs follow the input's memory format (channels_last in, channels_last out).
* Fast path: float32, float64 and bfloat16 CPU tensors in NCHW or channels_last go through the C++
  kernels of ``_kernels`` (same math, one pass per sweep over the big tensor, the small per-channel math
  in C too); everything else (CUDA, float16, other strides, torch.compile tracing, no compiler,
  ``NORMLAB_KERNELS=0``) through the tensor ops below. Tests run every norm test on both paths.
"""

from __future__ import annotations

import torch

from normlab.errors import NormlabError
from normlab.norms import _kernels


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs, otherwise the input dtype (float32 / float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def fast_layout(x: torch.Tensor) -> str | None:
    """The C++ kernels' layout for ``x`` (see ``_kernels``), or None to use tensor ops -- always the
    tensor ops under torch.compile, which traces them into fused kernels of its own (ctypes calls would
    break the graph)."""
    if torch.compiler.is_compiling():
        return None
    return _kernels.usable(x)


def distributed_active() -> bool:
    """True when torch.distributed is initialized with more than one rank (then ``sync`` matters)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def _moments(s1: torch.Tensor, s2: torch.Tensor, count: int, ct: torch.dtype):
    """Mean and biased variance from the sum and sum of squares, combined in float64.

    E[x²] − E[x]² loses relative precision ~1e-7·(mean/std)² in float32 sums: negligible for conv
    activations (|mean| of the order of std), and the price of a single fast pass (var_mean's
    Welford reduction is ~5x slower on CPU).
    """
    m64 = s1.double() / count
    v64 = (s2.double() / count - m64 * m64).clamp_min(0)
    return m64.to(ct), v64.to(ct)


def _update_running(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                    var: torch.Tensor, total: int, momentum: float) -> None:
    """nn.BatchNorm2d's running-statistics update, in place: the batch mean and unbiased batch variance."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (total / (total - 1))).to(running_var.dtype), alpha=momentum)


class BatchNormFunction(torch.autograd.Function):
    """Batch statistics over (N, H, W) per channel; optionally updates running stats in place.

    ``running_mean`` / ``running_var`` (or None) are updated with ``momentum`` and the unbiased
    batch variance, as ``nn.BatchNorm2d`` does. With ``sync`` and an active process group, the
    per-channel sum, sum of squares and count are all-reduced in forward, and the two per-channel
    gradient sums (of dy and dy·x̂) in backward, so every rank computes exactly the gradient of
    single-process BN on the concatenated batch. Weight/bias gradients stay local (DDP averages them).

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
        xf = x if x.dtype == ct else x.to(ct)
        dims = (0, 2, 3)
        local = x.numel() // c if c else 0
        sync = bool(sync) and distributed_active()
        fmt = fast_layout(x)
        if fmt:  # C++: both sums in one pass over x, float64 per channel
            s = _kernels.bn_sums(x, None, fmt)[0]
            s1, s2 = s[0], s[1]
        else:
            # x² goes into the buffer that will hold y (one big allocation fewer per call)
            buf = torch.mul(xf, xf)
            s1, s2 = xf.sum(dims), buf.sum(dims)  # one pass each, no Welford (5x slower on CPU)
        if sync:
            packed = torch.cat([s1.double(), s2.double(),
                                torch.tensor([float(local)], dtype=torch.float64, device=x.device)])
            packed = _all_reduce(packed)
            total = int(round(packed[-1].item()))
            s1, s2 = packed[:c], packed[c:2 * c]
        else:
            total = local
        if total <= 1:
            raise NormlabError(
                f"BatchNorm got {total} value per channel (input shape {tuple(x.shape)}) and cannot compute "
                "batch statistics in training: use a batch size of 2 or more, or a per-sample norm (gn/ln/in)")
        ctx.total, ctx.sync, ctx.relu = total, sync, bool(relu)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if fmt:  # C++: statistics, running-statistics update and the affine (+ residual, ReLU) in one call
            res = None if residual is None else _kernels.like(residual.to(x.dtype), fmt)
            y, mean, rstd, updated = _kernels.bn_forward(x, fmt, s1, s2, total, weight, bias, eps, momentum,
                                                         running_mean, running_var, res, ctx.relu)
            if not updated:  # running statistics of another dtype (rare): updated here
                _update_running(running_mean, running_var, *_moments(s1, s2, total, torch.float64), total, momentum)
            ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
            return y
        mean, var = _moments(s1, s2, total, ct)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, total, momentum)
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight.to(ct)
        shift = -mean * scale if bias is None else bias.to(ct) - mean * scale
        y = torch.addcmul(shift.view(1, c, 1, 1), xf, scale.view(1, c, 1, 1), out=buf)
        if residual is not None:
            y.add_(residual)
        if ctx.relu:
            y.clamp_min_(0)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, mean, rstd, y = ctx.saved_tensors
        c = x.shape[1]
        ct = mean.dtype
        dims = (0, 2, 3)
        fmt = fast_layout(x)
        want_res = ctx.has_residual and ctx.needs_input_grad[8]
        if fmt:  # C++: sums of dy and dy*(x - mean) in one pass (+ weight/bias grads), then dx in one
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
        if ctx.relu:
            dy = torch.where(y > 0, dy, 0)
        grad_res = _residual_grad(dy, ctx) if want_res else None
        dyf = dy if dy.dtype == ct else dy.to(ct)
        xf = x if x.dtype == ct else x.to(ct)
        sum_dy = dyf.sum(dims)
        # sum of dy * (x - mean), from the uncentered sum (one pass fewer; combined in float64);
        # dy * x goes into the buffer that becomes grad_x
        buf = torch.mul(dyf, xf)
        sum_dy_xc = (buf.sum(dims).double() - mean.double() * sum_dy.double()).to(ct)
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
            # dx = a*dy + b*(x - mean) + cst = a*dy + b*x + (cst - b*mean): two fused passes
            grad_x = torch.addcmul((cst - b * mean).view(1, c, 1, 1), xf, b.view(1, c, 1, 1), out=buf)
            grad_x.addcmul_(dyf, a.view(1, c, 1, 1))
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, grad_res, None


def _residual_grad(g: torch.Tensor, ctx) -> torch.Tensor:
    """The residual's gradient: the (ReLU-masked) output gradient, in the residual's dtype."""
    return g if g.dtype == ctx.residual_dtype else g.to(ctx.residual_dtype)


class GroupNormFunction(torch.autograd.Function):
    """Statistics per (sample, group of C/G channels) over (C/G, H, W); per-channel affine.
    ``residual`` and ``relu``: the fused ``relu(norm(x) + residual)``, as in ``BatchNormFunction``."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups: int, eps: float, residual=None, relu: bool = False):  # noqa: D102
        n, c = x.shape[:2]
        g = num_groups
        ct = compute_dtype(x.dtype)
        ctx.num_groups, ctx.relu = g, bool(relu)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        fmt = fast_layout(x)
        if fmt:  # C++: sums, statistics and affine (+ residual, ReLU) in one call (two passes over x)
            res = None if residual is None else _kernels.like(residual.to(x.dtype), fmt)
            y, mean, rstd = _kernels.gn_forward(x, fmt, g, weight, bias, eps, res, ctx.relu)
            ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
            return y
        xf = x if x.dtype == ct else x.to(ct)
        # per-(sample, channel) sums, then summed over each group on the small (N, C) tensors
        buf = torch.mul(xf, xf)  # x², in the buffer that will hold y
        s1 = xf.sum((2, 3)).view(n, g, c // g).sum(2)
        s2 = buf.sum((2, 3)).view(n, g, c // g).sum(2)
        mean, var = _moments(s1, s2, (c // g) * x.shape[2] * x.shape[3], ct)  # (N, G)
        rstd = torch.rsqrt(var + eps)
        rstd_c = rstd.repeat_interleave(c // g, dim=1)  # (N, C)
        mean_c = mean.repeat_interleave(c // g, dim=1)
        scale = rstd_c if weight is None else rstd_c * weight.to(ct)
        shift = -mean_c * scale if bias is None else bias.to(ct) - mean_c * scale
        y = torch.addcmul(shift.view(n, c, 1, 1), xf, scale.view(n, c, 1, 1), out=buf)
        if residual is not None:
            y.add_(residual)
        if ctx.relu:
            y.clamp_min_(0)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, mean, rstd, y = ctx.saved_tensors
        n, c, h, w = x.shape
        g = ctx.num_groups
        cg = c // g
        ct = mean.dtype
        fmt = fast_layout(x)
        want_res = ctx.has_residual and ctx.needs_input_grad[5]
        if fmt:  # C++: one pass for the (N, C) sums of dy and dy*x (ReLU: dy masked, written out), one for dx
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
        if ctx.relu:
            dy = torch.where(y > 0, dy, 0)
        grad_res = _residual_grad(dy, ctx) if want_res else None
        dyf = dy if dy.dtype == ct else dy.to(ct)
        xf = x if x.dtype == ct else x.to(ct)
        s1 = dyf.sum((2, 3))  # (N, C): sum of dy
        buf = torch.mul(dyf, xf)  # dy * x, in the buffer that becomes grad_x
        s2 = buf.sum((2, 3))  # (N, C): sum of dy * x
        rstd_c = rstd.repeat_interleave(cg, dim=1)
        mean_c = mean.repeat_interleave(cg, dim=1)
        grad_x = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = ((s2 - mean_c * s1) * rstd_c).sum(0).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = s1.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            wf = None if weight is None else weight.to(ct)
            ws1 = s1 if wf is None else s1 * wf
            ws2 = s2 if wf is None else s2 * wf
            sum_g1 = ws1.view(n, g, cg).sum(2)  # (N, G): sum of w*dy over the group
            sum_g2 = ws2.view(n, g, cg).sum(2)  # (N, G): sum of w*dy*x
            m = cg * h * w
            m1 = sum_g1 / m
            m2 = rstd * ((sum_g2.double() - mean.double() * sum_g1.double()) / m).to(ct)  # mean of w*dy*x̂
            b = (-rstd * rstd * m2).repeat_interleave(cg, dim=1)
            cst = (rstd * (rstd * m2 * mean - m1)).repeat_interleave(cg, dim=1)
            a = rstd_c if wf is None else rstd_c * wf
            grad_x = torch.addcmul(cst.view(n, c, 1, 1), xf, b.view(n, c, 1, 1), out=buf)
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


def check_input(x: torch.Tensor, num_channels: int, who: str) -> None:
    """One-line errors for the two mistakes worth naming: wrong rank, wrong channel count."""
    if x.dim() != 4:
        raise NormlabError(f"{who} expects a 4D (N, C, H, W) input, got shape {tuple(x.shape)}: "
                           "reshape the input or use a norm made for it")
    if x.shape[1] != num_channels:
        raise NormlabError(f"{who} was built for {num_channels} channels but got {x.shape[1]} "
                           f"(input shape {tuple(x.shape)}): build it with num_channels={x.shape[1]}")
