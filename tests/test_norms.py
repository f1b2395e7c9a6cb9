"""normlab.norms: the from-scratch layers equal PyTorch's native ones (forward, gradients, running
stats, eval), pass gradcheck, plug into ResNets, handle bf16/channels_last, and sync across ranks; every test runs
on the C++ kernels and on the tensor ops (the kernels' own internals: test_cpp_kernels.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import normlab.norms as norms
from normlab.errors import NormlabError
from normlab.norms import _functional
from normlab.norms import (
    NORMS, BatchInstanceNorm2d, BatchNorm2d, GroupNorm2d, InstanceNorm2d, LayerNorm2d, clamp_gates_, make_norm,
    norm_layer,
)
from norm_helpers import (  # noqa: F401  (norm_path: the autouse fixture, C++ kernels and tensor ops)
    FUSABLE, assert_same_step, assert_train_alike, bin_pair, bin_step, close, composed_bin, fused_and_unfused,
    make_input, norm_path, randomize_affine,
    run, to_double,
)

NAMES = ("bn", "in", "bin", "ln", "gn", "nn", "torch_bn")


# --------------------------------------------------------------------------------------- registry

def test_registry_has_the_seven_names_and_the_catalogue():
    from norm_specs import BY_NAME  # the catalogue's specification table (tests/test_catalogue.py)

    assert set(NAMES) <= set(NORMS) and set(NORMS) == set(BY_NAME)
    assert isinstance(NORMS, dict)


@pytest.mark.parametrize("name", NAMES)
def test_make_norm_builds_each_and_drops_inapplicable_kwargs(name):
    m = make_norm(name, 16, num_groups=4, sync=False)
    assert isinstance(m, nn.Module)
    assert norm_layer(name, num_groups=None, sync=True)(16) is not None
    x = torch.randn(4, 16, 5, 5)
    y = m.train()(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if name == "gn":
        assert m.num_groups == 4
    if name in ("bn", "bin"):
        assert norm_layer(name, sync=True)(16).sync is True


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_resnet18_accepts_each_norm(name):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(norm_layer=norm_layer(name), num_classes=10).train()
    out = model(torch.randn(2, 3, 64, 64))  # at 32 px its layer4 sees 1x1 maps, which IN and BIN refuse
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_registry_classes_are_exported():
    for cls in (BatchNorm2d, InstanceNorm2d, BatchInstanceNorm2d, LayerNorm2d, GroupNorm2d):
        assert cls.__name__ in norms.__all__
    assert isinstance(make_norm("nn", 7), nn.Identity)
    assert isinstance(make_norm("torch_bn", 7, sync=True, num_groups=2), nn.BatchNorm2d)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(NormlabError, match=r"unknown norm 'gm'.*did you mean 'gn'.*bn, in, bin, ln, gn, nn, torch_bn"):
        make_norm("gm", 16)
    with pytest.raises(NormlabError, match="did you mean 'torch_bn'"):
        norm_layer("torchbn")


def test_groupnorm_bad_groups_is_a_clear_error():
    with pytest.raises(NormlabError) as info:
        make_norm("gn", 12)  # default 8 groups
    msg = str(info.value)
    assert "8 groups do not divide 12 channels" in msg and "(1, 2, 3, 4, 6, 12)" in msg and "\n" not in msg
    with pytest.raises(NormlabError, match="5 groups do not divide 16"):
        GroupNorm2d(16, num_groups=5)
    with pytest.raises(NormlabError):
        GroupNorm2d(16, 0)
    assert GroupNorm2d(16).num_groups == 8 and GroupNorm2d(12, 3).num_groups == 3


@pytest.mark.parametrize("cls", [BatchNorm2d, BatchInstanceNorm2d])
def test_batchnorm_single_value_per_channel_raises(cls):
    m = cls(3).train()
    with pytest.raises(NormlabError) as info:
        m(torch.randn(1, 3, 1, 1))
    assert "\n" not in str(info.value) and "batch size of 2" in str(info.value)
    m.eval()(torch.randn(1, 3, 1, 1))  # eval uses running stats: fine


def test_wrong_input_is_a_clear_error():
    with pytest.raises(NormlabError, match="4D"):
        LayerNorm2d(4)(torch.randn(2, 4))
    with pytest.raises(NormlabError, match="built for 4 channels but got 5"):
        BatchNorm2d(4)(torch.randn(2, 5, 3, 3))


# ---------------------------------------------------------------------- equality with native layers

SHAPES = [((8, 16, 8, 8), False), ((3, 12, 5, 7), False), ((8, 16, 8, 8), True), ((4, 12, 5, 7), True)]


@pytest.mark.parametrize("shape,cl", SHAPES)
def test_batchnorm_matches_native(shape, cl):
    c = shape[1]
    ours, ref = BatchNorm2d(c), nn.BatchNorm2d(c)
    randomize_affine(ours, ref)
    for step in range(3):  # different inputs each step: running stats must track identically
        assert_same_step(ours, ref, make_input(shape, cl, seed=step), seed=10 + step)
    close(ours.running_mean, ref.running_mean)
    close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    assert ours.num_batches_tracked.dtype == torch.long
    ours.eval(), ref.eval()
    assert_same_step(ours, ref, make_input(shape, cl, seed=7))


@pytest.mark.parametrize("cl", [False, True])
def test_batchnorm_running_stats_of_another_dtype(cl):
    """float64 running buffers on a float32 layer (the kernels update only buffers in the compute dtype):
    the update still matches nn.BatchNorm2d's, and the buffers keep their dtype."""
    ours, ref = BatchNorm2d(6), nn.BatchNorm2d(6)
    ours.running_mean, ours.running_var = ours.running_mean.double(), ours.running_var.double()
    for step in range(2):
        xi = make_input((4, 6, 5, 3), cl, seed=step).detach()
        close(ours.train()(xi), ref.train()(xi))
    assert ours.running_mean.dtype == ours.running_var.dtype == torch.float64
    close(ours.running_mean.float(), ref.running_mean)
    close(ours.running_var.float(), ref.running_var)


def test_batchnorm_state_dict_interchangeable_and_options():
    ours, ref = BatchNorm2d(6), nn.BatchNorm2d(6)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.train()(torch.randn(4, 6, 3, 3) * 3 + 1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 3, 3)
    close(ours.eval()(x), ref.eval()(x))
    ref.load_state_dict(ours.state_dict())
    # momentum=None (cumulative average), no affine, no running stats
    for kw in ({"momentum": None}, {"affine": False}, {"track_running_stats": False}):
        a, b = BatchNorm2d(6, **kw), nn.BatchNorm2d(6, **kw)
        for s in range(2):
            xi = make_input((4, 6, 3, 3), seed=s).detach()
            close(a.train()(xi), b.train()(xi))
        close(a.eval()(x), b.eval()(x))
        if kw.get("momentum", 0) is None:
            close(a.running_mean, b.running_mean)
            close(a.running_var, b.running_var)


@pytest.mark.parametrize("shape,cl", SHAPES + [((1, 12, 5, 7), False), ((1, 16, 4, 4), True)])
def test_instancenorm_matches_native(shape, cl):
    c = shape[1]
    ours, ref = InstanceNorm2d(c), nn.InstanceNorm2d(c, affine=True)
    randomize_affine(ours, ref)
    assert_same_step(ours, ref, make_input(shape, cl))
    ours.eval(), ref.eval()  # no running stats: eval == train
    assert_same_step(ours, ref, make_input(shape, cl, seed=3))


@pytest.mark.parametrize("shape,cl", SHAPES + [((1, 12, 5, 7), False)])
def test_layernorm_matches_groupnorm_1(shape, cl):
    c = shape[1]
    ours, ref = LayerNorm2d(c), nn.GroupNorm(1, c)
    randomize_affine(ours, ref)
    assert_same_step(ours, ref, make_input(shape, cl))
    ours.eval(), ref.eval()
    assert_same_step(ours, ref, make_input(shape, cl, seed=3))


@pytest.mark.parametrize("shape,cl,groups", [
    ((8, 16, 8, 8), False, None), ((8, 16, 8, 8), True, 8), ((3, 12, 5, 7), False, 4),
    ((3, 12, 5, 7), True, 3), ((1, 12, 5, 7), False, 4), ((2, 12, 5, 7), False, 12), ((2, 12, 5, 7), False, 1),
])
def test_groupnorm_matches_native(shape, cl, groups):
    c = shape[1]
    ours = GroupNorm2d(c, groups) if groups is not None else GroupNorm2d(c)
    ref = nn.GroupNorm(groups or 8, c)
    randomize_affine(ours, ref)
    assert_same_step(ours, ref, make_input(shape, cl))
    ours.eval(), ref.eval()
    assert_same_step(ours, ref, make_input(shape, cl, seed=3))


@pytest.mark.parametrize("shape,cl", SHAPES)
def test_bin_with_rho_1_is_batchnorm(shape, cl):
    c = shape[1]
    ours, ref = BatchInstanceNorm2d(c), nn.BatchNorm2d(c)
    randomize_affine(ours, ref)
    assert torch.equal(ours.rho.detach(), torch.ones(c))  # initialised to 1
    for step in range(3):
        assert_same_step(ours, ref, make_input(shape, cl, seed=step), seed=10 + step)
    close(ours.running_mean, ref.running_mean)
    close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 3
    ours.eval(), ref.eval()
    assert_same_step(ours, ref, make_input(shape, cl, seed=7))


@pytest.mark.parametrize("shape,cl", SHAPES)
def test_bin_with_rho_0_is_instancenorm(shape, cl):
    c = shape[1]
    ours, ref = BatchInstanceNorm2d(c), nn.InstanceNorm2d(c, affine=True)
    randomize_affine(ours, ref)
    with torch.no_grad():
        ours.rho.zero_()
    assert_same_step(ours, ref, make_input(shape, cl))
    ours.eval(), ref.eval()
    assert_same_step(ours, ref, make_input(shape, cl, seed=3))


def test_bin_mixes_the_two_branches():
    torch.manual_seed(0)
    x = make_input((4, 6, 3, 5)).detach()
    bn, inn, bin_ = BatchNorm2d(6), InstanceNorm2d(6), BatchInstanceNorm2d(6)
    randomize_affine(bn, inn, bin_)
    rho = torch.rand(6)
    with torch.no_grad():
        bin_.rho.copy_(rho)
        bn.bias.zero_(), inn.bias.zero_()
    want = rho.view(1, -1, 1, 1) * bn(x) + (1 - rho.view(1, -1, 1, 1)) * inn(x) + bin_.bias.view(1, -1, 1, 1)
    close(bin_(x), want)


def test_clamp_gates_clamps_every_rho():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchInstanceNorm2d(4), nn.Sequential(BatchInstanceNorm2d(4)))
    for m in (model[1], model[2][0]):
        with torch.no_grad():
            m.rho.copy_(torch.tensor([-0.5, 0.25, 1.0, 1.7]))
    x = torch.randn(2, 4, 3, 3)
    y_out_of_range = model[1](x)
    assert clamp_gates_(model) is model
    for m in (model[1], model[2][0]):
        assert torch.equal(m.rho.detach(), torch.tensor([0.0, 0.25, 1.0, 1.0]))
        assert m.rho.requires_grad
    close(model[1](x), y_out_of_range)  # forward already used the clamped gate


def test_inputs_keep_memory_format_for_every_layer():
    x = make_input((2, 8, 4, 6), channels_last=True).detach()
    for name in ("bn", "in", "bin", "ln", "gn"):
        for mode in (True, False):
            y = make_norm(name, 8).train(mode)(x)
            assert y.is_contiguous(memory_format=torch.channels_last), (name, mode)
    y = make_norm("gn", 8)(x.contiguous())
    assert y.is_contiguous()


# ------------------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("name,make,shape", [
    ("bn", lambda: BatchNorm2d(3), (4, 3, 3, 2)),
    ("bn-noaffine", lambda: BatchNorm2d(3, affine=False), (3, 3, 2, 2)),
    ("in", lambda: InstanceNorm2d(3), (2, 3, 3, 2)),
    ("ln", lambda: LayerNorm2d(3), (2, 3, 2, 3)),
    ("gn", lambda: GroupNorm2d(4, 2), (2, 4, 2, 3)),
    ("bin", lambda: BatchInstanceNorm2d(3), (3, 3, 2, 2)),
])
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck(name, make, shape, train):
    m = to_double(make()).train(train)
    if name.startswith("bn") or name == "bin":  # non-trivial running stats for eval
        with torch.no_grad():
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = tuple(m.parameters())
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)
    if name == "gn" and train:  # channels_last input
        xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(f, (xcl, *params), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------- fused BatchNorm + ReLU (+ residual)

@pytest.mark.parametrize("name", list(FUSABLE))
@pytest.mark.parametrize("shape,cl", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_forward_relu_equals_native_norm_add_relu(name, shape, cl, residual):
    """``forward_relu`` (the ResNet block's fused ``relu(norm(x) + r)``): output, input, residual, weight
    and bias gradients (and BN's running statistics) as the native norm followed by the add and the ReLU."""
    c = shape[1]
    ours, ref = FUSABLE[name][0](c), FUSABLE[name][1](c)
    randomize_affine(ours, ref)
    for step in range(2):
        x = make_input(shape, cl, seed=step).detach()
        r = make_input(shape, cl, seed=20 + step).detach() if residual else None
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(30 + step))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ra, rb = (r.clone().requires_grad_(), r.clone().requires_grad_()) if residual else (None, None)
        ours.zero_grad(), ref.zero_grad()
        ya = ours.forward_relu(xa, ra)
        yb = torch.relu(ref(xb) + rb) if residual else torch.relu(ref(xb))
        ya.backward(dy)
        yb.backward(dy)
        assert (ya == 0).float().mean() > 0.2 and (ya > 0).float().mean() > 0.2  # the mask matters
        close(ya, yb)
        close(xa.grad, xb.grad)
        if residual:
            close(ra.grad, rb.grad)
        close(ours.weight.grad, ref.weight.grad)
        close(ours.bias.grad, ref.bias.grad)
        if cl:
            assert ya.is_contiguous(memory_format=torch.channels_last)
    if name == "bn":
        close(ours.running_mean, ref.running_mean)
        close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()  # eval (BN: the unfused composition on running statistics)
    close(ours.forward_relu(x, r), torch.relu(ref(x) + r) if residual else torch.relu(ref(x)))


@pytest.mark.parametrize("fn", ["bn", "gn"])
@pytest.mark.parametrize("cl", [False, True])
def test_gradcheck_fused_norm_relu_residual(fn, cl):
    g = torch.Generator().manual_seed(2)
    x, r = (torch.randn(4, 4, 3, 2, dtype=torch.float64, generator=g) for _ in range(2))
    if cl:
        x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    x, r = x.requires_grad_(), r.requires_grad_()
    w = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()

    def f(x, r, w, b):
        if fn == "bn":
            return _functional.BatchNormFunction.apply(x, w, b, None, None, 0.0, 1e-5, False, r, True)
        return _functional.GroupNormFunction.apply(x, w, b, 2, 1e-5, r, True)

    assert torch.autograd.gradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("norm,cl,shortcut", [
    ("bn", False, "A"), ("bn", True, "A"), ("bn", False, "B"), ("bn", True, "B"),
    ("gn", True, "A"), ("ln", False, "B"), ("in", True, "B"), ("ln", True, "A")])
def test_resnet_fused_blocks_train_as_unfused(norm, cl, shortcut):
    """Two SGD steps of a ResNet with fused blocks and of the same ResNet unfused: bit-identical losses,
    weights and running statistics in fp32 (the option-A shortcut's zero-padded residual arrives in NCHW:
    converted)."""
    a, b = fused_and_unfused(shortcut=shortcut, norm=norm)
    fmt = torch.channels_last if cl else torch.contiguous_format
    a, b = a.to(memory_format=fmt), b.to(memory_format=fmt)
    blocks = [m for m in a.modules() if hasattr(m, "fused")]
    assert blocks and all(m.fused() for m in blocks)
    assert not any(m.fused() for m in b.modules() if hasattr(m, "fused"))
    assert_train_alike(a, b, fmt)


def test_resnet_fused_blocks_under_bf16_autocast():
    """bf16 autocast: the fused ResNet's output and gradients are as close to the fp32 ones as the unfused
    ResNet's (bf16 gradients are ~10% off either way; a wrong fused path would be far off)."""
    a, b = fused_and_unfused()
    ref, _ = fused_and_unfused(fuse=False)
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    outs = []
    for m, bf16 in ((a, True), (b, True), (ref, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x)
        out.float().pow(2).mean().backward()
        outs.append(out.float())
    assert a.stages[0][0].fused() and outs[0].dtype == torch.float32
    err = [(o - outs[2]).norm() / outs[2].norm() for o in outs[:2]]
    assert err[0] <= 1.25 * err[1] + 0.01, err
    for (name, pa), pb, pr in zip(a.named_parameters(), b.parameters(), ref.parameters()):
        assert torch.isfinite(pa.grad).all()
        ea, eb = ((p.grad - pr.grad).norm() / pr.grad.norm() for p in (pa, pb))
        # 1.5: stages.0.0.bn1.weight sits at ea/eb ~ 1.34 (0.143 vs 0.106, bf16 rounding noise), with the
        # kernels' plain sums and with their shifted sums alike
        assert ea <= 1.5 * eb + 0.01, (name, ea, eb)


def test_fused_blocks_step_aside_for_hooks_eval_and_other_layers():
    """Hooks on a block's norms or ReLUs (feature probes, Grad-CAM, users) see the unfused outputs: the
    norm's own output before the add. Eval mode, other norms and other activations do not fuse."""
    from normlab.models.resnet import ResNet

    model = ResNet(1, 10)
    blk = model.stages[0][0]
    assert blk.fused()
    seen = {}
    h = blk.bn2.register_forward_hook(lambda _m, _i, o: seen.__setitem__("bn2", o.detach().clone()))
    assert not blk.fused()
    model(torch.randn(8, 3, 8, 8))
    assert (seen["bn2"] < 0).any()  # the norm's output, before the add and the ReLU
    close(seen["bn2"].mean((0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)  # normalized per channel
    h.remove()
    assert blk.fused()
    h = blk.act2.register_full_backward_hook(lambda *_: None)  # any module hook (global ones: test_models.py)
    assert not blk.fused()
    h.remove()
    assert blk.fused()
    assert not model.eval().stages[0][0].fused()
    for kw in ({"norm": "torch_bn"}, {"norm": "ln2d"}, {"norm": "nn"}, {"activation": "gelu"}, {"fuse": False}):
        assert not ResNet(1, 10, **kw).stages[0][0].fused(), kw
    # normlab's norms with forward_relu: the course norms and the specs (BIN's override runs the ops in turn)
    assert all(ResNet(1, 10, norm=n).stages[0][0].fused() for n in ("bn", "gn", "ln", "in", "bin", "sn", "rms"))


def test_stem_fuses_its_norm_and_relu_like_the_blocks():
    """The stem (still an nn.Sequential: parameter names ``stem.0``/``stem.1``) calls its norm's
    ``forward_relu`` in training: the same output as conv -> norm -> ReLU, and no separate ReLU runs. A hook
    on its norm sees the norm's own output (negative values: before the ReLU), and eval does not fuse."""
    from normlab.models.resnet import ResNet

    torch.manual_seed(0)
    model, ref = ResNet(1, 10), ResNet(1, 10, fuse=False)
    ref.load_state_dict(model.state_dict())
    assert "stem.1.weight" in model.state_dict() and model.stem.fused() and not ref.stem.fused()
    calls = []
    relu_forward = model.stem[2].forward
    model.stem[2].forward = lambda t: calls.append(1) or relu_forward(t)  # an instance attribute, not a hook
    x = torch.randn(8, 3, 8, 8)
    out = model.stem(x)
    assert not calls  # the fused path ran
    assert torch.equal(out, ref.stem(x))
    seen = {}
    h = model.stem[1].register_forward_hook(lambda _m, _i, o: seen.__setitem__("norm", o.detach().clone()))
    assert not model.stem.fused()
    assert torch.equal(model.stem(x), out) and calls and (seen["norm"] < 0).any()
    h.remove()
    assert model.stem.fused() and not model.eval().stem.fused()


# ------------------------------------------------------------------------------ mixed precision

@pytest.mark.parametrize("name", ["bn", "in", "bin", "ln", "gn"])
def test_bf16_autocast_is_finite_and_close_with_fp32_stats(name):
    torch.manual_seed(0)
    x32 = make_input((8, 16, 6, 6)).detach()
    ref, ref32, m = make_norm(name, 16), make_norm(name, 16), make_norm(name, 16)
    randomize_affine(ref, ref32, m)
    want = ref.train()(x32.bfloat16().float())  # fp32 on exactly the same (bf16-rounded) values
    x = x32.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m.train()(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    close(y.float(), want, atol=0.05, rtol=0.02)  # only the final rounding to bf16 differs
    close(y.float(), ref32.train()(x32), atol=0.1, rtol=0.05)  # and close to the all-fp32 result
    if name in ("bn", "bin"):
        # statistics accumulated in fp32: running stats agree to fp32 precision, not bf16 precision
        assert m.running_mean.dtype == torch.float32
        close(m.running_mean, ref.running_mean, atol=1e-6, rtol=1e-5)
        close(m.running_var, ref.running_var, atol=1e-6, rtol=1e-5)
    y.float().pow(2).mean().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert m.weight.grad.dtype == torch.float32 and torch.isfinite(m.weight.grad).all()


def test_bf16_autocast_through_a_conv():
    conv, norm = nn.Conv2d(3, 8, 3, padding=1), GroupNorm2d(8, 4)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(conv(x))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    close(y.float(), norm(conv(x)), atol=0.1, rtol=0.05)


# ------------------------------------------------------------------------- upstream gradient layout

@pytest.mark.parametrize("make,ref", [
    (lambda: BatchNorm2d(12), lambda: nn.BatchNorm2d(12)),
    (lambda: GroupNorm2d(12, 4), lambda: nn.GroupNorm(4, 12)),
    (lambda: LayerNorm2d(12), lambda: nn.GroupNorm(1, 12)),
])
@pytest.mark.parametrize("x_cl", [False, True])
def test_upstream_gradient_in_another_layout(make, ref, x_cl):
    """dy arrives in the other memory format (or expanded, stride 0): same gradients as native."""
    ours, theirs = make(), ref()
    randomize_affine(ours, theirs)
    x = make_input((6, 12, 5, 7), x_cl)
    for dy in (torch.randn(6, 12, 5, 7).contiguous(memory_format=torch.contiguous_format if x_cl
                                                   else torch.channels_last),
               torch.tensor(0.5).expand(6, 12, 5, 7)):
        got, want = run(ours, x, dy), run(theirs, x, dy)
        for a, b in zip(got, want):
            # a constant dy makes the weight gradient a float32 sum of 210 values that cancels to 0: native's
            # own rounding there reaches ~1e-5 (at 1 thread), hence the wider atol
            close(a, b, atol=5e-5)


# ---------------------------------------------------------------------------------- source rules

def test_sources_do_not_call_native_norm_kernels():
    src = Path(norms.__file__).parent
    files = sorted(src.glob("*.py"))
    assert len(files) >= 6
    banned = re.compile(r"F\.(batch|group|layer|instance)_norm|torch\.(batch|group|layer|instance)_norm"
                        r"|torch\.native_\w*norm|nn\.(BatchNorm2d|GroupNorm|LayerNorm|InstanceNorm2d)\(")
    for f in files:
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            code = re.sub(r"``[^`]*``", "", line)  # docstrings may *name* the native layers in ``...``
            if banned.search(code):
                # the only exception: the "torch_bn" registry entry
                assert f.name == "native.py" and "return nn.BatchNorm2d(num_channels, **kw)" in line, \
                    f"{f.name}:{lineno}: {line.strip()}"


# --------------------------------------------------------------------------------------- sync BN

def _sync_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        x_full = torch.randn(16, 4, 5, 3, generator=g) * 2 + 1
        dy_full = torch.randn(16, 4, 5, 3, generator=g)
        part = slice(rank * 8, (rank + 1) * 8)
        results = {}
        for name in ("bn", "bin"):
            for sync in (True, False):
                m = make_norm(name, 4, sync=sync)
                randomize_affine(m)
                if name == "bin":
                    with torch.no_grad():
                        m.rho.copy_(torch.tensor([1.0, 0.7, 0.3, 0.0]))
                for step in range(2):
                    x = (x_full[part] + step).clone().requires_grad_()
                    m.zero_grad()
                    y = m(x)
                    y.backward(dy_full[part])
                results[(name, sync)] = {"y": y.detach(), "dx": x.grad, "rm": m.running_mean.clone(),
                                         "rv": m.running_var.clone(), "dw": m.weight.grad.clone()}
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks tear gloo down together (see tests/test_distributed.py's worker)
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_equals_full_batch(tmp_path):
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(16, 4, 5, 3, generator=g) * 2 + 1
    dy_full = torch.randn(16, 4, 5, 3, generator=g)
    for name in ("bn", "bin"):
        ref = make_norm(name, 4)
        randomize_affine(ref)
        if name == "bin":
            with torch.no_grad():
                ref.rho.copy_(torch.tensor([1.0, 0.7, 0.3, 0.0]))
        for step in range(2):
            x = (x_full + step).clone().requires_grad_()
            ref.zero_grad()
            y = ref(x)
            y.backward(dy_full)
        synced = [r[(name, True)] for r in ranks]
        close(torch.cat([s["y"] for s in synced]), y.detach())
        close(torch.cat([s["dx"] for s in synced]), x.grad)
        close(synced[0]["dw"] + synced[1]["dw"], ref.weight.grad)  # local grads; DDP sums/averages them
        for s in synced:
            close(s["rm"], ref.running_mean)
            close(s["rv"], ref.running_var)
        local = ranks[0][(name, False)]
        assert not torch.allclose(local["rv"], ref.running_var, atol=1e-3)
        assert not torch.allclose(local["y"], y.detach()[:8], atol=1e-3)


def test_sync_is_a_no_op_without_distributed():
    x = make_input((4, 3, 3, 3)).detach()
    a, b = BatchNorm2d(3, sync=True), BatchNorm2d(3)
    close(a(x), b(x))
    close(a.running_var, b.running_var)


def test_bin_gate_gets_a_gradient_at_its_initial_bound_and_moves():
    """rho starts at exactly 1: the gate must still receive a gradient there (torch.clamp's is 0)."""
    from normlab.norms import BatchInstanceNorm2d, clamp_gates_

    torch.manual_seed(0)
    m = BatchInstanceNorm2d(4)
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    y = m(x)
    (y * torch.randn_like(y)).sum().backward()
    assert m.rho.grad is not None and m.rho.grad.abs().sum() > 0
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    target = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)  # an IN-like target pulls rho down
    for _ in range(20):
        opt.zero_grad()
        ((m(x) - target) ** 2).mean().backward()
        opt.step()
        clamp_gates_(m)
    assert (m.rho < 0.99).all() and (m.rho >= 0).all() and (m.rho <= 1).all()


# --------------------------------------------------------------------------------------- other devices

@pytest.mark.parametrize("name", NAMES)
def test_norms_and_resnet_run_on_a_non_cpu_device(name):
    """No GPU here, so the device-agnostic path is checked on PyTorch's "meta" device (shapes only, no
    data): every norm and the ResNet train forward + backward and eval there, in channels_last, through
    the tensor-op path -- a CPU-only call (data_ptr, item, numpy, the C++ kernels) would fail."""
    from normlab.models.resnet import ResNet

    x = torch.randn(4, 8, 5, 5, device="meta", requires_grad=True)
    assert _functional.fast_layout(x) is None
    m = make_norm(name, 8, num_groups=4).to("meta")
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and y.device.type == "meta" and x.grad.device.type == "meta"
    assert m.eval()(x).shape == x.shape
    model = ResNet(1, 10, norm=name).to("meta").to(memory_format=torch.channels_last)
    out = model(torch.randn(4, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last))
    out.sum().backward()
    assert out.shape == (4, 10)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------ large means, host syncs, factory keywords, interop

@pytest.mark.parametrize("name", ["bn", "gn", "in", "ln", "bin"])
@pytest.mark.parametrize("cl", [False, True])
def test_statistics_exact_for_large_mean_inputs(name, cl, norm_path):
    """|mean|/std = 1000 (float32): outputs and running variance as close to a float64 reference as native
    float32 layers get (one-pass float32 sums of x and x² were off by ~5e-2 there). The tensor-op path, the
    C++ kernels and the Triton kernels (test_triton_norms.py) all use shifted sums."""
    x = make_input((8, 16, 6, 6), cl).detach() * 0.5 + 1000.0
    kw = {"momentum": 1.0} if name in ("bn", "bin") else {}
    ours = make_norm(name, 16, **kw)
    ref = {"bn": lambda: nn.BatchNorm2d(16, momentum=1.0), "bin": lambda: nn.BatchNorm2d(16, momentum=1.0),
           "gn": lambda: nn.GroupNorm(8, 16), "in": lambda: nn.GroupNorm(16, 16), "ln": lambda: nn.GroupNorm(1, 16)}
    nat32, nat64 = ref[name](), ref[name]().double()
    xo = x.clone().requires_grad_()
    y = ours(xo)
    want = nat64(x.double())
    err_ours = (y.double() - want).abs().max().item()
    err_native = (nat32(x).double() - want).abs().max().item()
    assert err_ours <= max(2 * err_native, 1e-3), (err_ours, err_native)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    y.backward(dy)
    x64 = x.double().requires_grad_()
    nat64(x64).backward(dy.double())
    assert (xo.grad.double() - x64.grad).abs().max().item() < 5e-3 * x64.grad.abs().max().item()
    if name in ("bn", "bin"):
        rel = ((ours.running_var.double() - nat64.running_var) / nat64.running_var).abs().max().item()
        rel_native = ((nat32.running_var.double() - nat64.running_var) / nat64.running_var).abs().max().item()
        assert rel <= max(2 * rel_native, 1e-3), (rel, rel_native)


@pytest.mark.parametrize("name", ["bn", "gn", "in", "ln"])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_gradients_exact_for_large_mean_inputs(name, cl, relu, norm_path):
    """|mean|/std = 1000 (float32): input, weight and bias gradients (plain and with the fused ReLU) as close
    to a float64 reference as native float32 layers get in NCHW. The backward sums are centred on the mean
    value by value (sum dy*(x - mean)): sum(dy*x) - mean*sum(dy) of float runs was off by ~1e-1 there."""
    c = 16
    groups = {"bn": None, "gn": 8, "in": c, "ln": 1}[name]
    x = make_input((8, c, 6, 6), cl).detach() * 0.5 + 1000.0
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ours = make_norm(name, c)
    nat32, nat64 = (nn.BatchNorm2d(c) if groups is None else nn.GroupNorm(groups, c) for _ in range(2))
    nat64.double()
    randomize_affine(ours, nat32, nat64)
    grads = []
    for m, xx, d in ((ours, x, dy), (nat32, x.contiguous(), dy), (nat64, x.double(), dy.double())):
        xx = xx.clone().requires_grad_()
        y = (m.forward_relu(xx) if m is ours else torch.relu(m(xx))) if relu else m(xx)
        y.backward(d)
        grads.append([t.double() for t in (xx.grad, m.weight.grad, m.bias.grad)])
    for what, a, b, want in zip(("input", "weight", "bias"), grads[0], grads[1], grads[2]):
        err = ((a - want).abs().max() / want.abs().max()).item()
        err_native = ((b - want).abs().max() / want.abs().max()).item()
        assert err <= max(2 * err_native, 1e-4), (what, err, err_native)


@pytest.mark.parametrize("cls", [BatchNorm2d, BatchInstanceNorm2d])
@pytest.mark.parametrize("relu", [False, True])
def test_synced_batchnorm_has_no_host_sync(cls, relu, norm_path, monkeypatch):
    """Synced BN with a (mocked) world of two ranks holding the same batch: outputs, input gradients and
    running statistics equal native BN on the doubled batch, and the tensor-op path never reads a tensor on
    the host (no ``.item()``: the global count stays a device tensor, so CUDA never waits and torch.compile
    does not break its graph)."""
    c = 6
    monkeypatch.setattr(_functional, "distributed_active", lambda: True)
    monkeypatch.setattr(_functional, "_all_reduce", lambda t: t.mul_(2))
    monkeypatch.setattr(_functional, "_broadcast", lambda t: t)  # both ranks hold the same batch
    if norm_path == "ops":
        def no_item(self):
            raise AssertionError("host sync: .item() in synced BN")
        monkeypatch.setattr(torch.Tensor, "item", no_item)
    ours = cls(c, sync=True) if cls is BatchNorm2d else cls(c, sync=True)
    ref = nn.BatchNorm2d(c)
    randomize_affine(ours, ref)
    x = make_input((4, c, 5, 5)).detach() + 50.0
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    xo = x.clone().requires_grad_()
    y = ours.forward_relu(xo) if relu and cls is BatchNorm2d else ours(xo)
    y.backward(dy)
    monkeypatch.undo()
    x2 = torch.cat([x, x]).requires_grad_()
    y2 = ref(x2)
    if relu and cls is BatchNorm2d:
        y2 = torch.relu(y2)
    y2.backward(torch.cat([dy, dy]))
    close(y, y2[:4].detach(), atol=1e-4, rtol=1e-4)
    close(xo.grad, x2.grad[:4], atol=1e-4, rtol=1e-4)
    close(ours.running_mean, ref.running_mean, atol=1e-4, rtol=1e-5)
    close(ours.running_var, ref.running_var, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["bn", "in", "bin", "ln", "gn", "nn", "torch_bn"])
def test_every_norm_takes_device_and_dtype_factory_keywords(name):
    m = make_norm(name, 8, device="cpu", dtype=torch.float64)
    for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
        assert t.dtype == torch.float64 and t.device.type == "cpu"
    meta = make_norm(name, 8, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    assert m(x).dtype == torch.float64


def test_norm_layer_factory_builds_norms_and_norm_act_layers():
    """The factory keeps its bound settings (here num_groups), takes timm's device/dtype keywords, builds a
    NormAct2d with the activation each call names, and refuses a norm+act request that names none."""
    f = norm_layer("gn", num_groups=2)
    assert norm_layer("gn", num_groups=2) is f  # one factory per setting (timm registers it once)
    m = f(8, device="cpu", dtype=torch.float32)
    assert isinstance(m, GroupNorm2d) and m.num_groups == 2
    with pytest.raises(NormlabError, match="without its activation"):
        f(8, apply_act=True, inplace=True)  # a norm+act request without the activation: refused, one line
    na = f(8, act_layer=nn.SiLU, inplace=True)
    assert isinstance(na, norms.NormAct2d) and isinstance(na.act, nn.SiLU) and isinstance(na.norm, GroupNorm2d)
    assert na.weight is na.norm.weight and na.bias is na.norm.bias
    assert isinstance(norm_layer("bn")(8, act_layer=nn.ReLU, apply_act=False).act, nn.Identity)
    with pytest.raises(NormlabError, match="takes no act_layer"):  # a bound activation would override the model's
        norm_layer("gn", act_layer=nn.ReLU)


@pytest.mark.parametrize("name", ["in", "gn", "ln"])
def test_per_sample_norms_refuse_single_value_statistics(name):
    """As native InstanceNorm2d ("Expected more than 1 spatial element"): statistics over one value make the
    output the bias for every input; a one-line error names it (a shape check: no device sync)."""
    channels = 1 if name == "ln" else 8
    m = make_norm(name, channels, num_groups=channels)  # gn: one channel per group, so IN's case
    for mode in (m.train, m.eval):
        mode()
        with pytest.raises(NormlabError, match=r"got 1x1 maps .*bias whatever the input"):
            m(torch.randn(4, channels, 1, 1))
    m.train()
    assert m(torch.randn(4, channels, 1, 2)).shape == (4, channels, 1, 2)  # two values: fine
    if name != "ln":
        assert make_norm("gn", 8, num_groups=4)(torch.randn(2, 8, 1, 1)).shape == (2, 8, 1, 1)  # 2 channels/group


def test_no_norm_refuses_a_model_reaching_for_its_affine():
    from torchvision.models import resnet18

    with pytest.raises(norms.NoAffineError, match=r"^norm 'nn' \(no normalization\) has no weight: .*zero_init_residual"):
        resnet18(norm_layer=norm_layer("nn"), zero_init_residual=True)
    model = resnet18(norm_layer=norm_layer("nn"), num_classes=3)  # without zero-init: an identity
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert getattr(model.bn1, "weight", None) is None and not hasattr(model.bn1, "bias")


def test_clamp_gates_walks_the_model_once(monkeypatch):
    from normlab.models.resnet import ResNet

    model = ResNet(1, 10, norm="bin")
    walks = []
    real = nn.Module.modules
    monkeypatch.setattr(nn.Module, "modules", lambda self: walks.append(1) or real(self))
    gates = [m.rho for m in real(model) if isinstance(m, BatchInstanceNorm2d)]
    for step in range(3):
        with torch.no_grad():
            for g in gates:
                g.fill_(2.0 if step % 2 else -1.0)
        clamp_gates_(model)
        assert all(((g >= 0) & (g <= 1)).all() for g in gates)
    assert len(walks) == 1
    clamp_gates_(model, refresh=True)
    assert len(walks) == 2


def test_fusion_is_decided_on_mode_and_layer_changes():
    from normlab.models.resnet import ResNet
    from normlab.registry import ACTIVATIONS

    model = ResNet(1, 10)
    blk = model.stages[0][0]
    assert blk.fused() and model.stem.fused()
    model.eval()
    assert not blk.fused() and not model.stem.fused()
    model.train()
    blk.act2 = nn.GELU()  # another activation swapped in: decided again
    assert not blk.fused()
    blk.act2 = ACTIVATIONS["relu"]()  # the registry's ReLU (a plain nn.ReLU does not fuse: test_models.py)
    assert blk.fused()
    blk.fuse = False
    assert not blk.fused()
    model.stem[1] = nn.BatchNorm2d(16)  # a norm without forward_relu
    assert not model.stem.fused()


# ------------------------------------------------------- BIN's fused Function vs its BN + IN composition

@pytest.mark.parametrize("dtype,offset", [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float32, 1000.0)],
                         ids=["fp32", "bf16", "fp32_large_mean"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_fused_bin_equals_its_bn_plus_in_composition(dtype, cl, offset, monkeypatch):
    """The fused Function (tensor-op path) gives the composition's outputs, input/weight/bias/rho gradients,
    running statistics and eval outputs and gradients, for fp32 and bf16, NCHW and channels_last, and
    |mean|/std = 500 in fp32 (bf16 cannot hold such inputs: its step at 1000 is 8). Both sides run on the
    tensor ops (the C++ path of the fused Function has its own tests in test_cpp_kernels.py), so the C++
    parametrization repeats the same check."""
    monkeypatch.setenv("NORMLAB_KERNELS", "0")
    c, shape = 12, (6, 12, 5, 7)
    ours, ref = bin_pair(c)
    assert _functional.backend(make_input(shape, cl)) is None
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}[dtype]
    if offset and dtype == torch.float32:  # x ~ 1000 in float32: outputs lose ~1e-7 * 1000 in x*A + B (both)
        tol = dict(atol=1e-3, rtol=1e-3)
    grad_tol = dict(atol=5e-3, rtol=5e-3) if dtype == torch.bfloat16 else tol  # parameter grads: fp32 sums
    fused = lambda m, x: m(x)  # noqa: E731
    for step in range(2):
        x = (make_input(shape, cl, seed=step).detach() + offset).to(dtype)
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step)).to(dtype)
        got, want = bin_step(ours, x, dy, fused), bin_step(ref, x, dy, composed_bin)
        assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == torch.float32
        if cl:
            assert got[0].is_contiguous(memory_format=torch.channels_last)
            assert got[1].is_contiguous(memory_format=torch.channels_last)
        for what, a, b in zip(("y", "dx", "dweight", "dbias", "drho"), got, want):
            t = tol if what in ("y", "dx") else grad_tol
            if what == "dx" and offset:
                t = dict(atol=2e-3 * b.abs().max().item(), rtol=0)
            torch.testing.assert_close(a.float(), b.float(), **t, msg=lambda s, w=what: f"{w}: {s}")
        assert got[4].abs().sum() > 0
        close(ours.running_mean, ref.running_mean, atol=1e-4, rtol=1e-5)
        close(ours.running_var, ref.running_var, atol=1e-4, rtol=1e-4)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2
    ours.eval(), ref.eval()
    x = (make_input(shape, cl, seed=9).detach() + offset).to(dtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    got, want = bin_step(ours, x, dy, fused), bin_step(ref, x, dy, composed_bin)
    for what, a, b in zip(("y", "dx", "dweight", "dbias", "drho"), got, want):
        t = tol if what in ("y", "dx") else grad_tol
        if what == "dx" and offset:
            t = dict(atol=2e-3 * b.abs().max().item(), rtol=0)
        torch.testing.assert_close(a.float(), b.float(), **t, msg=lambda s, w=what: f"eval {w}: {s}")


def test_fused_bin_momentum_none_and_no_tracking(monkeypatch):
    """momentum=None (cumulative average) and running stats removed (batch statistics in eval too): as the
    composition."""
    monkeypatch.setenv("NORMLAB_KERNELS", "0")
    ours, ref = bin_pair(6, momentum=None)
    for step in range(3):
        x, dy = make_input((4, 6, 3, 5), seed=step), torch.randn(4, 6, 3, 5)
        for a, b in zip(bin_step(ours, x, dy, lambda m, x: m(x)), bin_step(ref, x, dy, composed_bin)):
            close(a, b)
    close(ours.running_var, ref.running_var)
    ours.running_mean = ours.running_var = ref.running_mean = ref.running_var = None
    ours.eval(), ref.eval()
    x, dy = make_input((4, 6, 3, 5), seed=5), torch.randn(4, 6, 3, 5)
    for a, b in zip(bin_step(ours, x, dy, lambda m, x: m(x)), bin_step(ref, x, dy, composed_bin)):
        close(a, b)


def test_fused_bin_synced_equals_the_synced_composition(norm_path, monkeypatch):
    """Synced BIN with a mocked world of two ranks holding the same batch (as the BN test above): the fused
    Function all-reduces the same sums as the composition's BN branch, so outputs, gradients and running
    statistics agree with it (test_synced_batchnorm_has_no_host_sync checks ρ = 1 against native BN on the
    doubled batch); no ``.item()``."""
    monkeypatch.setenv("NORMLAB_KERNELS", "0")
    monkeypatch.setattr(_functional, "distributed_active", lambda: True)
    reduced = []
    monkeypatch.setattr(_functional, "_all_reduce", lambda t: reduced.append(t.numel()) or t.mul_(2))
    monkeypatch.setattr(_functional, "_broadcast", lambda t: t)  # the composition's BN: both ranks, one batch
    ours, ref = bin_pair(6, sync=True)
    x = make_input((4, 6, 5, 5), channels_last=norm_path == "cpp").detach() + 50.0  # both layouts over the two params
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with monkeypatch.context() as mp_:
        def no_item(self):
            raise AssertionError("host sync: .item() in synced BIN")

        mp_.setattr(torch.Tensor, "item", no_item)
        got = bin_step(ours, x, dy, lambda m, x: m(x))
    assert reduced == [13, 12]  # forward (sum, sum of squares, count) and backward (two gradient sums)
    want = bin_step(ref, x, dy, composed_bin)
    for a, b in zip(got, want):
        close(a, b, atol=1e-4, rtol=1e-4)
    close(ours.running_mean, ref.running_mean, atol=1e-4, rtol=1e-5)
    close(ours.running_var, ref.running_var, atol=1e-4, rtol=1e-4)


def test_fused_bin_makes_the_sweeps_of_one_batchnorm(monkeypatch):
    """Structure, counted with TorchDispatchMode on the tensor-op path: every op that reads or writes a tensor
    of the input's size. Fused BIN runs exactly BatchNorm2d's ops forward (one statistics sweep: sub, two
    sums, the square; one affine) and backward (one sums sweep, one dx sweep), about half the composition's."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    monkeypatch.setenv("NORMLAB_KERNELS", "0")

    class BigOps(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.ops = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # views move no data (torch 2.4 dispatches a slice for x[:, ::1], newer ones do not)
                return out
            if any(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in tree_leaves((args, kwargs, out))):
                self.ops.append(func.overloadpacket.__name__)
            return out

    def ops(fn, m, x, params):
        x = x.detach().clone().requires_grad_()
        with BigOps(x.numel()) as fwd:
            y = fn(m, x)
        dy = torch.ones_like(y)
        with BigOps(x.numel()) as bwd:
            torch.autograd.grad(y, [x, *params], dy)
        return fwd.ops, bwd.ops

    for cl in (False, True):
        x = make_input((8, 16, 6, 6), cl)
        bin_, ref = bin_pair(16)
        bn = BatchNorm2d(16)
        fused = ops(lambda m, x: m(x), bin_, x, [bin_.weight, bin_.bias, bin_.rho])
        composed = ops(composed_bin, ref, x, [ref.weight, ref.bias, ref.rho])
        plain_bn = ops(lambda m, x: m(x), bn, x, [bn.weight, bn.bias])
        assert fused == plain_bn, (fused, plain_bn)
        sweeps = [[op for op in f if op != "empty_like"] for f in fused]
        assert sweeps == [["sub", "sum", "mul_", "sum", "addcmul"], ["sum", "sub", "mul_", "sum", "addcmul", "addcmul_"]]
        assert len(composed[0]) == 2 * len(fused[0]) + 1 and len(composed[1]) == 2 * len(fused[1]) + 1



# ------------------------------------------------------------------ synced norms: compiled, two ranks

def test_synced_batchnorm_compiles_into_one_graph(monkeypatch):
    """Under torch.compile synced BN skips the shift broadcast (dynamo cannot trace ``dist.broadcast``: a graph
    break per layer, an error with fullgraph) and un-shifts each rank's sums instead; with a mocked world of
    two ranks holding the same batch it still equals native BN on the doubled batch."""
    monkeypatch.setattr(_functional, "distributed_active", lambda: True)
    monkeypatch.setattr(_functional, "_all_reduce", lambda t: t.mul_(2))
    torch._dynamo.reset()
    ours = BatchNorm2d(6, sync=True)
    ref = nn.BatchNorm2d(6)
    randomize_affine(ours, ref)
    x = make_input((4, 6, 5, 5)).detach() + 50.0
    y = torch.compile(ours, backend="eager", fullgraph=True)(x)
    monkeypatch.undo()
    close(y, ref(torch.cat([x, x]))[:4].detach(), atol=1e-4, rtol=1e-4)
    close(ours.running_var, ref.running_var, atol=1e-4, rtol=1e-4)


def _two_ranks(make, xa, xb, dya, dyb, monkeypatch):
    """Rank 0 of a mocked two-rank world whose rank 1 holds a *different* batch ``xb``: every all-reduce adds
    the other rank's local tensor, found by running rank 1's module with the same mock (its forward locals
    first, then its backward locals once rank 0's forward sums are known), and the shift broadcast hands rank
    1 rank 0's shift. Returns rank 0's module, output and input gradient."""
    monkeypatch.setattr(_functional, "distributed_active", lambda: True)
    monkeypatch.setattr(_functional, "_broadcast", lambda t: t.copy_(xa.detach()[0, :, 0, 0].to(t.dtype)))

    def reducer(seen: list, others: list):
        def all_reduce(t):
            seen.append(t.clone())
            return t.add_(others.pop(0)) if others else t
        return all_reduce

    f1, f0, r1 = [], [], []
    monkeypatch.setattr(_functional, "_all_reduce", reducer(f1, []))
    make()(xb.detach().clone())  # rank 1's local forward sums
    monkeypatch.setattr(_functional, "_all_reduce", reducer(f0, [f1[0]]))
    m0, x0 = make(), xa.detach().clone().requires_grad_()
    y0 = m0(x0)
    monkeypatch.setattr(_functional, "_all_reduce", reducer(r1, [f0[0]]))
    x1 = xb.detach().clone().requires_grad_()
    make()(x1).backward(dyb)  # rank 1 with the global statistics: its local backward sums are r1[1]
    b0 = []
    monkeypatch.setattr(_functional, "_all_reduce", reducer(b0, [r1[1]]))
    y0.backward(dya)
    assert (len(f0), len(b0), len(r1)) == (1, 1, 2)  # one all-reduce forward and one backward per rank
    return m0, y0.detach(), x0.grad


@pytest.mark.parametrize("name", ["bn", "bin"])
def test_synced_norms_on_two_ranks_with_different_batches(name, norm_path, monkeypatch):
    """The other synced tests mock two ranks holding the *same* batch, so every rank's shift and sums are equal
    and a mistake in combining different ranks' shifts would pass. Here rank 1 holds another batch (with another
    mean): rank 0's output, input gradient and running statistics equal one process on both batches."""
    c = 6
    xa = make_input((4, c, 5, 5), seed=1).detach() + 50.0
    xb = make_input((3, c, 5, 5), seed=2).detach() * 3 + 40.0
    dya = torch.randn(xa.shape, generator=torch.Generator().manual_seed(3))
    dyb = torch.randn(xb.shape, generator=torch.Generator().manual_seed(4))
    if name == "bn":
        def make():
            m = BatchNorm2d(c, sync=True)
            randomize_affine(m)
            return m
        ref = nn.BatchNorm2d(c)
        randomize_affine(ref)
        fn = ref
    else:
        template, ref = bin_pair(c)
        template.sync = True

        def make():
            import copy
            return copy.deepcopy(template)
        fn = lambda x: composed_bin(ref, x)  # noqa: E731
    m0, y0, g0 = _two_ranks(make, xa, xb, dya, dyb, monkeypatch)
    monkeypatch.undo()
    x = torch.cat([xa, xb]).requires_grad_()
    y = fn(x)
    y.backward(torch.cat([dya, dyb]))
    close(y0, y[:4].detach(), atol=1e-4, rtol=1e-4)
    close(g0, x.grad[:4], atol=1e-4, rtol=1e-4)
    close(m0.running_mean, ref.running_mean, atol=1e-4, rtol=1e-5)
    close(m0.running_var, ref.running_var, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ Triton's gate

@pytest.mark.parametrize("version,usable", [("3.0.0", False), ("3.5.1", False), ("3.6.0", True), ("3.10.0", True)])
def test_triton_older_than_min_triton_is_not_used(version, usable, monkeypatch):
    """The Triton kernels are used only from ``MIN_TRITON`` on (the oldest release they were checked on); an older
    triton (torch 2.4 ships 3.0) leaves the tensor ops in charge."""
    import types

    from normlab.norms import _triton

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(_triton, "_state", {})
    kernels = types.ModuleType("_triton_kernels")  # imports whatever the version: only the gate can say None
    monkeypatch.setitem(sys.modules, "normlab.norms._triton_kernels", kernels)
    monkeypatch.delattr(norms, "_triton_kernels", raising=False)
    assert _triton.kernels() is (kernels if usable else None)
