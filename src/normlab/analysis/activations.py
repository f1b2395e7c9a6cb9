"""Feature maps of a trained run for one image: what the stem and each stage respond to.

``run_activations(run_dir, image)`` reads the run's best (else last) weights and data statistics,
prepares the image like the run's data (grey or RGB to the run's channel count, shorter side resized
and centre-cropped to the run's image size, normalised with the training mean/std), and writes one
figure per layer -- ``stem.png``, ``stage1.png``, ... -- with the first ``channels`` feature maps
(each map min-max scaled on its own) and the input image in the first panel.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.device import unwrap
from normlab.errors import NormlabError
from normlab.layer_outputs import record_outputs


def read_image(path: str | os.PathLike, channels: int | None = None, size: int | None = None) -> torch.Tensor:
    """One image file as a ``C x H x W`` uint8 tensor: ``channels`` 1 (grey) or 3 (RGB; default: the file's
    own, grey stays grey), resized (shorter side) and centre-cropped to ``size x size`` when given."""
    import warnings

    from PIL import Image, ImageOps

    from normlab.data.images import _to_rgb, resize_square

    path = Path(path)
    if not path.is_file():
        raise NormlabError(f"image {path} not found: pass an image file (PNG, JPEG, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img) or img
                grey = img.mode in ("L", "LA", "1", "I", "F") or img.mode.startswith("I;16")
                img = _to_rgb(img)
    except Exception as exc:
        raise NormlabError(f"image {path} cannot be read ({type(exc).__name__}): pass a PNG or JPEG file") from None
    channels = channels or (1 if grey else 3)
    if channels == 1:
        img = img.convert("L")
    if size:
        img = resize_square(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def feature_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``stem`` and ``stage1..K`` of a normlab ResNet / compact model or of the workbench's resnet18; of a timm
    model without ``stages``, its feature stages (``feature_info``, e.g. RegNet's ``s1..s4``)."""
    m = unwrap(model)
    layers: dict[str, nn.Module] = {}
    if isinstance(getattr(m, "stem", None), nn.Module):
        layers["stem"] = m.stem
    stages = list(getattr(m, "stages", None) or [])
    if not stages and isinstance(getattr(m, "feature_info", None), list):
        names = [f.get("module") for f in m.feature_info if isinstance(f, dict)]
        stages = [m.get_submodule(n) for n in names if n and n != "stem" and not n.startswith("act")]
    for i, stage in enumerate(stages):
        layers[f"stage{i + 1}"] = stage
    if not layers:
        raise NormlabError(f"{type(m).__name__} has no stem/stages to show feature maps of")
    return layers


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs (``C x H x W``, CPU float) of every feature layer for the single normalised image ``x`` (1 x C x H x W)."""
    was_training = model.training
    try:
        model.eval()
        with record_outputs(feature_layers(model), keep=lambda o: o[0].detach().float().cpu()) as out:
            model(x)
    finally:
        model.train(was_training)
    return out


def plot_feature_maps(maps: torch.Tensor, path: str | os.PathLike, image: torch.Tensor | None = None,
                      channels: int = 16, title: str = "") -> Path:
    """A grid of the first ``channels`` maps of ``maps`` (``C x H x W``), each min-max scaled; the input first."""
    from normlab.plots import plt, save_figure

    k = min(channels, maps.shape[0])
    panels = k + (1 if image is not None else 0)
    cols = min(8, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    flat = list(axes.flat)
    if image is not None:
        img = image.float().div(255).clamp(0, 1)
        ax = flat.pop(0)
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img[:3].permute(1, 2, 0).numpy())
        ax.set_title("input", fontsize=8)
    for c in range(k):
        a = maps[c]
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)
        flat[c].imshow(a.numpy(), cmap="viridis", vmin=0, vmax=1)
        flat[c].set_title(f"ch {c}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def run_activations(run_dir: str | Path, image: str | Path, out_dir: str | Path | None = None, channels: int = 16,
                    device: str = "cpu") -> dict[str, Any]:
    """Write ``<out>/<layer>.png`` for the stem and every stage of the run; returns ``{layer: path}`` info."""
    from normlab.data import normalize

    if not 1 <= channels <= 64:
        raise NormlabError(f"channels must be between 1 and 64, got {channels}")
    from normlab.analysis.galleries import load_run

    run = load_run(run_dir, device)
    data = run.data
    img = read_image(image, channels=data.in_channels, size=data.image_size)
    x = normalize(img[None].to(run.device), data.mean, data.std)
    maps = feature_maps(run.model, x)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "activations"
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image).name)[:60]
    files: dict[str, Any] = {}
    for name, fmap in maps.items():
        path = plot_feature_maps(fmap, out / f"{name}.png", image=img, channels=channels,
                                 title=f"{run.cfg.model} · {run.cfg.norm} · {name} ({fmap.shape[0]} channels, "
                                       f"{fmap.shape[1]}x{fmap.shape[2]}) · {stem}")
        files[name] = {"file": str(path), "channels": int(fmap.shape[0]), "size": list(fmap.shape[1:])}
    return files
