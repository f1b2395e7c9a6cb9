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

from normlab.version import __version__
from normlab import plots
from normlab.config import make_config
from normlab import runfolder
from normlab.io import read_json, write_text
from normlab.report.collect import (METRICS, SPLITS, RunRecord, by_cell, cell_metric, cell_status, collect_study,
                                    fmt, mean_curve, mean_quantiles, mean_std, rank)
from normlab.report.findings import augmentation, batch_size, sanity, score_split, summarise
from normlab.report.render import Doc, Swatch, to_html, to_markdown
from normlab.report.robustness import (calibration_findings, calibration_section, robustness_findings,
                                       robustness_section)
from normlab import studyfolder as sf
from normlab.device import cpu_name

METRIC_NAMES = {"acc": "acc", "micro_f1": "micro-F1", "macro_f1": "macro-F1"}
SECTIONS = ("Findings", "Results: all variants", "Sanity check: custom BN vs torch_bn", "Loss curves",
            "Error, accuracy and F1 curves", "Batch size", "Augmentation", "Feature-quantile evolution",
            "Time per epoch", "Confusion matrices", "Per-class accuracy and most-confused pairs",
            "Misclassified images", "Grad-CAM", "Grad-CAM across norms", "Robustness", "Calibration",
            "Appendix: setup and settings")


def _hardware() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"{cpu}, {os.cpu_count()} cores; GPU: {gpu}"


def swatch(label: str, siblings) -> Swatch:
    style = plots.style_of(label, list(siblings))
    return Swatch(label, style["color"], plots.MARKER_GLYPHS.get(style["marker"], "●"))


def _metric_table(cells: dict[str, list[RunRecord]], splits=SPLITS) -> tuple[list[str], list[list]]:
    headers = ["variant", "seeds"] + [f"{s} {METRIC_NAMES[m]}" for s in splits for m in METRICS] + ["status"]
    rows = []
    for label, recs in cells.items():
        row: list = [swatch(label, cells), str(len(recs))]
        for s in splits:
            for m in METRICS:
                mean, std, n = cell_metric(recs, s, m)
                row.append(fmt(mean, std, n))
        status = cell_status(recs)
        rows.append(row + [status or "ok"])
    return headers, rows


def _curves(cells: dict[str, list[RunRecord]], column: str) -> dict[str, tuple[list[float], list[float]]]:
    return {label: mean_curve(recs, column) for label, recs in cells.items()}


LINE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


def batch_caption(batch: dict[str, list[RunRecord]]) -> str:
    """The batch-size figure's caption: the norms it holds and which line style is which batch size (the
    same for every norm when each has its sizes in the same order, as a study plans them)."""
    norms = list(dict.fromkeys(label.partition(" · ")[0] for label in batch))
    styles: dict[str, set[str]] = {}
    for label in batch:
        styles.setdefault(label.partition(" · ")[2], set()).add(plots.style_of(label, list(batch))["linestyle"])
    key = ("; ".join(f"{size}: {LINE_NAMES.get(next(iter(st)), next(iter(st)))}" for size, st in styles.items())
           if all(len(st) == 1 for st in styles.values()) else "line style: batch size")
    return f"{', '.join(norms)} at each batch size (colour and marker: norm; {key})"


def _first_with_summary(runs: list[RunRecord]) -> RunRecord | None:
    return next((r for r in runs if r.summary), None)


def build_report(study_dir: str | Path) -> tuple[Path, Path]:
    study_dir = Path(study_dir)
    record, runs = collect_study(study_dir)
    study, base = record["study"], record["train"]
    fig_dir = study_dir / sf.FIGURES
    fig_dir.mkdir(exist_ok=True)
    doc = Doc(f"normlab study: {study.get('name', study_dir.name)}")
    first_run = _first_with_summary(runs)
    first = first_run.summary if first_run else {}
    norms = by_cell(runs, "norms")
    state = sf.read_state(study_dir)
    classes = first.get("classes", [])

    # ------------------------------------------------------------------ findings: the answer first
    doc.h(SECTIONS[0])
    done = sum(r.usable for r in runs)
    doc.p(f"{len(runs)} runs planned, {done} finished; {study['seeds']} seed(s) per cell; data {base['dataset']}, "
          f"{make_config(base).model_label}. Every sentence below is computed from the run folders.")
    doc.findings(summarise(runs) + robustness_findings(norms)[:2]
                 + calibration_findings(norms, score_split(runs)))
    doc.p(f"Every run as one table row: {sf.RESULTS} (normlab.load_study(folder) gives it as a pandas DataFrame).")

    # ------------------------------------------------------------------ main table
    doc.h(SECTIONS[1])
    if norms:
        headers, rows = _metric_table(norms)
        doc.table(headers, rows)
        split = score_split(runs)
        ranking = rank({label: cell_metric(recs, split, "acc")[0] for label, recs in norms.items()})
        if ranking:
            doc.p(f"Ranking by mean {split} accuracy (computed from the table; see Findings for which gaps are "
                  "within noise): " + "; ".join(f"{i}. {k} ({v:.4f})" for i, k, v in ranking)
                  + (". Variants without a number (diverged or failed) are left out." if len(ranking) < len(norms) else "."))
        doc.p("Accuracy is top-1 accuracy, which equals micro-F1 for single-label classification. Train figures are "
              "from a clean eval-mode pass of the best-on-val weights; val and test use the same weights. "
              "Markers and colours are the same in every table and figure.")

    # ------------------------------------------------------------------ sanity check
    doc.h(SECTIONS[2])
    if "bn" in norms and "torch_bn" in norms:
        pair = {"bn": norms["bn"], "torch_bn": norms["torch_bn"]}
        rows = []
        for s in SPLITS:
            for m in METRICS:
                a, b = cell_metric(pair["bn"], s, m)[0], cell_metric(pair["torch_bn"], s, m)[0]
                rows.append([f"{s} {METRIC_NAMES[m]}", f"{a:.4f}", f"{b:.4f}", f"{a - b:+.4f}"])
        doc.table(["metric", swatch("bn", norms), swatch("torch_bn", norms), "difference"], rows)
        verdict = sanity(norms, score_split(runs))
        if verdict:
            doc.p(verdict + " Both start from the same weights and see the same batches; differences come from "
                  "floating-point rounding in the normalization, amplified by training.")
        path = plots.plot_panels([
            ("Train loss", "loss", _curves(pair, "train_loss")), ("Val loss", "loss", _curves(pair, "val_loss")),
            ("Val accuracy", "accuracy", _curves(pair, "val_acc")), ("Val macro-F1", "macro-F1", _curves(pair, "val_macro_f1")),
        ], fig_dir / "sanity_bn_vs_torch_bn.png", styles={"bn": "-", "torch_bn": "--"})
        doc.img(path, "normlab BN (solid) and PyTorch BN (dashed), overlaid")
    else:
        doc.p("Not in this study (needs both `bn` and `torch_bn` in `norms`).")

    # ------------------------------------------------------------------ loss curves
    doc.h(SECTIONS[3])
    if norms:
        path = plots.plot_panels([("Train loss", "loss", _curves(norms, "train_loss")),
                                  ("Val loss", "loss", _curves(norms, "val_loss"))],
                                 fig_dir / "loss_curves.png", logy=[True, True])
        doc.img(path, "Train and val loss of every variant (log scale), mean over seeds")
    # ------------------------------------------------------------------ error / acc / F1 curves
    doc.h(SECTIONS[4])
    if norms:
        panels = []
        for key, name in (("error", "error"), ("acc", "accuracy"), ("micro_f1", "micro-F1"), ("macro_f1", "macro-F1")):
            for split in ("train", "val"):
                panels.append((f"{split.capitalize()} {name}", name, _curves(norms, f"{split}_{key}")))
        path = plots.plot_panels(panels, fig_dir / "error_accuracy_f1_curves.png", dpi=85)  # 8 panels: ~1050 px wide
        doc.img(path, "Error, accuracy, micro-F1 and macro-F1 per epoch, train (left; training pass, train mode) and "
                      "val (right), every variant, mean over seeds")

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
        finding = batch_size(runs, score_split(runs))
        if finding:
            doc.p(finding)
        doc.p(f"Early stopping on val accuracy with patience {study['batch_patience']}, capped at "
              f"{study['batch_max_epochs']} epochs.")
        path = plots.plot_panels([("Val accuracy", "accuracy", _curves(batch, "val_acc")),
                                  ("Train loss", "loss", _curves(batch, "train_loss"))],
                                 fig_dir / "batch_size_curves.png", logy=[False, True])
        doc.img(path, batch_caption(batch))
    else:
        doc.p("Not in this study.")

    # ------------------------------------------------------------------ augmentation
    doc.h(SECTIONS[6])
    aug = by_cell(runs, "augment")
    if aug:
        headers, rows = _metric_table(aug)
        doc.table(headers, rows)
        finding = augmentation(runs, score_split(runs))
        if finding:
            doc.p(finding)
        path = plots.plot_panels([("Train loss", "loss", _curves(aug, "train_loss")),
                                  ("Val accuracy", "accuracy", _curves(aug, "val_acc"))],
                                 fig_dir / "augmentation_curves.png")
        doc.img(path, "With and without the augmentation (line style: augmentation)")
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
        _time_section(doc, norms, fig_dir, first)

    # ------------------------------------------------------------------ per-run analyses (files written by analyses)
    seed0 = {label: next((r for r in recs if r.usable), None) for label, recs in norms.items()}
    doc.h(SECTIONS[9])
    split = score_split(runs)
    mats = {label: r.summary[split]["confusion"] for label, r in seed0.items()
            if r is not None and (r.summary.get(split) or {}).get("confusion")}
    if mats and classes:
        path = plots.plot_confusion_grid(mats, classes, fig_dir / "confusion_matrices.png",
                                         title=f"{split} confusion matrices (rows: true class, colour: row fraction)")
        doc.img(path, f"Confusion matrices on {split}, every variant (first seed), from summary.json")
        doc.p("Each run folder also holds full-size confusion_val.png and confusion_test.png with class names: "
              + ", ".join(f"{label}: runs/{r.name}/" for label, r in seed0.items() if r is not None) + ".")
    doc.h(SECTIONS[10])
    _per_class(doc, seed0, classes)
    doc.h(SECTIONS[11])
    for label, r in seed0.items():
        if r is not None:
            doc.img(runfolder.misclassified_file(r.folder),
                    f"{label}: misclassified val images, true → predicted ({r.name})")
    doc.h(SECTIONS[12])
    best = state.get(sf.GRADCAM_RUN)
    index = runfolder.gradcam_index(sf.run_dir(study_dir, best)) if best else None
    if index:
        doc.p(f"Best model of the study by val accuracy: {best}. Maps for the true class from the 2n convolutions of the "
              f"last stage, mean-aggregated, on up to {index.get('per_class', 5)} correctly and incorrectly classified "
              "val images per class.")
        for cls, entry in index.get("classes", {}).items():
            doc.img(sf.run_dir(study_dir, best) / runfolder.GRADCAM_DIR / entry["file"], f"Grad-CAM: {cls}")
    else:
        doc.p("No Grad-CAM gallery yet (it is made at the end of the study, or with `normlab gradcam RUN_DIR`).")
    doc.h(SECTIONS[13])
    _gradcam_across(doc, study_dir, state)

    # ------------------------------------------------------------------ robustness and calibration (saved results)
    doc.h(SECTIONS[14])
    robustness_section(doc, runs, fig_dir, swatch)
    doc.h(SECTIONS[15])
    calibration_section(doc, runs, fig_dir, swatch, score_split(runs))

    # ------------------------------------------------------------------ appendix
    doc.h(SECTIONS[16])
    doc.fold("Setup, hardware, versions and the shared training settings")
    _setup(doc, runs, study, base, first_run, state)
    doc.end_fold()

    md_path, html_path = study_dir / sf.REPORT_MD, study_dir / sf.REPORT_HTML
    write_text(md_path, to_markdown(doc, study_dir))
    write_text(html_path, to_html(doc))
    return md_path, html_path


def _setup(doc: Doc, runs: list[RunRecord], study: dict, base: dict, first_run: RunRecord | None, state: dict) -> None:
    first = first_run.summary if first_run else {}
    classes = first.get("classes", [])
    data = first.get("data", {})
    done = sum(r.usable for r in runs)
    doc.p(f"{len(runs)} runs planned, {done} finished, {sum(r.status == 'diverged' for r in runs)} diverged, "
          f"{sum(r.status in ('failed', 'missing') for r in runs)} failed or missing. Seeds per cell: {study['seeds']}.")
    run_time = sum((r.summary or {}).get("wall_seconds", 0.0) for r in runs)
    world = first.get("world") or {}
    doc.table(["item", "value"], [
        ["data set", f"{base['dataset']} ({data.get('source', base.get('data_root') or 'default location')})"],
        ["classes", f"{len(classes)}: {', '.join(classes[:30])}{' …' if len(classes) > 30 else ''}"],
        ["split sizes (train/val/test)", "/".join(str(data.get("counts", {}).get(k, "?")) for k in SPLITS)],
        ["model", make_config(base).model_label
                  + (f" (n={base['n']}, shortcut {base['shortcut']})" if base.get("model", "resnet") == "resnet" else "")
         + (f", {first.get('params', 0):,} parameters with {first_run.config['norm']}" if first_run else "")],
        ["hardware", _hardware()],
        ["versions", f"normlab {__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
                     f"Python {platform.python_version()}"],
        ["device / threads / processes", f"{first.get('device', '?')} / {first.get('threads', '?')} / "
                                         f"{world.get('world_size', 1)}"],
        ["total time", f"{run_time / 60:.1f} min of training runs"
                       + (f"; study wall time {state[sf.WALL_SECONDS] / 60:.1f} min" if state.get(sf.WALL_SECONDS) else "")],
    ])
    doc.p("Shared training settings (every run uses these except for the setting its comparison varies):")
    doc.table(["setting", "value"], [[k, str(v)] for k, v in base.items() if k not in ("out", "progress")])


def _time_section(doc: Doc, norms: dict[str, list[RunRecord]], fig_dir: Path, first: dict) -> None:
    """Steady state (median of epochs 2..E) apart from the one-time first-epoch cost, with their source."""
    rows, steady = [], {}
    for label, recs in norms.items():
        t = [runfolder.timing(r.rows) for r in recs if r.rows]
        st = mean_std([x["steady_seconds_per_epoch"] for x in t if x["steady_seconds_per_epoch"] is not None])
        fe = mean_std([x["first_epoch_seconds"] for x in t if x["first_epoch_seconds"] is not None])
        ex = mean_std([x["first_epoch_extra_seconds"] for x in t if x["first_epoch_extra_seconds"] is not None])
        ev = mean_std([x["eval_seconds_per_epoch"] for x in t if x["eval_seconds_per_epoch"] is not None])
        ips = mean_std([x["steady_images_per_s"] for x in t if x["steady_images_per_s"] is not None])
        epochs = sorted({x["steady_epochs"] + 1 for x in t})
        steady[label] = st[0]
        source = (f"metrics.csv epoch_seconds, median of epochs 2–{max(epochs)}" if epochs and max(epochs) > 1
                  else "metrics.csv: one epoch only, no steady state")
        rows.append([swatch(label, norms), fmt(*st, len(t), 2), fmt(*ips, len(t), 0), fmt(*fe, len(t), 2),
                     fmt(*ex, len(t), 2), fmt(*ev, len(t), 2), f"{source}; {len(t)} seed(s)"])
    doc.table(["variant", "steady s/epoch (train pass)", "steady images/s", "first epoch s",
               "one-time extra s (first − steady)", "eval s/epoch", "source"], rows)
    doc.p("The first epoch pays one-time costs — the build of the CPU norm kernels (once per machine, cached), "
          "torch.compile where it is on, allocator and cache warm-up — so it is reported apart and the variants "
          "are compared on their steady state. Runs of a study run one after another on "
          f"{first.get('device', 'the device')} with {first.get('threads', '?')} thread(s); on a machine shared with "
          "other work, timings carry that noise.")
    path = plots.plot_bars({k: v for k, v in steady.items() if not math.isnan(v)}, fig_dir / "time_per_epoch.png",
                           "Steady-state training time per epoch (first epoch excluded)", "seconds")
    doc.img(path, "Seconds per training epoch in steady state (median of epochs 2+), mean over seeds")


def _gradcam_across(doc: Doc, study_dir: Path, state: dict) -> None:
    folder = study_dir / sf.GRADCAM_COMPARE_DIR
    index = read_json(folder / runfolder.GRADCAM_INDEX) if (folder / runfolder.GRADCAM_INDEX).is_file() else None
    if not index or not state.get(sf.GRADCAM_COMPARE):
        doc.p("Not made yet (it needs two or more finished variants; `normlab gradcam RUN_DIR RUN_DIR ...` makes it "
              "for any runs).")
        return
    runs = index.get("runs", {})
    doc.p("The same val images explained by the first seed of every variant ("
          + ", ".join(f"{k}: {Path(v).name}" for k, v in runs.items())
          + "): per class, images that every model classifies correctly (\"all right\") and images the models "
          "disagree on (\"disagree\"); maps for the true class, each titled with that model's prediction (red: wrong).")
    for cls, entry in index.get("classes", {}).items():
        doc.img(folder / entry["file"], f"Grad-CAM across norms: {cls}")


def _per_class(doc: Doc, seed0: dict[str, RunRecord | None], classes: list[str]) -> None:
    from normlab.metrics import most_confused_pairs, per_class_accuracy

    runs = {k: r for k, r in seed0.items() if r is not None and (r.summary or {}).get("val")}
    if not runs or not classes:
        return
    accs = {k: per_class_accuracy(torch.tensor(r.summary["val"]["confusion"])).tolist() for k, r in runs.items()}
    if len(accs) > len(classes):  # many variants (the catalogue): one row each, so the table stays narrow
        doc.table(["variant"] + list(classes), [[swatch(k, seed0)] + [f"{a:.3f}" for a in accs[k]] for k in accs])
    else:
        doc.table(["class"] + [swatch(k, seed0) for k in accs],
                  [[c] + [f"{accs[k][i]:.3f}" for k in accs] for i, c in enumerate(classes)])
    doc.p("Val accuracy per class (seed 0). Most-confused pairs on val (true → predicted: count):")
    rows = []
    for k, r in runs.items():
        pairs = most_confused_pairs(torch.tensor(r.summary["val"]["confusion"]), 3)
        rows.append([swatch(k, seed0), "; ".join(f"{classes[t]} → {classes[p]}: {n}" for t, p, n in pairs)])
    doc.table(["variant", "most confused (val)"], rows)
