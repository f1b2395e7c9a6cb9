"""The norms' CPU fast path: ``_kernels.cpp`` built once with the system C++ compiler, called via ctypes.

The kernels do each norm's passes over the big tensor (per-(sample, channel) sums, the affine, the
input gradient: one pass each) and the small per-channel / per-group math, for float32, float64 and
bfloat16 CPU tensors in NCHW or channels_last; ``_functional.py`` falls back to plain tensor ops for
everything else (CUDA, float16, other strides, torch.compile tracing) or when no compiler
works. The build runs once and is cached as ``$NORMLAB_CACHE/kernels/normlab_norms_<hash>.so`` (the hash
covers the source, flags, compiler and CPU), and is written atomically so parallel processes (DDP
ranks, study jobs) can race safely. ``NORMLAB_KERNELS=0`` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from normlab.io import cache_dir

SOURCE = Path(__file__).with_name("_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
NCHW, NHWC = "rows", "nhwc"

_state: dict = {"lib": None, "tried": False, "error": None}

_P, _I, _D, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_SIGNATURES = {
    "bn_sums": [_P, _P, _INT, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT],
    "bn_forward": [_P, _P, _INT, _I, _I, _I, _P, _P, _P, _D, _P, _P, _D, _D, _P, _P, _P, _P, _P, _INT, _INT],
    "bn_backward": [_P, _P, _P, _INT, _I, _I, _I, _P, _P, _D, _P, _P, _P, _INT],
    "nc_sums": [_P, _P, _INT, _I, _I, _I, _P, _P, _P, _P, _P, _P, _INT],
    "nc_affine": [_P, _P, _P, _INT, _I, _I, _I, _P, _P, _P, _P, _P, _P, _INT, _INT],
    "gn_forward": [_P, _P, _INT, _I, _I, _I, _I, _P, _P, _D, _P, _P, _P, _INT, _INT],
    "gn_backward": [_P, _P, _P, _INT, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _INT],
    "bin_moments": [_P, _P, _P, _I, _I, _I, _D, _P, _P, _P, _P, _P, _P],
    "bin_scale": [_P, _P, _P, _INT, _P, _D, _I, _I, _D, _D, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P],
    "bin_grad_sums": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P],
    "bin_grad_coefs": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _D, _I, _I, _I, _P, _P, _P],
}
_SUFFIX = {torch.float32: "f", torch.float64: "d", torch.bfloat16: "b"}
# the statistics', parameters' and gradients' dtype for each storage dtype (bfloat16 is computed in float32)
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}


def enabled() -> bool:
    """False when ``NORMLAB_KERNELS`` is 0/false/off."""
    return os.environ.get("NORMLAB_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(cxx: str) -> Path:
    """Where the built library for this source, compiler, flags and CPU lives."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cxx, version, _cpu_id(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"normlab_norms_{key}.so"


def build(cxx: str) -> Path:
    """Compile the kernels (if not cached) and return the library path; raises on failure."""
    out = library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["compiler failed"])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library():
    """The loaded kernel library, or None (disabled, no compiler, build failed: warned once)."""
    if not enabled():
        return None
    if _state["tried"]:
        return _state["lib"]
    _state["tried"] = True
    cxx = _compiler()
    try:
        if cxx is None:
            raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
        lib = ctypes.CDLL(str(build(cxx)))
        for suffix in _SUFFIX.values():
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, f"normlab_{name}_{suffix}")
                fn.argtypes, fn.restype = args, None
        _state["lib"] = lib
    except Exception as exc:  # noqa: BLE001 -- any failure means: use the tensor-op path
        _state["error"] = str(exc)
        warnings.warn(f"normlab: the C++ norm kernels are unavailable ({exc}); the norms use plain tensor "
                      "ops instead (same results, slower on CPU). Set NORMLAB_KERNELS=0 to silence this.",
                      RuntimeWarning, stacklevel=2)
    return _state["lib"]


def dense_layout(x: torch.Tensor) -> str | None:
    """NCHW or NHWC when ``x`` is a non-empty 4-D tensor dense in one of them (what every kernel back-end walks),
    else None."""
    if x.dim() != 4 or x.numel() == 0:
        return None
    if x.is_contiguous():
        return NCHW
    if x.is_contiguous(memory_format=torch.channels_last):
        return NHWC
    return None


def layout(x: torch.Tensor) -> str | None:
    """NCHW or NHWC when the fast path can take ``x`` (CPU, float32/64 or bfloat16, dense 4-D), else None."""
    if not x.is_cpu or x.dtype not in _SUFFIX:
        return None
    return dense_layout(x)


def usable(x: torch.Tensor) -> str | None:
    """The layout to use for ``x`` if the kernels are built and can take it, else None."""
    fmt = layout(x)
    return fmt if fmt is not None and library() is not None else None


def like(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """``t`` in the memory layout ``fmt`` (a copy only when it is not already)."""
    return t.contiguous() if fmt == NCHW else t.contiguous(memory_format=torch.channels_last)


_FNS: dict = {}  # (name, dtype) -> bound C function, filled on first use


def _fn(name: str, dtype: torch.dtype):
    fn = _FNS.get((name, dtype))
    if fn is None:
        fn = _FNS[(name, dtype)] = getattr(_state["lib"], f"normlab_{name}_{_SUFFIX[dtype]}")
    return fn


def _geom(x: torch.Tensor, fmt: str) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return int(fmt == NHWC), n, c, h * w


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _row(t: torch.Tensor, i: int) -> int:
    """The address of ``t[i]`` (``t`` contiguous), without the dispatcher call that indexing costs."""
    return t.data_ptr() + i * t.stride(0) * t.element_size()


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A parameter / statistic as a contiguous ``dtype`` tensor (itself when it already is: the common
    case, checked without a dispatcher call for ``to``)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def bn_sums(a: torch.Tensor, b: torch.Tensor | None, fmt: str, center: torch.Tensor | None = None,
            rstd: torch.Tensor | None = None, grad_weight: bool = False, grad_bias: bool = False,
            mask: torch.Tensor | None = None):
    """Per-channel sums over (N, H, W), centred value by value (exact for large-mean inputs).
    ``b=None`` (forward): ``s`` = float64 (3, C) holding the shifted sums ``sum (a - k)``, ``sum (a - k)²``
    and the shift ``k`` (``center`` when given -- synced BN: one shift for every rank --, else each channel's
    first value, chosen by the kernel). Otherwise (backward): ``s`` =
    float64 (2, C) holding ``sum a`` and ``sum a*(b - center)`` (no center: 0); with ``rstd``, also the
    weight / bias gradients ``s[1]*rstd`` and ``s[0]`` in the compute dtype (float32 for bfloat16; or None).
    With ``mask`` (a ReLU's output, in a's layout and dtype; needs ``b``), ``a`` is first replaced by
    ``g = a * (mask > 0)``. Returns ``(s, grad_weight, grad_bias, g)`` (g None without mask)."""
    c, ct = a.shape[1], _COMPUTE[a.dtype]
    center, rstd = _as(center, ct), _as(rstd, ct)
    s = torch.empty(3 if b is None else 2, c, dtype=torch.float64)
    gw = torch.empty(c, dtype=ct) if grad_weight else None
    gb = torch.empty(c, dtype=ct) if grad_bias else None
    g = torch.empty_like(a) if mask is not None else None
    _fn("bn_sums", a.dtype)(a.data_ptr(), _ptr(b), *_geom(a, fmt), _ptr(center), _ptr(rstd), _row(s, 0),
                            _row(s, 1), _row(s, 2) if b is None else None, _ptr(gw), _ptr(gb),
                            _ptr(mask), _ptr(g), torch.get_num_threads())
    return s, gw, gb, g


def bn_forward(x: torch.Tensor, fmt: str, s1: torch.Tensor, s2: torch.Tensor, total: int,
               weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, momentum: float,
               running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               residual: torch.Tensor | None = None, relu: bool = False, shift: torch.Tensor | None = None):
    """BN's normalization from the float64 per-channel sums ``s1``, ``s2`` of ``x - shift`` and
    ``(x - shift)²`` (float64 ``shift``; None: plain sums) over ``total`` values per channel;
    updates the running statistics in place (unbiased variance) when they are contiguous tensors of the
    compute dtype. ``residual`` (x's layout and dtype) is added to the output, ``relu`` clamps it at 0.
    Returns ``(y, mean, rstd, updated)``: ``updated`` is False when there were running statistics the
    kernel could not update (another dtype: the caller updates them)."""
    c, ct = x.shape[1], _COMPUTE[x.dtype]
    updated = running_mean is not None and all(t.dtype == ct and t.is_contiguous()
                                               for t in (running_mean, running_var))
    y = torch.empty_like(x)
    stats = torch.empty(2, c, dtype=ct)
    # every pointer handed to C belongs to a tensor bound to a name here (kept alive during the call)
    s1c, s2c, w, b = s1.contiguous(), s2.contiguous(), _as(weight, ct), _as(bias, ct)
    k = _as(shift, torch.float64)
    _fn("bn_forward", x.dtype)(
        x.data_ptr(), y.data_ptr(), *_geom(x, fmt), s1c.data_ptr(), s2c.data_ptr(), _ptr(k),
        float(total), _ptr(w), _ptr(b), float(eps), float(momentum),
        _ptr(running_mean) if updated else None, _ptr(running_var) if updated else None,
        _row(stats, 0), _row(stats, 1), _ptr(residual), int(relu), torch.get_num_threads())
    return y, stats[0], stats[1], updated or running_mean is None


def bn_backward(dy: torch.Tensor, x: torch.Tensor, fmt: str, s: torch.Tensor, total: int,
                weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """BN's input gradient from the float64 (2, C) sums of dy and dy*(x - mean) over ``total`` values;
    ``dy`` must be in x's layout and dtype."""
    dx = torch.empty_like(x)
    ct = _COMPUTE[x.dtype]
    s, w, mean, rstd = s.contiguous(), _as(weight, ct), _as(mean, ct), _as(rstd, ct)
    _fn("bn_backward", x.dtype)(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), *_geom(x, fmt), _row(s, 0),
                                _row(s, 1), float(total), _ptr(w), mean.data_ptr(),
                                rstd.data_ptr(), torch.get_num_threads())
    return dx


def nc_sums(a: torch.Tensor, b: torch.Tensor | None, fmt: str, center: torch.Tensor | None = None,
            mask: torch.Tensor | None = None):
    """Per-(sample, channel) sums over (H, W), float64 (2, N, C), centred value by value on ``center`` (N, C):
    ``b=None`` (forward) those of ``a - center`` and ``(a - center)²``; otherwise (backward; ``b`` in a's layout
    and dtype) those of ``a`` and ``a*(b - center)``. ``center=None`` (forward): each (sample, channel)'s first
    value ``a[n, c, 0, 0]``, read by the kernel. With ``mask`` (backward only: a fused ReLU's output, in a's
    layout and dtype), ``a`` is first replaced by ``g = a * (mask > 0)``, written out. Returns ``(s, center)``,
    the centre as a contiguous (N, C) tensor of the compute dtype, or with ``mask`` ``(s, center, g)``."""
    n, c = a.shape[:2]
    ct = _COMPUTE[a.dtype]
    s = torch.empty(2, n, c, dtype=torch.float64)
    k = torch.empty(n, c, dtype=ct) if center is None else _as(center, ct)
    if mask is not None and b is None:
        raise ValueError("nc_sums: a mask needs the backward sums (b)")
    g = torch.empty_like(a) if mask is not None else None
    _fn("nc_sums", a.dtype)(a.data_ptr(), _ptr(b), *_geom(a, fmt), None if center is None else k.data_ptr(),
                            k.data_ptr(), _row(s, 0), _row(s, 1), _ptr(mask), _ptr(g), torch.get_num_threads())
    return (s, k) if mask is None else (s, k, g)


def nc_affine(p: torch.Tensor, fmt: str, P: torch.Tensor, R: torch.Tensor, q: torch.Tensor | None = None,
              Q: torch.Tensor | None = None, Qc: torch.Tensor | None = None, *, Pc: torch.Tensor | None = None,
              residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``p*P + R``, or with ``q`` (in p's layout and dtype) ``p*P + (q - Qc)*Q + R``, with (N, C) coefficients
    (``Qc`` None: 0), in p's layout and dtype. Without ``q``: ``Pc`` centres p value by value,
    ``(p - Pc)*P + R`` (exact for large-mean inputs), ``residual`` (p's layout and dtype) is added and ``relu``
    clamps at 0."""
    ct = _COMPUTE[p.dtype]
    out = torch.empty_like(p)
    P, R = _as(P, ct), _as(R, ct)
    if q is not None:
        if Pc is not None or residual is not None or relu:
            raise ValueError("nc_affine: Pc, residual and relu are for the form without q")
        Q = _as(Q, ct)
        Qc = torch.zeros_like(Q) if Qc is None else _as(Qc, ct)
    Pc = _as(Pc, ct)
    _fn("nc_affine", p.dtype)(p.data_ptr(), _ptr(q), out.data_ptr(), *_geom(p, fmt), P.data_ptr(), _ptr(Pc),
                              _ptr(Q), _ptr(Qc), R.data_ptr(), _ptr(residual), int(relu), torch.get_num_threads())
    return out


def gn_forward(x: torch.Tensor, fmt: str, groups: int, weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None, relu: bool = False):
    """Group normalization of ``x`` (+ ``residual``, in x's layout and dtype; clamped at 0 with ``relu``).
    Returns ``(y, mean, rstd)``, statistics of shape (N, G)."""
    n, ct = x.shape[0], _COMPUTE[x.dtype]
    y = torch.empty_like(x)
    stats = torch.empty(2, n, groups, dtype=ct)
    w, b = _as(weight, ct), _as(bias, ct)
    _fn("gn_forward", x.dtype)(x.data_ptr(), y.data_ptr(), *_geom(x, fmt), groups, _ptr(w), _ptr(b), float(eps),
                               _row(stats, 0), _row(stats, 1), _ptr(residual), int(relu),
                               torch.get_num_threads())
    return y, stats[0], stats[1]


def gn_backward(dy: torch.Tensor, x: torch.Tensor, fmt: str, groups: int, weight: torch.Tensor | None,
                mean: torch.Tensor, rstd: torch.Tensor, grad_x: bool, grad_weight: bool, grad_bias: bool,
                mask: torch.Tensor | None = None):
    """Group norm's gradients ``(dx, d weight, d bias, g)`` (None where not asked); ``dy`` in x's layout.
    With ``mask`` (a fused ReLU's output), dy is first replaced by ``g = dy * (mask > 0)`` (returned)."""
    c, ct = x.shape[1], _COMPUTE[x.dtype]
    dx = torch.empty_like(x) if grad_x else None
    gw = torch.empty(c, dtype=ct) if grad_weight else None
    gb = torch.empty(c, dtype=ct) if grad_bias else None
    g = torch.empty_like(x) if mask is not None else None
    w, mean, rstd = _as(weight, ct), _as(mean, ct), _as(rstd, ct)
    _fn("gn_backward", x.dtype)(dy.data_ptr(), x.data_ptr(), _ptr(dx), *_geom(x, fmt), groups, _ptr(w),
                                mean.data_ptr(), rstd.data_ptr(), _ptr(gw), _ptr(gb), _ptr(mask), _ptr(g),
                                torch.get_num_threads())
    return dx, gw, gb, g


# Batch-Instance Norm's small per-(sample, channel) math (float64; formulas in _bin.py and _kernels.cpp): two C
# calls per direction, so that synced BIN can all-reduce BN's per-channel sums between them. Parameters are
# read in the compute dtype ``ct`` of x (float32 for bfloat16), as the BN and GN entry points read them.


def bin_moments(s: torch.Tensor, k: torch.Tensor, hw: int, eps: float, dtype: torch.dtype):
    """Forward, step 1, from ``nc_sums``' (2, N, C) sums ``s`` of x - k over ``hw`` values (``k`` (N, C), of x's
    compute dtype; ``dtype``: x's dtype). Returns ``(ins, mean_t, bn)``: float64 (2, N, C) IN mean and rstd; the
    IN mean rounded to the compute dtype (the backward sweep's centre); float64 (3, C) BN's per-channel sums of
    x - kc and (x - kc)², and kc = k[0]."""
    n, c = k.shape
    ins = torch.empty(2, n, c, dtype=torch.float64)
    mean_t = torch.empty(n, c, dtype=k.dtype)
    bn = torch.empty(3, c, dtype=torch.float64)
    _fn("bin_moments", dtype)(_row(s, 0), _row(s, 1), k.data_ptr(), n, c, hw, float(eps), _row(ins, 0),
                              _row(ins, 1), mean_t.data_ptr(), _row(bn, 0), _row(bn, 1), _row(bn, 2))
    return ins, mean_t, bn


def _total(total) -> tuple[int | None, float]:
    """A count for the C calls: a plain number, or (synced) a float64 CPU tensor read there (no ``.item()``)."""
    return (total.data_ptr(), 0.0) if isinstance(total, torch.Tensor) else (None, float(total))


def bin_scale(ins: torch.Tensor, sums, total, weight: torch.Tensor, bias: torch.Tensor, rho: torch.Tensor,
              eps: float, momentum: float, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
              dtype: torch.dtype, shifted: bool = True, moments: bool = False):
    """Forward, step 2: BN's statistics from its float64 per-channel sums of x - kc and (x - kc)² over ``total``
    values (a number, or synced a float64 tensor): ``sums`` is ``bin_moments``' (3, C) tensor (the two sums and
    kc), or a pair of contiguous float64 (C,) tensors -- plain sums (``shifted=False``), or with ``moments`` the
    mean and variance themselves (eval); the running statistics are updated in place when given (contiguous
    float64 only); then the (N, C) scale and shift of the output (IN statistics ``ins`` from ``bin_moments``;
    ``dtype``: x's). Returns ``(coef, bn)``: (2, N, C) scale and shift in the compute dtype, float64 (3, C) BN
    mean, biased variance and rstd."""
    n, c = ins.shape[1:]
    ct = _COMPUTE[dtype]
    coef = torch.empty(2, n, c, dtype=ct)
    bn = torch.empty(3, c, dtype=torch.float64)
    w, b, r = _as(weight, ct), _as(bias, ct), _as(rho, ct)
    if isinstance(sums, torch.Tensor):
        p1, p2, kc = _row(sums, 0), _row(sums, 1), _row(sums, 2) if shifted else None
    else:
        (p1, p2), kc = (t.data_ptr() for t in sums), None
    tp, tv = _total(total)
    _fn("bin_scale", dtype)(p1, p2, kc, int(moments), tp, tv, n, c, float(eps), float(momentum),
                            _ptr(running_mean), _ptr(running_var), _row(ins, 0), _row(ins, 1), w.data_ptr(),
                            b.data_ptr(), r.data_ptr(), _row(bn, 0), _row(bn, 1), _row(bn, 2), _row(coef, 0),
                            _row(coef, 1))
    return coef, bn


def bin_grad_sums(s: torch.Tensor, mean_t: torch.Tensor, ins: torch.Tensor, bn: torch.Tensor,
                  weight: torch.Tensor, rho: torch.Tensor, dtype: torch.dtype):
    """Backward, step 1, from ``nc_sums``' (2, N, C) sums ``s`` of g and g*(x - mean_t) (the forward's saved
    ``mean_t``, ``ins``, ``bn`` as returned there). Returns ``(h, grads, grads_t)``: float64 (2, C) BN's
    per-channel sums of g and g*(x - mean_BN) (local); the weight, bias and ρ gradients (3, C) in float64 and
    rounded to the compute dtype."""
    n, c = mean_t.shape
    ct = _COMPUTE[dtype]
    h = torch.empty(2, c, dtype=torch.float64)
    grads = torch.empty(3, c, dtype=torch.float64)
    grads_t = torch.empty(3, c, dtype=ct)
    w, r = _as(weight, ct), _as(rho, ct)
    _fn("bin_grad_sums", dtype)(_row(s, 0), _row(s, 1), mean_t.data_ptr(), _row(ins, 1), _row(bn, 0), _row(bn, 2),
                                w.data_ptr(), r.data_ptr(), n, c, _row(h, 0), _row(h, 1), grads.data_ptr(),
                                grads_t.data_ptr())
    return h, grads, grads_t


def bin_grad_coefs(s: torch.Tensor, mean_t: torch.Tensor, ins: torch.Tensor, bn: torch.Tensor,
                   weight: torch.Tensor, rho: torch.Tensor, h: torch.Tensor | None, total, hw: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Backward, step 2: dx's (N, C) coefficients ``a, b, cst`` (dx = a*g + b*(x - mean_t) + cst) in the compute
    dtype, as one (3, N, C) tensor; ``h`` (training: BN's statistics depend on x) the (synced) per-channel sums
    from ``bin_grad_sums`` over ``total`` values (a number, or synced a float64 tensor), None in eval."""
    n, c = mean_t.shape
    ct = _COMPUTE[dtype]
    coef = torch.empty(3, n, c, dtype=ct)
    w, r = _as(weight, ct), _as(rho, ct)
    tp, tv = _total(total)
    _fn("bin_grad_coefs", dtype)(_row(s, 0), _row(s, 1), mean_t.data_ptr(), _row(ins, 1), _row(bn, 0),
                                 _row(bn, 2), w.data_ptr(), r.data_ptr(), None if h is None else _row(h, 0),
                                 None if h is None else _row(h, 1), tp, tv, n, c, hw, _row(coef, 0),
                                 _row(coef, 1), _row(coef, 2))
    return coef
