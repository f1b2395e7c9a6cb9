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
