"""normlab's norms inside other people's models: timm (resnet18, efficientnet_b0, convnext_atto, regnetx_002)
and torchvision (resnet18) built with ``norm_layer=normlab.norms.norm_layer(name, ...)``, each trained for one
step on a tiny batch: the loss is finite, every norm parameter gets a finite, non-zero gradient, and the model
really holds normlab's layers (no silent fallback to the native ones)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.norms import NORMS, NormAct2d, norm_layer

timm = pytest.importorskip("timm")

NORM_NAMES = ["bn", "in", "bin", "ln", "gn"]
# timm models whose blocks build norm+activation layers (BatchNormAct2d): the activation must be named
NORM_ACT = {"efficientnet_b0": nn.SiLU, "regnetx_002": nn.ReLU}
# ConvNeXt runs its norms on channels-last (N, H, W, C) tensors unless conv_mlp: timm asks for conv_mlp=True
# with a custom norm layer, so every norm sees (N, C, H, W)
EXTRA = {"convnext_atto": {"conv_mlp": True}}
MODELS = ["resnet18", "efficientnet_b0", "convnext_atto", "regnetx_002"]


# efficientnet_b0 down-samples 32 times: at 32×32 its last norms see 1×1 maps, where IN's output is its bias for
# every input, the logits are equal, and with labels [0, 1] every norm gradient is exactly 0 (any non-zero
# value is rounding noise); at 64×64 they see 2×2
SIZE = {"efficientnet_b0": 64}


def one_step(model: nn.Module, cls, size: int = 32) -> None:
    torch.manual_seed(0)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, cls)]
    assert norms, f"no {cls.__name__} in the model"
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for m in norms for p in m.parameters(recurse=False)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    opt.step()


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("arch", MODELS)
def test_timm_models_train_a_step_with_each_norm(arch, name):
    kw = {"act_layer": NORM_ACT[arch]} if arch in NORM_ACT else {}
    model = timm.create_model(arch, pretrained=False, num_classes=2, norm_layer=norm_layer(name, **kw),
                              **EXTRA.get(arch, {}))
    one_step(model, NORMS[name], SIZE.get(arch, 32))
    if arch in NORM_ACT:  # the model's own activation kept inside every norm+act layer
        acts = [m.act for m in model.modules() if isinstance(m, NormAct2d)]
        assert acts and any(isinstance(a, NORM_ACT[arch]) for a in acts)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())  # no native BN left behind


@pytest.mark.parametrize("arch", list(NORM_ACT))
def test_timm_norm_act_models_without_activation_are_a_clear_error(arch):
    with pytest.raises(NormlabError, match="act_layer"):
        timm.create_model(arch, pretrained=False, num_classes=2, norm_layer=norm_layer("gn"))


def test_timm_get_norm_layer_keeps_the_settings():
    from timm.layers import get_norm_layer

    layer = get_norm_layer(norm_layer("gn", num_groups=4))(16)
    assert type(layer) is NORMS["gn"] and layer.num_groups == 4


@pytest.mark.parametrize("name", NORM_NAMES)
def test_torchvision_resnet18_trains_a_step_with_each_norm(name):
    from torchvision.models import resnet18

    one_step(resnet18(num_classes=2, norm_layer=norm_layer(name)), NORMS[name])
