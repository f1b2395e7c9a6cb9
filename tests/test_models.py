"""The CIFAR ResNet (He et al. 2016 §4.2): depth, parameter counts, shapes, shortcuts, every norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models import ResNet, count_parameters, count_weighted_layers
from normlab.norms import NORMS, clamp_gates_, norm_layer

NAMES = tuple(NORMS)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_weighted_layers_are_6n_plus_2(n):
    assert count_weighted_layers(ResNet(n, 10)) == 6 * n + 2
    assert count_weighted_layers(ResNet(n, 10, shortcut="B")) == 6 * n + 2  # projections not counted


@pytest.mark.parametrize("n,millions", [(3, 0.27), (5, 0.46), (9, 0.85)])
def test_parameter_counts_match_the_paper(n, millions):
    params = count_parameters(ResNet(n, 10, norm="bn"))
    assert abs(params - millions * 1e6) <= 0.01 * millions * 1e6, params


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (256, 3)])
def test_output_shapes_with_every_norm(name, size, channels):
    torch.manual_seed(0)
    model = ResNet(1, 7, norm=name, in_channels=channels).train()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_stage_maps_for_a_256_input():
    model = ResNet(1, 5, norm="gn").eval()
    widths = {}
    for i in range(3):
        model.stages[i].register_forward_hook(lambda m, inp, out, i=i: widths.__setitem__(i, tuple(out.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 256, 256))
    assert widths == {0: (16, 256, 256), 1: (32, 128, 128), 2: (64, 64, 64)}


def test_shortcut_b_works_and_adds_parameters():
    a, b = ResNet(1, 10, shortcut="A"), ResNet(1, 10, shortcut="B")
    assert count_parameters(b) > count_parameters(a)
    # two projections (16->32, 32->64): 1x1 conv weights + BN affine
    assert count_parameters(b) - count_parameters(a) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    out = b.train()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "depth n"), ({"n": -1}, "depth n"), ({"n": True}, "depth n"), ({"n": 1.5}, "depth n"),
    ({"n": 1, "shortcut": "C"}, "shortcut"), ({"n": 1, "norm": "bm"}, "did you mean"),
    ({"n": 1, "norm": "gn", "norm_kwargs": {"num_groups": 5}}, "groups do not divide"),
    ({"n": 1, "activation": "rleu"}, "activation"), ({"n": 1, "num_classes": 1}, "num_classes"),
])
def test_bad_settings_raise_normlab_error(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(NormlabError, match=match):
        ResNet(**kwargs)


def test_norm_kwargs_and_callables_reach_the_layers():
    model = ResNet(1, 10, norm="gn", norm_kwargs={"num_groups": 4, "sync": True})
    assert {m.num_groups for m in model.modules() if hasattr(m, "num_groups")} == {4}
    model = ResNet(1, 10, norm=norm_layer("bn", sync=True))
    assert all(m.sync for m in model.modules() if hasattr(m, "sync"))
    model = ResNet(1, 10, norm=lambda c: nn.GroupNorm(2, c))
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 1 + 2 * 3


@pytest.mark.parametrize("name", NAMES)
def test_training_step_with_every_norm(name):
    torch.manual_seed(0)
    model = ResNet(1, 10, norm=name, norm_kwargs={"num_groups": None, "sync": False}).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        clamp_gates_(model)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    if name == "bin":
        rhos = torch.cat([m.rho.detach() for m in model.modules() if hasattr(m, "rho")])
        assert rhos.min() >= 0 and rhos.max() <= 1


def test_channels_last_model_matches_contiguous():
    torch.manual_seed(0)
    model = ResNet(1, 10, norm="gn").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ fusion and hooks
# The stem and blocks fuse norm + ReLU (+ residual add) in training; a hook on one of those layers turns its
# owner's fusion off when it is registered and back on when its handle is removed (decided then, not per call).

def _pair(**kw):
    """A fused ResNet-8 and the same weights unfused."""
    torch.manual_seed(0)
    a, b = ResNet(1, 10, **kw), ResNet(1, 10, fuse=False, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _fusing(model):
    return {name: m.fused() for name, m in model.named_modules() if hasattr(m, "fused")}


_HOOKS = {  # kind -> register(module, record) -> handle
    "forward_pre": lambda m, rec: m.register_forward_pre_hook(lambda _m, a: rec.append(a[0].detach().clone())),
    "forward": lambda m, rec: m.register_forward_hook(lambda _m, _a, o: rec.append(o.detach().clone())),
    "forward_kwargs": lambda m, rec: m.register_forward_hook(
        lambda _m, _a, _kw, o: rec.append(o.detach().clone()), with_kwargs=True, always_call=True),
    "full_backward": lambda m, rec: m.register_full_backward_hook(lambda _m, _gi, go: rec.append(go[0].clone())),
    "full_backward_pre": lambda m, rec: m.register_full_backward_pre_hook(lambda _m, go: rec.append(go[0].clone())),
    "backward": lambda m, rec: m.register_backward_hook(lambda _m, _gi, go: rec.append(go[0].clone())),
}
# (hooked layer, its owner, hook kinds): torch itself refuses backward hooks on a layer whose output an in-place
# ReLU overwrites (the ReLUs, and a norm followed directly by one), fused or not, so those pairs are left out
_TARGETS = [("stages.0.0.bn2", "stages.0.0", list(_HOOKS)), ("stem.1", "stem", ["forward_pre", "forward"]),
            ("stages.1.0.act1", "stages.1.0", ["forward_pre", "forward_kwargs"]), ("stem.2", "stem", ["forward"])]


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook")  # torch's, for register_backward_hook
@pytest.mark.parametrize("target,owner,kind", [(t, o, k) for t, o, kinds in _TARGETS for k in kinds])
def test_a_hook_added_after_train_unfuses_its_owner_until_removed(kind, target, owner):
    """A hook registered on a fused norm or ReLU after ``train()`` turns off its owner's fusion (only its owner's)
    and fires exactly as on the unfused model, with the same values; its handle's ``remove()`` fuses again."""
    register = _HOOKS[kind]
    a, b = _pair()
    a.train(), b.train()
    assert all(_fusing(a).values())
    seen = {"a": [], "b": []}
    handles = [register(m.get_submodule(target), seen[k]) for k, m in (("a", a), ("b", b))]
    assert _fusing(a) == {name: name != owner for name in _fusing(a)}
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    for m in (a, b):
        nn.functional.cross_entropy(m(x), y).backward()
    assert len(seen["a"]) == len(seen["b"]) == 1
    torch.testing.assert_close(seen["a"][0], seen["b"][0])
    if kind.startswith("forward") and target.endswith(("bn2", ".1")):
        assert (seen["a"][0] < 0).any()  # the norm's own output or input, not a fused ReLU's
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    handles[0].remove()
    handles[0].remove()  # a second remove() changes nothing
    assert all(_fusing(a).values())
    nn.functional.cross_entropy(a(x), y).backward()
    assert len(seen["a"]) == 1  # removed: not called again


def test_recording_a_layer_unfuses_only_its_owner_while_recording(tmp_path):
    """``record_outputs`` (the probes' one way to read layers) hooks through the layers' own methods: the block
    whose norm is recorded stops fusing for the recording, the recorded values are the unfused model's, and
    on exit -- also after an exception in the forward pass -- no hook is left and every block fuses again."""
    from normlab.layer_outputs import record_outputs

    a, b = _pair()
    a.train(), b.train()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    names = {"last_norm": "stages.2.0.bn2", "stage1": "stages.0"}
    seen = {}
    for key, m in (("a", a), ("b", b)):
        with record_outputs({k: m.get_submodule(v) for k, v in names.items()}) as seen[key]:
            if key == "a":
                assert _fusing(a) == {name: name != "stages.2.0" for name in _fusing(a)}
            m(x)
    assert set(seen["a"]) == set(names)
    for k in names:
        torch.testing.assert_close(seen["a"][k], seen["b"][k])
    assert (seen["a"]["last_norm"] < 0).any()  # the norm's own output, not a fused ReLU's
    assert all(_fusing(a).values())
    assert not a.get_submodule("stages.2.0.bn2").has_hooks() and not a.stages[0]._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with record_outputs({"last_norm": a.get_submodule("stages.2.0.bn2")}):
            assert not a.stages[2][0].fused()
            raise RuntimeError("boom")
    assert all(_fusing(a).values()) and not a.get_submodule("stages.2.0.bn2").has_hooks()
    with pytest.raises(AttributeError):  # the second layer cannot take a hook: the first one's is removed too
        with record_outputs({"last_norm": a.get_submodule("stages.2.0.bn2"), "bad": object()}):
            pass
    assert all(_fusing(a).values()) and not a.get_submodule("stages.2.0.bn2").has_hooks()


def test_only_the_registry_relu_and_hook_watched_norms_fuse():
    """A plain ``nn.ReLU`` cannot report its hooks, so a block never skips it; the registry's ReLU prints and
    computes as ``nn.ReLU``."""
    from normlab.registry import ACTIVATIONS, ReLU

    relu = ACTIVATIONS["relu"]()
    assert type(relu) is ReLU and isinstance(relu, nn.ReLU) and repr(relu) == repr(nn.ReLU(inplace=True))
    model = ResNet(1, 10)
    blk = model.stages[0][0]
    blk.act2 = nn.ReLU(inplace=True)
    assert not blk.fused()
    seen = []
    blk.act2.register_forward_hook(lambda *_: seen.append(1))
    model(torch.randn(2, 3, 8, 8))
    assert seen == [1]
    blk.act2 = ACTIVATIONS["relu"]()
    assert blk.fused()


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "full_backward_pre"])
def test_global_hooks_seen_without_torchs_private_test(kind, monkeypatch):
    """torch 2.4 has no ``_has_any_global_hook``: the fallback reads the hook dicts themselves, and sees each
    kind of global hook (the fused blocks would otherwise hide the norms' outputs from it)."""
    from torch.nn.modules import module as m

    monkeypatch.delattr(m, "_has_any_global_hook", raising=False)  # torch 2.4 has none to remove
    assert ResNet(1, 10).stages[0][0].fused()
    handle = getattr(m, f"register_module_{kind}_hook")(lambda *a: None)
    try:
        assert ResNet(1, 10).stages[0][0].fused() is False
    finally:
        handle.remove()
    assert ResNet(1, 10).stages[0][0].fused()


def test_global_hooks_are_seen_when_fusion_is_decided():
    """The documented policy: a global module hook (torch gives no public way to watch those) is taken into
    account when fusion is decided -- at construction and ``train()``/``eval()`` among others -- not per call."""
    from torch.nn.modules.module import register_module_forward_hook

    model = ResNet(1, 10)
    blk = model.stages[0][0]
    called = []
    handle = register_module_forward_hook(lambda m, _i, o: called.append((m, o.detach().clone())))
    try:
        assert ResNet(1, 10).stages[0][0].fused() is False  # built while a global hook exists: unfused
        assert blk.fused()  # registered after the decision: not seen yet
        model(torch.randn(2, 3, 8, 8))
        assert any(m is blk for m, _ in called) and not any(m is blk.bn1 for m, _ in called)
        model.train()
        assert not any(_fusing(model).values())
        called.clear()
        model(torch.randn(2, 3, 8, 8))
        norm_out = [o for m, o in called if m is blk.bn1]
        assert len(norm_out) == 1 and (norm_out[0] < 0).any()  # the norm's own output
    finally:
        handle.remove()
    assert not blk.fused()  # the removal is not seen either...
    model.train()
    assert all(_fusing(model).values())  # ...until the next decision


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_fuse_and_watch_their_own_layers(how, tmp_path):
    import copy
    import pickle

    model = ResNet(1, 10)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        torch.save(model, tmp_path / "m.pt")
        twin = torch.load(tmp_path / "m.pt", weights_only=False)
    assert all(_fusing(twin).values())
    h = twin.stages[0][0].bn1.register_forward_hook(lambda *_: None)
    assert not twin.stages[0][0].fused() and all(_fusing(model).values())
    h.remove()
    assert all(_fusing(twin).values())
    h = model.stem[1].register_forward_hook(lambda *_: None)
    assert not model.stem.fused() and twin.stem.fused()
    if how == "deepcopy":  # a copy of a hooked model has the hook too (torch copies it), so it does not fuse
        hooked = copy.deepcopy(model)
        assert not hooked.stem.fused()
        h.remove()
        assert model.stem.fused() and not hooked.stem.fused()


def test_state_dict_is_unchanged_and_loads_into_a_hooked_model():
    a, b = _pair()
    assert list(a.state_dict()) == list(b.state_dict())
    h = a.stages[0][0].bn1.register_forward_hook(lambda *_: None)
    a.load_state_dict(ResNet(1, 10).state_dict())
    assert not a.stages[0][0].fused()
    h.remove()
    assert a.stages[0][0].fused()


def test_replace_norms_decides_fusion_again():
    from normlab.models.swap import replace_norms

    model = ResNet(1, 10, norm="torch_bn")
    assert not any(_fusing(model).values())
    replace_norms(model, norm_layer("gn"))
    assert all(_fusing(model).values())
    old = model.stages[0][0].bn1
    replace_norms(model, norm_layer("gn"))
    old.register_forward_hook(lambda *_: None)  # swapped out: no longer reports to the block
    assert all(_fusing(model).values())
    model.stages[0][0].bn1.register_forward_hook(lambda *_: None)
    assert not model.stages[0][0].fused()
    replace_norms(model, norm_layer("torch_bn"))
    assert not any(_fusing(model).values())


def test_hooks_under_torch_compile_and_ddp(tmp_path):
    """A compiled model and a DDP-wrapped one follow hooks added and removed after wrapping (torch.compile's
    tensor-op path differs from the C++ kernels in the last bits: compared with a tolerance)."""
    import torch.distributed as dist

    a, b = _pair()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(a, backend="eager")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(a)
        for wrapped in (compiled, ddp):
            torch.testing.assert_close(wrapped(x), b(x), atol=1e-5, rtol=1e-5)
            seen = []
            h = a.stages[0][0].bn2.register_forward_hook(lambda _m, _i, o: seen.append(o.detach().clone()))
            out = wrapped(x)
            torch.testing.assert_close(out, b(x), atol=1e-5, rtol=1e-5)
            assert len(seen) == 1 and (seen[0] < 0).any()  # the norm's output, before the add and the ReLU
            h.remove()
            torch.testing.assert_close(wrapped(x), b(x), atol=1e-5, rtol=1e-5)
            assert len(seen) == 1 and a.stages[0][0].fused()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ what counts as a normalization layer

class ScaleNorm(nn.Module):
    """A user's own normalization layer: no torch base class, not registered, named as a norm."""

    def __init__(self, c: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return self.g[:, None, None] * x / x.pow(2).mean(1, keepdim=True).add(1e-5).sqrt()


class PreNorm(nn.Module):
    """A block named as a norm that holds a conv: searched, not taken for a norm."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_users_own_norm_layer_is_refused_and_kept_on_purpose():
    """A layer of any library named as a norm, holding no conv or linear layer, is a normalization layer (the
    swap and the training loop's probe used to disagree here: replace_norms left it silently, norm_paths listed
    it): replace_norms refuses to leave it behind, keep= keeps it, and a block named so is searched."""
    from normlab.models.swap import is_normalization, norm_paths, replace_norms

    model = nn.Sequential(nn.Conv2d(3, 8, 3), ScaleNorm(8), PreNorm(8), nn.BatchNorm2d(8))
    assert [is_normalization(m) for m in model] == [False, True, False, True]
    assert list(norm_paths(model)) == ["1", "2.bn", "3"]
    with pytest.raises(NormlabError, match=r"1 normalization layer\(s\) .* would stay: "
                                           r"test_models\.ScaleNorm x1 \(at 1\); nothing was changed"):
        replace_norms(model, norm_layer("gn"))
    assert type(model[3]) is nn.BatchNorm2d and type(model[2].bn) is nn.BatchNorm2d
    replace_norms(model, norm_layer("gn"), keep=(ScaleNorm,))
    assert type(model[1]) is ScaleNorm and type(model[2].bn) is NORMS["gn"] and type(model[3]) is NORMS["gn"]


def test_input_normalization_is_not_a_normalization_layer():
    """torchvision's ``Normalize`` (fixed per-channel constants on the input) is not a normalization layer: a model
    that starts with it is swapped (the swap used to refuse it, by the word Norm in its name) and the swap record
    does not list it."""
    from torchvision.transforms import Normalize

    from normlab.models.swap import is_normalization, norm_paths, replace_norms

    model = nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    assert not is_normalization(model[0]) and list(norm_paths(model)) == ["2"]
    replace_norms(model, norm_layer("gn"))
    assert type(model[0]) is Normalize and type(model[2]) is NORMS["gn"]
