"""A trained run, reused: ``load_trained`` (its model with the best or last weights, its config and summary,
behind ``normlab.load_run``) and ``evaluate_run`` (``normlab evaluate``: the weights scored on the run's own
data or on another data set of the same classes). Nothing here trains.

The evaluated images are normalized with the run's own training statistics (saved in the checkpoint), not the
other data set's, so the model sees its inputs as in training; the scores are those ``summary.json`` keeps per
split (loss, accuracy, micro-F1, macro-F1, confusion matrix), computed by the same evaluation pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab import runfolder
from normlab.errors import NormlabError

WEIGHTS = {"best": runfolder.BEST, "last": runfolder.LAST}


@dataclass
class TrainedRun:
    """What ``normlab.load_run`` returns: the model (eval mode) with the chosen weights, and the run's records."""

    model: nn.Module
    config: Any  # TrainConfig
    summary: dict[str, Any] | None  # summary.json (None while the run is unfinished)
    run_dir: Path
    checkpoint: Path
    epoch: int | None  # the epoch these weights are from
    classes: list[str] | None
    mean: tuple[float, ...] | None  # the run's input normalization (None: checkpoint older than this record)
    std: tuple[float, ...] | None

    def __iter__(self):  # model, config = normlab.load_run(run)
        return iter((self.model, self.config))


def _first(values: list[str], n: int = 4) -> str:
    return ", ".join(values[:n]) + (", ..." if len(values) > n else "")


def _shape(cfg: Any, ckpt: dict[str, Any], summary: dict[str, Any] | None) -> tuple[int, list[str] | None, int]:
    """(in_channels, class names or None, class count) without loading the data: the checkpoint's record, else
    the summary's class list and the data set's channel count."""
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    classes = data.get("classes") or (summary or {}).get("classes")
    in_channels = data.get("in_channels") or (1 if cfg.dataset == "fashion-mnist" else 3)
    if classes:
        return int(in_channels), list(classes), len(classes)
    # an unfinished run written before checkpoints recorded their classes: the class data set decides
    from normlab.data import load_data

    bundle = load_data(cfg, max_eval=cfg.eval_subset)
    return bundle.in_channels, list(bundle.classes), bundle.num_classes


def load_trained(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu") -> TrainedRun:
    """The model of ``run_dir`` with its ``best.pt`` (or ``last.pt``) weights, in eval mode on ``device``."""
    from normlab.checkpoint import config_of, load_checkpoint, load_weights
    from normlab.device import pick_device
    from normlab.models import build_model

    run_dir = Path(run_dir)
    if which not in WEIGHTS:
        raise NormlabError(f"which={which!r}: use 'best' (best val accuracy) or 'last' (the last epoch)")
    if not run_dir.is_dir():
        raise NormlabError(f"run folder {run_dir} not found: pass a folder made by `normlab train`")
    path = run_dir / WEIGHTS[which]
    if not path.is_file():
        other = next((w for w, f in WEIGHTS.items() if w != which and (run_dir / f).is_file()), None)
        hint = (f"use {other!r} weights (--weights {other})" if other else
                "train the run first (a run writes best.pt and last.pt after its first epoch)")
        raise NormlabError(f"{run_dir} has no {WEIGHTS[which]} (no trained weights): {hint}")
    dev = device if isinstance(device, torch.device) else pick_device(str(device))
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt)
    summary = runfolder.read_summary(run_dir)
    in_channels, classes, k = _shape(cfg, ckpt, summary)
    # the checkpoint holds every weight: never read --pretrained again (the file may be gone)
    model = build_model(dataclasses.replace(cfg, pretrained=None), in_channels, k)
    load_weights(model, ckpt, path)
    model.to(dev).eval()
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    epoch = ckpt.get("epoch") if which == "best" else (ckpt.get("state") or {}).get("epoch")
    return TrainedRun(model, cfg, summary, run_dir, path, int(epoch) if epoch is not None else None, classes,
                      tuple(data["mean"]) if data.get("mean") else None, tuple(data["std"]) if data.get("std") else None)


def _data_label(cfg: Any, dataset: str, data_root: str | None, own: bool) -> str:
    if own or not data_root:
        return dataset
    name = Path(data_root).name
    for ext in (".tar.gz", ".tgz", ".tar", ".zip"):
        name = name.removesuffix(ext)
    return f"{dataset}-{name}"


def evaluate_run(run_dir: str | Path, *, data_root: str | None = None, dataset: str | None = None,
                 split: str = "test", which: str = "best", eval_subset: int | None = None,
                 out: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Score a run's weights on ``split`` of its own data (no ``data_root``/``dataset``) or of another data set
    with the same classes; writes ``<data>-<split>.json`` and its confusion figure (``runfolder.eval_paths``)
    and returns the record plus ``json`` and ``figure`` paths. ``eval_subset``: cap the split at a stratified
    subset of N images (None: the run's own ``eval_subset``; 0: every image)."""
    from normlab.analysis.galleries import plot_confusion, split_tensors
    from normlab.config import make_config
    from normlab.data import load_data
    from normlab.evaluation import evaluate
    from normlab.metrics import scores_from_confusion

    if split not in runfolder.SPLITS:
        raise NormlabError(f"split {split!r}: use test, val or train")
    if eval_subset is not None and eval_subset < 0:
        raise NormlabError(f"--eval-subset {eval_subset}: use a positive number of images, or 0 for every image")
    if data_root is not None and not Path(data_root).expanduser().exists():
        raise NormlabError(f"data root {data_root} does not exist: pass the folder or tarball of the data set to "
                           "evaluate on")
    run = load_trained(run_dir, which, device)
    cfg = run.config
    same_root = data_root is None or (cfg.data_root is not None and
                                      Path(data_root).expanduser().resolve() == Path(cfg.data_root).expanduser().resolve())
    own = same_root and (dataset is None or dataset == cfg.dataset)
    over: dict[str, Any] = {}
    if not own:  # another data set, read at the run's input size
        over = {"dataset": dataset or cfg.dataset, "data_root": data_root, "image_size": cfg.input_size,
                "train_subset": None}
    dcfg = make_config(cfg.to_dict(), over, where="evaluate")
    cap = cfg.eval_subset if eval_subset is None else (eval_subset or None)
    data = load_data(dcfg, max_eval=cap)
    source = data.info.get("source")
    if run.classes is not None and list(data.classes) != list(run.classes):
        raise NormlabError(f"class mismatch: {run.run_dir} was trained on {len(run.classes)} classes "
                           f"({_first(run.classes)}), {source} has {data.num_classes} ({_first(list(data.classes))}): "
                           "evaluate on a data set with the same class names")
    if data.in_channels != _in_channels(run.model):
        raise NormlabError(f"{source} has {data.in_channels}-channel images, the run's model takes "
                           f"{_in_channels(run.model)}: evaluate on a data set like the one it was trained on")
    if run.mean is not None and run.std is not None:
        normalization = "run"
        data = dataclasses.replace(data, mean=run.mean, std=run.std)
    else:
        normalization = "run" if own else "evaluated data (this run's checkpoint predates saved statistics)"
    x, y = split_tensors(data, split)
    dev = next(run.model.parameters()).device
    fmt = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
    run.model.to(memory_format=fmt)
    loss, cm, _ = evaluate(run.model, x, y, data, dev, cfg.eval_batch_size, cfg.precision, fmt)  # as in training
    label = _data_label(cfg, dcfg.dataset, dcfg.data_root, own)
    json_path, png_path = runfolder.eval_paths(run.run_dir, label, split, out)
    record = {
        "run": run.run_dir.name, "weights": run.checkpoint.name, "epoch": run.epoch, "dataset": dcfg.dataset,
        "data_root": dcfg.data_root, "source": source, "split": split, "images": int(len(y)),
        "classes": list(data.classes), "loss": loss, **scores_from_confusion(cm), "confusion": cm.tolist(),
        "normalization": normalization, "figure": png_path.name,
    }
    plot_confusion(cm, data.classes, png_path, title=f"{split} confusion · {label} · {cfg.model_label} · {cfg.norm}")
    runfolder.write_eval(json_path, record)
    return {**record, "json": str(json_path), "figure": str(png_path)}


def _in_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else -1


__all__ = ["TrainedRun", "evaluate_run", "load_trained"]
