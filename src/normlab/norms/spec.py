"""The spec engine: a norm of the shared shape is a small class stating its parameters and its (N, C) math.

The shared shape (BN, IN, GN, BIN and most of the catalogue): per-(sample, channel) sums over H×W → a little
math on (N, C)-sized tensors → a per-(sample, channel) affine ``y = A·(x − centre) + B``. The engine owns the
two sweeps over the big tensor, each an autograd Function with a hand-written backward, both running on
``sweeps`` (the C++ kernels on CPU, the Triton kernels on CUDA, tensor ops otherwise and under torch.compile):

* :class:`ChannelSums`: ``s1 = Σ(x − k)``, ``s2 = Σ(x − k)²`` over H×W per (n, c), with ``k`` one value of
  each (n, c) map (shifted sums: exact for large-mean inputs, as ``_functional`` does); backward
  ``dx = g1 + 2·g2·(x − k)``, one centred sweep.
* :class:`ChannelAffine`: ``y = a·(x − k) + c``, centred value by value (optionally ``relu(y + residual)`` in the
  same sweep: :meth:`SpecNorm.forward_relu`); backward ``da = Σ dy·(x − k)``, ``dc = Σ dy`` in one sweep (dy
  masked by the ReLU there), ``dx = a·dy``. On the kernels the two parts of x's gradient are written by one
  sweep, ``a·dy + 2·g2·(x − k) + g1`` (see :class:`_Link`).

Everything between them is torch ops on (N, C) tensors written by the norm (:meth:`SpecNorm.coefficients`),
and autograd derives that small part's backward. :class:`Stats` turns the sums into moments over any
pattern (per (n, c), per sample over channel groups, per channel over the batch or over ghost batches),
combined in float64 around a common shift per statistic, and all-reduced over ranks for batch statistics
(float64 plain sums and the count in one differentiable all-reduce through ``_functional._all_reduce``, so
the backward all-reduces their gradients: every rank gets single-process BN's gradient on the whole batch).
The centre a norm subtracts stays relative to the shift (``Moments.centre = mean − k``), so neither the
affine nor its gradients cancel large means. Half-precision inputs are computed in float32 and come back in
their dtype. The specs themselves are torch ops only: a new norm gets every back-end and ``torch.compile``
without kernel code of its own.

A norm whose output is not an affine of x (EvoNorm's per-element max and sigmoid) overrides
:meth:`SpecNorm.output` and still takes its statistics from :class:`Stats`; its output is then torch ops (and its
``forward_relu`` unfused).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.norms import _functional, sweeps
from normlab.norms._functional import check_input, compute_dtype
from normlab.norms._hooks import HookWatched

_F64 = torch.float64


def _nc(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


class _Link:
    """What the two sweeps of one :class:`Stats` share, so that the input gradient is one sweep on the kernels.

    x's gradient has two parts: ``a·g`` through :class:`ChannelAffine` and ``g1 + 2·g2·(x − k)`` through the
    statistics (:class:`ChannelSums`). Autograd would compute each in its own sweep and add them in a third; instead
    ``ChannelAffine.backward`` hands ``(g, a)`` over (``pending``) when ``ChannelSums.backward`` will run in the same
    backward pass (it runs after it: it depends on the coefficients' gradients), and that writes
    ``a·g + 2·g2·(x − k) + g1`` in one centred sweep. ``node`` is ChannelSums' autograd node (None: its outputs
    need no gradient), asked of the engine at backward time, so a backward that never reaches the statistics (a
    gradient taken only for the parameters, sums used without gradient) gets ``a·g`` from ChannelAffine itself.
    Tensor ops (and torch.compile, and a backward that builds a graph for higher-order gradients) keep the plain
    two-part gradient. Only an affine made after the sums claims the link (:meth:`Stats.affine`): its node then
    has a higher sequence number than ChannelSums', so autograd runs it first (an affine made before the sums
    could run after ChannelSums' backward, and its handed-over ``a·g`` would be lost). The node is held weakly: it
    holds this link (and its saved input), and a cycle would keep the input of a forward without backward alive
    until the next garbage collection."""

    __slots__ = ("node", "pending", "claimed")

    def __init__(self) -> None:
        self.node: weakref.ref | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.claimed = False

    def attach(self, node) -> None:
        self.node = None if node is None else weakref.ref(node)

    def will_run(self) -> bool:
        node = None if self.node is None else self.node()
        if node is None:
            return False
        try:
            return bool(torch._C._will_engine_execute_node(node))
        except (AttributeError, RuntimeError):  # an older torch, or not inside the engine's backward
            return False


class ChannelSums(torch.autograd.Function):
    """Per-(n, c) sums of ``x − k`` and ``(x − k)²`` over H×W (``k``: (N, C), no grad; ``sweeps.sums``: float64 on
    the kernels, the compute dtype on tensor ops). Backward ``dx = g1 + 2·g2·(x − k)`` in one centred sweep, with
    ``a·g`` of the linked :class:`ChannelAffine` added in the same sweep when it was handed over."""

    @staticmethod
    def forward(ctx, x, k, link=None):  # noqa: D102
        ctx.save_for_backward(x, k)
        ctx.link = link
        return sweeps.sums(x, k)

    @staticmethod
    def backward(ctx, g1, g2):  # noqa: D102
        x, k = ctx.saved_tensors
        link = ctx.link
        pending = None
        if link is not None:
            pending, link.pending = link.pending, None
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with sweeps.differentiable_if_needed():
            ct = k.dtype
            g1 = g1.to(ct)
            b = 2 * g2.to(ct)
            if pending is not None:  # a·g + 2·g2·(x − k) + g1: the whole input gradient in one sweep
                g, a = pending
                dx = sweeps.affine(g if g.dtype == x.dtype else g.to(x.dtype), a, g1, q=x, Q=b, Qc=k)
            else:
                dx = sweeps.affine(x, b, g1, Pc=k)
        return dx, None, None


class ChannelAffine(torch.autograd.Function):
    """``y = a·(x − k) + c`` per (n, c) (``a``, ``c``: (N, C) in the compute dtype), y in x's dtype; with
    ``residual`` (x's shape and dtype) and ``relu``: ``relu(a·(x − k) + c + residual)`` in the same sweep, y then
    saved too (backward masks dy with y > 0; the masked gradient is also the residual's), so it must not be
    modified in place. Backward: ``da = Σ g·(x − k)``, ``dc = Σ g`` in one sweep, and ``dx = a·g`` -- handed to
    the linked :class:`ChannelSums` when its backward will run (see :class:`_Link`)."""

    @staticmethod
    def forward(ctx, x, k, a, c, residual=None, relu: bool = False, link=None):  # noqa: D102
        y = sweeps.affine(x, a, c, Pc=k, residual=residual, relu=bool(relu))
        ctx.relu, ctx.link = bool(relu), link
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x, k, a, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, k, a, y = ctx.saved_tensors
        ct = k.dtype
        need_x, need_a, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_res = ctx.residual_dtype is not None and ctx.needs_input_grad[4]
        da = dc = dx = gr = None
        g = dy
        link = ctx.link
        if link is not None:
            link.pending = None  # a hand-over left by a backward that raised is never read
        with sweeps.differentiable_if_needed():
            if need_a or need_c or ctx.relu:
                s1, s2, gm = sweeps.grad_sums(dy, x, k, mask=y)
                g = dy if gm is None else gm
                da = s2.to(ct) if need_a else None
                dc = s1.to(ct) if need_c else None
            if need_x:
                if link is not None and sweeps.kind(x) is not None and link.will_run():
                    link.pending = (g, a)  # ChannelSums' backward writes a·g with its own part
                else:
                    dx = sweeps.affine(g if g.dtype == x.dtype else g.to(x.dtype), a)
        if need_res:
            gr = g if g.dtype == ctx.residual_dtype else g.to(ctx.residual_dtype)
        return dx, None, da, dc, gr, None, None


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; backward sums the gradients over ranks (every rank's loss depends on every rank's sums)."""

    @staticmethod
    def forward(ctx, t):  # noqa: D102
        return _functional._all_reduce(t.clone())

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return _functional._all_reduce(g.clone())


@dataclass
class Moments:
    """Statistics over one pattern, broadcast to (N, C): ``centre`` = mean − the sums' shift (small: subtract
    it with :meth:`Stats.affine`), ``var`` the biased variance, ``mean`` the absolute mean; ``stat_mean`` /
    ``stat_var`` the same at the statistic's own shape ((G, C) for batch and ghost batches, (N, G) for channel
    groups); ``count`` the values per statistic (a float64 tensor when all-reduced)."""

    centre: torch.Tensor
    var: torch.Tensor
    mean: torch.Tensor
    stat_mean: torch.Tensor
    stat_var: torch.Tensor
    count: torch.Tensor | float


class Stats:
    """The per-(n, c) sums of one input (computed on first use) and the moments a norm asks for."""

    def __init__(self, x: torch.Tensor, sync: bool = False, who: str = "norm") -> None:
        self.x, self.who = x, who
        self.ct = compute_dtype(x.dtype)
        n, c, h, w = x.shape
        self.n, self.c, self.hw = n, c, h * w
        # contiguous once: every sweep reads it as an (N, C) table (a strided view of x would be copied by each)
        self.shift = (x[:, :, 0, 0] if x.numel() else x.new_zeros(n, c)).detach().to(self.ct).contiguous()
        self.sync = bool(sync) and _functional.distributed_active()
        self._sums: tuple[torch.Tensor, torch.Tensor] | None = None
        # not traced: dynamo refuses a Function that mutates an object from outside (compiled graphs keep the
        # two-part input gradient, which their own fusion handles)
        self._link = None if torch.compiler.is_compiling() else _Link()

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s1, s2): per-(n, c) sums of ``x − shift`` and its square over H×W."""
        if self._sums is None:
            self._sums = ChannelSums.apply(self.x, self.shift, self._link)
            if self._link is not None:
                self._link.attach(self._sums[0].grad_fn)
        return self._sums

    def moments(self, over: str = "hw", groups: int = 1, ghost: int | None = None) -> Moments:
        """Mean and biased variance per statistic, from the sums. ``over``: ``"hw"`` one per (n, c) (IN);
        ``"groups"`` one per (sample, group of channels) over (C/G, H, W) (``groups`` = G; 1 = LN);
        ``"batch"`` one per channel over (N, H, W) (BN; synced over ranks when the norm's ``sync`` is on and
        torch.distributed runs), or over ghost batches of ``ghost`` samples (the last may be smaller)."""
        s1, s2 = self.sums()
        s1, s2, k = s1.to(_F64), s2.to(_F64), self.shift.to(_F64)
        n, c, cnt = self.n, self.c, float(self.hw)
        if over == "hw":
            off1, off2 = s1 / cnt, s2 / cnt
            var = (off2 - off1 * off1).clamp_min(0)
            mean = k + off1
            return self._pack(off1, var, mean, mean, var, cnt)
        if over == "groups":
            gs = c // groups
            kv, s1v, s2v = k.view(n, groups, gs), s1.view(n, groups, gs), s2.view(n, groups, gs)
            k0 = kv[:, :, :1]
            dk = kv - k0
            t1 = (s1v + cnt * dk).sum(-1)
            t2 = (s2v + 2 * dk * s1v + cnt * dk * dk).sum(-1)
            total = cnt * gs
            m_off = t1 / total
            var = (t2 / total - m_off * m_off).clamp_min(0)
            mean = k0[..., 0] + m_off
            big = (n, groups, gs)
            centre = (k0 - kv + m_off[..., None]).reshape(n, c)
            return self._pack(centre, var[..., None].expand(big).reshape(n, c),
                              mean[..., None].expand(big).reshape(n, c), mean, var, total)
        if over != "batch":
            raise ValueError(f"unknown statistics pattern {over!r}")
        if ghost is None or ghost >= n:
            gid, starts = torch.zeros(n, dtype=torch.long, device=k.device), [0]
        else:
            gid = torch.arange(n, device=k.device) // ghost
            starts = list(range(0, n, ghost))
        ng = len(starts)
        onehot = (gid[None, :] == torch.arange(ng, device=k.device)[:, None]).to(_F64)  # (G, N)
        k0 = k[starts]  # (G, C): every ghost batch's shift, one value of each channel
        dk = k - k0[gid]
        t1 = onehot @ (s1 + cnt * dk)
        t2 = onehot @ (s2 + 2 * dk * s1 + cnt * dk * dk)
        total = onehot.sum(1, keepdim=True) * cnt  # (G, 1)
        if self.sync and ng == 1:  # plain float64 sums and the count, summed over ranks in one all-reduce
            p1, p2 = t1 + total * k0, t2 + 2 * k0 * t1 + total * k0 * k0
            packed = _AllReduce.apply(torch.cat([p1[0], p2[0], total[0]]))
            p1, p2, total = packed[None, :c], packed[None, c:2 * c], packed[None, 2 * c:]
            mean = p1 / total
            var = (p2 / total - mean * mean).clamp_min(0)
            centre = mean[gid] - k
            return self._pack(centre, var[gid], mean[gid], mean, var, total[0, 0])
        m_off = t1 / total
        var = (t2 / total - m_off * m_off).clamp_min(0)
        mean = k0 + m_off
        centre = k0[gid] - k + m_off[gid]
        count = total[:, 0] if ng > 1 else float(n * cnt)
        return self._pack(centre, var[gid], mean[gid], mean, var, count)

    def _pack(self, centre, var, mean, stat_mean, stat_var, count) -> Moments:
        ct = self.ct
        return Moments(centre.to(ct), var.to(ct), mean.to(ct), stat_mean.to(ct), stat_var.to(ct), count)

    def offset(self, mean: torch.Tensor) -> torch.Tensor:
        """``mean − shift`` as a (N, C) centre for :meth:`affine`, for an absolute (C,) or (N, C) mean (e.g. the
        running mean in eval)."""
        return mean.to(self.ct) - self.shift

    def affine(self, a: torch.Tensor, centre: torch.Tensor | None, b: torch.Tensor,
               residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        """``y = a·(x − mean) + b`` with ``centre`` = mean − shift (a ``Moments.centre`` or :meth:`offset`), or
        ``y = a·x + b`` with ``centre`` None; ``a``, ``b``: anything broadcasting to (N, C). ``residual`` (x's
        shape and dtype) and ``relu``: ``relu(y + residual)`` in the same sweep."""
        shape = (self.n, self.c)
        a = a.to(self.ct).expand(shape)
        b = b.to(self.ct).expand(shape)
        c = b + a * self.shift if centre is None else b - a * centre
        link = None
        # the first affine made after the sums shares ChannelSums' dx sweep (see _Link: made before, it could run after)
        if self._link is not None and self._sums is not None and not self._link.claimed:
            self._link.claimed = True
            link = self._link
        return ChannelAffine.apply(self.x, self.shift, a, c, residual, bool(relu), link)


def check_batch(x: torch.Tensor, sync: bool, who: str) -> None:
    """A one-line error when unsynced batch statistics would see one value per channel."""
    _functional.batch_values(x, sync, who, "gn/ln/in/frn/rms")


class SpecNorm(HookWatched, nn.Module):
    """Base of the norms written as specs: subclasses set ``num_channels``, their parameters and buffers, and
    write :meth:`coefficients` (or :meth:`output`). Class flags: ``batch_stats`` (statistics over the batch:
    running statistics for eval, ``sync`` over ranks), ``has_act`` (the norm contains its activation:
    normlab's ResNet drops the ReLU that follows it, see ``models/resnet.py``).

    Hook-watched (``_hooks.HookWatched``) and with :meth:`forward_relu`, so normlab's ResNet blocks fuse norm +
    ReLU (+ residual) through it as they do for BN."""

    batch_stats = False
    has_act = False
    num_channels: int
    sync: bool = False

    def check(self, x: torch.Tensor) -> None:
        """One-line errors for inputs the norm cannot take (wrong shape, one value per channel for batch
        statistics in training)."""
        check_input(x, self.num_channels, type(self).__name__)
        if self.batch_stats and self.training:
            check_batch(x, self.sync, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.engine_forward(x)

    def forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``relu(self(x) + residual)`` (``relu(self(x))`` without residual). For a norm whose output is the affine
        (it does not override :meth:`output`), the residual add and the ReLU are fused into the affine's sweep,
        forward and backward; otherwise (EvoNorm, FRN's TLU) and for a residual of another shape or dtype, the
        three ops run unfused. Forward hooks on this module are not called (the block that calls this checks for
        them)."""
        self.check(x)
        return self.engine_forward_relu(x, residual)

    def engine_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The spec on the engine: the sums, :meth:`coefficients` (or :meth:`output`), the affine (input checked)."""
        return self.output(x, Stats(x, self.sync, type(self).__name__))

    def engine_forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward_relu` on the engine (input checked)."""
        if type(self).output is not SpecNorm.output or not _functional.fusable_residual(x, residual):
            y = self.engine_forward(x)
            return torch.relu(y if residual is None else y + residual)
        stats = Stats(x, self.sync, type(self).__name__)
        a, centre, b = self.coefficients(stats)
        return stats.affine(a, centre, b, residual=residual, relu=True)

    def output(self, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        a, centre, b = self.coefficients(stats)
        return stats.affine(a, centre, b)

    def coefficients(self, stats: Stats) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(a, centre, b)`` for ``y = a·(x − mean) + b`` (see :meth:`Stats.affine`)."""
        raise NotImplementedError


class RunningStats:
    """BN's running-statistics buffers (``running_mean``, ``running_var``, ``num_batches_tracked``: state_dicts
    carry over from BN) and their update; for the batch-statistics specs.

    They follow torch's BatchNorm conventions, which is what ``normlab.analysis.robustness`` relies on to give
    every norm with batch statistics its test-time statistics without knowing it by name:
    ``track_running_stats`` is True, :meth:`reset_running_stats` starts the estimates afresh, ``momentum=None``
    makes the update a cumulative average over the batches since the reset, train mode folds each batch into
    them and eval mode reads the buffers at every forward (so a forward pre-hook that writes them sets the
    statistics a batch is normalized with). :meth:`batch_statistics` is the per-channel estimate the update
    folds in (a norm whose batch statistics are not the whole batch's, as GBN's ghost batches, overrides
    :meth:`batch_moments`)."""

    track_running_stats = True

    def init_running(self, num_channels: int, momentum: float | None, device=None) -> None:
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_channels, device=device))
        self.register_buffer("running_var", torch.ones(num_channels, device=device))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """Running mean 0, variance 1 and the batch counter 0, as ``nn.BatchNorm2d.reset_running_stats``."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def batch_moments(self, stats: Stats) -> Moments:
        """The batch statistics this norm normalizes with in training: one per channel over (N, H, W)."""
        return stats.moments("batch")

    @staticmethod
    def _estimate(m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        count = m.count
        if isinstance(count, torch.Tensor) and count.dim() == 1:  # ghost batches: one count each
            count = count[:, None]
        unbiased = m.stat_var * (count / (count - 1))
        return m.stat_mean.mean(0), unbiased.mean(0)

    @torch.no_grad()
    def batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, unbiased variance) per channel of ``x`` as a training step would fold them into the running
        statistics (the batch's; the mean over ghost batches for GBN), not synced; in the compute dtype."""
        return self._estimate(self.batch_moments(Stats(x.detach(), False, type(self).__name__)))

    @torch.no_grad()
    def update_running(self, m: Moments) -> None:
        """nn.BatchNorm2d's update from the batch's (or the mean of the ghost batches') mean and unbiased variance."""
        mean, var = self._estimate(m)
        factor = self.momentum
        if factor is None:  # cumulative average, as native BN (reads the counter: a host sync)
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
        self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var.detach().to(self.running_var.dtype), alpha=factor)
        self.num_batches_tracked.add_(1)


def positive(who: str, name: str, value, flag: str | None = None, minimum: float = 0.0, strict: bool = True) -> None:
    """One-line error unless ``value`` is a number above (or at, ``strict=False``) ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        how = f"use {flag}" if flag else f"pass {name}="
        rel = ">" if strict else ">="
        raise NormlabError(f"{who}: {name} must be a number {rel} {minimum}, got {value!r}; {how} with a value {rel} {minimum}")


__all__ = ["ChannelAffine", "ChannelSums", "Moments", "RunningStats", "SpecNorm", "Stats", "check_batch", "positive"]
