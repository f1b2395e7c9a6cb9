"""Every norm against its specification row (tests/norm_specs.py): forward and backward equal to an independent
reference (native torch, timm, or the paper's equations), float64 gradcheck, train vs eval, running statistics,
exactness for large means, synchronisation over two ranks holding different batches, one-line errors, and use
in normlab's ResNet, timm models and ``replace_norms``."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models.resnet import ResNet
from normlab.models.swap import replace_norms
from normlab.norms import NORMS, _functional, _kernels, has_act, make_norm, norm_layer, sweeps
from normlab.norms.spec import RunningStats, SpecNorm
from norm_helpers import TwoRanks, assert_train_alike, fused_and_unfused
from norm_specs import BY_NAME, SPECS, Spec

C = 8
SHAPE = (4, C, 3, 3)
IDS = [s.name for s in SPECS]


@pytest.fixture(autouse=True)
def _ops_path(monkeypatch):
    monkeypatch.setenv("NORMLAB_KERNELS", "0")  # tensor ops, unless a test takes `norm_path`


@pytest.fixture(params=["cpp", "ops"])
def norm_path(request, monkeypatch):
    """The tests where the back-end matters run twice: through the C++ kernels and through the tensor ops."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1" if request.param == "cpp" else "0")
    if request.param == "cpp":
        assert _kernels.library() is not None, (
            f"the C++ norm kernels did not build ({_kernels._state['error']}): install g++ (make test does)")
    return request.param


ENGINE = [s for s in SPECS if isinstance(s.factory(C), SpecNorm)]  # the rows on the spec engine


def randomize(m: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("weight", "v", "alpha"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name == "rho":
                p.copy_(torch.rand(p.shape, generator=g) * 0.6 + 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def make_input(shape=SHAPE, seed=0, mean=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * 2 + mean


def step(m: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """y, dx and every parameter's gradient after one forward/backward."""
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = m(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


def pair(spec: Spec, dtype=torch.float32):
    ours = randomize(spec.factory(C)).to(dtype)
    return ours, spec.reference(ours).to(dtype)


def max_differences(spec: Spec, x: torch.Tensor, dy: torch.Tensor, steps: int = 2):
    """Run ours and the reference side by side for ``steps`` training steps, then once in eval; returns the largest
    |difference| of outputs and of gradients (input and parameters) and asserts they are within tolerance."""
    ours, ref = pair(spec)
    worst_y = worst_g = 0.0
    for mode in ["train"] * steps + ["eval"]:
        ours.train(mode == "train")
        ref.train(mode == "train")
        (y, dx, g), (ry, rdx, rg) = step(ours, x, dy), step(ref, x, dy)
        torch.testing.assert_close(y, ry, atol=spec.atol, rtol=spec.rtol, msg=lambda s: f"{mode} output: {s}")
        torch.testing.assert_close(dx, rdx, atol=spec.atol, rtol=spec.rtol, msg=lambda s: f"{mode} input grad: {s}")
        worst_y = max(worst_y, float((y - ry).abs().max()))
        worst_g = max(worst_g, float((dx - rdx).abs().max()))
        for name, grad in g.items():
            want = rg.get(spec.grads.get(name, name))
            if want is None and grad is not None and name not in rg:
                continue
            torch.testing.assert_close(grad, want, atol=spec.atol, rtol=spec.rtol,
                                       msg=lambda s, n=name: f"{mode} grad of {n}: {s}")
            worst_g = max(worst_g, float((grad - want).abs().max()))
        for buf in spec.running:
            torch.testing.assert_close(getattr(ours, buf), getattr(ref, buf), atol=1e-5, rtol=1e-5)
    return worst_y, worst_g


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_backward_and_running_stats_equal_the_reference(spec, norm_path):
    x, dy = make_input(), make_input(seed=3, mean=0.0)
    assert sweeps.kind(x) == (None if norm_path == "ops" else "cpp")
    max_differences(spec, x, dy)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name not in ("nn",)], ids=[s.name for s in SPECS if s.name != "nn"])
def test_exact_for_large_mean_inputs(spec, norm_path):
    """float32 with |mean|/std = 500 against the float64 reference: the shifted sums keep the statistics exact."""
    x = make_input(mean=1000.0, seed=4)
    dy = make_input(seed=5, mean=0.0)
    ours, _ = pair(spec)
    ref = spec.reference(ours).double()
    y, dx, _ = step(ours, x, dy)
    ry, rdx, _ = step(ref, x.double(), dy.double())
    torch.testing.assert_close(y, ry.float(), atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(dx, rdx.float(), atol=2e-4 * float(rdx.abs().max()) + 1e-6, rtol=1e-3)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gradcheck_float64(spec, norm_path):
    m = randomize(spec.factory(C)).double().train()
    if isinstance(m, RunningStats) or isinstance(m, nn.BatchNorm2d):
        m.momentum = 0.0  # running statistics frozen, so repeated evaluations see one function
    if spec.name == "brn":  # running statistics far from the batch: r and d sit at their (constant) bounds
        m.warmup = 0
        with torch.no_grad():
            m.running_mean.fill_(100.0)
            m.running_var.fill_(1e4)
    x = make_input((4, C, 2, 3), dtype=torch.float64).requires_grad_()
    params = [p for p in m.parameters()]
    assert torch.autograd.gradcheck(lambda x, *_: m(x), (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_train_and_eval(spec, norm_path):
    """Batch-statistics norms normalize with running statistics in eval (a different function than in training);
    every other norm computes the same in both modes."""
    m = randomize(spec.factory(C))
    x = make_input()
    y_train = m.train()(x).detach()
    y_eval = m.eval()(x).detach()
    if spec.batch_stats:
        assert not torch.allclose(y_train, y_eval, atol=1e-3)
        assert hasattr(m, "running_var")
    else:
        torch.testing.assert_close(y_train, y_eval)
        assert not any("running" in n for n, _ in m.named_buffers())


def test_batch_renorm_is_batchnorm_before_its_warmup_and_corrects_after():
    bn, brn = make_norm("bn", C), make_norm("brn", C, warmup=10)
    randomize(bn)
    randomize(brn)
    x = make_input()
    torch.testing.assert_close(brn(x), bn(x))  # r_max = 1, d_max = 0 at step 0
    brn.num_batches_tracked.fill_(10)
    with torch.no_grad():
        brn.running_mean.fill_(3.0)  # far from the batch: d is clipped to ±d_max
    assert not torch.allclose(brn(x), bn(x), atol=1e-2)
    r_max, d_max = brn.bounds()
    assert float(r_max) == 3.0 and float(d_max) == 5.0


def test_batch_renorm_warmup_bounds_keep_a_float64_layer_in_float64():
    """The warm-up bounds in the compute dtype: in float64 mid-warm-up (d clipped by a bound that is a ratio of
    steps) the layer equals the paper's equations to float64 rounding (bounds taken in float32 were ~1e-9 off)."""
    spec = BY_NAME["brn"]
    m = randomize(spec.factory(C)).double()
    ref = spec.reference(m).double()
    with torch.no_grad():
        m.running_mean.fill_(0.7)
        ref.running_mean.fill_(0.7)
    x = make_input(dtype=torch.float64)
    for _ in range(3):  # steps 0, 1, 2 of a warm-up of 2 steps: the bounds 1/3, ... of the way open
        torch.testing.assert_close(m(x), ref(x), atol=1e-13, rtol=1e-12)
    assert m.bounds(torch.float64)[1].dtype == torch.float64


def test_ghost_batches_are_batchnorm_per_chunk_and_a_small_last_one_stands_alone():
    m = make_norm("gbn", C, virtual_batch=3)
    x = make_input((7, C, 2, 2))
    y = m(x)
    for chunk, out in zip(x.split(3), y.split(3)):
        torch.testing.assert_close(out, nn.functional.batch_norm(chunk, None, None, training=True))


def test_evonorm_and_frn_contain_their_activation():
    for name in NORMS:
        assert has_act(name) == BY_NAME[name].has_act, name
    frn = make_norm("frn", C)
    y = frn(make_input()).detach()
    assert float(y.min()) >= float(frn.tau.detach().min()) - 1e-6  # TLU: never below τ


# ----------------------------------------------------------------------------------- synchronisation


@pytest.mark.parametrize("spec", [s for s in SPECS if s.sync], ids=[s.name for s in SPECS if s.sync])
def test_synced_ranks_with_different_batches_equal_one_process(spec, norm_path, monkeypatch):
    x_full, dy_full = make_input((8, C, 3, 2), seed=6), make_input((8, C, 3, 2), seed=7, mean=0.0)
    single = randomize(spec.factory(C))
    want = []
    for s in range(2):
        want.append(step(single, x_full + s, dy_full))
    world = TwoRanks()
    world.install(monkeypatch)

    def rank(r):
        m = randomize(spec.factory(C))
        m.sync = True
        part = slice(4 * r, 4 * (r + 1))
        got = [step(m, (x_full + s)[part], dy_full[part]) for s in range(2)]
        return m, got

    ranks = world.run(rank)
    for s in range(2):
        y = torch.cat([ranks[r][1][s][0] for r in range(2)])
        dx = torch.cat([ranks[r][1][s][1] for r in range(2)])
        torch.testing.assert_close(y, want[s][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dx, want[s][1], atol=1e-5, rtol=1e-4)
        for pname, g in want[s][2].items():  # local parameter gradients add up to the whole batch's
            torch.testing.assert_close(ranks[0][1][s][2][pname] + ranks[1][1][s][2][pname], g, atol=1e-5, rtol=1e-4)
    for r in range(2):
        for buf in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(ranks[r][0], buf), getattr(single, buf))
    # unsynced, a rank's statistics are its own batch's: the test above could fail
    local = randomize(spec.factory(C))
    monkeypatch.setattr(_functional, "distributed_active", lambda: False)
    y0 = step(local, x_full[:4], dy_full[:4])[0]
    assert not torch.allclose(y0, want[0][0][:4], atol=1e-3)


# ----------------------------------------------------------------------------------------- errors

ERRORS = [
    (lambda: make_norm("gbn", C, virtual_batch=0), "GhostBatchNorm: virtual_batch must be a whole number >= 1"),
    (lambda: make_norm("brn", C, r_max=0.5), "BatchRenorm: r_max must be a number >= 1.0"),
    (lambda: make_norm("brn", C, d_max=-1.0), "BatchRenorm: d_max must be a number >= 0"),
    (lambda: make_norm("brn", C, warmup=-5), "BatchRenorm: warmup must be a whole number of steps >= 0"),
    (lambda: make_norm("evonorm_s0", C, num_groups=3), "EvoNormS0: 3 groups do not divide 8 channels"),
    (lambda: make_norm("frn", C, eps=-1.0), "FilterResponseNorm: eps must be a number >= 0"),
    (lambda: make_norm("dyt", C, alpha_init=0.0), "DynamicTanh: alpha_init must be a number > 0"),
    (lambda: make_norm("sn", C)(torch.randn(1, C, 1, 1)), "SwitchableNorm2d got 1 value per channel"),
    (lambda: make_norm("evonorm_b0", C)(torch.randn(1, C, 1, 1)), "EvoNormB0 got 1 value per channel"),
    (lambda: make_norm("rms", C)(torch.randn(2, C + 1, 2, 2)), "RMSNorm2d was built for 8 channels but got 9"),
    (lambda: make_norm("ln2d", C)(torch.randn(2, C)), "ChannelLayerNorm2d expects a 4D"),
]


@pytest.mark.parametrize("make, message", ERRORS, ids=[m for _, m in ERRORS])
def test_impossible_settings_are_one_line_errors(make, message):
    with pytest.raises(NormlabError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ in models

NEW = [s.name for s in SPECS if s.source != "torch"]  # the catalogue: every row not checked against torch


@pytest.mark.parametrize("name", NEW)
def test_resnet_drops_the_relu_only_after_norms_with_their_own_activation(name):
    model = ResNet(1, 10, norm=name)
    block = model.stages[0][0]
    assert isinstance(block.act1, nn.Identity) == has_act(name)
    assert isinstance(model.stem[2], nn.Identity) == has_act(name)
    assert not isinstance(block.act2, nn.Identity)  # after the residual add: always the block's ReLU
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("spec", ENGINE, ids=[s.name for s in ENGINE])
def test_forward_relu_is_relu_of_the_norm_plus_the_residual(spec, cl, norm_path):
    """``forward_relu(x, r)`` = ``relu(norm(x) + r)`` (and ``relu(norm(x))``): outputs, input, residual and parameter
    gradients and running statistics; fused into the affine's sweep where the output is the affine (the ReLU's
    mask and the residual's gradient from the same backward sweep), unfused for EvoNorm/FRN (per-element output)
    and for a residual of another dtype."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = make_input().contiguous(memory_format=fmt)
    dy = make_input(seed=3, mean=0.0).contiguous(memory_format=fmt)
    for res in (make_input(seed=5).contiguous(memory_format=fmt), None, make_input(seed=5).double()):
        ours, ref = randomize(spec.factory(C)).train(), randomize(spec.factory(C)).train()
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        ro = rr = None
        if res is not None:
            ro, rr = res.clone().requires_grad_(), res.clone().requires_grad_()
        y = ours.forward_relu(xo, ro)
        want = torch.relu(ref(xr) + rr) if res is not None else torch.relu(ref(xr))
        y.backward(dy.to(y.dtype))
        want.backward(dy.to(want.dtype))
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-4)
        if res is not None:
            torch.testing.assert_close(ro.grad, rr.grad, atol=1e-5, rtol=1e-4)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, msg=lambda m, n=name: f"{n}: {m}")
        assert (y >= 0).all() and (y == 0).any()


@pytest.mark.parametrize("name", ["rms", "sn", "gbn"])
def test_forward_relu_fuses_the_residual_and_relu_into_the_affine(name, monkeypatch):
    """On the C++ kernels a fused ``forward_relu`` is the norm's own two forward sweeps (the residual add and the
    ReLU inside the affine's) and two backward sweeps (the ReLU's mask inside the gradient sums): no separate add,
    ReLU or ReLU-backward op over the tensor."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    seen = []
    for fn in ("nc_sums", "nc_affine"):
        real = getattr(_kernels, fn)
        monkeypatch.setattr(_kernels, fn, lambda *a, _r=real, _n=fn, **k: (seen.append((_n, sorted(
            key for key, v in k.items() if v is not None and v is not False))), _r(*a, **k))[1])
    for fn in ("relu", "add"):  # the unfused ops would show here
        real = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda *a, _r=real, _n=fn, **k: (seen.append((_n, [])), _r(*a, **k))[1])
    m = randomize(make_norm(name, C, **({"virtual_batch": 2} if name == "gbn" else {})))
    x, res = make_input().requires_grad_(), make_input(seed=5).requires_grad_()
    y = m.forward_relu(x, res)
    assert seen == [("nc_sums", []), ("nc_affine", ["Pc", "relu", "residual"])]
    seen.clear()
    y.backward(make_input(seed=3, mean=0.0))
    assert seen == [("nc_sums", ["mask"]), ("nc_affine", [])] and res.grad is not None


@pytest.mark.parametrize("norm,cl,kw", [("rms", False, {}), ("sn", True, {}), ("brn", False, {"shortcut": "B"}),
                                        ("gbn", True, {"norm_kwargs": {"virtual_batch": 4}})],
                         ids=["rms", "sn-channels_last", "brn-shortcut_B", "gbn-channels_last"])
def test_resnet_fuses_catalogue_norms_and_trains_as_unfused(norm, cl, kw, norm_path):
    """The spec norms are hook-watched and offer ``forward_relu``: a ResNet's stem and blocks fuse norm + ReLU
    (+ residual) through them, and two SGD steps give the unfused ResNet's losses, weights and running statistics
    (bit-identical: the same float operations in the same order)."""
    a, b = fused_and_unfused(norm=norm, **kw)
    fmt = torch.channels_last if cl else torch.contiguous_format
    a, b = a.to(memory_format=fmt), b.to(memory_format=fmt)
    blocks = [m for m in a.modules() if hasattr(m, "fused")]
    assert blocks and all(m.fused() for m in blocks)
    assert not any(m.fused() for m in b.modules() if hasattr(m, "fused"))
    handle = a.stem[1].register_forward_hook(lambda *_: None)  # a hook on a spec norm stops its block's fusion
    assert not a.stem.fused()
    handle.remove()
    assert a.stem.fused()
    assert_train_alike(a, b, fmt)


@pytest.mark.parametrize("norm", ["sn", "rms"])
def test_resnet_fused_catalogue_norms_under_bf16_autocast(norm, monkeypatch):
    """bf16 autocast on the C++ kernels: the fused ResNet's output and gradients are as close to the fp32 ones as
    the unfused ResNet's (a wrong fused path would be far off)."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1")
    a, b = fused_and_unfused(norm=norm)
    ref, _ = fused_and_unfused(norm=norm)
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for m, bf16 in ((a, True), (b, True), (ref, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x)
        out.float().pow(2).mean().backward()
        outs.append(out.detach().float())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert a.stages[0][0].fused() and a.stem.fused()
    err = [float((o - outs[2]).abs().max()) for o in outs[:2]]
    gerr = [float((g - grads[2]).norm() / grads[2].norm()) for g in grads[:2]]
    assert err[0] < 2 * err[1] + 1e-3 and gerr[0] < 2 * gerr[1] + 1e-3, (err, gerr)


def test_the_old_norms_still_fuse_in_the_resnet():
    assert ResNet(1, 10, norm="bn").train().stages[0][0].fused()
    assert not ResNet(1, 10, norm="frn").train().stages[0][0].fused()


@pytest.mark.parametrize("name", ["frn", "evonorm_s0", "sn", "ln2d"])
def test_timm_models_take_the_catalogue(name):
    timm = pytest.importorskip("timm")
    # regnetx builds norm+activation layers: a norm with its own activation replaces the pair
    model = timm.create_model("regnetx_002", pretrained=False, num_classes=2,
                              norm_layer=norm_layer(name))
    norms = [m for m in model.modules() if type(m) is NORMS[name]]
    assert norms
    if has_act(name):
        assert any(m.apply_act for m in norms) and any(not m.apply_act for m in norms)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NEW)
def test_replace_norms_carries_the_affine_over(name):
    model = ResNet(1, 10, norm="bn")
    randomize(model.stem[1])
    w, b = model.stem[1].weight.detach().clone(), model.stem[1].bias.detach().clone()
    replace_norms(model, norm_layer(name))
    new = model.stem[1]
    assert type(new) is NORMS[name]
    torch.testing.assert_close(new.weight.detach(), w)
    torch.testing.assert_close(new.bias.detach(), b)
    if hasattr(new, "running_mean"):
        assert torch.equal(new.running_mean, torch.zeros(16))


class _TwoAffines(SpecNorm):
    """A spec whose output is two affines of one Stats: the first (the one linked to the statistics' backward)
    does not depend on the sums, so autograd may run the statistics' backward before it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.num_channels = c
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def output(self, x, stats):
        zero = torch.zeros(())
        y = stats.affine(self.weight, None, zero)  # before the sums exist: it claims the link
        m = stats.moments("hw")
        return y + stats.affine(torch.rsqrt(m.var + 1e-5), m.centre, zero)


def test_a_spec_of_two_affines_gets_its_whole_input_gradient(norm_path):
    """The single-sweep input gradient hands the first affine's a·g to the statistics' backward only while that
    has not run yet (once it dropped a·g on the kernels: dx off by max|w·dy|)."""
    x = make_input().requires_grad_()
    dy = make_input(seed=3, mean=0.0)
    m = _TwoAffines(C)
    m(x).backward(dy)
    xr = x.detach().double().requires_grad_()
    var, mean = torch.var_mean(xr, (2, 3), correction=0, keepdim=True)
    want = m.weight.detach().double().view(1, -1, 1, 1) * xr + (xr - mean) * torch.rsqrt(var + 1e-5)
    want.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["sn", "rms", "gbn", "mobn"])
def test_second_order_gradients_through_spec_norms(name, norm_path):
    """A gradient of a gradient (a gradient penalty) through a spec norm: the backward that autograd records runs
    on tensor ops, so the C++ path gives the tensor ops' answer (the kernels' results carry no graph: it was
    silently zero)."""
    def penalty_grad(kernels: str):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NORMLAB_KERNELS", kernels)
            m = randomize(make_norm(name, C))
            x = make_input().requires_grad_()
            y = m(x)
            (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
            (g * g).sum().backward()
            return m.weight.grad.clone()

    got = penalty_grad("1" if norm_path == "cpp" else "0")
    assert got.abs().max() > 0
    torch.testing.assert_close(got, penalty_grad("0"), atol=1e-4, rtol=1e-4)



def test_spec_norms_under_torch_compile(norm_path):
    m = randomize(make_norm("sn", C))
    ref = randomize(make_norm("sn", C))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x, dy = make_input(), make_input(seed=3, mean=0.0)
    got, want = step(compiled, x, dy), step(ref, x, dy)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_every_norm_has_its_own_colour_marker_and_glyph_in_reports():
    from normlab import plots

    listed = [n for n in NORMS if n in plots.VARIANT_STYLES]
    catalogue = {"frn", "evonorm_b0", "evonorm_s0", "sn", "brn", "gbn", "rms", "ln2d", "rms2d", "dyt"}
    assert catalogue <= set(listed)  # a norm added later without a line there gets one of the extra styles
    styles = [plots.VARIANT_STYLES[name] for name in listed]
    colours = {c.lower() for c, _ in styles}
    assert len(colours) == len(listed) and not colours & {c.lower() for c, _ in plots._EXTRA}
    assert len({m for _, m in styles}) == len(listed)
    assert len({plots.MARKER_GLYPHS[m] for _, m in styles}) == len(listed)


def test_the_catalogue_preset_has_every_norm_and_every_batch_statistics_norm_at_two_batch_sizes():
    from normlab.study.plan import load_preset, make_study_config

    study, train, _ = load_preset("catalogue")
    cfg = make_study_config(study)
    assert set(cfg.norms) == set(NORMS) and train["batch_size"] == 128 and train["dataset"] == "cifar10"
    assert set(cfg.batch_norms) == {s.name for s in SPECS if s.batch_stats}
    assert sorted(cfg.batch_sizes) == [8, 128]


def test_ghost_batch_setting_reaches_the_layers_and_a_batch_it_cannot_split_is_refused():
    from normlab.config import make_config
    from normlab.models import build_model

    net = build_model(make_config({"norm": "gbn", "ghost_batch": 4, "batch_size": 16}), 3, 10)
    assert {m.virtual_batch for m in net.modules() if type(m) is NORMS["gbn"]} == {4}
    with pytest.raises(NormlabError) as e:
        make_config({"norm": "gbn", "batch_size": 100})
    assert str(e.value) == ("config: batch_size=100 is not a multiple of the ghost batch of 32 samples (norm gbn): use "
                            "a batch size that is a multiple of 32, or --ghost-batch with a divisor of 100")
    make_config({"norm": "gbn", "batch_size": 8})  # at most one ghost batch: plain BN


# ------------------------------------------------- weight standardization, normalizer-free ResNet, AGC


def test_weight_standardized_convs_equal_timms():
    tl = pytest.importorskip("timm.layers")
    from normlab.models.nf import ScaledStdConv2d, StdConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for ours, ref in ((StdConv2d(4, 6, 3, padding=1, bias=False, eps=1e-5), tl.StdConv2d(4, 6, 3, padding=1, eps=1e-5)),
                      (ScaledStdConv2d(4, 6, 3, padding=1, bias=True), tl.ScaledStdConv2d(4, 6, 3, padding=1))):
        with torch.no_grad():
            ours.weight.normal_(0.3, 2.0)
            if isinstance(ours, ScaledStdConv2d):
                ours.gain.uniform_(0.5, 1.5)
                ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
        (y, dx, g), (ry, rdx, rg) = step(ours, x, torch.ones(2, 6, 6, 6)), step(ref, x, torch.ones(2, 6, 6, 6))
        torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dx, rdx, atol=1e-5, rtol=1e-4)
        for name in g:
            torch.testing.assert_close(g[name], rg[name], atol=1e-4, rtol=1e-4)
        w = ours.standardized_weight().detach()
        if isinstance(ours, StdConv2d):  # zero mean, unit variance per filter
            torch.testing.assert_close(w.mean((1, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
            torch.testing.assert_close(w.var((1, 2, 3), unbiased=False), torch.ones(6), atol=1e-4, rtol=0)


def test_conv_ws_swaps_every_conv_of_a_resnet_with_any_norm():
    from normlab.config import make_config
    from normlab.models import build_model
    from normlab.models.nf import StdConv2d

    for norm in ("bn", "frn", "gn"):
        net = build_model(make_config({"norm": norm, "conv": "ws", "n": 1}), 3, 10)
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(type(m) is StdConv2d for m in convs)
        net(torch.randn(2, 3, 8, 8)).sum().backward()


def test_nf_resnet_keeps_unit_variance_at_init_and_trains_with_agc():
    from normlab.config import make_config
    from normlab.models import build_model
    from normlab.models.nf import NFResNet

    torch.manual_seed(0)
    net = build_model(make_config({"model": "nf", "n": 2}), 3, 10)
    assert isinstance(net, NFResNet) and not any(type(m) in NORMS.values() for m in net.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()) == 6 * 2 + 1
    with torch.no_grad():
        h = net.stages(net.stem(torch.randn(64, 3, 16, 16)))
    assert 0.5 < float(h.var()) < 2.5  # signal propagation: no explosion or collapse without norms
    with pytest.raises(NormlabError, match="config: agc=-1.0 must be > 0"):
        make_config({"agc": -1.0})


def test_agc_equals_timms_and_leaves_the_classifier_alone():
    tu = pytest.importorskip("timm.utils")
    from normlab.train.agc import adaptive_clip_, agc_params

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 6, 6) * 50  # large gradients: the units get clipped
    for m in (net, ref):
        m(x).sum().backward()
    head = [p.grad.clone() for p in net[2].parameters()]
    before = net[0].weight.grad.clone()
    adaptive_clip_(agc_params(net), 0.01)
    tu.adaptive_clip_grad(list(ref[0].parameters()), 0.01)
    assert not torch.equal(before, net[0].weight.grad)
    for a, b in zip(net[0].parameters(), ref[0].parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert all(torch.equal(a, p.grad) for a, p in zip(head, net[2].parameters()))


def test_the_training_step_applies_agc_to_every_parameter_but_the_classifier(monkeypatch):
    from normlab.config import make_config
    from normlab.models.nf import NFResNet
    from normlab.train import step as step_module
    from normlab.train.optim import build_optimizer

    seen = []
    real = step_module.adaptive_clip_
    monkeypatch.setattr(step_module, "adaptive_clip_", lambda ps, f: (seen.append((len(ps), f)), real(ps, f)))
    torch.manual_seed(0)
    model = NFResNet(1, 3)
    for agc in (None, 0.02):
        cfg = make_config({"dataset": "folder", "model": "nf", "n": 1, "progress": "off", "agc": agc})
        st = step_module.TrainStep(model, model, build_optimizer(model, cfg), cfg, device=torch.device("cpu"),
                                   num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3, steps_per_epoch=1, total_steps=1)
        st(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (4,)), 0,
           torch.Generator().manual_seed(0))
    assert seen == [(len(list(model.parameters())) - 2, 0.02)]  # once, with --agc; fc's weight and bias left out


@pytest.mark.parametrize("name", NEW)
def test_bf16_and_channels_last_inputs_keep_their_dtype_and_layout(name, norm_path):
    """Half-precision inputs are computed in float32 inside the norm and come back in their dtype; channels_last
    stays channels_last."""
    m = randomize(make_norm(name, C))
    x = make_input().contiguous(memory_format=torch.channels_last)
    want = m(x).detach()
    xb = x.to(torch.bfloat16).requires_grad_()
    y = m(xb)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), want, atol=0.1, rtol=0.05)


@pytest.mark.slow  # builds a whole report (its figures): ~15 s
def test_a_report_of_every_norm_keeps_its_tables_narrow(tmp_path, monkeypatch):
    """The catalogue's 17 variants: the per-class table turns to one row per variant (not 18 columns), and the
    findings still name the variants within noise of the best."""
    import test_report_browser as trb

    monkeypatch.setattr(trb, "NORMS", tuple(NORMS))
    trb.fake_study(tmp_path / "study")
    md = (tmp_path / "study" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant |") and "Trouser" in line)
    assert header.count("|") == len(trb.CLASSES) + 2
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.count("|") == header.count("|")]
    assert all(any(name in line for line in rows) for name in NORMS)
    assert "Best variant" in md


def test_a_study_that_names_no_norms_still_compares_the_seven_of_the_course():
    from normlab.study.plan import make_study_config

    assert make_study_config({}).norms == ["bn", "in", "bin", "ln", "gn", "nn", "torch_bn"]
