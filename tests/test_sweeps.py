"""The spec engine's per-(sample, channel) sweeps (``normlab.norms.sweeps``): each back-end equals the tensor ops
(C++ here; Triton in test_triton_norms.py), in NCHW and channels_last, float32/float64/bfloat16, with the fused
residual + ReLU and the ReLU-masked gradient sums; exact for large means; tensor ops under torch.compile; and the
spec engine's use of them: one sweep per direction each for the sums and the affine, one sweep for the input
gradient, and no lost gradient part when the statistics' backward does not run."""

from __future__ import annotations

import pytest
import torch

from normlab.norms import _kernels, make_norm, sweeps
from normlab.norms.spec import SpecNorm, Stats

SHAPE = (3, 5, 4, 6)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    assert _kernels.library() is not None, f"the C++ norm kernels did not build ({_kernels._state['error']})"


def ops(monkeypatch, on: bool) -> None:
    monkeypatch.setenv("NORMLAB_KERNELS", "0" if on else "1")


def tensor(shape=SHAPE, seed=0, mean=0.0, std=1.0, dtype=torch.float32, cl=False):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def coef(seed, dtype=torch.float32, shape=SHAPE[:2]):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_cpp_sweeps_equal_the_tensor_ops(dtype, cl, kernels_on, monkeypatch):
    """sums, grad_sums (plain and ReLU-masked), and the affine in all its forms (plain, centred, residual + ReLU,
    centred with residual and ReLU, the one-pass dx form) give the tensor ops' values, in x's dtype and layout."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    x = tensor(dtype=dtype, cl=cl, mean=3.0, std=2.0)
    g = tensor(seed=1, dtype=dtype, cl=cl)
    y = tensor(seed=2, dtype=dtype, cl=cl)  # a ReLU's output stands in: positive where kept
    res = tensor(seed=3, dtype=dtype, cl=cl)
    k, P, R, Q, Qc = (coef(s, ct) for s in (4, 5, 6, 7, 8))

    def run():
        out = [*sweeps.sums(x, k)]
        s1, s2, gm = sweeps.grad_sums(g, x, k)
        assert gm is None
        out += [s1, s2]
        out += list(sweeps.grad_sums(g, x, k, mask=y))
        out += [sweeps.affine(x, P, R), sweeps.affine(x, P, R, Pc=k), sweeps.affine(x, P, R, residual=res, relu=True),
                sweeps.affine(x, P, R, residual=res, relu=True, Pc=k), sweeps.affine(x, P, None, relu=True),
                sweeps.affine(g, P, R, q=x, Q=Q, Qc=Qc), sweeps.affine(g, P, R, q=x, Q=Q)]
        return out

    assert sweeps.kind(x) == "cpp"
    got = run()
    ops(monkeypatch, True)
    assert sweeps.kind(x) is None
    want = run()
    assert got[0].dtype == torch.float64  # the kernels' sums are float64
    for i, (a, b) in enumerate(zip(got, want)):
        if a.dim() == 4:
            assert a.dtype == dtype, i
            assert a.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format), i
        scale = 1.0 if a.dim() == 4 else float(b.double().abs().max()) + 1.0  # sums: relative to their size
        tol = TOL[dtype]
        close(a, b, (tol[0] * scale, tol[1]))
    gm = got[6]
    assert torch.equal(gm, torch.where(y > 0, g, 0))  # the masked gradient, written out exactly


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path", ["cpp", "ops"])
def test_sweeps_exact_for_large_means(path, cl, kernels_on, monkeypatch):
    """|mean|/std = 1000 in float32: the sums and the centred affine are as close to float64 as float32 values
    allow (an affine written as x·P + (R − k·P) would be off by ~1e-4 here: x·P rounds at 1000's step)."""
    ops(monkeypatch, path == "ops")
    x = tensor(mean=1000.0, cl=cl)
    k = x[:, :, 0, 0].contiguous()
    P, R = coef(5) + 2.0, coef(6)
    s1, s2 = sweeps.sums(x, k)
    d = x.double() - k.double()[:, :, None, None]
    close(s1, d.sum((2, 3)), (2e-4, 1e-6))
    close(s2, (d * d).sum((2, 3)), (2e-4, 1e-6))
    y = sweeps.affine(x, P, R, Pc=k)
    want = d * P.double()[:, :, None, None] + R.double()[:, :, None, None]
    close(y, want, (2e-6, 1e-6))
    g = tensor(seed=1, cl=cl)
    h1, h2, _ = sweeps.grad_sums(g, x, k)
    close(h2, (g.double() * d).sum((2, 3)), (1e-4, 1e-6))
    dx = sweeps.affine(g, P, R, q=x, Q=P, Qc=k)
    close(dx, g.double() * P.double()[:, :, None, None] + want, (4e-6, 1e-6))


def test_sweeps_under_torch_compile_take_the_tensor_ops(kernels_on, monkeypatch):
    """Inside a compiled graph the sweeps are tensor ops (opaque kernel calls would break the graph): the kernels
    are not called, and the values are the eager kernels'."""
    calls = []
    for name in ("nc_sums", "nc_affine"):
        real = getattr(_kernels, name)
        monkeypatch.setattr(_kernels, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    x, k, P, R, res = tensor(), coef(4), coef(5), coef(6), tensor(seed=3)

    def f(x, k, P, R, res):
        s1, s2 = sweeps.sums(x, k)
        return s1, s2, sweeps.affine(x, P, R, residual=res, relu=True, Pc=k)

    eager = f(x, k, P, R, res)
    assert calls == ["nc_sums", "nc_affine"]
    calls.clear()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, k, P, R, res)
    assert calls == []
    for a, b in zip(compiled, eager):
        close(a, b, (1e-5, 1e-5))


def test_the_kernels_refuse_what_they_do_not_compute():
    """The C++ affine's post-op and centre go with the forward form only; a mask needs the backward sums."""
    x = tensor()
    P = coef(5)
    with pytest.raises(ValueError, match="without q"):
        sweeps.affine(x, P, P, q=x, Q=P, relu=True)
    if _kernels.library() is not None:
        with pytest.raises(ValueError, match="needs the backward sums"):
            _kernels.nc_sums(x, None, _kernels.NCHW, coef(4), mask=x)


# ------------------------------------------------------------------------ the spec engine on the sweeps


@pytest.fixture
def counted(monkeypatch):
    """Counts the C++ sweeps: (kind, backward?) per call."""
    calls: list[tuple[str, bool]] = []
    for name in ("nc_sums", "nc_affine"):
        real = getattr(_kernels, name)

        def spy(a, b_or_fmt, *rest, _r=real, _n=name, **kw):
            backward = (b_or_fmt is not None) if _n == "nc_sums" else (len(rest) > 2 and rest[2] is not None)
            calls.append((_n, backward or kw.get("q") is not None))
            return _r(a, b_or_fmt, *rest, **kw)

        monkeypatch.setattr(_kernels, name, spy)
    return calls


@pytest.mark.parametrize("name", ["rms", "sn", "gbn", "brn", "frn"])
def test_a_spec_norm_is_one_sums_and_one_affine_sweep_per_direction(name, kernels_on, counted):
    """Forward: the sums and the affine; backward: the gradient sums and the whole input gradient
    ``a·g + 2·g2·(x − k) + g1`` in one sweep (autograd would otherwise add the affine's and the statistics' parts
    in a third)."""
    m = make_norm(name, SHAPE[1]).train()
    x = tensor(cl=True).requires_grad_()
    y = m(x)
    assert counted == [("nc_sums", False), ("nc_affine", False)]
    counted.clear()
    y.backward(tensor(seed=1, cl=True))
    assert counted == [("nc_sums", True), ("nc_affine", True)]


class DetachedScale(SpecNorm):
    """A norm whose scale comes from statistics taken without gradient: the statistics' backward never runs."""

    def __init__(self, c):
        super().__init__()
        self.num_channels = c
        self.weight = torch.nn.Parameter(torch.rand(c) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(c))

    def coefficients(self, stats: Stats):
        m = stats.moments("hw")
        return self.weight * torch.rsqrt(m.var.detach() + 1e-5), m.centre.detach(), self.bias


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_the_input_gradient_is_whole_when_the_statistics_backward_does_not_run(cl, kernels_on, monkeypatch):
    """The affine hands its part of dx to the statistics' backward only when that will run: with statistics used
    without gradient, and with a gradient asked for the parameters alone, dx and the parameters' gradients are the
    tensor ops'."""
    x, dy = tensor(cl=cl, mean=2.0), tensor(seed=1, cl=cl)

    def grads(m):
        xo = x.clone().requires_grad_()
        y = m(xo)
        gw, gb = torch.autograd.grad(y, [m.weight, m.bias], dy, retain_graph=True)
        (gx,) = torch.autograd.grad(y, [xo], dy)
        return gx, gw, gb

    for make in (lambda: DetachedScale(SHAPE[1]), lambda: make_norm("rms", SHAPE[1])):
        torch.manual_seed(0)
        m = make()
        got = grads(m)
        ops(monkeypatch, True)
        want = grads(m)
        ops(monkeypatch, False)
        for a, b in zip(got, want):
            close(a, b, (1e-5, 1e-5))
        assert float(got[0].abs().max()) > 1e-3


@pytest.mark.parametrize("backward", [False, True], ids=["forward_only", "with_backward"])
def test_a_spec_norm_frees_its_input_without_garbage_collection(backward, kernels_on):
    """The link between the two sweeps' autograd nodes holds no reference cycle: a forward with gradients on and
    no backward (a validation pass without no_grad) frees the input it saved as soon as its output goes, not at
    the next garbage collection."""
    import gc
    import weakref

    m = make_norm("sn", SHAPE[1]).train()
    enabled = gc.isenabled()
    gc.disable()
    try:
        h = tensor().requires_grad_() * 1.0
        alive = weakref.ref(h)
        y = m(h)
        if backward:
            y.sum().backward()
        del h, y
        assert alive() is None
    finally:
        if enabled:
            gc.enable()
