"""The spec engine: a norm of the shared shape is a small class stating its parameters and its (N, C) math.

The shared shape (BN, IN, GN, BIN and most of the catalogue): per-(sample, channel) sums over H×W → a little
math on (N, C)-sized tensors → a per-(sample, channel) affine ``y = A·(x − centre) + B``. The engine owns the
two sweeps over the big tensor, each an autograd Function with a hand-written backward:

* :class:`ChannelSums`: ``s1 = Σ(x − k)``, ``s2 = Σ(x − k)²`` over H×W per (n, c), with ``k`` one value of
  each (n, c) map (shifted sums: exact for large-mean inputs, as ``_functional`` does); backward
  ``dx = g1 + 2·g2·(x − k)``.
* :class:`ChannelAffine`: ``y = a·(x − k) + c``; backward ``da = Σ dy·(x − k)``, ``dc = Σ dy``, ``dx = a·dy``.

Everything between them is torch ops on (N, C) tensors written by the norm (:meth:`SpecNorm.coefficients`),
and autograd derives that small part's backward. :class:`Stats` turns the sums into moments over any
pattern (per (n, c), per sample over channel groups, per channel over the batch or over ghost batches),
combined in float64 around a common shift per statistic, and all-reduced over ranks for batch statistics
(float64 plain sums and the count in one differentiable all-reduce through ``_functional._all_reduce``, so
the backward all-reduces their gradients: every rank gets single-process BN's gradient on the whole batch).
The centre a norm subtracts stays relative to the shift (``Moments.centre = mean − k``), so neither the
affine nor its gradients cancel large means. Half-precision inputs are computed in float32 and come back in
their dtype. Only tensor ops: works under ``torch.compile`` and on any device.

A norm whose output is not an affine of x (EvoNorm's per-element max and sigmoid) overrides
:meth:`SpecNorm.output` and still takes its statistics from :class:`Stats`.

Back-ends later: ``ChannelSums`` and ``ChannelAffine`` are the only code that touches the big tensor, so the
C++ and Triton sweeps of ``_kernels`` / ``_triton`` can be dispatched inside their forward/backward (the
same ``backend(x)`` choice ``_functional`` makes) without changing any spec; see ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.norms import _functional
from normlab.norms._functional import check_input, compute_dtype

_F64 = torch.float64


def _nc(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


class ChannelSums(torch.autograd.Function):
    """Per-(n, c) sums of ``x − k`` and ``(x − k)²`` over H×W in the compute dtype (``k``: (N, C), no grad)."""

    @staticmethod
    def forward(ctx, x, k):  # noqa: D102
        ct = k.dtype
        d = (x if x.dtype == ct else x.to(ct)) - _nc(k)
        ctx.save_for_backward(x, k)
        return d.sum((2, 3)), (d * d).sum((2, 3))

    @staticmethod
    def backward(ctx, g1, g2):  # noqa: D102
        x, k = ctx.saved_tensors
        ct = k.dtype
        d = (x if x.dtype == ct else x.to(ct)) - _nc(k)
        dx = _nc(g1.to(ct)) + 2 * _nc(g2.to(ct)) * d
        return dx.to(x.dtype), None


class ChannelAffine(torch.autograd.Function):
    """``y = a·(x − k) + c`` per (n, c) (``a``, ``c``: (N, C) in the compute dtype), y in x's dtype."""

    @staticmethod
    def forward(ctx, x, k, a, c):  # noqa: D102
        ct = k.dtype
        y = torch.addcmul(_nc(c), (x if x.dtype == ct else x.to(ct)) - _nc(k), _nc(a))
        ctx.save_for_backward(x, k, a)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, k, a = ctx.saved_tensors
        ct = k.dtype
        dyf = dy.to(ct)
        da = dc = dx = None
        if ctx.needs_input_grad[2]:
            da = (dyf * ((x if x.dtype == ct else x.to(ct)) - _nc(k))).sum((2, 3))
        if ctx.needs_input_grad[3]:
            dc = dyf.sum((2, 3))
        if ctx.needs_input_grad[0]:
            dx = (dyf * _nc(a)).to(x.dtype)
        return dx, None, da, dc


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
        self.shift = (x[:, :, 0, 0] if x.numel() else x.new_zeros(n, c)).detach().to(self.ct)
        self.sync = bool(sync) and _functional.distributed_active()
        self._sums: tuple[torch.Tensor, torch.Tensor] | None = None

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s1, s2): per-(n, c) sums of ``x − shift`` and its square over H×W."""
        if self._sums is None:
            self._sums = ChannelSums.apply(self.x, self.shift)
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

    def affine(self, a: torch.Tensor, centre: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
        """``y = a·(x − mean) + b`` with ``centre`` = mean − shift (a ``Moments.centre`` or :meth:`offset`), or
        ``y = a·x + b`` with ``centre`` None; ``a``, ``b``: anything broadcasting to (N, C)."""
        shape = (self.n, self.c)
        a = a.to(self.ct).expand(shape)
        b = b.to(self.ct).expand(shape)
        c = b + a * self.shift if centre is None else b - a * centre
        return ChannelAffine.apply(self.x, self.shift, a, c)


def check_batch(x: torch.Tensor, sync: bool, who: str) -> None:
    """A one-line error when unsynced batch statistics would see one value per channel."""
    _functional.batch_values(x, sync, who, "gn/ln/in/frn/rms")


class SpecNorm(nn.Module):
    """Base of the norms written as specs: subclasses set ``num_channels``, their parameters and buffers, and
    write :meth:`coefficients` (or :meth:`output`). Class flags: ``batch_stats`` (statistics over the batch:
    running statistics for eval, ``sync`` over ranks), ``has_act`` (the norm contains its activation:
    normlab's ResNet drops the ReLU that follows it, see ``models/resnet.py``)."""

    batch_stats = False
    has_act = False
    num_channels: int
    sync: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels, type(self).__name__)
        if self.batch_stats and self.training:
            check_batch(x, self.sync, type(self).__name__)
        return self.output(x, Stats(x, self.sync, type(self).__name__))

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
