"""The report's Robustness and Calibration sections, and their findings, from saved results only.

Reads ``robustness.json``, ``calibration.json`` and ``logits.npz`` through the run records and
``normlab.runfolder``; every sentence is computed from those numbers, and ``report.stats`` decides what is
within noise: paired over seeds when cells share two or more seeds; with one seed, test-set noise only
(corrupted accuracies: the unpaired interval over every corrupted image; ECE: a paired bootstrap over
the images from the saved logits).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from normlab import plots, runfolder
from normlab.report.collect import RunRecord, by_cell, fmt, mean_std
from normlab.report.findings import at_chance
from normlab.report.stats import Gap, bootstrap_gap, compare, paired_gap

ROBUSTNESS = "Robustness"
CALIBRATION = "Calibration"


# --------------------------------------------------------------------------- numbers per run


def _ok(r: RunRecord) -> bool:
    return r.usable and bool((r.robustness or {}).get("accuracy"))


def mean_acc(result: dict[str, Any] | None, key: str = "accuracy", severity: int | None = None) -> float:
    vals = [a for sev in ((result or {}).get(key) or {}).values() for s, a in sev.items()
            if a is not None and (severity is None or int(s) == severity)]
    return statistics.fmean(vals) if vals else math.nan


def corruption_acc(result: dict[str, Any], corruption: str, key: str = "accuracy") -> float:
    vals = [a for a in ((result.get(key) or {}).get(corruption) or {}).values() if a is not None]
    return statistics.fmean(vals) if vals else math.nan


def _seeds(records: list[RunRecord], value) -> dict[int, float]:
    out = {}
    for i, r in enumerate(records):
        v = value(r)
        if v is not None and not math.isnan(v):
            out[int(r.config.get("seed", i))] = float(v)
    return out


def _pooled_images(records: list[RunRecord]) -> int:
    r = next((r for r in records if _ok(r)), None)
    if r is None:
        return 0
    res = r.robustness
    return int(res.get("images", 0)) * sum(len(s) for s in res["accuracy"].values())


def _norm(r: RunRecord, key: str) -> float | None:
    v = ((r.robustness or {}).get("normalized") or {}).get(key)
    return None if v is None else float(v)


def _m(scores: dict[int, float]) -> float:
    return statistics.fmean(scores.values()) if scores else math.nan


# --------------------------------------------------------------------------- findings


def robustness_findings(norms: dict[str, list[RunRecord]]) -> list[str]:
    """Most robust variant (mean corrupted accuracy) and its gap to the next; what re-estimated statistics
    change per norm with batch statistics, and who wins once that is allowed; failed steps."""
    out = []
    plain = {k: _seeds(v, lambda r: mean_acc(r.robustness) if _ok(r) else None) for k, v in norms.items()}
    plain = {k: v for k, v in plain.items() if v}
    if len(plain) >= 1:
        ranked = sorted(plain, key=lambda k: -_m(plain[k]))
        best = ranked[0]
        text = f"Most robust to corruptions (mean accuracy over every corruption × severity): {best} {_m(plain[best]):.4f}"
        if len(ranked) > 1:
            second = ranked[1]
            gap = compare(plain[best], plain[second], _pooled_images(norms[best]))
            text += f", ahead of {second} {_m(plain[second]):.4f} by {gap.diff:+.4f}: {gap.verdict()}"
        mce = {k: _seeds(v, lambda r: _norm(r, "mce")) for k, v in norms.items()}
        mce = {k: _m(v) for k, v in mce.items() if v}
        if mce:
            low = min(mce, key=mce.get)
            text += f". Lowest mCE (normalized by torch_bn = 1): {low} {mce[low]:.3f}"
        out.append(text + ".")
    gains = []
    allowed: dict[str, dict[int, float]] = {}
    for label, recs in norms.items():
        adapted = _seeds(recs, lambda r: mean_acc(r.robustness, "adapted") if _ok(r) and r.robustness.get("adapted")
                         else None)
        base = plain.get(label, {})
        allowed[label] = {s: max(v, adapted.get(s, v)) for s, v in base.items()}
        if adapted and base:
            g = compare(adapted, base, _pooled_images(recs))
            gains.append(f"{label} {_m(base):.4f} → {_m(adapted):.4f} ({g.diff:+.4f}, {g.verdict()})")
    if gains:
        text = "Re-estimating the batch statistics on the corrupted images (mean corrupted accuracy): " + "; ".join(gains)
        allowed = {k: v for k, v in allowed.items() if v}
        if len(allowed) > 1:
            ranked = sorted(allowed, key=lambda k: -_m(allowed[k]))
            gap = compare(allowed[ranked[0]], allowed[ranked[1]], _pooled_images(norms[ranked[0]]))
            text += (f". Once re-estimation is allowed, the best is {ranked[0]} ({_m(allowed[ranked[0]]):.4f}, ahead "
                     f"of {ranked[1]} by {gap.diff:+.4f}: {gap.verdict()})")
        out.append(text + ".")
    failed = [f"{r.name} ({r.robustness['failed']})" for recs in norms.values() for r in recs
              if (r.robustness or {}).get("failed")]
    if failed:
        out.append("The robustness step failed for " + "; ".join(failed) + "; those runs' training results stand.")
    return out


def _confidence(r: RunRecord, split: str):
    logits = runfolder.read_logits(r.folder) or {}
    true = logits.get(split + runfolder.LABELS_SUFFIX)
    if split not in logits or true is None:
        return None
    import numpy as np

    z = logits[split].astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if len(true) != len(p):
        return None
    return p.max(1), (p.argmax(1) == true).astype(np.float64)


def ece_gap(a: list[RunRecord], b: list[RunRecord], split: str) -> Gap:
    """ECE of a − b: paired over seeds with two or more shared seeds; else a paired bootstrap over the images
    from the saved logits; else no interval."""
    from normlab.metrics import ece_from_confidence

    sa = _seeds(a, lambda r: ((r.calibration or {}).get(split) or {}).get("ece") if r.usable else None)
    sb = _seeds(b, lambda r: ((r.calibration or {}).get(split) or {}).get("ece") if r.usable else None)
    gap = paired_gap(sa, sb)
    if gap is not None:
        return gap
    ra, rb = next((r for r in a if r.usable), None), next((r for r in b if r.usable), None)
    ca, cb = (_confidence(ra, split) if ra else None), (_confidence(rb, split) if rb else None)
    if ca is not None and cb is not None and len(ca[0]) == len(cb[0]):
        return bootstrap_gap(ece_from_confidence, ca, cb)
    return Gap(_m(sa) - _m(sb), math.inf, 1, "none")


def calibration_findings(norms: dict[str, list[RunRecord]], split: str) -> list[str]:
    eces = {k: _seeds(v, lambda r: ((r.calibration or {}).get(split) or {}).get("ece") if r.usable else None)
            for k, v in norms.items()}
    eces = {k: v for k, v in eces.items() if v}
    chance = [k for k in at_chance(norms, split) if k in eces]
    trivial = (f" ({', '.join(chance)} at chance accuracy: left out, a model that predicts the class prior is "
               "calibrated trivially)") if chance else ""
    eces = {k: v for k, v in eces.items() if k not in chance}
    if not eces:
        return [f"Calibration on {split}: every variant is at chance accuracy; ECE says nothing here."] if chance else []
    ranked = sorted(eces, key=lambda k: _m(eces[k]))
    best = ranked[0]
    text = f"Best calibrated on {split} (lowest ECE, 15 bins){trivial}: {best} {_m(eces[best]):.4f}"
    if len(ranked) > 1:
        gap = ece_gap(norms[best], norms[ranked[1]], split)
        text += f", vs {ranked[1]} {_m(eces[ranked[1]]):.4f} ({gap.diff:+.4f}: {gap.verdict()})"
        worst = ranked[-1]
        if worst != ranked[1]:
            text += f"; worst {worst} {_m(eces[worst]):.4f}"
    nll = {k: _m(_seeds(norms[k], lambda r: ((r.calibration or {}).get(split) or {}).get("nll") if r.usable else None))
           for k in eces}
    low = min(nll, key=lambda k: nll[k] if not math.isnan(nll[k]) else math.inf)
    return [text + f". Lowest NLL: {low} {nll[low]:.4f}."]


# --------------------------------------------------------------------------- sections


def robustness_section(doc, runs: list[RunRecord], fig_dir: Path, swatch) -> None:
    norms = by_cell(runs, "norms")
    have = {k: [r for r in v if _ok(r)] for k, v in norms.items()}
    have = {k: v for k, v in have.items() if v}
    failed = [r for r in runs if (r.robustness or {}).get("failed")]
    if not have:
        if failed:
            doc.p("The robustness step failed for every run: "
                  + "; ".join(f"{r.name}: {r.robustness['failed']}" for r in failed) + ".")
        else:
            doc.p("Not in this study: the robustness step is off (it is on by default for CIFAR-10 and image folders; "
                  "set `robustness: on` in the study, or run `normlab robustness RUN_DIR ...` on any run).")
        return
    first = next(iter(have.values()))[0].robustness
    sevs = first["severities"]
    doc.p(f"The best weights of every variant on {len(first['corruptions'])} corruptions (Hendrycks & Dietterich) × "
          f"severities {', '.join(map(str, sevs))} of the {first['split']} split ({first['images']} images each), "
          "generated locally; nothing retrained. mCE: corruption errors summed over severities, divided by "
          "torch_bn's, averaged over corruptions (torch_bn = 1; lower is better); relative mCE uses the increase over "
          "each model's clean error. Re-estimated: BN-style running statistics recomputed on the corrupted images; "
          f"prior-mixed: Schneider et al.'s N/(N+n) mix with N = {first.get('prior_n', 16)} at the evaluation batch size.")
    for line in robustness_findings(norms):
        doc.p(line)
    rows = []
    for label, recs in norms.items():
        ok = [r for r in recs if _ok(r)]

        def cell(value, digits=4):
            m, s = mean_std([v for v in (value(r) for r in ok) if v is not None])
            return fmt(m, s, len(ok), digits)

        bad = sum(bool((r.robustness or {}).get("failed")) for r in recs)
        status = f"failed in {bad}/{len(recs)} seeds (see above)" if bad else ""
        rows.append([swatch(label, norms), str(len(ok)), cell(lambda r: r.robustness["clean"]["acc"]),
                     cell(lambda r: mean_acc(r.robustness)), cell(lambda r: _norm(r, "mce"), 3),
                     cell(lambda r: _norm(r, "relative_mce"), 3),
                     cell(lambda r: mean_acc(r.robustness, "adapted") if r.robustness.get("adapted") else None),
                     cell(lambda r: mean_acc(r.robustness, "mixed") if r.robustness.get("mixed") else None),
                     status or ("ok" if ok else "not evaluated")])
    doc.table(["variant", "seeds", "clean acc", "corrupted acc", "mCE", "relative mCE", "re-estimated acc",
               "prior-mixed acc", "status"], rows)
    # accuracy against severity (0 = clean), plain and re-estimated
    panels = []
    for key, title in (("accuracy", "As trained (eval mode)"), ("adapted", "Statistics re-estimated on the corrupted images")):
        series = {}
        for label, recs in have.items():
            if key == "adapted" and not any(r.robustness.get("adapted") for r in recs):
                continue
            ys = [statistics.fmean([r.robustness["clean"]["acc"] for r in recs])]
            ys += [statistics.fmean([mean_acc(r.robustness, key, s) for r in recs]) for s in sevs]
            series[label] = ([0] + list(sevs), ys)
        if series:
            panels.append((title, "accuracy (mean over corruptions)", series))
    # one y scale: the gain from re-estimation is the step from the left panel's curve to the right one's
    path = plots.plot_panels(panels, fig_dir / "robustness_severity.png", xlabel="severity (0 = clean)", sharey=True,
                             xticks=[0] + list(sevs))
    doc.img(path, "Accuracy against corruption severity, every variant, mean over corruptions and seeds")
    # corruption × variant heat map
    names = first["corruptions"]
    grid = [[statistics.fmean([corruption_acc(r.robustness, c) for r in recs]) for recs in have.values()]
            for c in names]
    path = plots.plot_heatmap(grid, names, list(have), fig_dir / "robustness_heatmap.png",
                              title="Accuracy per corruption (mean over severities and seeds)", label="accuracy")
    doc.img(path, "Accuracy per corruption and variant, mean over the severities evaluated")
    # gain from re-estimated statistics, and the clean batch-statistics sweep
    gain_rows = []
    for label, recs in have.items():
        if not any(r.robustness.get("adapted") for r in recs):
            continue
        p_ = _m(_seeds(recs, lambda r: mean_acc(r.robustness)))
        a_ = _m(_seeds(recs, lambda r: mean_acc(r.robustness, "adapted")))
        x_ = _m(_seeds(recs, lambda r: mean_acc(r.robustness, "mixed")))
        mm = [_norm(r, "mce_adapted") for r in recs if _norm(r, "mce_adapted") is not None]
        gain_rows.append([swatch(label, norms), f"{p_:.4f}", f"{a_:.4f} ({a_ - p_:+.4f})", f"{x_:.4f} ({x_ - p_:+.4f})",
                          f"{statistics.fmean(mm):.3f}" if mm else "–"])
    if gain_rows:
        doc.p("Gain from test-time statistics (norms with batch statistics only; the others have none to re-estimate):")
        doc.table(["variant", "as trained", "re-estimated (gain)", "prior-mixed (gain)", "mCE re-estimated"], gain_rows)
    sweep = {label: [r.robustness.get("batch_stats_clean") for r in recs if r.robustness.get("batch_stats_clean")]
             for label, recs in have.items()}
    sweep = {k: v for k, v in sweep.items() if v}
    if sweep:
        sizes = [k for k in next(iter(sweep.values()))[0] if k != "eval"]
        rows = []
        for label, vals in sweep.items():
            row = [swatch(label, norms), f"{statistics.fmean([v['eval'] for v in vals]):.4f}"]
            for b in sizes:
                got = [v[b] for v in vals if v.get(b) is not None]
                row.append(f"{statistics.fmean(got):.4f}" if got else "n/a (one value per channel)")
            rows.append(row)
        n_img = next(r.robustness.get("batch_stats_images") for recs in have.values() for r in recs
                     if r.robustness.get("batch_stats_clean"))
        doc.p(f"Clean accuracy in eval mode (running statistics) and with batch statistics at evaluation batch sizes "
              f"{', '.join(sizes)} (first {n_img} images of the split): how much a BN-style model depends on the "
              "batch it is evaluated with.")
        doc.table(["variant", "eval mode"] + [f"batch {b}" for b in sizes], rows)


def calibration_section(doc, runs: list[RunRecord], fig_dir: Path, swatch, split: str) -> None:
    norms = by_cell(runs, "norms")
    have = {k: [r for r in v if r.usable and r.calibration] for k, v in norms.items()}
    have = {k: v for k, v in have.items() if v}
    if not have:
        doc.p("No calibration results yet (they are computed after training by the study's analyses).")
        return
    for line in calibration_findings(norms, split):
        doc.p(line)
    splits = [s for s in ("val", "test") if any((r.calibration or {}).get(s) for v in have.values() for r in v)]
    rows = []
    for label, recs in have.items():
        row = [swatch(label, norms), str(len(recs))]
        for s in splits:
            for m in ("ece", "nll", "brier"):
                vals = [r.calibration[s][m] for r in recs if r.calibration.get(s)]
                row.append(fmt(*mean_std(vals), len(vals)))
        rows.append(row)
    doc.table(["variant", "seeds"] + [f"{s} {m}" for s in splits for m in ("ECE", "NLL", "Brier")], rows)
    doc.p("ECE: expected calibration error over 15 equal-width confidence bins (torchmetrics); NLL: mean negative "
          "log-likelihood of the true class; Brier: mean squared distance of the probabilities to the one-hot label "
          "(summed over classes). Lower is better for all three. Computed from the best weights' saved logits.")
    bins = {label: recs[0].calibration[split]["bins"] for label, recs in have.items() if recs[0].calibration.get(split)}
    if bins:
        path = plots.plot_reliability(bins, fig_dir / f"reliability_{split}.png",
                                      title=f"Reliability on {split} (first seed; diagonal = calibrated)")
        doc.img(path, f"Reliability diagrams on {split}, one per variant: accuracy against confidence per bin "
                      "(bar shade: share of images in the bin)")
