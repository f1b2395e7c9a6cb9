"""The report's opening summary, computed from the run records: what a reader needs first.

Every sentence is derived from the numbers (``report.stats`` decides "within noise"); nothing here reads
files or trains.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from normlab import runfolder
from normlab.report.collect import RunRecord, by_cell
from normlab.report.stats import Gap, Z95, chance_p, compare, mcnemar_gap


def score_split(runs: list[RunRecord]) -> str:
    """test when the finished runs have a test split, else val (the data set has none)."""
    return "test" if any(r.usable and r.summary.get("test") for r in runs) else "val"


def seed_scores(records: list[RunRecord], split: str, metric: str = "acc") -> dict[int, float]:
    return {int(r.config.get("seed", i)): float(r.summary[split][metric])
            for i, r in enumerate(records) if r.usable and r.summary.get(split)}


def n_images(records: list[RunRecord], split: str) -> int:
    for r in records:
        if r.usable and (r.summary.get(split) or {}).get("confusion"):
            return int(sum(map(sum, r.summary[split]["confusion"])))
    return 0


def gap_between(a: list[RunRecord], b: list[RunRecord], split: str, metric: str = "acc") -> Gap:
    """a − b: paired over seeds with two or more shared seeds; with one seed each, McNemar on the shared
    images when both runs saved their predictions (``predictions.json``), else the unpaired interval."""
    sa, sb = seed_scores(a, split, metric), seed_scores(b, split, metric)
    ra = [r for r in a if r.usable and ((r.predictions or {}).get(split))]
    rb = [r for r in b if r.usable and ((r.predictions or {}).get(split))]
    if metric == "acc" and len(set(sa) & set(sb)) < 2 and len(ra) == len(sa) == 1 and len(rb) == len(sb) == 1:
        pa, pb = ra[0].predictions[split], rb[0].predictions[split]
        if pa["true"] == pb["true"] and pa["true"]:
            return mcnemar_gap(pa["true"], pa["pred"], pb["pred"])
    return compare(sa, sb, n_images(a, split))


def _mean(scores: dict[int, float]) -> float:
    return statistics.fmean(scores.values()) if scores else math.nan


def _cell_text(label: str, scores: dict[int, float]) -> str:
    if len(scores) > 1:
        return f"{label} {_mean(scores):.4f} ± {statistics.stdev(scores.values()):.4f} ({len(scores)} seeds)"
    return f"{label} {_mean(scores):.4f}"


def best_variant(norms: dict[str, list[RunRecord]], split: str) -> str | None:
    scores = {label: seed_scores(recs, split) for label, recs in norms.items()}
    scores = {k: v for k, v in scores.items() if v}
    if not scores:
        return None
    ranked = sorted(scores, key=lambda k: -_mean(scores[k]))
    best = ranked[0]
    if len(ranked) == 1:
        return f"Only {_cell_text(best, scores[best])} has a {split} accuracy: nothing to compare it with."
    second = ranked[1]
    gap = gap_between(norms[best], norms[second], split)
    ties = [k for k in ranked[1:] if not gap_between(norms[best], norms[k], split).separated]
    text = (f"Best variant by mean {split} accuracy: {_cell_text(best, scores[best])}, ahead of "
            f"{_cell_text(second, scores[second])} by {gap.diff:+.4f}: {gap.verdict()}.")
    if ties and len(ties) > 1:
        text += f" Within noise of {best}: {', '.join(ties)}."
    elif not ties:
        text += f" Every other variant is separated from {best}."
    return text


def sanity(norms: dict[str, list[RunRecord]], split: str) -> str | None:
    if "bn" not in norms or "torch_bn" not in norms:
        return None
    a, b = seed_scores(norms["bn"], split), seed_scores(norms["torch_bn"], split)
    if not a or not b:
        return "Sanity check (normlab BN vs torch_bn): not available, a run did not finish."
    gap = gap_between(norms["bn"], norms["torch_bn"], split)
    ok = not gap.separated
    return (f"Sanity check: normlab's BN {'agrees with' if ok else 'DIFFERS from'} PyTorch's BatchNorm2d — {split} acc "
            f"{_mean(a):.4f} vs {_mean(b):.4f} ({gap.diff:+.4f}, {gap.verdict()})"
            + ("." if ok else "; look for a bug before trusting the other comparisons."))


def _by(records: list[RunRecord], key: str) -> dict[Any, list[RunRecord]]:
    out: dict[Any, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.config.get(key), []).append(r)
    return out


def batch_size(runs: list[RunRecord], split: str) -> str | None:
    """Does each norm's accuracy move between the smallest and largest batch, and which moves more?"""
    recs = [r for r in runs if "batch" in r.groups]
    if not recs:
        return None
    moves: dict[str, tuple[Gap, int, int, dict, dict]] = {}
    for norm, of_norm in _by(recs, "norm").items():
        sizes = _by(of_norm, "batch_size")
        if len(sizes) < 2:
            continue
        lo, hi = min(sizes), max(sizes)
        a, b = seed_scores(sizes[hi], split), seed_scores(sizes[lo], split)
        if a and b:
            moves[norm] = (gap_between(sizes[hi], sizes[lo], split), lo, hi, a, b)
    if not moves:
        return "Batch size: no comparison finished."
    parts = [f"{norm.upper()} {_mean(b):.4f} → {_mean(a):.4f} ({g.diff:+.4f}, {g.verdict()})"
             for norm, (g, lo, hi, a, b) in moves.items()]
    lo, hi = next(iter(moves.values()))[1:3]
    text = f"Batch size {lo} → {hi} ({split} acc): " + "; ".join(parts) + "."
    if "bn" in moves and "gn" in moves:
        gb, gg = moves["bn"][0], moves["gn"][0]
        more = "BN" if abs(gb.diff) > abs(gg.diff) else "GN"
        # the larger change is clearly larger when the smaller one is within noise and the larger one is not
        clear = (gb.separated != gg.separated) and (gb.separated == (more == "BN"))
        text += (f" {more} moves more (|Δ| {abs(gb.diff):.4f} vs {abs(gg.diff):.4f})"
                 + (f"; only {more}'s change is beyond noise." if clear else
                    ", but whether one moves more than the other is not established by these runs."))
    return text


def augmentation(runs: list[RunRecord], split: str) -> str | None:
    recs = [r for r in runs if "augment" in r.groups]
    modes = _by(recs, "augment")
    if "none" not in modes or len(modes) < 2:
        return None
    base = seed_scores(modes["none"], split)
    parts = []
    for mode, of_mode in modes.items():
        if mode == "none":
            continue
        with_aug = seed_scores(of_mode, split)
        if not with_aug or not base:
            parts.append(f"{mode}: did not finish")
            continue
        g = gap_between(of_mode, modes["none"], split)
        gap_none = _mean(seed_scores(modes["none"], "train")) - _mean(base)
        gap_aug = _mean(seed_scores(of_mode, "train")) - _mean(with_aug)
        parts.append(f"{mode} vs none: {split} acc {_mean(with_aug):.4f} vs {_mean(base):.4f} ({g.diff:+.4f}, "
                     f"{g.verdict()}); train−{split} gap {gap_none:+.4f} → {gap_aug:+.4f}")
    norm = recs[0].config.get("norm", "")
    return f"Augmentation ({norm}): " + "; ".join(parts) + "."


def at_chance(norms: dict[str, list[RunRecord]], split: str) -> dict[str, float]:
    """The variants whose accuracy on ``split`` does not beat guessing (1/classes) by a one-sided exact binomial
    test on its images (p >= 0.05, every seed): {label: mean accuracy}. Their gaps to each other and their
    calibration say nothing about the norm (a model that predicts the class prior is calibrated trivially)."""
    out = {}
    for label, recs in norms.items():
        scores = [r.summary[split] for r in recs if r.usable and (r.summary.get(split) or {}).get("confusion")]
        if not scores:
            continue
        ps = []
        for sc in scores:
            cm = sc["confusion"]
            n, right = int(sum(map(sum, cm))), int(sum(cm[i][i] for i in range(len(cm))))
            ps.append(chance_p(right, n, len(cm)))
        if all(p >= 0.05 for p in ps):
            out[label] = statistics.fmean(float(sc["acc"]) for sc in scores)
    return out


def chance_line(norms: dict[str, list[RunRecord]], split: str) -> str | None:
    low = at_chance(norms, split)
    if not low:
        return None
    first = next(r for recs in norms.values() for r in recs if r.usable and (r.summary.get(split) or {}).get("confusion"))
    k, n = len(first.summary[split]["confusion"]), n_images([first], split)
    return (f"At chance level ({split} accuracy not above 1/{k} by a one-sided exact binomial test on {n} images, "
            f"p ≥ 0.05): " + ", ".join(f"{label} {acc:.4f}" for label, acc in low.items())
            + ". These runs did not learn at this budget: gaps among them and their calibration say nothing about "
            "the norm.")


def failures(runs: list[RunRecord]) -> str:
    bad = []
    for r in runs:
        if r.status == "diverged":
            where = (r.summary or {}).get("diverged") or {}
            bad.append(f"{r.name} diverged (epoch {where.get('epoch', '?')}, step {where.get('step', '?')})")
        elif r.status in ("failed", "missing"):
            bad.append(f"{r.name} {'failed (see its train.log / failed.json)' if r.status == 'failed' else 'has not finished'}")
    early = sum(r.status == "stopped_early" for r in runs)
    tail = f" {early} stopped early on val accuracy (as planned)." if early else ""
    if not bad:
        return f"All {len(runs)} runs finished; none diverged or failed.{tail}"
    return f"{len(bad)} of {len(runs)} runs did not finish: " + "; ".join(bad) + "." + tail


def timing_line(norms: dict[str, list[RunRecord]]) -> str | None:
    steady = {}
    for label, recs in norms.items():
        vals = [t for r in recs if (t := runfolder.timing(r.rows)["steady_seconds_per_epoch"]) is not None]
        if vals:
            steady[label] = statistics.fmean(vals)
    if len(steady) < 2:
        return None
    fast, slow = min(steady, key=steady.get), max(steady, key=steady.get)
    return (f"Steady-state training time per epoch (epochs 2+, first-epoch set-up excluded): fastest {fast} "
            f"{steady[fast]:.2f} s, slowest {slow} {steady[slow]:.2f} s (see Time per epoch).")


def summarise(runs: list[RunRecord]) -> list[str]:
    """The report's findings, in reading order."""
    split = score_split(runs)
    norms = by_cell(runs, "norms")
    items = [best_variant(norms, split), sanity(norms, split), batch_size(runs, split), augmentation(runs, split),
             failures(runs), chance_line(norms, split), timing_line(norms)]
    seeds = {len(v) for v in norms.values()}
    if seeds == {1}:
        paired = all((r.predictions or {}).get(split) for r in runs if r.usable)
        how = ("an exact McNemar test on the images only one of the two models gets right (p < 0.05 = beyond)"
               if paired else f"the unpaired 95 % interval ±{Z95:.2f}·√(Σ p(1−p)/n) of the two accuracies")
        items.append(f"One seed per cell: \"within noise\" above means the {split} set cannot separate the two by "
                     f"{how}; a gap beyond it may still be seed noise. Run more seeds (--seeds 3) for a comparison "
                     "paired over seeds.")
    return [i for i in items if i]
