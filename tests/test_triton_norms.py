"""The norms' Triton kernels (their CUDA path), run on CPU tensors by Triton's interpreter, against torch's
native layers: outputs, input/weight/bias gradients and running statistics, for float32, bfloat16 and
float16 inputs in NCHW and channels_last, with and without the fused residual add + ReLU.

``triton.jit`` (and triton's own library functions, jitted when triton is imported) pick the interpreter at
import time, so TRITON_INTERPRET=1 is set here, at collection, before anything imports triton (normlab imports
it only when a tensor is headed for the Triton path). Where triton was already imported without it (another
test compiled something first), the whole file reruns in a fresh interpreter instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:  # importorskip would import it before the variable is set
    pytest.skip("triton is not installed", allow_module_level=True)
FRESH = "triton" not in sys.modules
if FRESH:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from normlab.norms import BatchInstanceNorm2d, _functional, _triton, make_norm  # noqa: E402

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


def composed_bin(m, x):
    """BIN as the BN and IN Functions summed (its C++ path, and BIN before its fused Function)."""
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
