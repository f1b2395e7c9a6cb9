"""The study report: ``report.md`` + self-contained ``report.html`` + ``figures/``, from saved results only.

Every number comes from the run folders; every ranking is computed from those numbers.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch
import torchvision

import normlab
from normlab import plots
from normlab.config import make_config
from normlab.io import read_json, write_text
from normlab.report.collect import (METRICS, SPLITS, RunRecord, by_cell, cell_metric, cell_status, collect_study,
                                    fmt, mean_curve, mean_quantiles, mean_std, rank)
from normlab.report.render import Doc, to_html, to_markdown
from normlab.device import cpu_name

METRIC_NAMES = {"acc": "acc", "micro_f1": "micro-F1", "macro_f1": "macro-F1"}
SECTIONS = ("Setup", "Results: all variants", "Sanity check: custom BN vs torch_bn", "Loss curves",
            "Accuracy and F1 curves", "Batch size: BN vs GN", "Augmentation", "Feature-quantile evolution",
            "Time per epoch", "Confusion matrices", "Per-class accuracy and most-confused pairs",
            "Misclassified images", "Grad-CAM")


def _hardware() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"{cpu}, {os.cpu_count()} cores; GPU: {gpu}"


def _metric_table(cells: dict[str, list[RunRecord]], splits=SPLITS) -> tuple[list[str], list[list[str]]]:
    headers = ["variant", "seeds"] + [f"{s} {METRIC_NAMES[m]}" for s in splits for m in METRICS] + ["status"]
    rows = []
    for label, recs in cells.items():
        row = [label, str(len(recs))]
        for s in splits:
            for m in METRICS:
                mean, std, n = cell_metric(recs, s, m)
                row.append(fmt(mean, std, n))
        status = cell_status(recs)
        rows.append(row + [status or "ok"])
    return headers, rows


def _curves(cells: dict[str, list[RunRecord]], column: str) -> dict[str, tuple[list[float], list[float]]]:
    return {label: mean_curve(recs, column) for label, recs in cells.items()}


def _first_with_summary(runs: list[RunRecord]) -> RunRecord | None:
    return next((r for r in runs if r.summary), None)


def build_report(study_dir: str | Path) -> tuple[Path, Path]:
    study_dir = Path(study_dir)
    record, runs = collect_study(study_dir)
    study, base = record["study"], record["train"]
    fig_dir = study_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    doc = Doc(f"normlab study: {study.get('name', study_dir.name)}")
    first_run = _first_with_summary(runs)
    first = first_run.summary if first_run else {}
    norms = by_cell(runs, "norms")
    state = read_json(study_dir / "state.json") if (study_dir / "state.json").is_file() else {}

    # ------------------------------------------------------------------ setup
    doc.h(SECTIONS[0])
    classes = first.get("classes", [])
    data = first.get("data", {})
    done = sum(r.usable for r in runs)
    doc.p(f"{len(runs)} runs planned, {done} finished, {sum(r.status == 'diverged' for r in runs)} diverged, "
          f"{sum(r.status in ('failed', 'missing') for r in runs)} failed or missing. Seeds per cell: {study['seeds']}.")
    run_time = sum((r.summary or {}).get("wall_seconds", 0.0) for r in runs)
    doc.table(["item", "value"], [
        ["data set", f"{base['dataset']} ({data.get('source', base.get('data_root') or 'default location')})"],
        ["classes", f"{len(classes)}: {', '.join(classes[:30])}{' …' if len(classes) > 30 else ''}"],
        ["split sizes (train/val/test)", "/".join(str(data.get("counts", {}).get(k, "?")) for k in SPLITS)],
        ["model", make_config(base).model_label
                  + (f" (n={base['n']}, shortcut {base['shortcut']})" if base.get("model", "resnet") == "resnet" else "")
         + (f", {first.get('params', 0):,} parameters with {first_run.config['norm']}" if first_run else "")],
        ["hardware", _hardware()],
        ["versions", f"normlab {normlab.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
                     f"Python {platform.python_version()}"],
        ["device / threads", f"{first.get('device', '?')} / {first.get('threads', '?')}"],
        ["total time", f"{run_time / 60:.1f} min of training runs"
                       + (f"; study wall time {state['wall_seconds'] / 60:.1f} min" if state.get("wall_seconds") else "")],
    ])
    doc.p("Shared training settings (every run uses these except for the setting its comparison varies):")
    doc.table(["setting", "value"], [[k, str(v)] for k, v in base.items() if k not in ("out", "progress")])

    # ------------------------------------------------------------------ main table
    doc.h(SECTIONS[1])
    if norms:
        headers, rows = _metric_table(norms)
        doc.table(headers, rows)
        test_acc = {label: cell_metric(recs, "test", "acc")[0] for label, recs in norms.items()}
        if all(math.isnan(v) for v in test_acc.values()):
            test_acc = {label: cell_metric(recs, "val", "acc")[0] for label, recs in norms.items()}
            split = "val"
        else:
            split = "test"
        ranking = rank(test_acc)
        if ranking:
            doc.p(f"Ranking by mean {split} accuracy (computed from the table): "
                  + "; ".join(f"{i}. {k} ({v:.4f})" for i, k, v in ranking)
                  + (". Variants without a number (diverged or failed) are left out." if len(ranking) < len(norms) else "."))
        doc.p("Accuracy is top-1 accuracy, which equals micro-F1 for single-label classification. Train figures are "
              "from a clean eval-mode pass of the best-on-val weights; val and test use the same weights.")

    # ------------------------------------------------------------------ sanity check
    doc.h(SECTIONS[2])
    if "bn" in norms and "torch_bn" in norms:
        pair = {"bn": norms["bn"], "torch_bn": norms["torch_bn"]}
        rows = []
        for s in SPLITS:
            for m in METRICS:
                a, b = cell_metric(pair["bn"], s, m)[0], cell_metric(pair["torch_bn"], s, m)[0]
                rows.append([f"{s} {METRIC_NAMES[m]}", f"{a:.4f}", f"{b:.4f}", f"{a - b:+.4f}"])
        doc.table(["metric", "bn (normlab)", "torch_bn", "difference"], rows)
        diffs = [abs(float(r[3])) for r in rows if r[3] not in ("+nan", "nan")]
        if diffs:
            doc.p(f"Largest absolute difference: {max(diffs):.4f}. Both start from the same weights and see the same "
                  "batches; differences come from floating-point rounding in the normalization, amplified by training.")
        path = plots.plot_panels([
            ("Train loss", "loss", _curves(pair, "train_loss")), ("Val loss", "loss", _curves(pair, "val_loss")),
            ("Val accuracy", "accuracy", _curves(pair, "val_acc")), ("Val macro-F1", "macro-F1", _curves(pair, "val_macro_f1")),
        ], fig_dir / "sanity_bn_vs_torch_bn.png", styles={"bn": "-", "torch_bn": "--"})
        doc.img(path, "normlab BN (solid) and PyTorch BN (dashed), overlaid")
    else:
        doc.p("Not in this study (needs both `bn` and `torch_bn` in `norms`).")

    custom = {k: v for k, v in norms.items() if k != "torch_bn"}
    # ------------------------------------------------------------------ loss curves
    doc.h(SECTIONS[3])
    if custom:
        path = plots.plot_panels([("Train loss", "loss", _curves(custom, "train_loss")),
                                  ("Val loss", "loss", _curves(custom, "val_loss"))],
                                 fig_dir / "loss_curves.png", logy=[True, True])
        doc.img(path, "Train and val loss of the custom variants (log scale), mean over seeds")
    # ------------------------------------------------------------------ acc / F1 curves
    doc.h(SECTIONS[4])
    if norms:
        path = plots.plot_panels([
            ("Train accuracy", "accuracy", _curves(norms, "train_acc")), ("Val accuracy", "accuracy", _curves(norms, "val_acc")),
            ("Val micro-F1", "micro-F1", _curves(norms, "val_micro_f1")),
            ("Val macro-F1", "macro-F1", _curves(norms, "val_macro_f1")),
        ], fig_dir / "accuracy_f1_curves.png")
        doc.img(path, "Accuracy and F1 per epoch, all variants, mean over seeds")

    # ------------------------------------------------------------------ batch size
    doc.h(SECTIONS[5])
    batch = by_cell(runs, "batch")
    if batch:
        headers, rows = _metric_table(batch, splits=("val", "test"))
        epochs = {label: mean_std([float(r.summary["epochs_run"]) for r in recs if r.summary])[0]
                  for label, recs in batch.items()}
        headers.insert(2, "epochs run")
        for row, label in zip(rows, batch):
            row.insert(2, "–" if math.isnan(epochs[label]) else f"{epochs[label]:.1f}")
        doc.table(headers, rows)
        doc.p(f"Early stopping on val accuracy with patience {study['batch_patience']}, capped at "
              f"{study['batch_max_epochs']} epochs.")
        path = plots.plot_panels([("Val accuracy", "accuracy", _curves(batch, "val_acc")),
                                  ("Train loss", "loss", _curves(batch, "train_loss"))],
                                 fig_dir / "batch_size_curves.png", logy=[False, True])
        doc.img(path, "BN and GN at each batch size")
    else:
        doc.p("Not in this study.")

    # ------------------------------------------------------------------ augmentation
    doc.h(SECTIONS[6])
    aug = by_cell(runs, "augment")
    if aug:
        headers, rows = _metric_table(aug)
        doc.table(headers, rows)
        path = plots.plot_panels([("Train loss", "loss", _curves(aug, "train_loss")),
                                  ("Val accuracy", "accuracy", _curves(aug, "val_acc"))],
                                 fig_dir / "augmentation_curves.png")
        doc.img(path, "With and without the standard augmentation")
    else:
        doc.p("Not in this study.")

    # ------------------------------------------------------------------ extra comparisons (study.compare)
    for i, title in enumerate(study.get("compare") or {}):
        cells = by_cell(runs, f"compare:{title}")
        doc.h(f"Comparison: {title}")
        if not cells:
            continue
        headers, rows = _metric_table(cells)
        doc.table(headers, rows)
        ranking = rank({label: cell_metric(recs, "val", "acc")[0] for label, recs in cells.items()})
        if ranking:
            doc.p("Ranking by mean val accuracy: " + "; ".join(f"{j}. {k} ({v:.4f})" for j, k, v in ranking) + ".")
        path = plots.plot_panels([("Train loss (log scale)", "loss", _curves(cells, "train_loss")),
                                  ("Val loss (log scale)", "loss", _curves(cells, "val_loss")),
                                  ("Val accuracy", "accuracy", _curves(cells, "val_acc")),
                                  ("Val macro-F1", "macro-F1", _curves(cells, "val_macro_f1"))],
                                 fig_dir / f"compare_{i}.png", logy=[True, True, False, False])
        doc.img(path, f"{title}: curves, mean over seeds")

    # ------------------------------------------------------------------ quantiles
    doc.h(SECTIONS[7])
    layer = "last_norm"
    q = next((r.quantiles for r in runs if r.quantiles), None)
    if q and norms:
        layer = q.get("headline", layer)
        variants = {label: mean_quantiles(recs, layer) for label, recs in norms.items()}
        path = plots.plot_quantile_panels(variants, q["q"], fig_dir / "quantiles.png", layer)
        doc.p(f"Layer `{layer}`: the output of the second norm of the last residual block (before the residual "
              "addition and ReLU), on the same fixed batch of val images after every epoch; epoch 0 is at initialisation. "
              "`quantiles.json` in each run also holds the stem and the three stages.")
        doc.img(path, "1st, 20th, 80th and 99th percentiles per epoch, one panel per variant (shared axes)")

    # ------------------------------------------------------------------ time
    doc.h(SECTIONS[8])
    if norms:
        rows, secs = [], {}
        for label, recs in norms.items():
            s = mean_std([r.summary["seconds_per_epoch"] for r in recs if r.summary and r.summary.get("seconds_per_epoch")])
            ips = mean_std([r.summary["images_per_s"] for r in recs if r.summary and r.summary.get("images_per_s")])
            secs[label] = s[0]
            rows.append([label, fmt(*s, len(recs), 2), fmt(*ips, len(recs), 0)])
        doc.table(["variant", "seconds per epoch (train pass)", "images/s"], rows)
        path = plots.plot_bars({k: v for k, v in secs.items() if not math.isnan(v)}, fig_dir / "time_per_epoch.png",
                               "Training time per epoch", "seconds")
        doc.img(path, "Seconds per training epoch, mean over seeds")

    # ------------------------------------------------------------------ per-run analyses (files written by analyses)
    seed0 = {label: next((r for r in recs if r.usable), None) for label, recs in norms.items()}
    doc.h(SECTIONS[9])
    for label, r in seed0.items():
        if r is not None:
            for split in ("val", "test"):
                doc.img(r.folder / f"confusion_{split}.png", f"{label}: confusion matrix on {split} ({r.name})")
    doc.h(SECTIONS[10])
    _per_class(doc, seed0, classes)
    doc.h(SECTIONS[11])
    for label, r in seed0.items():
        if r is not None:
            doc.img(r.folder / "misclassified_val.png", f"{label}: misclassified val images, true → predicted ({r.name})")
    doc.h(SECTIONS[12])
    best = state.get("gradcam_run")
    if best and (study_dir / "runs" / best / "gradcam" / "gradcam.json").is_file():
        index = read_json(study_dir / "runs" / best / "gradcam" / "gradcam.json")
        doc.p(f"Best model of the study by val accuracy: {best}. Maps for the true class from the 2n convolutions of the "
              "last stage, mean-aggregated, on 5 correctly and 5 incorrectly classified val images per class.")
        for cls, entry in index.get("classes", {}).items():
            doc.img(study_dir / "runs" / best / "gradcam" / entry["file"], f"Grad-CAM: {cls}")
    else:
        doc.p("No Grad-CAM gallery yet (it is made at the end of the study, or with `normlab gradcam RUN_DIR`).")

    md_path, html_path = study_dir / "report.md", study_dir / "report.html"
    write_text(md_path, to_markdown(doc, study_dir))
    write_text(html_path, to_html(doc))
    return md_path, html_path


def _per_class(doc: Doc, seed0: dict[str, RunRecord | None], classes: list[str]) -> None:
    from normlab.metrics import most_confused_pairs, per_class_accuracy

    runs = {k: r for k, r in seed0.items() if r is not None and (r.summary or {}).get("val")}
    if not runs or not classes:
        return
    accs = {k: per_class_accuracy(torch.tensor(r.summary["val"]["confusion"])).tolist() for k, r in runs.items()}
    doc.table(["class"] + list(accs), [[c] + [f"{accs[k][i]:.3f}" for k in accs] for i, c in enumerate(classes)])
    doc.p("Val accuracy per class (seed 0). Most-confused pairs on val (true → predicted: count):")
    rows = []
    for k, r in runs.items():
        pairs = most_confused_pairs(torch.tensor(r.summary["val"]["confusion"]), 3)
        rows.append([k, "; ".join(f"{classes[t]} → {classes[p]}: {n}" for t, p, n in pairs)])
    doc.table(["variant", "most confused (val)"], rows)
