"""The wider workbench: resnet18 + norm swapping, pretrained weights, freezing, heads, the augmentation
catalogue, the compact model, augment-preview and activations (all fast, CPU, no network)."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from normlab.cli import main
from normlab.config import make_config, parse_head
from normlab.data.augment import augment_batch
from normlab.data.augmentations import AUGMENTATIONS, apply_augment, parse_params
from normlab.errors import NormlabError
from normlab.models import build_model
from normlab.models import torchvision_resnet
from normlab.models.build import freeze_units, make_head
from normlab.models.swap import replace_norms
from normlab.norms import NORMS, BatchNorm2d, GroupNorm2d, norm_layer
from normlab.train.optim import build_optimizer


def _tv_resnet18(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():  # recognisable, non-default statistics and affines
        for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.linspace(-1, 1, c) + i)
            m.running_var.copy_(torch.linspace(0.5, 2, c) + i)
            m.weight.copy_(torch.linspace(0.1, 1.9, c))
            m.bias.copy_(torch.linspace(-0.3, 0.3, c) * (i + 1))
    return model


# ------------------------------------------------------------------------------------ replace_norms

@pytest.mark.parametrize("name", list(NORMS))
def test_replace_norms_every_norm(name):
    ref = _tv_resnet18(num_classes=5)
    model = _tv_resnet18(num_classes=5)
    replace_norms(model, norm_layer(name))
    x = torch.randn(2, 3, 64, 64)  # at 32 px layer4 sees 1x1 maps, which IN refuses
    if name != "torch_bn":
        assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    if name == "bn":
        assert isinstance(model.bn1, BatchNorm2d)
        assert torch.equal(model.layer2[0].bn1.running_mean, ref.layer2[0].bn1.running_mean)
        assert torch.equal(model.layer2[0].bn1.running_var, ref.layer2[0].bn1.running_var)
        assert torch.equal(model.layer2[0].bn1.weight, ref.layer2[0].bn1.weight)
        ref.eval()
        model.eval()
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)  # the same function
    if name == "gn":
        assert isinstance(model.layer3[1].bn2, GroupNorm2d)
        assert torch.equal(model.layer3[1].bn2.weight, ref.layer3[1].bn2.weight)
        assert torch.equal(model.layer3[1].bn2.bias, ref.layer3[1].bn2.bias)
    if name == "nn":
        assert isinstance(model.bn1, nn.Identity)
    model.eval()
    assert model(x).shape == (2, 5)
    model.train()
    assert model(x).shape == (2, 5)


# ------------------------------------------------------------------------------------ pretrained

@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "r18.pt"
    model = _tv_resnet18(num_classes=1000, seed=1)
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def _r18_cfg(**kw):
    base = dict(model="resnet18", dataset="folder", image_size=64)
    return make_config({**base, **kw})


def test_pretrained_local_bn(weight_file):
    path, saved = weight_file
    model = build_model(_r18_cfg(pretrained=str(path), norm="bn"), 3, 4)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])  # 64 px input: the 7x7 stem is kept
    assert torch.equal(model.layer3[0].conv2.weight, saved["layer3.0.conv2.weight"])
    assert isinstance(model.layer1[0].bn1, BatchNorm2d)
    for key in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(model.layer4[1].bn2, key), saved[f"layer4.1.bn2.{key}"])
        assert torch.equal(getattr(model.bn1, key), saved[f"bn1.{key}"])
    assert model.fc.out_features == 4  # 1000-class fc skipped


def test_pretrained_local_gn_and_small_grey(weight_file):
    path, saved = weight_file
    model = build_model(_r18_cfg(pretrained=str(path), norm="gn"), 3, 4)
    assert isinstance(model.layer2[1].bn1, GroupNorm2d)
    assert torch.equal(model.layer2[1].bn1.weight, saved["layer2.1.bn1.weight"])
    assert torch.equal(model.layer2[1].bn1.bias, saved["layer2.1.bn1.bias"])
    assert not any(isinstance(m, (nn.BatchNorm2d, BatchNorm2d)) for m in model.modules())
    # 1-channel 64 px: RGB filters summed; 1-channel 28 px: 3x3 stem, no max-pool, still loads the rest
    grey = build_model(_r18_cfg(pretrained=str(path)), 1, 4)
    torch.testing.assert_close(grey.conv1.weight, saved["conv1.weight"].sum(1, keepdim=True))
    small = build_model(_r18_cfg(pretrained=str(path), image_size=28), 1, 4)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert torch.equal(small.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_pretrained_same_classes_keeps_fc(weight_file):
    path, saved = weight_file
    model = build_model(_r18_cfg(pretrained=str(path)), 3, 1000)
    assert torch.equal(model.fc.weight, saved["fc.weight"])


def test_pretrained_errors(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(NormlabError, match="not found"):
        build_model(_r18_cfg(pretrained=missing), 3, 4)
    assert main(["train", "--model", "resnet18", "--pretrained", missing, "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    with pytest.raises(NormlabError, match="needs --model resnet18"):
        make_config({"model": "compact", "pretrained": "imagenet"})
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(NormlabError, match="not a torchvision resnet18 state_dict"):
        build_model(_r18_cfg(pretrained=str(bad)), 3, 4)

    def offline(*_a, **_k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision_resnet, "load_state_dict_from_url", offline)
    with pytest.raises(NormlabError, match="could not be downloaded") as info:
        build_model(_r18_cfg(pretrained="imagenet"), 3, 4)
    assert "\n" not in str(info.value) and "--pretrained PATH" in str(info.value)


# ------------------------------------------------------------------------------------ freeze and heads

def test_freeze_resnet18_and_optimizer():
    cfg = _r18_cfg(freeze=2, image_size=32)
    model = build_model(cfg, 3, 4)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))}
    opt_params = {id(p) for g in build_optimizer(model, cfg).param_groups for p in g["params"]}
    assert all((id(p) in opt_params) == p.requires_grad for p in model.parameters())
    assert len(freeze_units(model)) == 5
    with pytest.raises(NormlabError, match="freeze=6 is out of range"):
        _r18_cfg(freeze=6)
    with pytest.raises(NormlabError, match="freeze=5 is out of range"):
        make_config({"model": "compact", "freeze": 5})
    compact = build_model(make_config({"model": "compact", "n": 1, "freeze": 1}), 3, 10)
    assert all(not p.requires_grad for p in compact.stem.parameters())
    assert all(p.requires_grad for p in compact.stages.parameters())


def test_head_spec():
    assert parse_head("linear") == [] and parse_head("mlp:512,128") == [512, 128]
    for bad in ("mlp", "mlp:", "mlp:a,3", "mlp:0", "conv:3", "mlp:512,"):
        with pytest.raises(NormlabError, match="is not linear or mlp"):
            parse_head(bad)
    with pytest.raises(NormlabError, match="head="):
        make_config({"head": "mlp:x"})
    head = make_head(512, 10, "mlp:64,32", dropout=0.5)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    model = build_model(make_config({"model": "compact", "n": 1, "head": "mlp:32", "dropout": 0.1}), 3, 7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert isinstance(model.fc, nn.Sequential) and isinstance(model.dropout, nn.Identity)


# ------------------------------------------------------------------------------------ augmentations

def _images(n=16, c=3, h=24, w=20, seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    if same:
        return torch.randint(0, 256, (1, c, h, w), generator=g, dtype=torch.uint8).repeat(n, 1, 1, 1)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_contract(name, channels):
    x = _images(c=channels, same=True)
    a = apply_augment(x, name, torch.Generator().manual_seed(5))
    b = apply_augment(x, name, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)  # deterministic for a seeded generator
    distinct = {a[i].numpy().tobytes() for i in range(len(a))}
    assert len(distinct) > 1  # identical inputs, per-image parameters -> different outputs
    assert not torch.equal(a, apply_augment(x, name, torch.Generator().manual_seed(6)))
    xf = x.float()
    assert apply_augment(xf, name, torch.Generator().manual_seed(5)).dtype == torch.float32


def test_standard_is_augment_batch():
    x = _images()
    assert torch.equal(apply_augment(x, "standard", torch.Generator().manual_seed(3)),
                       augment_batch(x, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("name,dim", [("hflip", -1), ("vflip", -2)])
def test_flips_are_flips(name, dim):
    x = _images(n=32)
    y = apply_augment(x, name, torch.Generator().manual_seed(0))
    flipped = [torch.equal(y[i], x[i].flip(dim)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    assert torch.equal(apply_augment(x, name, torch.Generator(), f"{name}.p=1"), x.flip(dim))


def test_cutout_zeros_a_square():
    x = torch.full((8, 3, 20, 20), 200, dtype=torch.uint8)
    y = apply_augment(x, "cutout", torch.Generator().manual_seed(1), "cutout.size=6")
    for img in y:
        zero = img[0] == 0
        assert zero.sum() == 36 and torch.equal(img[1] == 0, zero)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert len(rows) == 6 and len(cols) == 6 and zero[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()


def test_mask_proportion_and_identities():
    x = torch.full((64, 1, 64, 64), 100, dtype=torch.uint8)
    y = apply_augment(x, "mask", torch.Generator().manual_seed(0), "mask.p=0.3,mask.block=4")
    assert abs((y == 0).float().mean().item() - 0.3) < 0.02
    z = _images()
    g = torch.Generator()
    assert torch.equal(apply_augment(z, "rotation", g, "rotation.degrees=0"), z)
    assert torch.equal(apply_augment(z, "jitter", g, "jitter.brightness=0,jitter.contrast=0,jitter.saturation=0"), z)
    assert torch.equal(apply_augment(z, "resized_crop", g, "resized_crop.scale=1,resized_crop.ratio=1"), z)
    sp = apply_augment(x, "saltpepper", g, "saltpepper.amount=0.2")
    assert abs((sp != 100).float().mean().item() - 0.2) < 0.02
    chained = apply_augment(z, "crop,hflip,cutout", torch.Generator().manual_seed(0), "cutout.size=4")
    assert chained.shape == z.shape


def test_augment_config_errors():
    cfg = make_config({"augment": "crop,hflip,cutout", "augment_params": "cutout.size=8"})
    assert cfg.augment == "crop,hflip,cutout"
    for kw, msg in [({"augment": "cutuot"}, "did you mean 'cutout'"),
                    ({"augment": "cutout", "augment_params": "cutout.sise=8"}, "did you mean 'size'"),
                    ({"augment": "cutout", "augment_params": "mask.p=0.3"}, "does not include 'mask'"),
                    ({"augment": "mask", "augment_params": "mask.p=2"}, "probability"),
                    ({"augment": "mask", "augment_params": "mask.block=2.5"}, "whole number"),
                    ({"augment": "mask", "augment_params": "mask.p"}, "NAME.KEY=VALUE")]:
        with pytest.raises(NormlabError, match=msg) as info:
            make_config(kw)
        assert "\n" not in str(info.value)
    assert parse_params("rotation.degrees=15,mask.p=0.3") == {"rotation": {"degrees": 15.0}, "mask": {"p": 0.3}}


def test_augment_preview(tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "grid.png"
    assert main(["augment-preview", "--image", str(img), "--out", str(out), "--image-size", "24", "--samples", "3"]) == 0
    assert out.is_file() and out.stat().st_size > 1000
    assert main(["augment-preview", "--image", str(img), "--out", str(out), "--augment", "cutuot"]) == 2
    assert "did you mean 'cutout'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ compact model

def test_compact_budget():
    cfg = make_config({"model": "compact", "n": 1, "width": 16, "max_params": 50_000})
    model = build_model(cfg, 3, 10)
    count = sum(p.numel() for p in model.parameters())
    assert count < 50_000
    for norm in ("gn", "ln", "torch_bn"):
        assert build_model(make_config({"model": "compact", "n": 1, "norm": norm}), 3, 10)(
            torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(NormlabError, match=f"has {count:,} parameters, over the --max-params budget of 40,000"):
        build_model(make_config({"model": "compact", "n": 1, "max_params": 40_000}), 3, 10)
    with pytest.raises(NormlabError, match="over the --max-params budget"):
        build_model(make_config({"model": "resnet", "max_params": 100_000}), 3, 10)


# ------------------------------------------------------------------------------------ training and activations

@pytest.fixture(scope="module")
def workbench_runs(image_folder, tmp_path_factory):
    from normlab.train.loop import train

    root = tmp_path_factory.mktemp("wb_runs")
    weights = root / "r18.pt"  # pretrained weights that are deleted after training: analysis must not need them
    torch.save(_tv_resnet18(num_classes=1000).state_dict(), weights)
    common = dict(dataset="folder", data_root=str(image_folder), image_size=16, n=1, epochs=1, batch_size=16,
                  progress="off", lr=0.05, probe_size=16)
    runs = {}
    for name, kw in {"compact": dict(model="compact", width=8, augment="crop,hflip,cutout",
                                     augment_params="cutout.size=4"),
                     "resnet18": dict(model="resnet18", norm="gn", head="mlp:32", dropout=0.1, freeze=1,
                                      augment="standard", pretrained=str(weights))}.items():
        runs[name] = train(make_config({**common, **kw, "out": str(root / name)}), log=lambda *_: None)
    weights.unlink()
    return runs


@pytest.mark.parametrize("name", ["compact", "resnet18"])
def test_train_one_epoch(workbench_runs, name):
    run = workbench_runs[name]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 1
    quantiles = json.loads((run / "quantiles.json").read_text())
    assert "stage1" in quantiles["epochs"][-1] and "last_norm" in quantiles["epochs"][-1]


@pytest.mark.parametrize("name,stages", [("compact", 3), ("resnet18", 4)])
def test_activations_command(workbench_runs, tmp_path, name, stages):
    img = tmp_path / "grey.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40), dtype=np.uint8), "L").save(img)
    out = tmp_path / "act"
    assert main(["activations", str(workbench_runs[name]), "--image", str(img), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["stem.png"] + [f"stage{i + 1}.png" for i in range(stages)])
    assert main(["activations", str(workbench_runs[name]), "--image", str(tmp_path / "nope.png")]) == 2


# ------------------------------------------------------------------------- timm norm+activation layers

timm = pytest.importorskip("timm")


def _randomised_stats(model: nn.Module) -> nn.Module:
    """Non-default running statistics and affines, so that a swap that loses them shows in the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("arch", ["efficientnet_b0", "resnet18"])
@pytest.mark.parametrize("norm", ["bn", "torch_bn"])
def test_same_kind_swap_of_timm_models_changes_nothing(arch, norm):
    """timm's BatchNormAct2d subclasses nn.BatchNorm2d and applies SiLU itself: the swap must keep it."""
    model = _randomised_stats(timm.create_model(arch, pretrained=False, num_classes=10))
    silu = sum(isinstance(m, nn.SiLU) for m in model.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    replace_norms(model, norm_layer(norm))
    assert sum(isinstance(m, nn.SiLU) for m in model.modules()) == silu
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    if norm == "bn":
        assert any(isinstance(m, BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-4, rtol=1e-4)
    if arch == "efficientnet_b0":
        assert silu == 49  # the count the issue saw drop to 16 when the activations were lost


def test_unknown_norm_subclass_is_refused_with_one_line():
    class ScaledBN(nn.BatchNorm2d):  # does more than normalize, and normlab cannot know what
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4))
    with pytest.raises(NormlabError, match=r"^replace_norms: 1 normalization layer.* would stay: .*ScaledBN x1 \(at 1\)") as info:
        replace_norms(model, norm_layer("gn", num_groups=2))
    assert "\n" not in str(info.value)
    assert type(model[1]) is ScaledBN  # nothing was changed
