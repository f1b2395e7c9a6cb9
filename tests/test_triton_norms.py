"""The norms' Triton kernels (their CUDA path), run on CPU tensors by Triton's interpreter, against torch's
native layers: outputs, input/weight/bias gradients and running statistics, for float32, bfloat16 and
float16 inputs in NCHW and channels_last, with and without the fused residual add + ReLU; and the number of
kernel launches per forward and backward (counted, not timed).

``triton.jit`` (and triton's own library functions, jitted when triton is imported) pick the interpreter at
import time, so TRITON_INTERPRET=1 is set here, at collection, before anything imports triton (normlab imports
it only when a tensor is headed for the Triton path). Where triton was already imported without it (another
test compiled something first), the whole file reruns in a fresh interpreter instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:  # importorskip would import it before the variable is set
    pytest.skip("triton is not installed", allow_module_level=True)
FRESH = "triton" not in sys.modules
if FRESH:
    os.environ["TRITON_INTERPRET"] = "1"



def _interpreter_index_fix() -> None:
    """Triton before 3.7 turns a scalar into a Python int with ``int()`` of a one-element array, which numpy
    2.4 refuses (triton-lang/triton#9171: every kernel with ``range(0, R, ...)`` over a runtime R fails under
    the interpreter). Upstream fixed it by squeezing first; the same fix here, so that these tests also run
    on the Triton of older torch releases (torch 2.11's Triton 3.6 on Python 3.12, with numpy 2.5). On a
    Triton that has the fix it changes nothing."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def index(self):
        return int(self.handle.data.squeeze())

    def patched(tensor, *scope):
        original(tensor, *scope)
        if scope:  # Triton >= 3.4 patches through a scope that restores the attributes afterwards
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patched


if FRESH:
    _interpreter_index_fix()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from normlab.norms import (  # noqa: E402
    BatchInstanceNorm2d, BatchNorm2d, InstanceNorm2d, _functional, _triton, make_norm)
from triton_sm90 import Recorder  # noqa: E402

if _triton._version(importlib.metadata.version("triton")) < _triton.MIN_TRITON:
    pytest.skip(f"triton {importlib.metadata.version('triton')} is older than normlab's MIN_TRITON "
                f"{_triton.MIN_TRITON}: normlab runs the tensor ops there, not these kernels", allow_module_level=True)

# half precision: outputs and input gradients are rounded to the storage dtype; statistics stay float32
TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (6e-2, 2e-2), torch.float16: (8e-3, 4e-3)}
PARAM_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (0.5, 3e-2), torch.float16: (5e-2, 5e-3)}

if not FRESH:
    def test_triton_kernels_in_a_fresh_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                              env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout


SIGNATURES: dict = {}  # every distinct launch signature the tests below made (test_triton_kernels_compile_for_sm90)


@pytest.fixture(autouse=True, scope="module")
def recorded_signatures():
    """Every kernel of ``_triton_kernels`` wrapped in a ``Recorder`` for the whole file (interpreter runs only)."""
    if not FRESH:
        yield
        return
    mod = _triton.kernels()
    names = [k for k in vars(mod) if k.endswith("_kernel")]
    originals = {k: getattr(mod, k) for k in names}
    for k in names:
        setattr(mod, k, Recorder(k, originals[k], SIGNATURES))
    yield
    for k, v in originals.items():
        setattr(mod, k, v)


@pytest.fixture(autouse=True)
def forced_triton(request, monkeypatch):
    if request.node.name == "test_triton_kernels_in_a_fresh_interpreter":
        return
    if not FRESH:
        pytest.skip("triton was imported before TRITON_INTERPRET was set: covered by the fresh-interpreter test")
    monkeypatch.setenv("NORMLAB_TRITON", "1")
    assert _triton.kernels() is not None


@pytest.fixture
def spy(monkeypatch):
    """Counts the Triton kernel launches, so every test proves the Triton path really ran."""
    calls = {"sums": 0, "affine": 0}
    sums, affine = _triton.channel_sums, _triton.affine

    def counted_sums(*a, **k):
        calls["sums"] += 1
        return sums(*a, **k)

    def counted_affine(*a, **k):
        calls["affine"] += 1
        return affine(*a, **k)

    monkeypatch.setattr(_triton, "channel_sums", counted_sums)
    monkeypatch.setattr(_triton, "affine", counted_affine)
    return calls


def native(name: str, c: int) -> nn.Module:
    return {"bn": lambda: nn.BatchNorm2d(c), "in": lambda: nn.GroupNorm(c, c), "ln": lambda: nn.GroupNorm(1, c),
            "gn": lambda: nn.GroupNorm(4, c)}[name]()


def same_affine(ours: nn.Module, ref: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    c = ours.weight.numel()
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)


def inputs(shape, dtype, cl, seed=0, mean=0.5, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def check(a, b, tol):
    atol, rtol = tol
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPE = (4, 8, 5, 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual_relu"])
def test_triton_matches_native(name, dtype, cl, fused, spy):
    torch.manual_seed(0)
    c = SHAPE[1]
    ours, ref = make_norm(name, c, **({"num_groups": 4} if name == "gn" else {})), native(name, c)
    same_affine(ours, ref)
    x = inputs(SHAPE, dtype, cl)
    res = inputs(SHAPE, dtype, cl, seed=3) if fused else None
    dy = inputs(SHAPE, dtype, cl, seed=5, mean=0.0, std=1.0)
    assert _functional.backend(x) == ("triton", "nhwc" if cl else "rows")

    xo = x.clone().requires_grad_()
    ro = res.clone().requires_grad_() if fused else None
    y = ours.forward_relu(xo, ro) if fused else ours(xo)
    y.backward(dy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert xo.grad.dtype == dtype

    xr = x.detach().float().requires_grad_()
    rr = res.detach().float().requires_grad_() if fused else None
    yr = torch.relu(ref(xr) + rr) if fused else ref(xr)
    yr.backward(dy.float())

    check(y, yr, TOL[dtype])
    check(xo.grad, xr.grad, TOL[dtype])
    check(ours.weight.grad, ref.weight.grad, PARAM_TOL[dtype])
    check(ours.bias.grad, ref.bias.grad, PARAM_TOL[dtype])
    if fused:
        check(ro.grad, rr.grad, TOL[dtype])
        assert ro.grad.dtype == dtype
    if name == "bn":
        check(ours.running_mean, ref.running_mean, (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2))
        check(ours.running_var, ref.running_var, (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2))
    assert spy["sums"] == 2 and spy["affine"] == 2  # forward and backward, both on Triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_triton_bin_is_its_bn_and_in_branches(dtype, cl, spy):
    """BIN = ρ·BN + (1−ρ)·IN: one statistics pass and one affine forward and backward for both branches
    together (the cost of one BN), and with a random gate the same outputs, gradients and running statistics
    as the two native layers mixed."""
    c = SHAPE[1]
    ours = BatchInstanceNorm2d(c)
    bn, inn = nn.BatchNorm2d(c), nn.GroupNorm(c, c)
    same_affine(ours, bn)
    rho = torch.rand(c, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours.rho.copy_(rho)
        inn.weight.copy_(ours.weight * (1 - rho))  # the branches' fused affines: (1-ρ)·γ and ρ·γ, β
        inn.bias.zero_()
        bn.weight.mul_(rho)
    x, dy = inputs(SHAPE, dtype, cl), inputs(SHAPE, dtype, cl, seed=5, mean=0.0, std=1.0)
    xo = x.clone().requires_grad_()
    y = ours(xo)
    y.backward(dy)
    xr = x.detach().float().requires_grad_()
    yr = bn(xr) + inn(xr)
    yr.backward(dy.float())
    check(y, yr, TOL[dtype])
    check(xo.grad, xr.grad, TOL[dtype])
    check(ours.running_mean, bn.running_mean, (1e-2, 1e-2))
    check(ours.running_var, bn.running_var, (2e-2, 2e-2))
    assert spy == {"sums": 2, "affine": 2}  # one sums sweep and one affine forward, the same backward


@pytest.mark.parametrize("name", ["bn", "gn"])
def test_triton_statistics_exact_for_large_mean_inputs(name, spy):
    """|mean|/std = 1000: the shifted sums keep the statistics as exact as native's float32 (plain float32
    sums of x and x² lose ~5e-2 relative variance there)."""
    shape = (4, 8, 6, 6)
    x = inputs(shape, torch.float32, False, mean=1000.0, std=1.0)
    ours = make_norm(name, 8, momentum=1.0) if name == "bn" else make_norm(name, 8, num_groups=4)
    y = ours(x)
    x64 = x.double()
    ref = nn.BatchNorm2d(8, momentum=1.0).double() if name == "bn" else nn.GroupNorm(4, 8).double()
    want = ref(x64)
    assert (y.double() - want).abs().max() < 2e-3  # normalized outputs of std 1
    if name == "bn":
        rel = ((ours.running_var.double() - ref.running_var) / ref.running_var).abs().max()
        assert rel < 2e-3, rel
    assert spy["sums"] == 1


@pytest.mark.parametrize("name", ["bn", "bin"])
def test_triton_float64_running_buffers_get_the_float64_update(name, spy):
    """Running statistics kept in float64 buffers (float32 input) get the update computed in float64, not one
    rounded through float32: after 5 steps they match a float64 recomputation of the update to 1e-12, far
    below float32's ~3e-8 step at these values. Small integer inputs keep the kernels' float32 partial sums
    exact, so the only float32 rounding left to catch is the buffers' store."""
    c = SHAPE[1]
    ours = make_norm(name, c, momentum=0.3)
    ours.running_mean = ours.running_mean.double() + 1 / 3  # values float32 cannot hold exactly
    ours.running_var = ours.running_var.double() + 1 / 3
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    for seed in range(5):
        x = torch.randint(-3, 4, SHAPE, generator=torch.Generator().manual_seed(seed)).float()
        ours(x)
        x64 = x.double()
        n = x64.numel() // c
        rm = rm * 0.7 + x64.mean((0, 2, 3)) * 0.3
        rv = rv * 0.7 + x64.var((0, 2, 3), correction=0) * n / (n - 1) * 0.3
    assert ours.running_mean.dtype == torch.float64
    torch.testing.assert_close(ours.running_mean, rm, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.running_var, rv, atol=1e-12, rtol=1e-12)
    assert spy["sums"] == 5


class Launches(TorchDispatchMode):
    """Records every kernel launch of the code run under it: each Triton launch (the jitted kernels are wrapped
    by ``count_launches``) and each torch op that runs a kernel -- all but views and bare allocations. On a GPU
    every entry is at least one launch; the Triton interpreter's own tensor copies are not counted."""

    FREE = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
            torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view and func.overloadpacket not in self.FREE:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def triton(self) -> list[str]:
        return [op[len("triton:"):] for op in self.ops if op.startswith("triton:")]


@pytest.fixture
def count_launches(monkeypatch):
    """Wraps every jitted kernel of ``_triton_kernels`` so that a launch under a ``Launches`` mode is recorded
    (and the interpreter's work inside it is not); returns a function that gives a fresh mode."""
    mod = _triton.kernels()
    current: list[Launches] = []

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                mode = current[-1] if current else None
                if mode is None:
                    return self.kernel[grid](*args, **kwargs)
                mode.ops.append("triton:" + self.name)
                mode.paused = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    mode.paused = False
            return launch

    for name in [k for k in vars(mod) if k.endswith("_kernel")]:
        monkeypatch.setattr(mod, name, Counted(name, getattr(mod, name)))

    def new() -> Launches:
        current.append(Launches())
        return current[-1]
    return new


FINISH = {"bn": ("_bn_stats_kernel", "_bn_grad_kernel")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual_relu"])
def test_triton_launches_per_forward_and_backward(name, dtype, fused, count_launches):
    """Three launches per forward (sums with the shift read from x, finish, affine) and per backward (sums,
    finish, dx) -- as many as native BN's kernels, down from 18-28 (the small per-channel math as torch ops).
    BN's module forward adds one: ``num_batches_tracked += 1``, as native's does."""
    c = SHAPE[1]
    ours = make_norm(name, c, **({"num_groups": 4} if name == "gn" else {}))
    x = inputs(SHAPE, dtype, True).requires_grad_()
    res = inputs(SHAPE, dtype, True, seed=3).requires_grad_() if fused else None
    dy = inputs(SHAPE, dtype, True, seed=5, mean=0.0, std=1.0)
    fwd = count_launches()
    with fwd:
        y = ours.forward_relu(x, res) if fused else ours(x)
    bwd = count_launches()
    with bwd:
        torch.autograd.grad(y, [x, ours.weight, ours.bias] + ([res] if fused else []), dy)
    stats, grads = FINISH.get(name, ("_gn_stats_kernel", "_gn_grad_kernel"))
    assert fwd.triton() == ["_sums_kernel", stats, "_affine_kernel"], fwd.ops
    assert bwd.triton() == ["_sums_kernel", grads, "_affine_kernel"], bwd.ops
    assert len(fwd.ops) <= 3 + (name == "bn"), fwd.ops
    assert len(bwd.ops) <= 3, bwd.ops


BIN_LAUNCHES = {  # BIN's Triton launches and all ops per forward and backward: train, eval, synced (mocked)
    "train": (["_sums_kernel", "_bin_stats_kernel", "_affine_kernel"], 4,
              ["_sums_kernel", "_bin_grad_kernel", "_affine_kernel"], 3),
    "eval": (["_sums_kernel", "_bin_stats_kernel", "_affine_kernel"], 3,
             ["_sums_kernel", "_bin_grad_kernel", "_affine_kernel"], 3),
    "sync": (["_sums_kernel", "_bin_stats_kernel", "_bin_stats_kernel", "_affine_kernel"], 6,
             ["_sums_kernel", "_bin_grad_kernel", "_bin_grad_kernel", "_affine_kernel"], 5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(BIN_LAUNCHES))
def test_triton_bin_launches_per_forward_and_backward(case, dtype, count_launches, monkeypatch):
    """BIN's small per-(sample, channel) math runs in one finish kernel: three launches per forward (sums with
    the per-(n, c) shift read from x, finish, affine) and per backward (sums, finish, dx), plus
    ``num_batches_tracked += 1`` in training -- down from 61 / 59 ops in training, 39 / 46 in eval and 72 / 61
    synced with that math as float64 torch ops. Synced (all-reduce mocked): the forward packs the local BN
    sums (one launch) and all-reduces them; the backward all-reduces BN's gradient sums between two finish
    launches."""
    if case == "sync":
        monkeypatch.setattr(_functional, "distributed_active", lambda: True)
        monkeypatch.setattr(_functional, "_all_reduce", lambda t: t.mul_(2))
    ours = BatchInstanceNorm2d(SHAPE[1], sync=case == "sync").train(case != "eval")
    x = inputs(SHAPE, dtype, True).requires_grad_()
    dy = inputs(SHAPE, dtype, True, seed=5, mean=0.0, std=1.0)
    fwd = count_launches()
    with fwd:
        y = ours(x)
    bwd = count_launches()
    with bwd:
        grads = torch.autograd.grad(y, [x, ours.weight, ours.bias, ours.rho], dy)
    kf, nf, kb, nb = BIN_LAUNCHES[case]
    assert fwd.triton() == kf and len(fwd.ops) == nf, fwd.ops
    assert bwd.triton() == kb and len(bwd.ops) == nb, bwd.ops
    assert all(torch.isfinite(g).all() for g in grads) and grads[0].dtype == dtype


def test_triton_synced_bn_equals_bn_on_the_concatenated_batch(monkeypatch, count_launches):
    """sync=True with two ranks holding the same batch (the all-reduce doubles every sum): the output, the
    input gradient and the running statistics are single-process BN's on the two batches concatenated; weight
    and bias gradients stay local (half of it). The all-reduce adds one launch per direction, the packing of
    the local sums (un-shifted into float64 plain sums with the count) one more."""
    monkeypatch.setattr(_functional, "distributed_active", lambda: True)
    monkeypatch.setattr(_functional, "_all_reduce", lambda t: t.mul_(2))
    c = SHAPE[1]
    ours, ref = BatchNorm2d(c, sync=True), nn.BatchNorm2d(c)
    same_affine(ours, ref)
    x = inputs(SHAPE, torch.float32, True, mean=300.0)
    dy = inputs(SHAPE, torch.float32, True, seed=5, mean=0.0, std=1.0)
    xo = x.clone().requires_grad_()
    fwd = count_launches()
    with fwd:
        y = ours(xo)
    bwd = count_launches()
    with bwd:
        y.backward(dy)
    xr = torch.cat([x, x]).requires_grad_()
    yr = ref(xr)
    yr.backward(torch.cat([dy, dy]))
    check(y, yr[:SHAPE[0]], (2e-4, 2e-4))
    check(xo.grad, xr.grad[:SHAPE[0]], (2e-4, 2e-4))
    check(ours.weight.grad, ref.weight.grad / 2, (1e-3, 1e-4))
    check(ours.bias.grad, ref.bias.grad / 2, (1e-4, 1e-4))
    check(ours.running_mean, ref.running_mean, (1e-4, 1e-6))
    check(ours.running_var, ref.running_var, (1e-4, 1e-4))
    assert fwd.triton() == ["_sums_kernel", "_bn_stats_kernel", "_bn_stats_kernel", "_affine_kernel"], fwd.ops
    assert bwd.triton() == ["_sums_kernel", "_bn_grad_kernel", "_bn_grad_kernel", "_affine_kernel"], bwd.ops
    assert len(fwd.ops) <= 6 and len(bwd.ops) <= 5, (fwd.ops, bwd.ops)


@pytest.mark.parametrize("name", ["bn", "in"])
def test_triton_without_affine_and_without_input_grad(name, spy):
    """affine=False (no weight, no bias), and a backward that needs only the parameters' gradients."""
    c = SHAPE[1]
    x, dy = inputs(SHAPE, torch.float32, True), inputs(SHAPE, torch.float32, True, seed=5, mean=0.0, std=1.0)
    ours = BatchNorm2d(c, affine=False) if name == "bn" else InstanceNorm2d(c, affine=False)
    ref = nn.BatchNorm2d(c, affine=False) if name == "bn" else nn.GroupNorm(c, c, affine=False)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = ours(xo), ref(xr)
    y.backward(dy)
    yr.backward(dy)
    check(y, yr, TOL[torch.float32])
    check(xo.grad, xr.grad, TOL[torch.float32])
    ours = make_norm(name, c)
    ref = native(name, c)
    same_affine(ours, ref)
    ours(x).backward(dy)  # x does not require a gradient: only the weight and bias gradients are computed
    # the reference on NCHW copies: native GroupNorm's CPU backward without an input gradient crashes the process
    # on channels_last input in torch 2.4-2.11 (a segfault, seen with 2.4.1 and 2.11.0; 2.14 is fine)
    ref(x.contiguous()).backward(dy.contiguous())
    check(ours.weight.grad, ref.weight.grad, PARAM_TOL[torch.float32])
    check(ours.bias.grad, ref.bias.grad, PARAM_TOL[torch.float32])
    assert spy["sums"] == 4


def test_triton_bn_parameters_and_running_stats_of_another_dtype(spy):
    """A bfloat16 module (weight, bias and running statistics bf16) on float32 inputs: the finish kernels
    read and write them in their own dtype."""
    c = SHAPE[1]
    ours, ref = BatchNorm2d(c, dtype=torch.bfloat16), nn.BatchNorm2d(c)
    same_affine(ours, ref)
    with torch.no_grad():
        ref.weight.copy_(ours.weight.float())
        ref.bias.copy_(ours.bias.float())
    x, dy = inputs(SHAPE, torch.float32, False), inputs(SHAPE, torch.float32, False, seed=5, mean=0.0, std=1.0)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = ours(xo), ref(xr)
    y.backward(dy)
    yr.backward(dy)
    assert ours.running_mean.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.bfloat16
    check(y, yr, TOL[torch.float32])
    check(xo.grad, xr.grad, TOL[torch.float32])
    check(ours.weight.grad, ref.weight.grad, PARAM_TOL[torch.bfloat16])
    check(ours.running_mean, ref.running_mean, (1e-2, 1e-2))
    check(ours.running_var, ref.running_var, (2e-2, 2e-2))
    assert spy["sums"] == 2


@pytest.mark.parametrize("name,shape,groups", [("bn", (64, 8, 40, 40), None), ("ln", (2, 320, 3, 3), None),
                                               ("gn", (3, 12, 7, 5), 4), ("in", (3, 40, 2, 3), None)],
                         ids=["bn_many_rows", "ln_wide", "gn_odd_groups", "in_many_groups"])
def test_triton_finish_kernels_at_other_shapes(name, shape, groups, spy):
    """Shapes that take the finish kernels' loops more than once (rows > one tile, groups wider than one
    block of channels) or leave partial tiles (3 channels per group, C not a power of two)."""
    c = shape[1]
    ours = make_norm(name, c, **({"num_groups": groups} if groups else {}))
    ref = nn.GroupNorm(groups, c) if groups else native(name, c)
    same_affine(ours, ref)
    x = inputs(shape, torch.float32, True)
    dy = inputs(shape, torch.float32, True, seed=5, mean=0.0, std=1.0)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = ours(xo), ref(xr)
    y.backward(dy)
    yr.backward(dy)
    check(y, yr, TOL[torch.float32])
    check(xo.grad, xr.grad, (1e-4, 1e-3))
    check(ours.weight.grad, ref.weight.grad, (1e-3, 1e-4))
    check(ours.bias.grad, ref.bias.grad, (1e-3, 1e-4))
    if name == "bn":
        check(ours.running_var, ref.running_var, (1e-5, 1e-5))
    assert spy["sums"] == 2 and spy["affine"] == 2


def composed_bin(m, x):
    """BIN as the BN and IN Functions summed (BIN before its fused Function)."""
    rho = m.rho + (m.rho.detach().clamp(0, 1) - m.rho.detach())
    y_bn = m.batch_norm(x, rho * m.weight, m.bias)
    return y_bn + _functional.GroupNormFunction.apply(x, (1 - rho) * m.weight, None, m.num_channels, m.eps)


@pytest.mark.parametrize("dtype,case", [(torch.float32, "plain"), (torch.bfloat16, "plain"), (torch.float32, "sync"),
                                        (torch.bfloat16, "sync"), (torch.float32, "large_mean")],
                         ids=["fp32", "bf16", "fp32_sync", "bf16_sync", "fp32_large_mean"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_triton_fused_bin_equals_its_composition(dtype, cl, case, spy, monkeypatch):
    """On the Triton kernels, the fused BIN Function gives the BN + IN composition's outputs, input, weight,
    bias and ρ gradients (gates partly outside [0, 1]), running statistics, and eval outputs and gradients, with
    |mean|/std = 1000 (float32) and with synced BN mocked as a world of two identical ranks; one sums sweep and
    one affine forward, the same backward, in training and in eval. (Large means in float32 only: bfloat16's
    step at 1000 is 8.)"""
    import copy

    if case == "sync":
        monkeypatch.setattr(_functional, "distributed_active", lambda: True)
        monkeypatch.setattr(_functional, "_all_reduce", lambda t: t.mul_(2))
    c = SHAPE[1]
    ours = BatchInstanceNorm2d(c, sync=case == "sync")
    same_affine(ours, ours)
    with torch.no_grad():
        ours.rho.copy_(torch.rand(c, generator=torch.Generator().manual_seed(7)) * 1.6 - 0.3)
    ref = copy.deepcopy(ours)
    mean, std = (1000.0, 1.0) if case == "large_mean" else (0.5, 2.0)
    tol = TOL[dtype] if case != "large_mean" else (2e-3, 2e-3)
    # large means: either side's weight/ρ gradients are off float64's by ~6e-5 of their largest value
    ptol = PARAM_TOL[dtype] if case != "large_mean" else (1e-3, 1e-3)
    for step, train in ((0, True), (1, True), (2, False)):
        ours.train(train), ref.train(train)
        x = inputs(SHAPE, dtype, cl, seed=step, mean=mean, std=std)
        dy = inputs(SHAPE, dtype, cl, seed=10 + step, mean=0.0, std=1.0)
        got, want = [], []
        for m, fn, out in ((ours, lambda m, x: m(x), got), (ref, composed_bin, want)):
            before = dict(spy)
            xo = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            y = fn(m, xo)
            y.backward(dy)
            out += [y, xo.grad, m.weight.grad, m.bias.grad, m.rho.grad]
            if m is ours:
                assert {k: spy[k] - before[k] for k in spy} == {"sums": 2, "affine": 2}, (step, spy, before)
        assert got[0].dtype == got[1].dtype == dtype
        assert got[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for what, a, b in zip(("y", "dx", "dweight", "dbias", "drho"), got, want):
            t = tol if what in ("y", "dx") else ptol
            if what == "dx" and case == "large_mean":
                t = (2e-3 * b.abs().max().item(), 0)
            torch.testing.assert_close(a.float(), b.float(), atol=t[0], rtol=t[1],
                                       msg=lambda s, w=what, st=step: f"step {st}, {w}: {s}")
        check(ours.running_mean, ref.running_mean, (1e-4, 1e-5))
        check(ours.running_var, ref.running_var, (1e-4, 1e-4))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_triton_fused_bin_finish_loops(train, monkeypatch, spy):
    """The BIN finish kernels' loops with small tiles (2 samples, 2 blocks, 8 channels per iteration) on a
    shape that leaves each partly filled (5 samples, 3 blocks of H·W per channel, 12 channels): the same
    outputs, gradients and running statistics as the BN + IN composition."""
    import copy

    monkeypatch.setattr(_triton, "_bin_blocks", lambda n, nsb, c: (2, 2, 8))
    shape = (5, 12, 20, 30)
    ours = BatchInstanceNorm2d(12).train(train)
    same_affine(ours, ours)
    with torch.no_grad():
        ours.rho.copy_(torch.rand(12, generator=torch.Generator().manual_seed(7)) * 1.6 - 0.3)
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(ours)
    x = inputs(shape, torch.float32, False)
    dy = inputs(shape, torch.float32, False, seed=5, mean=0.0, std=1.0)
    got, want = [], []
    for m, fn, out in ((ours, lambda m, x: m(x), got), (ref, composed_bin, want)):
        xo = x.clone().requires_grad_()
        y = fn(m, xo)
        y.backward(dy)
        out += [y, xo.grad, m.weight.grad, m.bias.grad, m.rho.grad, m.running_mean, m.running_var]
        if m is ours:
            assert spy == {"sums": 2, "affine": 2}
    assert _triton.channel_sums(x, "rows", None, group_size=1)[0].shape == (5, 3, 12)  # 3 blocks per sample
    for a, b in zip(got, want):
        check(a, b, (1e-4, 1e-4))


SPEC_NORMS = {"frn": {}, "sn": {}, "gbn": {"virtual_batch": 2}, "evonorm_b0": {}, "rms": {}}
# per forward + backward: (sums sweeps, affine sweeps); EvoNorm's output is torch ops: its sums' backward only
SPEC_SWEEPS = {"evonorm_b0": (1, 1)}


def spec_norm(name: str) -> nn.Module:
    m = make_norm(name, SHAPE[1], **SPEC_NORMS[name]).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if p.dim() and p.numel() == SHAPE[1] else p)
        if hasattr(m, "bias"):
            m.bias.normal_(generator=g)
    return m


@pytest.mark.parametrize("dtype,cl", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16_cl"])
@pytest.mark.parametrize("name", list(SPEC_NORMS))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual_relu"])
def test_triton_spec_norms_equal_the_tensor_ops(name, dtype, cl, fused, spy, monkeypatch):
    """The spec engine's sweeps on the Triton kernels (sums with a per-(n, c) centre, the centred affine with the
    fused residual + ReLU, the ReLU-masked gradient sums, the one-pass input gradient) give the tensor ops' outputs,
    input, residual and parameter gradients and running statistics."""
    import copy

    ours = spec_norm(name)
    if name == "frn" and dtype == torch.bfloat16:  # TLU's max(y, τ) picks y or τ by bf16-rounded values: a tie
        with torch.no_grad():  # broken differently flips a gradient entry; τ out of reach keeps bf16 comparable
            ours.tau.fill_(-100.0)
    ref = copy.deepcopy(ours)
    x = inputs(SHAPE, dtype, cl)
    # bf16: a residual that keeps y + r far from 0, where y rounded one bf16 step apart flips the ReLU's mask (and a
    # gradient entry); the mask itself is checked in float32
    res = inputs(SHAPE, dtype, cl, seed=3, mean=20.0 if dtype == torch.bfloat16 else 0.5) if fused else None
    dy = inputs(SHAPE, dtype, cl, seed=5, mean=0.0, std=1.0)
    out = []
    for m in (ours, ref):
        if m is ref:
            monkeypatch.setenv("NORMLAB_TRITON", "0")
            monkeypatch.setenv("NORMLAB_KERNELS", "0")
            assert _functional.backend(x) is None
        else:
            assert _functional.backend(x) == ("triton", "nhwc" if cl else "rows")
        xo = x.clone().requires_grad_()
        ro = res.clone().requires_grad_() if fused else None
        y = m.forward_relu(xo, ro) if fused else m(xo)
        y.backward(dy)
        out.append([y, xo.grad] + ([ro.grad] if fused else []) + [p.grad for p in m.parameters()] + list(m.buffers()))
        if m is ours:
            assert y.dtype == dtype and xo.grad.dtype == dtype
            assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            sums, aff = SPEC_SWEEPS.get(name, (2, 2))
            assert spy == {"sums": sums, "affine": aff}, spy
    for i, (a, b) in enumerate(zip(*out)):
        tol = TOL[dtype] if i < 2 + fused else PARAM_TOL[dtype]
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            check(a, b, tol)


@pytest.mark.parametrize("name", ["rms", "sn"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual_relu"])
def test_triton_spec_norm_launches(name, fused, count_launches):
    """A spec norm's big-tensor work on Triton is two launches per forward (the sums, the affine with the residual
    and ReLU inside) and two per backward (the gradient sums with the ReLU's mask inside, the whole input gradient
    in one affine); the (N, C) math between them is torch ops (its launches counted and bounded here: the sums'
    float64 reduction, the moments, the coefficients; fewer for RMS than for SN's three statistics)."""
    m = spec_norm(name)
    x = inputs(SHAPE, torch.float32, True).requires_grad_()
    res = inputs(SHAPE, torch.float32, True, seed=3).requires_grad_() if fused else None
    dy = inputs(SHAPE, torch.float32, True, seed=5, mean=0.0, std=1.0)
    fwd = count_launches()
    with fwd:
        y = m.forward_relu(x, res) if fused else m(x)
    bwd = count_launches()
    with bwd:
        torch.autograd.grad(y, [x, *m.parameters()] + ([res] if fused else []), dy)
    assert fwd.triton() == ["_sums_kernel", "_affine_kernel"], fwd.ops
    assert bwd.triton() == ["_sums_kernel", "_affine_kernel"], bwd.ops
    bound = SPEC_LAUNCHES[name]
    assert len(fwd.ops) <= bound[0] and len(bwd.ops) <= bound[1], (len(fwd.ops), len(bwd.ops), " ".join(fwd.ops), " ".join(bwd.ops))


SPEC_LAUNCHES = {"rms": (37, 37), "sn": (104, 102)}  # all launches per forward, backward (as measured)


def test_triton_kernels_compile_for_sm90(tmp_path, monkeypatch):
    """Every launch signature the tests above made (dtypes, layouts, constexpr branches, launch options), plus a
    small run of each norm here (so the test also stands alone), compiles for an H100 (sm_90) through Triton's
    GPU compiler and ptxas, in a process without the interpreter: the interpreter accepts things the compiler
    does not (a float64 store into a bfloat16 buffer, say), and no CI machine has a GPU."""
    monkeypatch.setattr(_functional, "distributed_active", lambda: True)
    monkeypatch.setattr(_functional, "_all_reduce", lambda t: t.mul_(2))
    for name in ("bn", "in", "ln", "gn", "bin"):
        for sync in ((False, True) if name in ("bn", "bin") else (False,)):
            kw = {"num_groups": 4} if name == "gn" else {"sync": sync} if name in ("bn", "bin") else {}
            m = make_norm(name, SHAPE[1], **kw)
            for train in (True, False):
                x = inputs(SHAPE, torch.float32, False).requires_grad_()
                m.train(train)(x).backward(inputs(SHAPE, torch.float32, False, seed=5, mean=0.0, std=1.0))
    for fused in (False, True):  # the spec engine's sweeps: centred affine (+ residual, ReLU), masked sums, dx
        x = inputs(SHAPE, torch.float32, True).requires_grad_()
        res = inputs(SHAPE, torch.float32, True, seed=3) if fused else None
        y = spec_norm("rms").forward_relu(x, res) if fused else spec_norm("evonorm_b0")(x)
        y.backward(inputs(SHAPE, torch.float32, True, seed=5, mean=0.0, std=1.0))
    mod = _triton.kernels()
    kernels = {k for k in vars(mod) if k.endswith("_kernel")}
    assert {r["kernel"] for r in SIGNATURES.values()} == kernels, "a kernel was never launched"
    path = tmp_path / "signatures.json"
    path.write_text(json.dumps(list(SIGNATURES.values())))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_TRITON")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_sm90.py")), str(path)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    print(proc.stdout.strip().splitlines()[-1])
    assert f"{len(SIGNATURES)}/{len(SIGNATURES)} launch signatures of {len(kernels)} kernels" in proc.stdout
