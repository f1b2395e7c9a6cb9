"""Grad-CAM maps and galleries, confusion matrices and misclassified grids of a tiny trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from normlab.analysis.galleries import load_run, misclassified_grid, plot_confusion, run_analyses
from normlab.analysis.gradcam import (compare_gradcam, gradcam_maps, last_stage_convs, pick_shared, run_gradcam,
                                     select_examples)
from normlab.config import make_config
from normlab.data import normalize
from normlab.errors import NormlabError
from normlab.models import ResNet
from normlab.train.loop import train

from conftest import make_image_folder

# Untrusted class names: HTML-like markup, mathtext dollars (an invalid formula), a backslash, non-ASCII.
ODD = "<b>$x^$ & ü<\\b>"
CLASSES = ("blue", "green", ODD)

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
              "_backward_hooks", "_backward_pre_hooks")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    folder = make_image_folder(root / "imgs", classes=CLASSES, per_split={"train": 16, "val": 8, "test": 6})
    cfg = make_config(dict(dataset="folder", data_root=str(folder), image_size=16, n=1, epochs=1, batch_size=16,
                           lr=0.05, eval_batch_size=64, probe_size=16, progress="off", device="cpu",
                           out=str(root / "run")))
    return train(cfg)


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(m, attr, {}), f"{name or 'model'}.{attr} still holds a hook"


@pytest.mark.parametrize("n", [1, 2])
def test_last_stage_convs(n):
    model = ResNet(n, 10).eval()
    layers = last_stage_convs(model)
    assert len(layers) == 2 * n and all(isinstance(m, nn.Conv2d) for m in layers)
    assert all(any(m is lay for m in model.stages[-1].modules()) for lay in layers)
    shapes = []
    handles = [m.register_forward_hook(lambda _m, _i, o: shapes.append(tuple(o.shape))) for m in layers]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 256, 256))
    finally:
        for h in handles:
            h.remove()
    assert shapes == [(1, 64, 64, 64)] * (2 * n)


def test_gradcam_maps_shape_range_and_no_hooks_left():
    torch.manual_seed(0)
    model = ResNet(1, 3, norm="torch_bn")
    model.train()
    x = torch.randn(5, 3, 20, 24)
    maps = gradcam_maps(model, x, [0, 1, 2, 0, 1], last_stage_convs(model))
    assert maps.shape == (5, 20, 24) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert model.training, "the training flag must be restored"
    assert all(p.grad is None for p in model.parameters()), "parameter gradients must be restored"
    assert_no_hooks(model)
    # grayscale input, one layer, in eval mode
    gray = ResNet(1, 2, in_channels=1).eval()
    m1 = gradcam_maps(gray, torch.randn(2, 1, 16, 16), torch.tensor([1, 0]), [gray.stages[-1][0].conv2])
    assert m1.shape == (2, 16, 16) and np.isfinite(m1).all() and not gray.training
    assert_no_hooks(gray)


def test_select_examples():
    preds = torch.tensor([0, 1, 1, 2, 0, 0, 2, 1, 0])
    targets = torch.tensor([0, 0, 1, 2, 0, 1, 1, 1, 0])
    picks = select_examples(preds, targets, [0, 1, 2], per_class=2)
    for k, sel in picks.items():
        assert all(targets[i] == k and preds[i] == k for i in sel["correct"])
        assert all(targets[i] == k and preds[i] != k for i in sel["wrong"])
        assert len(sel["correct"]) <= 2 and len(sel["wrong"]) <= 2
    assert picks[0] == {"correct": [0, 4], "wrong": [1]}
    assert picks[1] == {"correct": [2, 7], "wrong": [5, 6]}
    assert picks[2] == {"correct": [3], "wrong": []}
    assert select_examples(preds, targets, [1], per_class=2) == {1: picks[1]}  # deterministic


def test_run_gradcam(run_dir, tmp_path):
    index = run_gradcam(run_dir, classes=["green", ODD], per_class=2, out_dir=tmp_path / "cam")
    assert set(index["classes"]) == {"green", ODD}
    pngs = sorted(p.name for p in (tmp_path / "cam").glob("*.webp"))  # image galleries: WebP, not PNG
    assert len(pngs) == 2 and pngs == sorted(v["file"] for v in index["classes"].values())
    assert all("<" not in f and "$" not in f and "\\" not in f for f in pngs)
    for entry in index["classes"].values():
        assert (tmp_path / "cam" / entry["file"]).read_bytes()[8:12] == b"WEBP"
        assert (tmp_path / "cam" / entry["file"]).stat().st_size > 1_500
        assert entry["correct"] + entry["wrong"] >= 1 and entry["correct"] <= 2 and entry["wrong"] <= 2
    assert json.loads((tmp_path / "cam" / "gradcam.json").read_text()) == index
    with pytest.raises(NormlabError, match="green"):
        run_gradcam(run_dir, classes=["gren"], out_dir=tmp_path / "bad")
    # default: every class (capped), into <run>/gradcam/
    index = run_gradcam(run_dir, per_class=1, max_classes=2)
    assert len(index["classes"]) == 2 and (run_dir / "gradcam" / "gradcam.json").is_file()
    assert len(list((run_dir / "gradcam").glob("*.webp"))) == 2


def test_gradcam_on_loaded_model_leaves_no_hooks(run_dir):
    run = load_run(run_dir)
    x = normalize(run.data.val_x[:4], run.data.mean, run.data.std)
    maps = gradcam_maps(run.model, x, run.data.val_y[:4], last_stage_convs(run.model))
    assert maps.shape == (4, 16, 16) and np.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1
    assert_no_hooks(run.model)


def test_run_analyses(run_dir):
    paths = run_analyses(run_dir)
    assert set(paths) == {"confusion_val", "confusion_test", "misclassified_val"}
    for name in ("confusion_val.png", "confusion_test.png", "misclassified_val.webp"):
        assert (run_dir / name).stat().st_size > 2_000, name
    assert (run_dir / "misclassified_val.webp").read_bytes()[8:12] == b"WEBP"
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert set(preds) == {"val", "test"} and len(preds["val"]["true"]) == len(preds["val"]["pred"]) == 3 * 8
    cm = json.loads((run_dir / "summary.json").read_text())["val"]["confusion"]
    assert sum(t == p for t, p in zip(preds["val"]["true"], preds["val"]["pred"])) == sum(cm[i][i] for i in range(3))


def test_figures_with_odd_names(tmp_path):
    names = [ODD, "a$b$c", "tab\tnew\nline", "x" * 200]
    cm = np.arange(16).reshape(4, 4)
    assert plot_confusion(cm, names, tmp_path / "cm.png", title="$odd$ <i>").stat().st_size > 5_000
    assert plot_confusion(np.zeros((4, 4)), names, tmp_path / "cm0.png", normalize=False).is_file()
    big = np.random.default_rng(0).integers(0, 5, size=(40, 40))
    assert plot_confusion(big, [f"c{i}" for i in range(40)], tmp_path / "cm40.png").is_file()
    imgs = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8)
    assert misclassified_grid(imgs, [0, 1, 2], [3, 0, 1], names, tmp_path / "g.png").stat().st_size > 3_000
    assert misclassified_grid(imgs[:0], [], [], names, tmp_path / "g0.png").is_file()
    with pytest.raises(NormlabError):
        plot_confusion(cm, names[:3], tmp_path / "bad.png")


def test_pick_shared_chooses_agreed_and_disputed_images():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    preds = {"a": torch.tensor([0, 0, 1, 1, 1, 0]), "b": torch.tensor([0, 1, 1, 0, 1, 0])}
    picks = pick_shared(preds, y, [0, 1], agree=5, disagree=5)
    assert picks[0] == {"agree": [0], "disagree": [1, 3]}  # image 2: both wrong the same way -> neither
    assert picks[1] == {"agree": [4], "disagree": []}
    with pytest.raises(NormlabError):
        pick_shared({"a": torch.tensor([0])}, y, [0])


def test_compare_gradcam_explains_the_same_images_by_every_run(run_dir, tmp_path):
    other = make_config(dict(dataset="folder", data_root=str(run_dir.parent / "imgs"), image_size=16, n=1, epochs=1,
                             batch_size=16, lr=0.05, eval_batch_size=64, probe_size=16, progress="off", device="cpu",
                             norm="gn", out=str(tmp_path / "gn")))
    gn_dir = train(other)
    index = compare_gradcam([run_dir, gn_dir], tmp_path / "cmp", labels=["bn", "gn"], agree=2, disagree=2)
    assert set(index["runs"]) == {"bn", "gn"}
    assert index["classes"], "no class had an image to show"
    for name, entry in index["classes"].items():
        shown = entry["agree_indices"] + entry["disagree_indices"]
        assert 1 <= len(shown) <= 4
        assert set(entry["predictions"]) == {"bn", "gn"} and all(len(p) == len(shown) for p in entry["predictions"].values())
        assert (tmp_path / "cmp" / entry["file"]).read_bytes()[8:12] == b"WEBP"
    with pytest.raises(NormlabError, match="distinct label"):
        compare_gradcam([run_dir, gn_dir], tmp_path / "bad", labels=["x", "x"])


def test_gradcam_command_takes_several_runs_and_a_device():
    from normlab.cli import build_parser

    args = build_parser().parse_args(["gradcam", "runs/a", "runs/b", "--device", "cuda"])
    assert args.run_dir == ["runs/a", "runs/b"] and args.device == "cuda"
    for cmd in (["activations", "r", "--image", "x.png"], ["report", "s"]):
        assert build_parser().parse_args(cmd + ["--device", "mps"]).device == "mps"
