"""Figures of a finished run: confusion matrices, misclassified images, Grad-CAM galleries.

``run_analyses(run_dir)`` never trains: it reads the run folder (``summary.json``'s confusion matrices,
the best checkpoint) and the data set, and writes ``confusion_val.png``, ``confusion_test.png`` (when the
data set has a test split), ``misclassified_val.png|webp`` and ``predictions.json``.

Class names are untrusted text from the data set: every label is drawn with ``parse_math=False`` (a
``$`` is a dollar sign, never mathtext), control characters are replaced and long names are shortened.
"""

from __future__ import annotations

import dataclasses

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.plots import gallery_dpi, gallery_font, plt, save_figure
from normlab.runfolder import BEST, CONFUSION_PNG, LAST, MISCLASSIFIED, write_predictions

ANNOTATE_MAX = 15  # annotate confusion cells with counts up to this many classes
TICKS_MAX = 60  # beyond this many classes the confusion axes get index ticks, not names


def label(text: Any, maxlen: int = 28) -> str:
    """Plain, one-line, bounded text for a figure label."""
    s = re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(text))
    return s if len(s) <= maxlen else s[: maxlen - 1] + "…"


# --------------------------------------------------------------------------- loading a run


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Any  # TrainConfig
    model: nn.Module  # eval mode, on ``device``
    data: Any  # DataBundle
    checkpoint: Path
    device: torch.device


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """The run's best weights (``best.pt``, else ``last.pt``) in the model its saved config describes, and its data."""
    from normlab.data import load_data
    from normlab.models import build_model
    from normlab.checkpoint import config_of, load_checkpoint, load_weights
    from normlab.device import pick_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NormlabError(f"run folder {run_dir} not found: pass a folder made by `normlab train`")
    path = next((p for p in (run_dir / BEST, run_dir / LAST) if p.is_file()), None)
    if path is None:
        raise NormlabError(f"{run_dir} has no best.pt or last.pt: train the run (or resume it) first")
    dev = device if isinstance(device, torch.device) else pick_device(str(device))
    ckpt = load_checkpoint(path, map_location=dev)
    cfg = config_of(ckpt)
    data = load_data(cfg, max_eval=cfg.eval_subset)
    # the checkpoint holds every weight: never fetch --pretrained again (it may be gone or need a download)
    model = build_model(dataclasses.replace(cfg, pretrained=None), data.in_channels, data.num_classes)
    load_weights(model, ckpt, path)
    model.to(dev).eval()
    return LoadedRun(run_dir, cfg, model, data, path, dev)


def split_tensors(data: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in ("train", "val", "test"):
        raise NormlabError(f"unknown split {split!r}: use train, val or test")
    x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
    if x is None or y is None:
        raise NormlabError(f"the data set {data.name!r} has no {split} split: use --split val")
    return x, y


@torch.no_grad()
def predictions(model: nn.Module, data: Any, split: str = "val", device: str | torch.device = "cpu",
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_uint8, y, preds, confusion)`` of ``model`` (eval mode; its training flag is restored) on ``split``."""
    from normlab.evaluation import evaluate

    x, y = split_tensors(data, split)
    was_training = model.training
    try:
        _, cm, preds = evaluate(model, x, y, data, torch.device(device), batch_size)
    finally:
        model.train(was_training)
    return x, y, preds, cm


def predict_split(run: LoadedRun, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, preds, _ = predictions(run.model, run.data, split, run.device, run.cfg.eval_batch_size)
    return x, y, preds


# --------------------------------------------------------------------------- figures


def plot_confusion(cm: Any, classes: Sequence[str], path: str | os.PathLike, title: str = "",
                   normalize: bool = True) -> Path:
    """Confusion-matrix heatmap (rows = true class). ``normalize``: colours are row fractions; up to
    ``ANNOTATE_MAX`` classes every cell shows its count."""
    cm = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if cm.shape != (k, k):
        raise NormlabError(f"confusion matrix of shape {cm.shape} does not match {k} classes")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        shown = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    else:
        shown = cm
    side = min(28.0, max(5.0, 0.42 * k + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), constrained_layout=True)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, shown.max()),
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                 label="fraction of the true class" if normalize else "images")
    if k <= TICKS_MAX:
        size = 9 if k <= 15 else 7 if k <= 30 else 5
        names = [label(c, 24) for c in classes]
        ax.set_xticks(range(k), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=size,
                      parse_math=False)
        ax.set_yticks(range(k), names, fontsize=size, parse_math=False)
    else:
        step = max(1, k // 20)
        ax.set_xticks(range(0, k, step))
        ax.set_yticks(range(0, k, step))
    if k <= ANNOTATE_MAX:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(round(cm[i, j]))}", ha="center", va="center", fontsize=8,
                        color="white" if shown[i, j] > (0.5 if normalize else shown.max() / 2) else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = cm.sum()
    acc = np.trace(cm) / total if total else float("nan")
    ax.set_title(label(f"{title}  (accuracy {acc:.3f}, {int(total)} images)" if title else
                       f"accuracy {acc:.3f}, {int(total)} images", 160), parse_math=False)
    return save_figure(fig, path)


def to_rgb01(img_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
    """A ``C × H × W`` uint8 image as ``H × W × 3`` float32 in [0, 1] (grayscale repeated)."""
    a = img_uint8.cpu().numpy() if isinstance(img_uint8, torch.Tensor) else np.asarray(img_uint8)
    a = np.transpose(a, (1, 2, 0)).astype(np.float32) / 255.0
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.clip(a[:, :, :3], 0.0, 1.0)


def overlay(img_uint8: torch.Tensor | np.ndarray, cam_map: np.ndarray) -> np.ndarray:
    """The heatmap superimposed on the image (``H × W × 3`` uint8, RGB)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(to_rgb01(img_uint8), np.clip(cam_map, 0.0, 1.0).astype(np.float32), use_rgb=True)


def _show(ax, img_uint8: Any) -> None:
    a = img_uint8.cpu().numpy() if isinstance(img_uint8, torch.Tensor) else np.asarray(img_uint8)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[2] == 1:
        ax.imshow(a[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(a, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def misclassified_grid(images_uint8: Any, true: Any, pred: Any, classes: Sequence[str], path: str | os.PathLike,
                       max_images: int = 32, title: str = "") -> Path:
    """A grid of (misclassified) images labelled "true → predicted"; grayscale drawn in gray."""
    n = min(len(images_uint8), max_images)
    true, pred = [int(t) for t in list(true)[:n]], [int(p) for p in list(pred)[:n]]
    dpi = gallery_dpi(max(images_uint8.shape[-2:]) if n else 64)
    cols = max(1, min(8, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.4, 2.1 * rows + 0.6), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.axis("on")
        _show(ax, images_uint8[i])
        ax.set_title(f"{label(classes[true[i]], 16)}\n→ {label(classes[pred[i]], 16)}", fontsize=gallery_font(dpi, 7),
                     parse_math=False)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center",
                          transform=axes.flat[0].transAxes)
    fig.suptitle(label(title or "misclassified (true → predicted)", 160), parse_math=False)
    return save_figure(fig, path, dpi=dpi)


def gradcam_gallery(rows: dict[str, list[tuple[Any, np.ndarray, int, int]]], classes: Sequence[str],
                    path: str | os.PathLike, title: str = "") -> Path:
    """Rows "correct" and "misclassified": each cell is the image | its Grad-CAM overlay, titled true/predicted.

    ``rows["correct"]`` / ``rows["wrong"]`` are lists of ``(image_uint8 C×H×W, map H×W, true, pred)``.
    """
    kinds = (("correct", "correct"), ("wrong", "misclassified"))
    cols = max(1, max(len(rows.get(k, [])) for k, _ in kinds))
    dpi = gallery_dpi(max((max(item[0].shape[-2:]) for k, _ in kinds for item in rows.get(k, [])), default=64))
    fig, axes = plt.subplots(2, cols, figsize=(3.0 * cols + 0.8, 2.0 * 2 + 0.9), squeeze=False,
                             constrained_layout=True)
    for r, (kind, name) in enumerate(kinds):
        items = rows.get(kind, [])
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.set_frame_on(False)
                if c == 0:
                    ax.text(0.5, 0.5, f"no {name} examples", ha="center", va="center", transform=ax.transAxes)
                continue
            img, cam_map, t, p = items[c]
            base = np.uint8(np.round(to_rgb01(img) * 255))
            sep = np.full((base.shape[0], max(1, base.shape[1] // 32), 3), 255, dtype=np.uint8)
            ax.imshow(np.concatenate([base, sep, overlay(img, cam_map)], axis=1), interpolation="nearest")
            ax.set_title(f"true: {label(classes[t], 22)}\npred: {label(classes[p], 22)}", fontsize=gallery_font(dpi),
                         color="black" if t == p else "firebrick", parse_math=False)
        axes[r][0].set_ylabel(name, fontsize=gallery_font(dpi, 11))
    fig.suptitle(label(title or "Grad-CAM", 160) + "\n(image | heatmap overlay, maps for the true class)",
                 parse_math=False)
    return save_figure(fig, path, dpi=dpi)


def compare_gallery(images: Any, true: int, per_run: dict[str, tuple[np.ndarray, list[int]]], kinds: Sequence[str],
                    classes: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """A row per image: the image, then each run's Grad-CAM overlay titled with that run's prediction
    (red when wrong). ``per_run[label] = (maps N×H×W, predictions)``; ``kinds[i]`` labels row ``i``."""
    n, runs = len(images), list(per_run)
    cols = 1 + len(runs)
    side = 1.45 if max(images.shape[-2:]) <= 64 else 2.2  # inches per panel
    dpi = gallery_dpi(max(images.shape[-2:]))
    fs = gallery_font(dpi, 7)
    fig, axes = plt.subplots(max(1, n), cols, figsize=(side * cols + 0.6, side * max(1, n) + 0.9), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(n):
        axes[i][0].imshow(np.uint8(np.round(to_rgb01(images[i]) * 255)), interpolation="nearest")
        axes[i][0].set_ylabel(kinds[i], fontsize=fs)
        if i == 0:
            axes[i][0].set_title(f"true: {label(classes[true], 18)}", fontsize=fs, parse_math=False)
        for j, run in enumerate(runs, 1):
            maps, preds = per_run[run]
            axes[i][j].imshow(overlay(images[i], maps[i]), interpolation="nearest")
            wrong = preds[i] != true
            axes[i][j].set_title(f"{label(run, 14)}\n→ {label(classes[preds[i]], 14)}", fontsize=fs,
                                 color="firebrick" if wrong else "black", parse_math=False)
    fig.suptitle(label(title or "Grad-CAM across runs", 160) + "\n(maps for the true class; red title: wrong prediction)",
                 parse_math=False, fontsize=fs + 1)
    return save_figure(fig, path, dpi=dpi)


# --------------------------------------------------------------------------- a finished run


def run_analyses(run_dir: str | Path, device: str = "cpu", max_images: int = 32) -> dict[str, str]:
    """Confusion matrices (val, and test when the data set has one) and the misclassified-val grid of a
    finished run; the confusions come from ``summary.json`` when it saved them. Returns ``{name: path}``."""
    from normlab.runfolder import read_summary

    run_dir = Path(run_dir)
    run = load_run(run_dir, device)
    data, cfg = run.data, run.cfg
    summary = read_summary(run_dir) or {}
    where = f"{cfg.dataset} · {cfg.model_label} · {cfg.norm}"
    out: dict[str, str] = {}
    cache: dict[str, tuple] = {}
    for split in ("val", "test"):
        if getattr(data, f"{split}_x") is None:
            continue
        cache[split] = predictions(run.model, data, split, run.device, cfg.eval_batch_size)
        saved = (summary.get(split) or {}).get("confusion")
        k = data.num_classes
        cm = np.asarray(saved) if saved is not None and np.asarray(saved).shape == (k, k) else cache[split][3].numpy()
        out[f"confusion_{split}"] = str(plot_confusion(cm, data.classes, run_dir / CONFUSION_PNG.format(split=split),
                                                       title=f"{split} confusion · {where}"))
    # per-image results: the report pairs two runs on the same images (McNemar) when it has one seed each
    write_predictions(run_dir, {split: (c[1].tolist(), c[2].tolist()) for split, c in cache.items()})
    x, y, preds, _ = cache["val"]
    wrong = torch.nonzero(preds != y).flatten()
    shown = wrong[:max_images]
    out["misclassified_val"] = str(misclassified_grid(
        x[shown], y[shown], preds[shown], data.classes, run_dir / MISCLASSIFIED[0 if data.in_channels == 1 else 1],
        max_images,
        title=f"misclassified val images (first {len(shown)} of {len(wrong)}) · {where}"))
    return out
