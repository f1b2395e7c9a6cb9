"""normlab's norms inside other people's models: timm (resnet18, efficientnet_b0, mixnet_s, convnext_atto,
regnetx_002) and torchvision (resnet18) built with ``norm_layer=normlab.norms.norm_layer(name, ...)`` for every
registered norm, each trained for one step on a tiny batch: the loss is finite, every norm parameter gets a
finite, non-zero gradient, the model really holds normlab's layers (no silent fallback to the native ones), and
every activation the model asks for is kept."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models import replace_norms
from normlab.norms import NORMS, NoAffineError, NormAct2d, has_act, make_norm, norm_layer

timm = pytest.importorskip("timm")

NORM_NAMES = list(NORMS)  # every registered norm, new ones included
# ConvNeXt runs its norms on channels-last (N, H, W, C) tensors unless conv_mlp: timm asks for conv_mlp=True
# with a custom norm layer, so every norm sees (N, C, H, W)
EXTRA = {"convnext_atto": {"conv_mlp": True}}
MODELS = ["resnet18", "efficientnet_b0", "mixnet_s", "convnext_atto", "regnetx_002"]
# models that zero-initialise the last norm of each residual block: nothing to zero without a norm
ZERO_INIT = {"resnet18": "zero_init_last", "regnetx_002": "zero_init_last"}
# models built from norm+activation layers (BatchNormAct2d), each block with its own activation
NORM_ACT = ["mixnet_s", "efficientnet_b0", "regnetx_002"]


# efficientnet_b0, mixnet_s, regnetx_002 and timm's resnet18 down-sample 32 times: at 32×32 its last norms see 1×1 maps, which the per-sample norms refuse
# (their statistics would cover one value); at 64×64 they see 2×2
SIZE = {"efficientnet_b0": 64, "mixnet_s": 64, "resnet18": 64, "regnetx_002": 64}


def one_step(model: nn.Module, name: str, size: int = 32) -> None:
    torch.manual_seed(0)
    model.train()
    cls = type(make_norm(name, 8))
    norms = [m for m in model.modules() if type(m) is cls]
    assert norms, f"no {cls.__name__} in the model"
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for m in norms for p in m.parameters(recurse=False)]
    if name != "nn":  # no normalization, no parameters
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    opt.step()


def activations(model: nn.Module) -> Counter:
    return Counter(type(m).__name__ for m in model.modules()
                   if isinstance(m, (nn.ReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.ReLU6)))


@pytest.fixture(scope="module")
def stock():
    return {arch: activations(timm.create_model(arch, pretrained=False, num_classes=2, **EXTRA.get(arch, {})))
            for arch in MODELS}


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("arch", MODELS)
def test_timm_models_train_a_step_with_each_norm(arch, name, stock):
    extra = dict(EXTRA.get(arch, {}))
    if name == "nn" and arch in ZERO_INIT:
        extra[ZERO_INIT[arch]] = False
    model = timm.create_model(arch, pretrained=False, num_classes=2, norm_layer=norm_layer(name), **extra)
    if arch == "convnext_atto" and name == "in":  # its head norm sees the pooled 1x1 maps
        with pytest.raises(NormlabError, match="got 1x1 maps"):
            one_step(model, name)
    else:
        one_step(model, name, SIZE.get(arch, 32))
    # every block keeps its own activation: mixnet mixes ReLU and SiLU, and a bound one used to override them
    if has_act(name) and arch in NORM_ACT:
        # a norm with its own activation (FRN's TLU, EvoNorm's) takes the place of a norm+activation layer's pair
        # (timm's convention): the activations that go are exactly those of the layers it replaced
        replaced = sum(bool(m.apply_act) for m in model.modules() if type(m) is NORMS[name])
        assert replaced > 0 and not any(isinstance(m, NormAct2d) for m in model.modules())
        assert activations(model) <= stock[arch]
        assert sum((stock[arch] - activations(model)).values()) == replaced
        return
    assert activations(model) == stock[arch]
    if arch in NORM_ACT:
        assert any(isinstance(m, NormAct2d) for m in model.modules())
    if name != "torch_bn":
        assert not any(type(m) is nn.BatchNorm2d for m in model.modules())  # no native BN left behind


def test_mixnet_keeps_relu_and_silu_blocks_apart(stock):
    """The case that went wrong: norm_layer("gn", act_layer=nn.ReLU) made stock {ReLU 7, SiLU 39} into
    {ReLU 33, SiLU 13}; timm now hands every layer its own activation."""
    model = timm.create_model("mixnet_s", pretrained=False, num_classes=2, norm_layer=norm_layer("gn"))
    assert stock["mixnet_s"]["ReLU"] == 7 and stock["mixnet_s"]["SiLU"] == 39
    acts = Counter(type(m.act).__name__ for m in model.modules() if isinstance(m, NormAct2d))
    assert acts["ReLU"] == 7 and acts["SiLU"] == 39 - 13  # the 13 SE blocks' SiLU sit outside the norms


def test_nn_with_zero_init_is_a_one_line_error():
    with pytest.raises(NoAffineError, match=r"^norm 'nn' \(no normalization\) has no weight: .*zero_init_last=False"):
        timm.create_model("regnetx_002", pretrained=False, norm_layer=norm_layer("nn"))


def test_timm_get_norm_layer_keeps_the_settings():
    from timm.layers import get_norm_layer

    layer = get_norm_layer(norm_layer("gn", num_groups=4))(16)
    assert type(layer) is NORMS["gn"] and layer.num_groups == 4


def test_convnext_head_norm_on_1x1_maps_is_refused_for_in():
    """convnext's head norm sees the pooled 1×1 maps: IN there makes the logits independent of the input."""
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=2, conv_mlp=True, norm_layer=norm_layer("in"))
    with pytest.raises(NormlabError, match="got 1x1 maps"):
        model(torch.randn(2, 3, 32, 32))


def test_replace_norms_swaps_timm_norm_classes():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=2, conv_mlp=True)
    before = [m for m in model.modules() if type(m).__name__ == "LayerNorm2d"]
    assert len(before) == 17
    weight = before[0].weight.detach().clone().uniform_()
    with torch.no_grad():
        before[0].weight.copy_(weight)
    replace_norms(model, norm_layer("gn"))
    assert not any(type(m).__name__ == "LayerNorm2d" for m in model.modules())
    swapped = [m for m in model.modules() if type(m) is NORMS["gn"]]
    assert len(swapped) == 17 and torch.equal(swapped[0].weight, weight)  # the per-channel affine carried over
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_replace_norms_keeps_each_timm_norm_act_layers_activation(stock):
    model = timm.create_model("mixnet_s", pretrained=False, num_classes=2)
    replace_norms(model, norm_layer("gn"))
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    assert activations(model) == stock["mixnet_s"]


def test_replace_norms_refuses_norms_it_would_leave_and_changes_nothing():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=2, conv_mlp=False)  # channels-last LN
    kinds = Counter(type(m).__name__ for m in model.modules())
    with pytest.raises(NormlabError, match=r"^replace_norms: \d+ normalization layer\(s\) .* would stay: "
                                           r"timm\.layers\.norm\.LayerNorm x\d+ .*nothing was changed") as info:
        replace_norms(model, norm_layer("gn"))
    assert "\n" not in str(info.value)
    assert Counter(type(m).__name__ for m in model.modules()) == kinds
    from timm.layers.norm import LayerNorm

    replace_norms(model, norm_layer("gn"), keep=(LayerNorm,))  # kept on purpose: the 2-d ones are swapped
    assert not any(type(m).__name__ == "LayerNorm2d" for m in model.modules())


@pytest.mark.parametrize("name", NORM_NAMES)
def test_torchvision_resnet18_trains_a_step_with_each_norm(name):
    from torchvision.models import resnet18

    one_step(resnet18(num_classes=2, norm_layer=norm_layer(name)), name, 64)  # 32 px: layer4 sees 1x1 maps


@pytest.mark.parametrize("name", [n for n in NORM_NAMES if has_act(n)])
def test_replace_norms_lets_a_norm_with_its_own_activation_replace_the_pair(name, stock):
    """frn / evonorm_* swapped into timm's norm+activation layers take the place of norm AND activation (timm's
    EvoNorm/FRN convention, as norm_layer builds them): keeping the layer's ReLU after FRN's TLU applied two."""
    model = timm.create_model("regnetx_002", pretrained=False, num_classes=2)
    pairs = sum(type(m).__name__ == "BatchNormAct2d" and not isinstance(m.act, nn.Identity) for m in model.modules())
    replace_norms(model, norm_layer(name))
    assert not any(isinstance(m, NormAct2d) for m in model.modules())
    ours = [m for m in model.modules() if type(m) is NORMS[name]]
    assert sum(m.apply_act for m in ours) == pairs
    assert sum((stock["regnetx_002"] - activations(model)).values()) == pairs
    one_step(model, name, 64)


def test_timms_evonorm_and_frn_layers_are_normalization_layers():
    """timm's EvoNorm and FRN layers (names that do not end in Norm...) are normalization layers for the swap
    record and the training loop's probe too (norm_paths used to miss them while replace_norms refused them):
    listed by norm_paths, refused by replace_norms (it cannot swap them), kept with keep=. A container named
    otherwise (timm's NormMlpClassifierHead) is searched: its LayerNorm2d is found and swapped."""
    from timm.layers import EvoNorm2dB0, FilterResponseNormTlu2d, NormMlpClassifierHead

    from normlab.models.swap import is_normalization, norm_paths

    model = nn.Sequential(nn.Conv2d(3, 8, 3), EvoNorm2dB0(8), FilterResponseNormTlu2d(8), NormMlpClassifierHead(8, 2))
    assert [is_normalization(m) for m in model] == [False, True, True, False]
    assert list(norm_paths(model)) == ["1", "2", "3.norm"]
    with pytest.raises(NormlabError, match=r"2 normalization layer\(s\) .* would stay: timm\.layers\.evo_norm\."
                                           r"EvoNorm2dB0 x1, timm\.layers\.filter_response_norm\.FilterResponseNormTlu2d x1"):
        replace_norms(model, norm_layer("gn"))
    replace_norms(model, norm_layer("gn"), keep=(EvoNorm2dB0, FilterResponseNormTlu2d))
    assert type(model[3].norm) is NORMS["gn"] and type(model[1]) is EvoNorm2dB0
