"""The per-(sample, channel) sweeps over the big tensor, with their back-end chosen in one place.

Three sweeps serve every norm of the spec engine (``spec.py``), each on the C++ kernels for the CPU tensors they
take (``_kernels.nc_sums`` / ``nc_affine``), on the Triton kernels for CUDA tensors (``_triton.channel_sums`` /
``affine``), and on tensor ops otherwise -- always under torch.compile, which traces them into kernels of its
own (``_functional.backend`` makes the choice, the one the BN/GN/BIN Functions make):

* :func:`sums`: ``Σ (x − k)`` and ``Σ (x − k)²`` over H×W per (n, c), ``k`` one (N, C) value per map. Shifted
  value by value before any product, so exact for inputs whose mean is large against their spread.
* :func:`grad_sums`: ``Σ g`` and ``Σ g·(x − k)`` per (n, c), ``g = dy`` or, with ``mask`` (a fused ReLU's
  output), ``dy·(mask > 0)``, which is also returned: it is the residual's gradient and what dx is made from.
* :func:`affine`: ``(p − Pc)·P + (q − Qc)·Q + R`` with (N, C) coefficients, centred value by value (``Pc``,
  ``Qc``; None: 0), then ``+ residual`` and clamped at 0 with ``relu``: the forward output (``p = x``), the
  input gradient ``a·g`` or, in one pass, ``a·g + b·(x − k) + c`` (``p = g``, ``q = x``).

The sums come back in float64 from the kernels (float32 partials added in float64 on Triton) and in the compute
dtype from the tensor ops; coefficients are taken in the compute dtype (float32 for half-precision inputs), and
outputs come back in p's dtype and memory format (NCHW or channels_last).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from normlab.norms import _functional, _kernels, _triton
from normlab.norms._functional import CPP, TRITON, compute_dtype

_F64 = torch.float64


def _nc(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


_STATE = threading.local()  # ops_only: set by differentiable_if_needed (this thread's sweeps on tensor ops)


@contextlib.contextmanager
def differentiable_if_needed():
    """Inside an autograd Function's backward: when autograd is recording it (``create_graph=True``, for a
    gradient of a gradient), every sweep runs on tensor ops, which autograd differentiates; the kernels' results
    carry no graph, so a second-order gradient through them would silently be zero."""
    if not torch.is_grad_enabled():
        yield
        return
    before, _STATE.ops_only = getattr(_STATE, "ops_only", False), True
    try:
        yield
    finally:
        _STATE.ops_only = before


def _backend(x: torch.Tensor) -> tuple[str | None, str | None]:
    if getattr(_STATE, "ops_only", False):
        return None, None
    be = _functional.backend(x)
    return be if be else (None, None)


def kind(x: torch.Tensor) -> str | None:
    """The back-end the sweeps over ``x`` run on: ``"cpp"``, ``"triton"`` or None (tensor ops)."""
    return _backend(x)[0]


def _like(t: torch.Tensor, ref: torch.Tensor, fmt: str) -> torch.Tensor:
    """``t`` in ref's dtype and the layout ``fmt`` (copies only where it is not already)."""
    t = t if t.dtype == ref.dtype else t.to(ref.dtype)
    return _kernels.like(t, fmt)


def sums(x: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s1, s2)``: the (N, C) sums of ``x − center`` and ``(x − center)²`` over H×W (``center`` (N, C), in x's
    compute dtype). float64 on the kernels, the compute dtype on tensor ops."""
    be, fmt = _backend(x)
    if be == CPP:
        s, _ = _kernels.nc_sums(x, None, fmt, center)
        return s[0], s[1]
    if be == TRITON:
        p1, p2, _ = _triton.channel_sums(x, fmt, center)
        return p1.sum(1, dtype=_F64), p2.sum(1, dtype=_F64)
    ct = center.dtype
    d = (x if x.dtype == ct else x.to(ct)) - _nc(center)
    return d.sum((2, 3)), (d * d).sum((2, 3))


def grad_sums(g: torch.Tensor, x: torch.Tensor, center: torch.Tensor, mask: torch.Tensor | None = None):
    """``(Σ g, Σ g·(x − center), gm)`` per (n, c) over H×W (``center`` (N, C) in x's compute dtype). With ``mask``
    (x's shape: a fused ReLU's output), ``g`` is first replaced by ``gm = g·(mask > 0)``, which is returned (in x's
    dtype and layout on the kernels); without, ``gm`` is None. The back-end is x's."""
    be, fmt = _backend(x)
    if be == CPP:
        gk = _like(g, x, fmt)
        if mask is None:
            s, _ = _kernels.nc_sums(gk, x, fmt, center)
            return s[0], s[1], None
        s, _, gm = _kernels.nc_sums(gk, x, fmt, center, mask=_like(mask, x, fmt))
        return s[0], s[1], gm
    if be == TRITON:
        p1, p2, gm = _triton.channel_sums(_like(g, x, fmt), fmt, center, b=x,
                                          mask=None if mask is None else _like(mask, x, fmt))
        return p1.sum(1, dtype=_F64), p2.sum(1, dtype=_F64), gm
    ct = center.dtype
    gm = None if mask is None else torch.where(mask > 0, g, 0)
    gf = g if gm is None else gm
    gf = gf if gf.dtype == ct else gf.to(ct)
    d = (x if x.dtype == ct else x.to(ct)) - _nc(center)
    return gf.sum((2, 3)), (gf * d).sum((2, 3)), gm


def _coef(t: torch.Tensor | None, shape: tuple[int, int], ct: torch.dtype) -> torch.Tensor | None:
    """An (N, C) coefficient in the compute dtype (anything broadcasting to (N, C))."""
    if t is None:
        return None
    t = t if t.dtype == ct else t.to(ct)
    return t if t.shape == shape else t.expand(shape)


def affine(p: torch.Tensor, P: torch.Tensor, R: torch.Tensor | None = None, q: torch.Tensor | None = None,
           Q: torch.Tensor | None = None, Qc: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           relu: bool = False, *, Pc: torch.Tensor | None = None) -> torch.Tensor:
    """``(p − Pc)·P + (q − Qc)·Q + R``, then ``+ residual`` and, with ``relu``, clamped at 0; in p's dtype and
    memory format. Coefficients broadcast to (N, C) (``R``, ``Pc``, ``Qc`` None: 0); ``q`` is p's shape (read in
    p's dtype); ``residual`` p's shape and dtype (``_functional.fusable_residual``). The centring is value by
    value, before the products: exact for large-mean inputs. The post-op (residual, ReLU) is for the form without
    ``q`` (the forward output)."""
    if q is not None and (residual is not None or relu or Pc is not None):
        raise ValueError("sweeps.affine: residual, relu and Pc go with the form without q")
    n, c = p.shape[:2]
    ct = compute_dtype(p.dtype)
    shape = (n, c)
    P = _coef(P, shape, ct)
    R = torch.zeros(shape, dtype=ct, device=p.device) if R is None else _coef(R, shape, ct)
    Q, Qc, Pc = _coef(Q, shape, ct), _coef(Qc, shape, ct), _coef(Pc, shape, ct)
    be, fmt = _backend(p)
    if be == CPP:
        qk = None if q is None else _like(q, p, fmt)
        res = None if residual is None else _like(residual, p, fmt)
        return _kernels.nc_affine(p, fmt, P, R, qk, Q, Qc, Pc=Pc, residual=res, relu=relu)
    if be == TRITON:
        qk = None if q is None else _like(q, p, fmt)
        res = None if residual is None else _like(residual, p, fmt)
        if q is not None and Qc is None:
            Qc = torch.zeros(shape, dtype=ct, device=p.device)
        return _triton.affine(p, fmt, P.contiguous(), R.contiguous(), qk, None if Q is None else Q.contiguous(),
                              None if Qc is None else Qc.contiguous(), res, relu,
                              Pc=None if Pc is None else Pc.contiguous())
    pf = p if p.dtype == ct else p.to(ct)
    if Pc is not None:
        pf = pf - _nc(Pc)
    y = torch.addcmul(_nc(R), pf, _nc(P))
    if q is not None:
        qf = q if q.dtype == ct else q.to(ct)
        y = y.addcmul_(qf if Qc is None else qf - _nc(Qc), _nc(Q))
    if residual is not None:
        y = y.add_(residual)
    if relu:
        y = y.clamp_min_(0)
    return y if y.dtype == p.dtype else y.to(p.dtype)


__all__ = ["affine", "differentiable_if_needed", "grad_sums", "kind", "sums"]
