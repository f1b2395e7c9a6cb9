"""The course norms (bn, in, ln, gn, bin: rows of tests/norm_specs.py with ``override``) on both of their paths:
the spec on the engine (``NORMLAB_FUSED=0`` or ``module.override = False``) and the hand-fused override (the
default), on the fused Functions' tensor-op and C++ back-ends. Forward, every gradient, running statistics over
two steps and eval equal each other and native torch; exactness for large means and float64 gradcheck on the
engine path; synced ranks with different batches equal one process; a ResNet-20 trained on the engine path
equals the fused one; the switch itself and the one-line errors, the same on both paths."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError
from normlab.models.resnet import ResNet
from normlab.norms import BatchNorm2d, _functional, make_norm
from normlab.norms.override import FusedSpecNorm, override_enabled
from norm_helpers import TwoRanks
from norm_specs import SPECS, Spec

C = 8
SHAPE = (4, C, 5, 3)
OVERRIDDEN = [s for s in SPECS if s.override]
IDS = [s.name for s in OVERRIDDEN]


@pytest.fixture(params=["ops", "cpp"])
def fused_backend(request, monkeypatch):
    """The fused override's back-end: tensor ops (NORMLAB_KERNELS=0) or the C++ kernels."""
    monkeypatch.setenv("NORMLAB_KERNELS", "0" if request.param == "ops" else "1")
    monkeypatch.delenv("NORMLAB_FUSED", raising=False)
    want = None if request.param == "ops" else _functional.CPP
    got = _functional.backend(torch.zeros(SHAPE))
    assert (got[0] if got else None) == want, f"the {request.param} back-end is not the one taken: {got}"
    return request.param


def randomize(m: nn.Module, seed: int = 1, gates: tuple[float, float] = (0.2, 0.8)) -> nn.Module:
    """Random parameters; BIN's gates ``rho`` uniform in ``gates``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "weight":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name == "rho":
                p.copy_(torch.rand(p.shape, generator=g) * (gates[1] - gates[0]) + gates[0])
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


def engine(m: FusedSpecNorm) -> FusedSpecNorm:
    m.override = False
    return m


def paths(spec: Spec, gates: tuple[float, float] = (0.2, 0.8)):
    """(fused, engine) copies of one randomized layer."""
    fused = randomize(spec.factory(C), gates=gates)
    assert isinstance(fused, FusedSpecNorm) and fused.override
    return fused, engine(copy.deepcopy(fused))


def _close(a, b, what, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda s: f"{what}: {s}")


def _reference_buffer(ref: nn.Module, name: str) -> torch.Tensor | None:
    state = ref.state_dict()
    return state.get(name, state.get(f"bn.{name}"))  # BIN's reference keeps BN's buffers in a native BN


@pytest.mark.parametrize("spec", OVERRIDDEN, ids=IDS)
def test_engine_equals_override_and_reference(spec, fused_backend):
    """Two training steps then eval: output, input and parameter gradients and every buffer of the engine path
    equal the fused override's and native torch's. BIN's gates lie partly outside [0, 1]: both paths clamp them
    with a straight-through gradient (the reference's plain clamp gives those gates no gradient, so they are
    compared with it only inside [0, 1])."""
    fused, eng = paths(spec, gates=(-0.3, 1.3))
    ref = spec.reference(fused)
    x, dy = make_input(), make_input(seed=3, mean=0.0)
    for mode in ["train", "train", "eval"]:
        for m in (fused, eng, ref):
            m.train(mode == "train")
        (y, dx, g), (fy, fdx, fg), (ry, rdx, rg) = step(eng, x, dy), step(fused, x, dy), step(ref, x, dy)
        for what, ours, theirs in [("output", y, fy), ("input grad", dx, fdx)] + [
                (f"grad of {n}", g[n], fg[n]) for n in g]:
            _close(ours, theirs, f"{mode} {what}, engine vs fused")
        _close(y, ry, f"{mode} output, engine vs reference")
        _close(dx, rdx, f"{mode} input grad, engine vs reference")
        for n, grad in g.items():
            want = rg[spec.grads.get(n, n)]
            if n == "rho":
                inside = (eng.rho >= 0) & (eng.rho <= 1)
                assert 0 < int(inside.sum()) < C and bool((grad[~inside] != 0).all())
                grad, want = grad[inside], want[inside]
            _close(grad, want, f"{mode} grad of {n}, engine vs reference")
        for (n, b), fb in zip(eng.named_buffers(), fused.buffers()):
            _close(b, fb, f"{mode} buffer {n}, engine vs fused")
            want = _reference_buffer(ref, n)
            assert want is not None, n
            _close(b, want.to(b.dtype), f"{mode} buffer {n}, engine vs reference")
    if spec.batch_stats:
        assert int(eng.num_batches_tracked) == 2


@pytest.mark.parametrize("kw", [{"momentum": None}, {"track_running_stats": False}, {"affine": False}],
                         ids=["cumulative", "untracked", "no-affine"])
def test_batchnorm_settings_on_both_paths_equal_native(kw, fused_backend):
    """BN's settings on the engine: momentum None (cumulative average), no running statistics (batch statistics
    in eval too), no affine -- against native BN with the same settings, and the fused path."""
    ref = nn.BatchNorm2d(C, **kw)
    fused = BatchNorm2d(C, **kw)
    if fused.weight is not None:
        randomize(fused)
        ref.load_state_dict(fused.state_dict())
    eng = engine(copy.deepcopy(fused))
    for i, mode in enumerate(["train", "train", "train", "eval"]):
        x, dy = make_input(seed=10 + i, mean=i), make_input(seed=20 + i, mean=0.0)
        for m in (fused, eng, ref):
            m.train(mode == "train")
        (y, dx, g), (fy, fdx, _), (ry, rdx, rg) = step(eng, x, dy), step(fused, x, dy), step(ref, x, dy)
        for want_y, want_dx, who in [(fy, fdx, "fused"), (ry, rdx, "native")]:
            _close(y, want_y, f"{mode} output vs {who}")
            _close(dx, want_dx, f"{mode} input grad vs {who}")
        for n, grad in g.items():
            _close(grad, rg[n], f"{mode} grad of {n} vs native")
        for name, b in ref.named_buffers():
            _close(getattr(eng, name), b, f"{mode} buffer {name} vs native")
    assert fused.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("spec", OVERRIDDEN, ids=IDS)
def test_engine_exact_for_large_mean_inputs(spec, monkeypatch):
    """float32 input with mean 1e4 (|mean|/std = 5000) on the engine path against the float64 reference."""
    monkeypatch.setenv("NORMLAB_FUSED", "0")
    x, dy = make_input(mean=1e4, seed=4), make_input(seed=5, mean=0.0)
    ours = randomize(spec.factory(C))
    ref = spec.reference(ours).double()
    y, dx, g = step(ours, x, dy)
    ry, rdx, rg = step(ref, x.double(), dy.double())
    _close(y, ry.float(), "output", atol=2e-4, rtol=1e-3)
    _close(dx, rdx.float(), "input grad", atol=2e-4 * float(rdx.abs().max()) + 1e-6, rtol=1e-3)
    for n, grad in g.items():
        want = rg[spec.grads.get(n, n)].float()
        _close(grad, want, f"grad of {n}", atol=2e-4 * float(want.abs().max()) + 1e-6, rtol=1e-3)


@pytest.mark.parametrize("spec", OVERRIDDEN, ids=IDS)
def test_engine_gradcheck_float64(spec, monkeypatch):
    monkeypatch.setenv("NORMLAB_FUSED", "0")
    m = randomize(spec.factory(C)).double().train()
    if spec.batch_stats:
        m.momentum = 0.0  # running statistics frozen, so repeated evaluations see one function
    x = make_input((4, C, 2, 3), dtype=torch.float64).requires_grad_()
    params = list(m.parameters())
    assert torch.autograd.gradcheck(lambda x, *_: m(x), (x, *params), eps=1e-6, atol=1e-5)
    m.eval()
    assert torch.autograd.gradcheck(lambda x, *_: m(x), (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", [s for s in OVERRIDDEN if s.sync], ids=[s.name for s in OVERRIDDEN if s.sync])
def test_engine_synced_ranks_with_different_batches_equal_one_process(spec, monkeypatch):
    """Two ranks on the engine path, each with half of the batch: outputs and input gradients are one
    process's on the whole batch (fused path), parameter gradients add up to it, running statistics agree."""
    x_full, dy_full = make_input((8, C, 3, 2), seed=6), make_input((8, C, 3, 2), seed=7, mean=0.0)
    single = randomize(spec.factory(C))
    want = [step(single, x_full + s, dy_full) for s in range(2)]
    world = TwoRanks()
    world.install(monkeypatch)

    def rank(r):
        m = engine(randomize(spec.factory(C)))
        m.sync = True
        part = slice(4 * r, 4 * (r + 1))
        return m, [step(m, (x_full + s)[part], dy_full[part]) for s in range(2)]

    ranks = world.run(rank)
    for s in range(2):
        _close(torch.cat([ranks[r][1][s][0] for r in range(2)]), want[s][0], f"step {s} output")
        _close(torch.cat([ranks[r][1][s][1] for r in range(2)]), want[s][1], f"step {s} input grad")
        for n, g in want[s][2].items():
            _close(ranks[0][1][s][2][n] + ranks[1][1][s][2][n], g, f"step {s} grad of {n}")
    for r in range(2):
        for buf in ("running_mean", "running_var"):
            _close(getattr(ranks[r][0], buf), getattr(single, buf), buf)
    # unsynced, a rank normalizes with its own half's statistics: the comparison above could fail
    monkeypatch.setattr(_functional, "distributed_active", lambda: False)
    y0 = step(engine(randomize(spec.factory(C))), x_full[:4], dy_full[:4])[0]
    assert not torch.allclose(y0, want[0][0][:4], atol=1e-3)


def _train(norm: str, cl: bool, steps: int = 2):
    torch.manual_seed(0)
    model = ResNet(3, 10, norm=norm, norm_kwargs={"num_groups": 4} if norm == "gn" else None)
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(steps):
        x = (torch.randn(8, 3, 8, 8, generator=g) * 2 + 0.5).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), model.state_dict()


@pytest.mark.parametrize("norm,cl", [("bn", False), ("in", True), ("ln", False), ("gn", True), ("bin", False)])
def test_resnet20_trained_on_the_engine_equals_the_fused_one(norm, cl, monkeypatch):
    """ResNet-20 (fused blocks: the engine path's forward_relu), two SGD steps with NORMLAB_FUSED=0 and with the
    fused override: the same losses, weights and running statistics."""
    monkeypatch.delenv("NORMLAB_FUSED", raising=False)
    losses, state = _train(norm, cl)
    monkeypatch.setenv("NORMLAB_FUSED", "0")
    e_losses, e_state = _train(norm, cl)
    _close(e_losses, losses, "losses")
    assert e_state.keys() == state.keys()
    for k, v in state.items():  # rounding differences, amplified by two SGD steps (IN on 2x2 maps)
        _close(e_state[k], v, k, atol=1e-3, rtol=1e-3)


def _count_paths(monkeypatch, cls) -> dict[str, int]:
    calls = {"fused": 0, "engine": 0}
    for name, key in (("fused_forward", "fused"), ("fused_forward_relu", "fused"), ("engine_forward", "engine"),
                      ("engine_forward_relu", "engine")):
        original = getattr(cls, name)

        def spy(self, x, *a, _original=original, _key=key):
            calls[_key] += 1
            return _original(self, x, *a)
        monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("spec", OVERRIDDEN, ids=IDS)
def test_the_switch_picks_the_path(spec, monkeypatch):
    """Default: the fused override; ``NORMLAB_FUSED=0`` sends every course norm to the engine, whatever its
    attribute; ``override = False`` sends one layer there; forward_relu follows."""
    m = spec.factory(C)
    calls = _count_paths(monkeypatch, type(m))
    x = make_input()
    monkeypatch.delenv("NORMLAB_FUSED", raising=False)
    assert override_enabled() and type(m).override is True
    m(x)
    assert calls == {"fused": 1, "engine": 0}
    for off in ("0", "false", "off", "no"):
        monkeypatch.setenv("NORMLAB_FUSED", off)
        m(x)
    assert calls == {"fused": 1, "engine": 4}
    monkeypatch.setenv("NORMLAB_FUSED", "1")
    other = spec.factory(C)
    other.override = False
    other(x)
    m(x)
    assert calls == {"fused": 2, "engine": 5}
    y = m.forward_relu(x, x)
    # BIN's Function has no fused residual + ReLU: its override's forward_relu runs fused_forward, then the ops
    fused = 3 if spec.name != "bin" else 4
    assert calls["fused"] == fused
    monkeypatch.setenv("NORMLAB_FUSED", "0")
    torch.testing.assert_close(m.forward_relu(x, x), y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.forward_relu(x), torch.relu(m(x)), atol=1e-5, rtol=1e-4)
    assert calls == {"fused": fused, "engine": 8}


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("spec", OVERRIDDEN, ids=IDS)
def test_forward_relu_on_both_paths(spec, cl, fused_backend):
    """The blocks' fused ``relu(norm(x) + residual)`` (gradients of x, the residual and the parameters): the
    engine path equals the fused one, NCHW and channels_last, and a residual that broadcasts."""
    fused, eng = paths(spec)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = make_input().contiguous(memory_format=fmt)
    for residual in (make_input(seed=8).contiguous(memory_format=fmt), make_input((1, C, 1, 1), seed=9), None):
        outs = []
        for m in (fused, eng):
            xx = x.detach().clone().requires_grad_()
            res = None if residual is None else residual.detach().clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            y = m.forward_relu(xx, res)
            y.backward(make_input(seed=11, mean=0.0))
            outs.append([y, xx.grad] + ([] if res is None else [res.grad]) + [p.grad for p in m.parameters()])
        for a, b in zip(*outs):
            _close(a, b, "forward_relu")


ERRORS = [
    ("bn", make_input((1, C, 1, 1)), "BatchNorm got 1 value per channel"),
    ("bin", make_input((1, C, 1, 1)), "BatchInstanceNorm got 1 value per channel"),
    ("in", make_input((2, C, 1, 1)), "InstanceNorm2d got 1x1 maps"),
    ("gn", make_input((2, C, 1, 1)), None),  # 2 channels per group: 2 values, allowed
    ("bn", make_input((2, C + 1, 2, 2)), "BatchNorm2d was built for 8 channels but got 9"),
    ("ln", make_input((2, C, 3)), "LayerNorm2d expects a 4D (N, C, H, W) input"),
]


@pytest.mark.parametrize("name,x,message", ERRORS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ERRORS)])
def test_errors_are_the_same_on_both_paths(name, x, message, monkeypatch):
    for switch in ("1", "0"):
        monkeypatch.setenv("NORMLAB_FUSED", switch)
        m = make_norm(name, C, **({"num_groups": 4} if name == "gn" else {}))
        if message is None:
            m(x)
            continue
        with pytest.raises(NormlabError, match=re.escape(message)):
            m(x)


COMPILED = [s for s in OVERRIDDEN if s.name in ("bn", "gn", "bin")]  # one per code family: BN, group stats, BIN


@pytest.mark.parametrize("spec", COMPILED, ids=[s.name for s in COMPILED])
def test_engine_path_compiles_into_one_graph(spec, monkeypatch):
    """The engine path under torch.compile (fullgraph: no graph break), forward_relu included, equals eager."""
    monkeypatch.delenv("NORMLAB_FUSED", raising=False)
    m = engine(randomize(spec.factory(C)))
    if spec.batch_stats:
        m.momentum = 0.0  # the same running statistics for the compiled and the eager call
    x = make_input().requires_grad_()
    y = torch.compile(m, backend="eager", fullgraph=True)(x)
    y.backward(make_input(seed=3, mean=0.0))
    _close(y, m(x), "compiled output")
    r = make_input(seed=5)  # a residual of its own (dynamo refuses one tensor passed twice to a Function)
    _close(torch.compile(m.forward_relu, backend="eager", fullgraph=True)(x, r), m.forward_relu(x, r),
           "compiled forward_relu")


@pytest.mark.parametrize("spec", OVERRIDDEN, ids=IDS)
def test_a_course_norm_is_a_spec_with_the_same_surface_on_both_paths(spec):
    """Each of the five is a SpecNorm (its math a spec on the engine) whose override is only a switch: the
    parameters, buffers, state_dict keys and repr do not depend on the path, and a state_dict moves between
    them."""
    from normlab.norms.spec import SpecNorm

    fused, eng = paths(spec)
    assert isinstance(fused, SpecNorm) and type(fused).coefficients is not SpecNorm.coefficients
    assert repr(fused) == repr(eng) and "override" not in repr(eng)
    assert fused.state_dict().keys() == eng.state_dict().keys()
    fresh = engine(spec.factory(C))
    fresh.load_state_dict(fused.state_dict())
    x = make_input()
    _close(fresh.eval()(x), fused.eval()(x), "eval output after loading the fused layer's state")
