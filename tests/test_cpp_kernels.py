"""The C++ CPU kernels under the norms (norms/_kernels.cpp, built and bound by norms/_kernels.py): when the fast
path is taken, bf16 storage, maps longer than one run, channels_last tiles and register sums, threaded and serial
paths, the build's fallback and cache, the ctypes signatures, and BIN's Function on the kernels against its
tensor-op path. What each norm is (equal to native, gradcheck, fusion, sync) is tests/test_norms.py; every test
here also runs twice, with the kernels on and off (the ``norm_path`` fixture)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from normlab.norms import _functional, _kernels
from normlab.norms._bin import BatchInstanceFunction
from normlab.norms import BatchInstanceNorm2d, BatchNorm2d, GroupNorm2d, InstanceNorm2d, make_norm
from norm_helpers import (  # noqa: F401  (norm_path: the autouse fixture, C++ kernels and tensor ops)
    FUSABLE, assert_same_step, bin_pair, close, make_input, norm_path, randomize_affine, run, to_double,
)


# ------------------------------------------------------------------------------- the fast path, numerics

def test_fast_path_is_taken_exactly_for_cpu_float_dense_inputs(norm_path, monkeypatch):
    calls = []
    for name in ("bn_forward", "bn_backward", "gn_forward", "gn_backward"):
        real = getattr(_kernels, name)
        monkeypatch.setattr(_kernels, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    for layer in (BatchNorm2d(8), GroupNorm2d(8, 4), BatchInstanceNorm2d(8)):
        for cl in (False, True):
            layer(make_input((4, 8, 5, 5), cl)).sum().backward()
    if norm_path == "ops":
        assert calls == []
        return
    assert {"bn_forward", "bn_backward", "gn_forward", "gn_backward"} <= set(calls)
    assert _functional.fast_layout(torch.randn(2, 3, 4, 4)) == _kernels.NCHW
    assert _functional.fast_layout(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)) == \
        _kernels.NHWC
    assert _functional.fast_layout(torch.randn(2, 3, 4, 4, dtype=torch.float64)) == _kernels.NCHW
    assert _functional.fast_layout(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)) == _kernels.NCHW
    for other in (torch.randn(2, 3, 4, 8)[..., ::2], torch.randn(2, 3, 4, 4).half(), torch.randn(0, 3, 4, 4),
                  torch.randn(2, 3, 4, 4).permute(0, 1, 3, 2)):
        assert _functional.fast_layout(other) is None, other.shape


@pytest.mark.parametrize("name", ["bn", "gn", "ln", "in", "bin"])
@pytest.mark.parametrize("cl", [False, True])
def test_bf16_kernels_match_the_tensor_op_path(name, cl, monkeypatch):
    """bfloat16 storage, float32 statistics: the C++ kernels and the fallback agree to bf16 rounding."""
    x = make_input((6, 16, 7, 5), cl).detach().bfloat16()
    dy = torch.randn(6, 16, 7, 5).bfloat16()
    got = {}
    for path in ("1", "0"):
        monkeypatch.setenv("NORMLAB_KERNELS", path)
        m = make_norm(name, 16)
        randomize_affine(m)
        got[path] = run(m, x, dy)
        if name in ("bn", "bin"):
            got[path] += (m.running_mean.clone(), m.running_var.clone())
    for a, b in zip(got["1"], got["0"]):
        assert a.dtype == b.dtype
        close(a.float(), b.float(), atol=0.02, rtol=0.02)  # a bf16 ulp is 2^-8 relative
    assert got["1"][0].dtype == got["1"][1].dtype == torch.bfloat16 and got["1"][2].dtype == torch.float32


def test_large_maps_and_blocks_longer_than_one_run():
    """Rows longer than the kernels' 4096-value runs and groups spanning channels: still exact."""
    for ours, ref in ((GroupNorm2d(4, 2), nn.GroupNorm(2, 4)), (BatchNorm2d(4), nn.BatchNorm2d(4))):
        randomize_affine(ours, ref)
        for cl in (False, True):
            assert_same_step(ours, ref, make_input((2, 4, 70, 65), cl))


@pytest.mark.parametrize("c,groups,hw", [(24, 3, (9, 10)), (300, 3, (3, 5)), (16, 4, (2, 3)), (40, 5, (33, 8))])
def test_channels_last_tiles_of_any_channel_count(c, groups, hw):
    """channels_last kernels work on tiles of whole rows (>= 256 values): channel counts that do not divide
    256, wider than a tile, and maps shorter than one tile or ending in a partial tile are all exact."""
    for ours, ref in ((GroupNorm2d(c, groups), nn.GroupNorm(groups, c)), (BatchNorm2d(c), nn.BatchNorm2d(c))):
        randomize_affine(ours, ref)
        assert_same_step(ours, ref, make_input((3, c) + hw, True))


@pytest.mark.parametrize("c", [16, 32, 48, 64])
@pytest.mark.parametrize("name", list(FUSABLE))
def test_channels_last_register_sums_at_resnet_widths(name, c):
    """At 16, 32, 48 and 64 channels the channels_last sums keep their accumulators in vector registers
    (several rows in flight, float sums moved to double every 256 rows): a map of 17x19 = 323 rows (two
    chunks, and rows left over after the last group of rows in flight) is exact, plainly, fused with ReLU +
    residual (the masked sums), and in bfloat16 against the tensor-op path."""
    shape = (3, c, 17, 19)
    ours, ref = FUSABLE[name][0](c), FUSABLE[name][1](c)
    randomize_affine(ours, ref)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for a, b in zip(run(ours, make_input(shape, True), dy), run(ref, make_input(shape, True), dy)):
        close(a, b, atol=1e-4)  # weight grads: float32 sums of ~1,000 products that partly cancel (native too)
    x, r = make_input(shape, True, seed=1).detach(), make_input(shape, True, seed=2).detach()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    xa, xb, ra, rb = (t.clone().requires_grad_() for t in (x, x, r, r))
    ya, yb = ours.forward_relu(xa, ra), torch.relu(ref(xb) + rb)
    ya.backward(dy), yb.backward(dy)
    assert (ya == 0).float().mean() > 0.2 and (ya > 0).float().mean() > 0.2
    for a, b in ((ya, yb), (xa.grad, xb.grad), (ra.grad, rb.grad), (ours.weight.grad, ref.weight.grad),
                 (ours.bias.grad, ref.bias.grad)):
        close(a, b, atol=1e-4)


@pytest.mark.parametrize("c", [32, 64])
@pytest.mark.parametrize("name", ["bn", "gn", "in"])
def test_bf16_register_sums_match_the_tensor_op_path(name, c, monkeypatch):
    x = make_input((4, c, 9, 7), True).detach().bfloat16()
    dy = torch.randn(4, c, 9, 7).bfloat16().contiguous(memory_format=torch.channels_last)
    got = {}
    for path in ("1", "0"):
        monkeypatch.setenv("NORMLAB_KERNELS", path)
        m = make_norm(name, c)
        randomize_affine(m)
        got[path] = run(m, x, dy)
    for a, b in zip(got["1"], got["0"]):
        close(a.float(), b.float(), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_threaded_and_serial_agree_with_native(threads):
    """Maps above the kernels' parallel threshold run the OpenMP paths (threads=2) or the serial ones: both
    match the native layers, in both layouts, whatever the machine's default thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for ours, ref in ((GroupNorm2d(40, 5), nn.GroupNorm(5, 40)), (BatchNorm2d(40), nn.BatchNorm2d(40)),
                          (InstanceNorm2d(40), nn.InstanceNorm2d(40, affine=True))):
            randomize_affine(ours, ref)
            for cl in (False, True):
                assert_same_step(ours, ref, make_input((6, 40, 33, 8), cl))
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ build, cache, ctypes signatures

def test_kernel_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setattr(_kernels, "_state", {"lib": None, "tried": False, "error": None})
    with pytest.warns(RuntimeWarning, match="C\\+\\+ norm kernels are unavailable"):
        assert _kernels.library() is None
    assert _kernels.library() is None  # tried once, not again
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
    ours, ref = BatchNorm2d(6), nn.BatchNorm2d(6)
    assert_same_step(ours, ref, make_input((4, 6, 5, 5)))


def test_kernel_library_is_cached_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    cxx = _kernels._compiler()
    assert cxx is not None, "no C++ compiler: install g++ (make test does)"
    built = _kernels.build(cxx)
    assert built.parent == tmp_path / "kernels" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert _kernels.build(cxx) == built and built.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_ctypes_signatures_match_the_cpp_entry_points():
    """Each Python ctypes declaration agrees, argument by argument, with the C++ ``NORMLAB_EXPORT`` macro it
    binds (a mismatch would corrupt memory silently), and every exported entry point is declared."""
    import ctypes

    src = _kernels.SOURCE.read_text()
    macro = src[src.index("#define NORMLAB_EXPORT"):].replace("\\\n", "\n")
    found = dict(re.findall(r'extern "C" void normlab_(\w+)_##X\((.*?)\)\s*\{', macro, re.S))
    assert set(found) == set(_kernels._SIGNATURES)

    def ctype(param: str):
        param = " ".join(param.split())
        if "*" in param:
            return ctypes.c_void_p
        kind = param.replace("const ", "").split()[0]
        return {"i64": ctypes.c_int64, "int": ctypes.c_int, "double": ctypes.c_double}[kind]

    for name, params in found.items():
        want = [ctype(p) for p in params.split(",")]
        assert _kernels._SIGNATURES[name] == want, name
    for suffix in ("f", "d", "b"):  # one instantiation per storage dtype, all declared
        assert f"NORMLAB_EXPORT(" in src and re.search(rf"NORMLAB_EXPORT\(\w+, \w+, {suffix}\)", src)


# ------------------------------------------------- BIN's Function on the C++ kernels vs on the tensor ops

def bin_run(path: str, m, x, dy, monkeypatch):
    """Forward + backward of BIN's Function on the C++ kernels (``path="cpp"``) or on the tensor ops (``"ops"``:
    the back-end forced to None): output, input grad, weight/bias/rho grads, running statistics; and the C++
    entry points called (``nc_sums`` / ``nc_affine``, in order)."""
    calls: list = []
    xo = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    with monkeypatch.context() as mp_:
        if path == "ops":
            mp_.setattr(_functional, "backend", lambda t: None)
        for name in ("nc_sums", "nc_affine"):
            real = getattr(_kernels, name)
            mp_.setattr(_kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
        y = m(xo)
        y.backward(dy)
    out = [y.detach(), xo.grad, m.weight.grad, m.bias.grad, m.rho.grad]
    return out + ([m.running_mean.clone(), m.running_var.clone()] if m.running_mean is not None else []), calls


BIN_SHAPES = [  # NCHW rows and channels_last tiles (c = 12, 300: tile_len 264 / c), the register sums
    (6, 12, 5, 7), (4, 32, 6, 6), (3, 300, 2, 3), (1, 16, 5, 5), (2, 4, 70, 70)]  # (c = 16..64), runs > 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", BIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_bin_on_the_cpp_kernels_equals_the_tensor_op_path(dtype, cl, shape, monkeypatch):
    """BIN's Function on the C++ kernels (``nc_sums`` forward and backward, ``nc_affine`` for y and dx) gives
    the tensor-op path's outputs, gradients and running statistics, in training (two steps) and eval, for
    every storage dtype and both layouts, gates outside [0, 1] included. The kernels are turned on here, so the
    ``ops`` parametrization repeats the check."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    ours, ref = bin_pair(shape[1])
    x0 = make_input(shape, cl).detach().to(dtype)
    assert _functional.backend(x0) == (_functional.CPP, _kernels.NHWC if cl else _kernels.NCHW)
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
           torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}[dtype]
    for step in range(3):
        if step == 2:
            ours.eval(), ref.eval()
        x = make_input(shape, cl, seed=step).detach().to(dtype)
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step)).to(dtype)
        got, calls = bin_run("cpp", ours, x, dy, monkeypatch)
        want, none = bin_run("ops", ref, x, dy, monkeypatch)
        assert calls == ["nc_sums", "nc_affine"] * 2 and none == []  # eval: IN statistics still summed
        assert got[0].dtype == got[1].dtype == dtype
        assert all(t.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                   for t in got[:2])
        for what, a, b in zip(("y", "dx", "dweight", "dbias", "drho", "running_mean", "running_var"), got, want):
            t = dict(atol=2e-3, rtol=2e-3) if dtype == torch.bfloat16 and what not in ("y", "dx") else tol
            torch.testing.assert_close(a, b, **t, msg=lambda s, w=what: f"step {step} {w}: {s}")


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_fused_bin_cpp_is_exact_for_large_mean_inputs(cl, monkeypatch):
    """|mean|/std = 1000 in float32: the C++ path's output, gradients and running statistics are as close to a
    float64 reference (BIN's Function in float64) as the tensor-op path's, within a factor 2 (its sums are
    shifted per (sample, channel) and its dx centred on the IN mean; with the shift set to 0 the output is off
    by more than 100%)."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    shape = (8, 16, 6, 6)
    ours, ref = bin_pair(16)
    x = make_input(shape, cl).detach() * 0.5 + 1000.0
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    want, _ = bin_run("ops", ref.double(), x.double(), dy.double(), monkeypatch)
    errs = {}
    for path in ("cpp", "ops"):
        m = bin_pair(16)[0]
        got, _ = bin_run(path, m, x, dy, monkeypatch)
        errs[path] = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    for what, e_cpp, e_ops in zip(("y", "dx", "dweight", "dbias", "drho", "running_mean", "running_var"),
                                  errs["cpp"], errs["ops"]):
        assert e_cpp <= max(2 * e_ops, 1e-5), (what, e_cpp, e_ops)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_bin_cpp_threaded_and_serial(threads, monkeypatch):
    """Above the kernels' parallel threshold (OpenMP over rows or samples, per-sample tiles per thread) and
    below it, both layouts: the C++ path equals the tensor-op path."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for cl in (False, True):
            ours, ref = bin_pair(40)
            x = make_input((6, 40, 33, 8), cl)
            dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
            got, calls = bin_run("cpp", ours, x, dy, monkeypatch)
            want, _ = bin_run("ops", ref, x, dy, monkeypatch)
            assert len(calls) == 4
            for a, b in zip(got, want):
                close(a, b)
    finally:
        torch.set_num_threads(before)


def test_fused_bin_cpp_gradcheck_channels_last(monkeypatch):
    """float64 gradcheck of BIN on the C++ kernels in channels_last (test_gradcheck covers NCHW), training and
    eval."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    m = to_double(BatchInstanceNorm2d(3))
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    x = torch.randn((3, 3, 2, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert _functional.backend(x) == (_functional.CPP, _kernels.NHWC)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    for train in (True, False):
        m.train(train)
        assert torch.autograd.gradcheck(f, (x, *m.parameters()), eps=1e-6, atol=1e-5)


def test_fused_bin_cpp_synced_equals_the_synced_tensor_op_path(monkeypatch):
    """Synced BIN on the C++ kernels (mocked world of two ranks, as test_fused_bin_synced_equals_the_synced_
    composition) all-reduces the same sums as on the tensor ops and gives the same results, without .item()."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    monkeypatch.setattr(_functional, "distributed_active", lambda: True)
    reduced = []
    monkeypatch.setattr(_functional, "_all_reduce", lambda t: reduced.append(t.numel()) or t.mul_(2))
    for cl in (False, True):
        ours, ref = bin_pair(6, sync=True)
        x = make_input((4, 6, 5, 5), channels_last=cl).detach() + 50.0
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        reduced.clear()
        with monkeypatch.context() as mp_:
            def no_item(self):
                raise AssertionError("host sync: .item() in synced BIN")

            mp_.setattr(torch.Tensor, "item", no_item)
            got, calls = bin_run("cpp", ours, x, dy, monkeypatch)
        assert reduced == [13, 12] and len(calls) == 4
        want, _ = bin_run("ops", ref, x, dy, monkeypatch)
        for a, b in zip(got, want):
            close(a, b, atol=1e-4, rtol=1e-4)


def bin_stats_saved(y: torch.Tensor) -> list:
    """The statistics BIN's Function saved for backward (IN mean in the compute dtype, IN rstd, BN mean, BN rstd;
    float64 but the first), from either path's layout."""
    saved = y.grad_fn.saved_tensors[3:]
    if len(saved) == 3:  # C++ path: mean_in, (IN mean, IN rstd), (BN mean, variance, rstd)
        mean_in, ins, bn = saved
        return [mean_in, ins[1], bn[0], bn[2]]
    return list(saved)  # tensor ops: mean_in, rstd_in, mean_bn, rstd_bn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_fused_bin_cpp_small_math_equals_the_tensor_op_path(dtype, cl, monkeypatch):
    """The C++ path's small float64 math (bin_moments, bin_scale, bin_grad_sums, bin_grad_coefs) gives the
    tensor-op path's statistics, running statistics, parameter gradients, output and input gradient to float64
    rounding, in training (two steps, float32 and float64 running buffers) and eval. float64: random inputs, the
    two paths' sums differ only by summation order (1e-12 relative). float32: integer inputs on 8x8 / 4x4 maps,
    so both paths' per-(n, c) sums are exact and equal (the IN means are multiples of 1/64), the statistics and
    gradients are float64 values rounded once (equal up to 1e-12, then to the last float32 bit) and only the two
    output sweeps round differently (a few float32 ulps)."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    tight = dict(atol=1e-12, rtol=1e-12)
    for shape, buffers in (((6, 12, 8, 8), torch.float32), ((5, 20, 4, 4), torch.float64)):
        ours, ref = bin_pair(shape[1], dtype=dtype)
        for m in (ours, ref):
            m.running_mean, m.running_var = m.running_mean.to(buffers), m.running_var.to(buffers)
        for step in range(3):
            if step == 2:
                ours.eval(), ref.eval()
            g = torch.Generator().manual_seed(step)
            if dtype == torch.float32:  # exact sums in float32 on both paths
                x = torch.randint(-8, 9, shape, generator=g).to(dtype)
                dy = torch.randint(-4, 5, shape, generator=g).to(dtype)
            else:
                x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5)
                dy = torch.randn(shape, generator=g, dtype=dtype)
            if cl:
                x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
            assert _functional.backend(x) == (_functional.CPP, _kernels.NHWC if cl else _kernels.NCHW)
            stats = {}
            with monkeypatch.context() as mp_:
                real = BatchInstanceFunction.apply

                def keep(path):
                    def apply(*args):
                        y = real(*args)
                        stats[path] = bin_stats_saved(y)
                        return y
                    return apply

                mp_.setattr(BatchInstanceFunction, "apply", keep("cpp"))
                got, calls = bin_run("cpp", ours, x, dy, monkeypatch)
                mp_.setattr(BatchInstanceFunction, "apply", keep("ops"))
                want, _ = bin_run("ops", ref, x, dy, monkeypatch)
            assert calls == ["nc_sums", "nc_affine"] * 2
            where = f"{shape} step {step}"
            for what, a, b in zip(("mean_in", "rstd_in", "mean_bn", "rstd_bn"), stats["cpp"], stats["ops"]):
                torch.testing.assert_close(a, b, **tight, msg=lambda s, w=what: f"{where} {w}: {s}")
            names = ("y", "dx", "dweight", "dbias", "drho", "running_mean", "running_var")
            for what, a, b in zip(names, got, want):
                if a.dtype == torch.float64:
                    t = tight
                elif what in ("y", "dx"):  # the sweeps' float32 rounding: dx centred (C++) or not (tensor ops)
                    t = dict(atol=4 * torch.finfo(dtype).eps * b.abs().max().item(), rtol=0)
                else:  # float64 values rounded once to float32: at most the last bit
                    t = dict(atol=0, rtol=torch.finfo(a.dtype).eps)
                torch.testing.assert_close(a, b, **t, msg=lambda s, w=what: f"{where} {w}: {s}")


def test_fused_bin_cpp_dispatches_few_torch_ops(monkeypatch):
    """BIN on the C++ kernels runs its small per-(n, c) math in C (two calls per direction): one layer's forward
    and backward dispatch at most 24 and 20 torch ops (views and allocations included; 68 and 65 when that math
    was float64 torch ops), and every op that computes something is the module's counter and, forward, the
    update of float32 running statistics as the tensor ops do it (float64 ones are updated in C) or, in eval,
    their reading as float64. Counted with TorchDispatchMode, both layouts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    free = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided}

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.all, self.compute = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.all.append(func.overloadpacket.__name__)
            if not func.is_view and func.overloadpacket not in free:
                self.compute.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    update = ["mul_", "_to_copy", "add_", "mul_", "mul", "_to_copy", "add_"]  # _functional._update_running
    for cl in (False, True):
        for dtype, train, want in ((torch.float32, True, update + ["add_"]), (torch.float64, True, ["add_"]),
                                   (torch.float32, False, ["_to_copy", "_to_copy"]), (torch.float64, False, [])):
            m = bin_pair(16, dtype=dtype)[0].train(train)
            x = make_input((8, 16, 6, 6), cl, dtype=dtype)
            assert _functional.backend(x) == (_functional.CPP, _kernels.NHWC if cl else _kernels.NCHW)
            with Ops() as fwd:
                y = m(x)
            dy = torch.ones_like(y)
            with Ops() as bwd:
                y.backward(dy)
            assert fwd.compute == want and bwd.compute == [], (cl, dtype, train, fwd.compute, bwd.compute)
            assert len(fwd.all) <= 24 and len(bwd.all) <= 20, (cl, dtype, train, fwd.all, bwd.all)
            assert x.grad is not None and m.rho.grad.abs().sum() > 0
