"""``--model timm:<name>``: timm architectures trained from the CLI with normlab's norms, the swaps listed in
the run's summary, local weights only, and one-line errors for a misspelt name, a missing timm, and inputs
too small for instance norm."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from normlab import cli
from normlab.config import make_config
from normlab.errors import NormlabError
from normlab.models import build_model

from conftest import make_image_folder

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def folder32(tmp_path_factory):
    # 32x32: both nets down-sample 32 times; 3 classes, a few images each (one tiny epoch)
    return make_image_folder(tmp_path_factory.mktemp("imgs32"), size=32,
                             per_split={"train": 8, "val": 4, "test": 4})


def run(argv, capsys):
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("arch, norm, swapped", [
    ("convnext_atto", "gn", {"LayerNorm2d -> GroupNorm2d": 17}),  # through timm's norm_layer
    pytest.param("convnext_atto", "bn", {"LayerNorm2d -> BatchNorm2d": 17}, marks=pytest.mark.slow),
    pytest.param("regnetx_002", "ln", {"BatchNormAct2d -> NormAct2d(LayerNorm2d)": 44}, marks=pytest.mark.slow),
    ("regnetx_002", "nn", {"BatchNormAct2d -> NormAct2d(NoNorm2d)": 44}),  # replace_norms, ReLU kept
])
def test_cli_trains_a_timm_model_and_the_summary_lists_the_swaps(arch, norm, swapped, folder32, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--model", f"timm:{arch}", "--norm", norm, "--dataset", "folder",
                        "--data-root", str(folder32), "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                        "--train-subset", "18", "--progress", "off", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema_version"] == 3 and summary["status"] == "finished"
    model = summary["model"]
    assert model["name"] == f"timm:{arch}" and model["norm_swaps"] == swapped and model["norms_kept"] == {}
    assert model["via"] == ("norm_layer" if arch == "convnext_atto" else "replace_norms")
    assert summary["test"]["confusion"] and sum(map(sum, summary["test"]["confusion"])) == 12
    assert summary["train"]["loss"] == summary["train"]["loss"]  # finite, not NaN
    if arch == "regnetx_002":  # the analyses of a study's report work on timm runs too
        code, out_text, err = run(["gradcam", str(out), "--per-class", "1", "--max-classes", "1"], capsys)
        assert code == 0 and (out / "gradcam").is_dir(), err


def test_timm_model_keeps_each_blocks_activation_and_trains_a_step():
    cfg = make_config({"model": "timm:regnetx_002", "norm": "gn", "dataset": "cifar10"})
    model = build_model(cfg, 1, 10)  # 1-channel input (Fashion-MNIST-like)
    acts = [type(m.act) for m in model.modules() if hasattr(m, "norm") and hasattr(m, "act")]
    assert acts and set(acts) <= {nn.ReLU, nn.Identity} and nn.ReLU in acts
    x = torch.randn(4, 1, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and model(x).shape == (4, 10)


def test_unknown_timm_name_is_one_line_with_close_names(tmp_path, capsys):
    code, _, err = run(["train", "--model", "timm:convnext_ato", "--out", str(tmp_path / "r"),
                        "--data-root", str(tmp_path / "nowhere")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "timm:convnext_ato" in lines[0] and "did you mean timm:convnext_atto" in lines[0]
    assert not (tmp_path / "r" / "summary.json").exists()


def test_missing_timm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(NormlabError, match=r"needs timm: pip install 'normlab\[timm\]'"):
        build_model(make_config({"model": "timm:regnetx_002"}), 3, 10)


def test_inputs_too_small_for_the_architecture_are_one_line():
    with pytest.raises(NormlabError, match=r"cannot run on 1x28x28 inputs .*try --image-size 56"):
        build_model(make_config({"model": "timm:convnext_atto"}), 1, 10)  # Fashion-MNIST's 28x28


def test_instance_norm_on_1x1_maps_is_refused_with_the_fix():
    with pytest.raises(NormlabError, match=r"see 1x1 maps at 32x32 inputs.*--image-size 64"):
        build_model(make_config({"model": "timm:regnetx_002", "norm": "in", "dataset": "cifar10"}), 3, 10)
    build_model(make_config({"model": "timm:regnetx_002", "norm": "in", "dataset": "cifar10", "image_size": 64}), 3, 10)
    # ConvNeXt's head norm normalizes pooled 1x1 features: no input size helps
    with pytest.raises(NormlabError, match=r"1 of its norm layers see 1x1 maps at 64x64.*at any input size"):
        build_model(make_config({"model": "timm:convnext_atto", "norm": "in", "dataset": "cifar10",
                                 "image_size": 64}), 3, 10)


def test_a_model_that_ignores_its_input_is_caught_by_the_probe():
    from normlab.models.timm_models import _probe

    # instance norm right before global pooling: every image gives the same features (the norm's bias)
    erased = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(4, 2))
    kept = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert _probe(erased, 3, 8, "x")[1] < 1e-5 < _probe(kept, 3, 8, "x")[1]


def test_local_weights_load_and_downloads_are_refused(tmp_path):
    stock = timm.create_model("regnetx_002", pretrained=False, num_classes=10)
    path = tmp_path / "w.pt"
    torch.save(stock.state_dict(), path)
    cfg = make_config({"model": "timm:regnetx_002", "norm": "bn", "pretrained": str(path)})
    model = build_model(cfg, 3, 5)  # another class count: the classifier is skipped
    assert model.normlab_pretrained["skipped"] == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(model.stem.conv.weight, stock.stem.conv.weight)
    norm = model.s1.b1.conv1.bn  # the swapped-in BN carries the file's BN statistics
    assert torch.equal(norm.norm.running_var, stock.s1.b1.conv1.bn.running_var)
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("convnext_atto", pretrained=False).state_dict(), other)
    with pytest.raises(NormlabError, match="do not fit timm:regnetx_002"):
        build_model(make_config({"model": "timm:regnetx_002", "pretrained": str(other)}), 3, 10)
    with pytest.raises(NormlabError, match="never downloads"):
        make_config({"model": "timm:regnetx_002", "pretrained": "imagenet"})


def test_mlp_head_on_a_timm_model():
    model = build_model(make_config({"model": "timm:convnext_atto", "norm": "gn", "head": "mlp:32",
                                     "dataset": "cifar10"}), 3, 4)
    assert isinstance(model.head.fc, nn.Sequential) and model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_resnet18_summary_record_lists_its_swaps():
    model = build_model(make_config({"model": "resnet18", "norm": "gn"}), 3, 10)
    assert model.normlab_swaps["swapped"] == {"nn.BatchNorm2d -> GroupNorm2d": 20}


def test_model_flag_accepts_timm_names_and_still_refuses_others(capsys):
    from normlab.registry import MODELS

    assert "timm:anything" in MODELS and "timm:" not in MODELS and "resnt" not in MODELS
    code, _, err = run(["train", "--model", "resnt"], capsys)
    assert code == 2 and "invalid choice: 'resnt'" in err and "timm:NAME" in err


def test_analyses_find_the_stages_of_timm_models():
    from normlab.analysis.activations import feature_layers
    from normlab.analysis.gradcam import last_stage_convs

    regnet = build_model(make_config({"model": "timm:regnetx_002", "norm": "gn", "dataset": "cifar10"}), 3, 10)
    assert list(feature_layers(regnet)) == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert last_stage_convs(regnet) == [regnet.s4]  # Grad-CAM on the last feature stage
    from normlab.train.loop import probe_layers

    assert set(probe_layers(regnet)) == {"stem", "stage1", "stage2", "stage3", "stage4", "last_norm"}


def test_timm_norms_preset_plans_every_norm_on_both_nets(tmp_path, capsys):
    from normlab.study.plan import DEFAULT_NORMS  # the course's seven

    code, out, err = run(["study", "--preset", "timm-norms", "--plan-only", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    cells = {(r["config"]["model"], r["config"]["norm"]) for r in plan}
    assert cells == {(f"timm:{a}", n) for a in ("convnext_atto", "regnetx_002") for n in DEFAULT_NORMS} - {
        ("timm:convnext_atto", "in")}  # its head norm sees pooled 1x1 features: refused
    assert all(r["config"]["image_size"] == 64 and r["config"]["dataset"] == "cifar10" for r in plan)
    # a misspelt architecture stops a study before its first run
    code, _, err = run(["study", "--preset", "quick", "--model", "timm:regnetx_02", "--plan-only", "--out",
                        str(tmp_path / "t")], capsys)
    assert code == 2 and "timm:regnetx_002" in err and "list_models('*regnetx*')" in err
    assert len(err.strip().splitlines()) == 1


def test_default_run_folder_names_the_timm_architecture():
    assert make_config({"model": "timm:regnetx_002", "norm": "gn"}).run_name() == \
        "fashion-mnist-regnetx_002-gn-b128-none-s0"
    assert make_config({"norm": "gn"}).run_name() == "fashion-mnist-gn-n3-b128-none-s0"  # unchanged
