"""Grad-CAM (Selvaraju et al. 2017) on a trained run: where does the network look for the true class?

The maps come from ``pytorch_grad_cam.GradCAM`` on the convolutions of the last ResNet stage (the
64×64 stage for a 256×256 input). With several target layers the library min-max scales each layer's
map to [0, 1] at the input resolution, averages them (``BaseCAM.aggregate_multi_layers``: a mean) and
rescales the mean to [0, 1]; that is the aggregation used here.

``run_gradcam(run_dir)`` writes ``<run_dir>/gradcam/<k>_<class>.jpg`` galleries (rows "correct" and
"misclassified", image | heatmap overlay, true/predicted class in the titles) and ``gradcam.json``.
``compare_gradcam(run_dirs, out)`` explains the same chosen val images (per class: some every model gets
right, some the models disagree on) by every run side by side, each with its own prediction.
Class names come from the data set and are treated as untrusted text: they only appear in figure
titles (drawn as plain text, no mathtext) and JSON, and the file names use a sanitised slug.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.device import unwrap
from normlab.errors import NormlabError

from normlab.plots import PHOTO_FORMAT

CAM_BATCH = 16  # images per Grad-CAM forward/backward (bounds memory at 256×256)


def last_stage_convs(model: nn.Module) -> list[nn.Module]:
    """``conv1`` and ``conv2`` of every block of the last stage: 2n layers for a 6n+2 ResNet (and ResNet-18).
    A timm model: the output of its last feature stage (``feature_info``: ``stages.3``, ``s4``, ``layer4``)."""
    m = unwrap(model)
    stages = getattr(m, "stages", None)
    blocks = list(stages[-1]) if isinstance(stages, (list, nn.Sequential, nn.ModuleList)) and len(stages) and \
        isinstance(stages[-1], (nn.Sequential, nn.ModuleList)) else []
    if blocks and all(hasattr(b, "conv1") and hasattr(b, "conv2") for b in blocks):
        layers: list[nn.Module] = []
        for block in blocks:
            layers += [block.conv1, block.conv2]
        return layers
    info = getattr(m, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        return [m.get_submodule(info[-1]["module"])]
    raise NormlabError(f"{type(m).__name__} has no `stages` of residual blocks and no timm feature_info: Grad-CAM "
                       "layers are picked from a normlab ResNet, ResNet-18 or a timm model")


def gradcam_maps(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | torch.Tensor,
                 layers: Sequence[nn.Module] | None = None, batch_size: int = CAM_BATCH) -> np.ndarray:
    """Grad-CAM maps (``N × H × W`` float32 in [0, 1], the input's H×W) of ``targets[i]`` for ``images[i]``.

    ``images`` are normalised float ``N × C × H × W``; ``layers`` default to ``last_stage_convs(model)``
    (several layers: per-layer maps scaled to [0, 1], averaged, rescaled). The model runs in eval mode;
    its training flag and the parameters' ``.grad`` are restored, and every hook is removed afterwards.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if images.dim() != 4:
        raise NormlabError(f"gradcam_maps expects N x C x H x W images, got shape {tuple(images.shape)}")
    targets = [int(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)]
    if len(targets) != len(images):
        raise NormlabError(f"gradcam_maps: {len(images)} images but {len(targets)} targets; pass one class per image")
    n, _, h, w = images.shape
    if n == 0:
        return np.zeros((0, h, w), dtype=np.float32)
    layers = list(layers) if layers is not None else last_stage_convs(model)
    was_training = model.training
    saved_grads = [p.grad for p in model.parameters()]
    device = next(model.parameters()).device
    out = []
    try:
        model.eval()
        with torch.enable_grad(), GradCAM(model=model, target_layers=layers) as cam:
            for i in range(0, n, batch_size):
                xb = images[i:i + batch_size].detach().to(device, torch.float32)
                tb = [ClassifierOutputTarget(t) for t in targets[i:i + batch_size]]
                maps = cam(input_tensor=xb, targets=tb)
                cam.outputs = None  # drop the retained graph of this batch
                out.append(np.asarray(maps, dtype=np.float32).reshape(len(xb), h, w))
    finally:
        for p, g in zip(model.parameters(), saved_grads):
            p.grad = g
        model.train(was_training)
    maps = np.concatenate(out)
    return np.clip(np.nan_to_num(maps, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)


def select_examples(preds: Sequence[int] | torch.Tensor, targets: Sequence[int] | torch.Tensor,
                    classes_wanted: Sequence[int], per_class: int = 5) -> dict[int, dict[str, list[int]]]:
    """For each wanted class, the first ``per_class`` indices (in data order) of images of that class that
    were classified correctly and incorrectly: ``{k: {"correct": [...], "wrong": [...]}}``."""
    p = torch.as_tensor(preds).reshape(-1).long()
    t = torch.as_tensor(targets).reshape(-1).long()
    if len(p) != len(t):
        raise NormlabError(f"select_examples: {len(p)} predictions but {len(t)} targets")
    chosen: dict[int, dict[str, list[int]]] = {}
    for k in classes_wanted:
        k = int(k)
        of_k = t == k
        chosen[k] = {"correct": torch.nonzero(of_k & (p == k)).flatten()[:per_class].tolist(),
                     "wrong": torch.nonzero(of_k & (p != k)).flatten()[:per_class].tolist()}
    return chosen


def resolve_classes(wanted: Sequence[str] | None, classes: Sequence[str], max_classes: int | None = 10) -> list[int]:
    """Class indices for names (exact match; an unknown name raises, listing close matches)."""
    if wanted is None:
        return list(range(len(classes)))[: max_classes if max_classes is not None else None]
    index = {c: i for i, c in enumerate(classes)}
    out: list[int] = []
    for name in wanted:
        if name not in index:
            close = difflib.get_close_matches(str(name), list(classes), n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
                f"the data set has {len(classes)} classes, e.g. {', '.join(repr(c) for c in list(classes)[:5])}"
            raise NormlabError(f"unknown class {str(name)[:80]!r}: {hint} (class names are case-sensitive)")
        if index[name] not in out:
            out.append(index[name])
    return out


def class_slug(k: int, name: str) -> str:
    """A safe file stem for class ``k``: index prefix (unique) + the name reduced to [A-Za-z0-9._-]."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")[:40]
    return f"{k:03d}_{slug}" if slug else f"{k:03d}"



def run_gradcam(run_dir: str | Path, classes: Sequence[str] | None = None, per_class: int = 5, split: str = "val",
                max_classes: int = 10, device: str = "cpu", out_dir: str | Path | None = None) -> dict[str, Any]:
    """Grad-CAM galleries of a finished run for the TRUE class of up to ``per_class`` correctly and
    ``per_class`` wrongly classified ``split`` images per class; returns (and writes) the ``gradcam.json`` index."""
    from normlab.analysis.galleries import gradcam_gallery, load_run, predict_split
    from normlab.data import normalize
    from normlab.io import write_json

    if per_class < 1:
        raise NormlabError(f"per_class must be >= 1, got {per_class}")
    run = load_run(run_dir, device)
    data = run.data
    wanted = resolve_classes(list(classes) if classes is not None else None, data.classes, max_classes)
    x, y, preds = predict_split(run, split)
    picks = select_examples(preds, y, wanted, per_class)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "gradcam"
    out.mkdir(parents=True, exist_ok=True)
    layers = last_stage_convs(run.model)
    index: dict[str, Any] = {"run": str(run_dir), "checkpoint": run.checkpoint.name, "split": split,
                             "target": "true class", "layers": f"last stage conv1/conv2 ({len(layers)} layers)",
                             "per_class": per_class, "classes": {}}
    for k in wanted:
        rows = {}
        for kind in ("correct", "wrong"):
            idx = picks[k][kind]
            if idx:
                imgs = x[idx]
                maps = gradcam_maps(run.model, normalize(imgs, data.mean, data.std), [k] * len(idx), layers)
            else:
                imgs, maps = x[:0], np.zeros((0,) + tuple(x.shape[-2:]), dtype=np.float32)
            rows[kind] = [(imgs[j], maps[j], k, int(preds[i])) for j, i in enumerate(idx)]
        name = data.classes[k]
        fname = class_slug(k, name) + "." + PHOTO_FORMAT
        gradcam_gallery(rows, data.classes, out / fname,
                        title=f"Grad-CAM ({split}, true class) · {name}")
        index["classes"][name] = {"index": k, "file": fname, "correct": len(rows["correct"]),
                                  "wrong": len(rows["wrong"]), "correct_indices": picks[k]["correct"],
                                  "wrong_indices": picks[k]["wrong"]}
    write_json(out / "gradcam.json", index)
    return index


def pick_shared(preds: dict[str, torch.Tensor], targets: torch.Tensor, classes_wanted: Sequence[int],
                agree: int = 1, disagree: int = 2) -> dict[int, dict[str, list[int]]]:
    """Per wanted class, the first ``agree`` images every model classifies correctly and the first
    ``disagree`` images the models disagree on (predictions differ); an image all models get wrong in
    the same way is neither. ``{k: {"agree": [...], "disagree": [...]}}``."""
    t = torch.as_tensor(targets).reshape(-1).long()
    stack = torch.stack([torch.as_tensor(p).reshape(-1).long() for p in preds.values()])
    if stack.shape[1] != len(t):
        raise NormlabError(f"pick_shared: {stack.shape[1]} predictions but {len(t)} targets")
    all_right = (stack == t).all(0)
    differ = (stack != stack[0]).any(0)
    out: dict[int, dict[str, list[int]]] = {}
    for k in classes_wanted:
        of_k = t == int(k)
        out[int(k)] = {"agree": torch.nonzero(of_k & all_right).flatten()[:agree].tolist(),
                       "disagree": torch.nonzero(of_k & differ).flatten()[:disagree].tolist()}
    return out


def compare_gradcam(run_dirs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None,
                    classes: Sequence[str] | None = None, agree: int = 1, disagree: int = 2, split: str = "val",
                    max_classes: int = 10, device: str = "cpu") -> dict[str, Any]:
    """The same ``split`` images explained by every run in ``run_dirs`` (maps for the true class), one
    figure per class: a row per image, the image then one overlay per run titled with that run's
    prediction. The runs must share the data set. Writes ``<out_dir>/<k>_<class>.jpg`` and ``gradcam.json``."""
    from normlab.analysis.galleries import compare_gallery, load_run, predict_split
    from normlab.data import normalize
    from normlab.io import write_json

    if len(run_dirs) < 1:
        raise NormlabError("compare_gradcam needs at least one run folder")
    labels = list(labels) if labels is not None else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs) or len(set(labels)) != len(labels):
        raise NormlabError("compare_gradcam: give one distinct label per run folder")
    loaded, preds = {}, {}
    x = y = None
    for label, run_dir in zip(labels, run_dirs):
        run = load_run(run_dir, device)
        rx, ry, rp = predict_split(run, split)
        if y is None:
            x, y, data = rx, ry, run.data
        elif run.data.classes != data.classes or not torch.equal(ry, y):
            raise NormlabError(f"{run_dir} was trained on other data than {run_dirs[0]} (classes or {split} images "
                               "differ): compare runs of one data set")
        loaded[label], preds[label] = run, rp
    wanted = resolve_classes(list(classes) if classes is not None else None, data.classes, max_classes)
    picks = pick_shared(preds, y, wanted, agree, disagree)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"runs": {label: str(d) for label, d in zip(labels, run_dirs)}, "split": split,
                             "target": "true class", "classes": {}}
    for k in wanted:
        idx = picks[k]["agree"] + picks[k]["disagree"]
        if not idx:
            continue
        imgs = x[idx]
        maps = {label: gradcam_maps(run.model, normalize(imgs.to(run.device), data.mean, data.std), [k] * len(idx))
                for label, run in loaded.items()}
        kinds = ["all right"] * len(picks[k]["agree"]) + ["disagree"] * len(picks[k]["disagree"])
        name = data.classes[k]
        fname = class_slug(k, name) + "." + PHOTO_FORMAT
        compare_gallery(imgs, k, {label: (maps[label], [int(preds[label][i]) for i in idx]) for label in loaded},
                        kinds, data.classes, out / fname, title=f"Grad-CAM across runs ({split}, true class) · {name}")
        index["classes"][name] = {"index": k, "file": fname, "agree_indices": picks[k]["agree"],
                                  "disagree_indices": picks[k]["disagree"],
                                  "predictions": {label: [data.classes[int(preds[label][i])] for i in idx]
                                                  for label in loaded}}
    write_json(out / "gradcam.json", index)
    return index
