"""The run folder: the one place that knows its file names and the schema of what is in them.

A run folder (``normlab train --out DIR``, ``<study>/runs/<name>``) holds:

=================  ==========================================================================================
``config.yaml``    the resolved ``TrainConfig``
``metrics.csv``    one row per epoch, columns ``METRIC_COLUMNS`` (train figures from the training pass)
``quantiles.json`` ``{"q": [...], "headline": layer, "epochs": [{"epoch": e, layer: [quantiles], ...}]}``
``summary.json``   the finished run (``SUMMARY_KEYS``): status, train/val/test scores and confusion matrices
                   of the best-on-val weights, timing (steady state and one-time costs), world size, versions,
                   the model (``model``: name, and for a model whose norms were swapped in, what was swapped)
``best.pt``        weights with the best val accuracy · ``last.pt`` weights + optimizer + RNG + progress
``predictions.json`` per-image ``{"val": {"true": [...], "pred": [...]}, "test": ...}`` of the best weights
                   (written by the analyses: paired tests between runs on the same images)
``robustness.json`` corruption robustness of the best weights (``normlab robustness``, a study's robustness
                   step): split, corruptions, severities, clean and per corruption × severity accuracy, the
                   same with statistics re-estimated on the corrupted data (``adapted``) and with Schneider et
                   al.'s prior-weighted mix (``mixed``), clean accuracy with batch statistics per evaluation
                   batch size, and ``normalized`` (CE / mCE against a baseline run); ``{"failed": message}``
                   when the step failed
``calibration.json`` per split: ECE (15 bins), NLL, Brier score and the reliability bins of the best weights
``logits.npz``     per split, the best weights' logits (float32, data order) and ``<split>_true`` labels:
                   calibration is computed from them
``reliability_{split}.png`` the run's reliability diagram
``failed.json``    written by a study when the training process failed: ``{"returncode", "command"}``;
                   removed once the run has a summary (the summary is the run's one truth)
``events.*``       TensorBoard scalars per epoch, and the run's HParams once at the end
``curves.png``, ``confusion_*.png``, ``misclassified_val.png|webp``, ``gradcam/`` (``gradcam.json`` + galleries)
``eval/``          ``normlab evaluate``: ``<data>-<split>.json`` (``EVAL_KEYS``: the scores and confusion matrix of
                   the run's weights on a data set and split) and ``<data>-<split>.png`` (its confusion figure)
=================  ==========================================================================================

Every reader and writer of these files goes through this module, so a change of name or key is made once.
``summary.json`` is written last, when everything else of the run is on disk: a run whose process failed
before that (a full disk while drawing ``curves.png``) has no summary and resumes from ``last.pt``. The
folder's lock (``RunLock``, from ``normlab.runlock``) and its preparation (``prepare``) live here too.
``SCHEMA_VERSION`` is stored in ``summary.json``; a summary without one is version 1 (the same keys
minus the timing and world-size additions, which readers treat as absent). Version 3 adds ``model``
(``MODEL_KEYS``); ``read_summary`` gives older summaries ``model: None``.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.io import read_json, write_json, write_text
from normlab.runlock import RunLock

__all__ = ["RunLock", "prepare"]  # and the names below

SCHEMA_VERSION = 3

CONFIG = "config.yaml"
METRICS = "metrics.csv"
QUANTILES = "quantiles.json"
SUMMARY = "summary.json"
BEST = "best.pt"
LAST = "last.pt"
FAILED = "failed.json"
PREDICTIONS = "predictions.json"
CURVES = "curves.png"
ROBUSTNESS = "robustness.json"
CALIBRATION = "calibration.json"
LOGITS = "logits.npz"
RELIABILITY_PNG = "reliability_{split}.png"
LABELS_SUFFIX = "_true"  # logits.npz: "<split>_true" holds the labels of "<split>"
ROBUSTNESS_SCHEMA = 1
TRAIN_LOG = "train.log"
GRADCAM_DIR = "gradcam"
GRADCAM_INDEX = "gradcam.json"
CONFUSION_PNG = "confusion_{split}.png"
# grey images: a 256-colour PNG is exact and the smallest; colour photographs: lossy WebP
MISCLASSIFIED = ("misclassified_val.png", "misclassified_val.webp")

RUN_MARKERS = (CONFIG, LAST, SUMMARY)  # any of these: the folder holds a run (never overwritten silently)

SPLITS = ("train", "val", "test")
SCORES = ("acc", "micro_f1", "macro_f1")
# metrics.csv columns in order; extra columns are kept by the readers
METRIC_COLUMNS = (("epoch", "lr")
                  + tuple(f"{s}_{m}" for s in ("train", "val") for m in ("loss", "error") + SCORES)
                  + ("epoch_seconds", "images_per_s", "eval_seconds"))
# summary.json keys (schema 3); "timing" and "world" are new in 2, "model" in 3
SUMMARY_KEYS = ("schema_version", "status", "diverged", "run", "epochs_run", "best_epoch", "classes", "params",
                "layers", "train", "val", "test", "seconds_per_epoch", "images_per_s", "timing", "wall_seconds",
                "device", "world", "torch", "python", "threads", "data", "model")
# summary["model"]: the --model name; norm_swaps {"Old -> New": count} and norms_kept {"Type": count} for a model
# whose norms were swapped in (timm, resnet18; None for normlab's own models, built with the norm), how
# (via: norm_layer | replace_norms), the timm keywords it was built with, and the --pretrained weights loaded
MODEL_KEYS = ("name", "norm_swaps", "norms_kept", "via", "timm_kwargs", "pretrained")
EVAL_DIR = "eval"
# eval/<data>-<split>.json keys: the split's scores as in summary.json (loss, acc, micro_f1, macro_f1, confusion)
# and where they come from
EVAL_KEYS = ("schema_version", "run", "weights", "epoch", "dataset", "data_root", "source", "split", "images",
             "classes", "loss", "acc", "micro_f1", "macro_f1", "confusion", "normalization", "figure")
STATUSES = ("finished", "stopped_early", "diverged")  # of summary.json; a study adds failed | missing | partial


def _p(folder: str | Path, name: str) -> Path:
    return Path(folder) / name


def holds_run(folder: str | Path) -> bool:
    return any(_p(folder, m).exists() for m in RUN_MARKERS)


def run_state(folder: str | Path) -> str:
    """finished (summary.json) | partial (last.pt, or metrics.csv, which is written after last.pt: finished
    epochs whose last.pt is gone, and ``--resume`` says what it can do) | new. What a study runner needs."""
    if _p(folder, SUMMARY).is_file():
        return "finished"
    if _p(folder, LAST).is_file() or _p(folder, METRICS).is_file():
        return "partial"
    return "new"


def prepare(out: str | Path, force: bool) -> Path:
    """Make ``out`` ready for a new run: refuse a folder holding a run unless ``force``, which empties it (never
    while a live process holds its lock). Returns the folder, created if needed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NormlabError(f"output {out} exists and is not a folder: choose another --out")
    if out.is_dir() and holds_run(out):
        if not force:
            raise NormlabError(f"output folder {out} already holds a run: continue it with `normlab train --resume "
                               f"{out}`, choose another --out, or pass --force to overwrite it")
        RunLock.check_free(out)  # --force must not delete the files of a run still being written
        clear(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def clear(out: str | Path, keep: tuple[str, ...] = ()) -> None:
    """Delete everything in the run folder but its lock and ``keep``."""
    for child in Path(out).iterdir():
        if child.name != ".lock" and child.name not in keep:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


# ----------------------------------------------------------------------------------------- metrics.csv


def metrics_text(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in METRIC_COLUMNS if c in rows[0]] + [c for c in rows[0] if c not in METRIC_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_metrics(folder: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = _p(folder, METRICS)
    if rows:
        write_text(path, metrics_text(rows))
    return path


def read_metrics(folder_or_file: str | Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` as dicts of floats (empty cells -> NaN); [] when there is none yet.
    Takes the run folder or the file itself."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
                for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------- quantiles.json


def write_quantiles(folder: str | Path, qs: tuple[float, ...] | list[float], epochs: list[dict[str, Any]],
                    headline: str = "last_norm") -> Path:
    path = _p(folder, QUANTILES)
    write_json(path, {"q": list(qs), "headline": headline, "epochs": epochs})
    return path


def read_quantiles(folder: str | Path) -> dict[str, Any] | None:
    """The file's content; a non-finite quantile (written as null: JSON is strict) is NaN again here."""
    path = _p(folder, QUANTILES)
    if not path.is_file():
        return None
    data = read_json(path)
    for entry in data.get("epochs", []):
        for layer, values in entry.items():
            if isinstance(values, list):
                entry[layer] = [math.nan if v is None else v for v in values]
    return data


# ----------------------------------------------------------------------------------------- summary.json


def write_summary(folder: str | Path, summary: dict[str, Any]) -> Path:
    path = _p(folder, SUMMARY)
    write_json(path, {"schema_version": SCHEMA_VERSION, **summary})
    return path


def read_summary(folder: str | Path) -> dict[str, Any] | None:
    path = _p(folder, SUMMARY)
    if not path.is_file():
        return None
    summary = read_json(path)
    summary.setdefault("schema_version", 1)
    summary.setdefault("model", None)
    return summary


def clear_failure(folder: str | Path) -> None:
    """Remove ``failed.json`` of an earlier attempt: the run's summary (or its next attempt) is the truth now."""
    _p(folder, FAILED).unlink(missing_ok=True)


def model_record(name: str, swaps: dict[str, Any] | None = None, pretrained: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """``summary["model"]`` (``MODEL_KEYS``) from the model name and what the builder recorded."""
    swaps = swaps or {}
    return {"name": name, "norm_swaps": swaps.get("swapped"), "norms_kept": swaps.get("kept"),
            "via": swaps.get("via"), "timm_kwargs": swaps.get("timm_kwargs"), "pretrained": pretrained}


# ----------------------------------------------------------------------------------------- eval/


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "data"


def eval_paths(folder: str | Path, data_label: str, split: str, out: str | Path | None = None) -> tuple[Path, Path]:
    """``(json, png)`` for ``normlab evaluate`` of ``split`` of the data ``data_label``: in ``RUN/eval/`` unless
    ``out`` names another folder."""
    base = Path(out) if out is not None else _p(folder, EVAL_DIR)
    stem = f"{_slug(data_label)}-{split}"
    return base / f"{stem}.json", base / f"{stem}.png"


def write_eval(path: str | Path, record: dict[str, Any]) -> Path:
    write_json(Path(path), {"schema_version": SCHEMA_VERSION, **record})
    return Path(path)


def read_evals(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``eval/*.json`` of a run, by file stem."""
    base = _p(folder, EVAL_DIR)
    return {p.stem: read_json(p) for p in sorted(base.glob("*.json"))} if base.is_dir() else {}


def read_failure(folder: str | Path) -> dict[str, Any] | None:
    path = _p(folder, FAILED)
    return read_json(path) if path.is_file() else None


def write_failure(folder: str | Path, returncode: int | None, command: list[str], **details: Any) -> Path:
    """``failed.json``: how a study's run ended without a summary (exit code, command, executor, note)."""
    path = _p(folder, FAILED)
    write_json(path, {"returncode": returncode, "command": command, **details})
    return path


def write_predictions(folder: str | Path, splits: dict[str, tuple[list[int], list[int]]]) -> Path:
    """``splits[name] = (true, pred)`` class indices in data order."""
    path = _p(folder, PREDICTIONS)
    write_json(path, {k: {"true": list(map(int, t)), "pred": list(map(int, p))} for k, (t, p) in splits.items()})
    return path


def read_predictions(folder: str | Path) -> dict[str, dict[str, list[int]]] | None:
    path = _p(folder, PREDICTIONS)
    return read_json(path) if path.is_file() else None


def read_config(folder: str | Path) -> dict[str, Any] | None:
    from normlab.config import read_yaml

    path = _p(folder, CONFIG)
    return read_yaml(path) if path.is_file() else None


def status_of(folder: str | Path) -> str:
    """finished | stopped_early | diverged (summary) · failed (failed.json) · partial (last.pt) · missing."""
    summary = read_summary(folder)
    if summary:
        return summary["status"]
    if _p(folder, FAILED).is_file():
        return "failed"
    return "partial" if _p(folder, LAST).is_file() else "missing"


def timing(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Steady-state training time per epoch and the first epoch's one-time extra, from metrics rows.

    The first epoch pays one-time costs (the CPU norm kernels' build, ``torch.compile``, allocator and
    cache warm-up); averaging it in ranks a variant by its set-up, not its speed. Steady state is the
    median train-pass time of epochs 2..E (the median resists a noisy neighbour on a shared machine);
    with a single epoch there is no steady state and ``steady_seconds_per_epoch`` is None.
    """
    secs = [r["epoch_seconds"] for r in rows if not math.isnan(r.get("epoch_seconds", math.nan))]
    ips = [r["images_per_s"] for r in rows[1:] if not math.isnan(r.get("images_per_s", math.nan))]
    steady = statistics.median(secs[1:]) if len(secs) > 1 else None
    return {
        "first_epoch_seconds": secs[0] if secs else None,
        "steady_seconds_per_epoch": steady,
        "steady_images_per_s": statistics.median(ips) if ips else None,
        "steady_epochs": max(0, len(secs) - 1),
        "first_epoch_extra_seconds": (secs[0] - steady) if secs and steady is not None else None,
        "eval_seconds_per_epoch": (statistics.median([r["eval_seconds"] for r in rows if "eval_seconds" in r])
                                   if rows and "eval_seconds" in rows[0] else None),
    }


def final_scores(summary: dict[str, Any] | None) -> dict[str, float | None]:
    """``{"train_acc": ..., "val_macro_f1": ..., "test_loss": ...}`` flat, None where a split is absent."""
    out: dict[str, float | None] = {}
    for split in SPLITS:
        part = (summary or {}).get(split) or {}
        for m in ("loss",) + SCORES:
            out[f"{split}_{m}"] = part.get(m)
    return out


def misclassified_file(folder: str | Path) -> Path | None:
    return next((p for p in (Path(folder) / n for n in MISCLASSIFIED) if p.is_file()), None)


def gradcam_index(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / GRADCAM_DIR / GRADCAM_INDEX
    return read_json(path) if path.is_file() else None


# ----------------------------------------------------------------------------------------- robustness, calibration


def write_robustness(folder: str | Path, result: dict[str, Any]) -> Path:
    """``robustness.json``: see the table above; accuracies keyed ``[corruption][str(severity)]``."""
    path = _p(folder, ROBUSTNESS)
    write_json(path, {"schema": ROBUSTNESS_SCHEMA, **result})
    return path


def read_robustness(folder: str | Path) -> dict[str, Any] | None:
    path = _p(folder, ROBUSTNESS)
    return read_json(path) if path.is_file() else None


def write_calibration(folder: str | Path, splits: dict[str, dict[str, Any]]) -> Path:
    path = _p(folder, CALIBRATION)
    write_json(path, splits)
    return path


def read_calibration(folder: str | Path) -> dict[str, Any] | None:
    path = _p(folder, CALIBRATION)
    return read_json(path) if path.is_file() else None


def write_logits(folder: str | Path, splits: dict[str, Any]) -> Path:
    """``logits.npz``: ``splits[name]`` an ``N × K`` float array of the best weights' logits, data order;
    ``splits[name + LABELS_SUFFIX]`` the true classes (int64), so the file alone gives the calibration."""
    import numpy as np

    from normlab.io import atomic_write

    path = _p(folder, LOGITS)
    arrays = {k: np.asarray(v, dtype=np.int64 if k.endswith(LABELS_SUFFIX) else np.float32) for k, v in splits.items()}
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def read_logits(folder: str | Path) -> dict[str, Any] | None:
    import numpy as np

    path = _p(folder, LOGITS)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _mean_acc(table: dict[str, dict[str, float]] | None) -> float | None:
    vals = [v for sev in (table or {}).values() for v in sev.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def robustness_scores(folder: str | Path) -> dict[str, Any]:
    """Flat columns for ``results.csv``: mean accuracy over every corruption × severity (plain, with
    re-estimated and with prior-mixed statistics), mCE and relative mCE (when normalized), ECE / NLL /
    Brier per split. None where absent; ``robustness_status`` is ok | failed: … | '' (not run)."""
    rob = read_robustness(folder) or {}
    cal = read_calibration(folder) or {}
    norm = rob.get("normalized") or {}
    out: dict[str, Any] = {
        "robustness_status": ("ok" if rob.get("accuracy") else f"failed: {rob['failed']}" if rob.get("failed") else ""),
        "clean_acc_robustness_split": (rob.get("clean") or {}).get("acc"),
        "corrupted_acc": _mean_acc(rob.get("accuracy")),
        "corrupted_acc_adapted": _mean_acc(rob.get("adapted")),
        "corrupted_acc_mixed": _mean_acc(rob.get("mixed")),
        "mce": norm.get("mce"), "relative_mce": norm.get("relative_mce"),
    }
    for split in ("val", "test"):
        part = cal.get(split) or {}
        for m in ("ece", "nll", "brier"):
            out[f"{split}_{m}"] = part.get(m)
    return out


ROBUSTNESS_COLUMNS = ("robustness_status", "clean_acc_robustness_split", "corrupted_acc", "corrupted_acc_adapted",
                      "corrupted_acc_mixed", "mce", "relative_mce",
                      "val_ece", "val_nll", "val_brier", "test_ece", "test_nll", "test_brier")
