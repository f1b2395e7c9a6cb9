"""Read a study folder into plain records (no plotting, no training) and aggregate them over seeds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab import runfolder
from normlab import studyfolder as sf

METRICS = ("acc", "micro_f1", "macro_f1")
SPLITS = ("train", "val", "test")


@dataclass
class RunRecord:
    name: str
    folder: Path
    config: dict[str, Any]
    groups: list[str]
    cell: str
    status: str  # finished | stopped_early | diverged | failed | missing
    summary: dict[str, Any] | None = None
    rows: list[dict[str, float]] = field(default_factory=list)
    quantiles: dict[str, Any] | None = None
    cells: dict[str, str] = field(default_factory=dict)  # group -> the cell label it has there
    predictions: dict[str, Any] | None = None  # predictions.json: per-image true/pred per split
    robustness: dict[str, Any] | None = None  # robustness.json
    calibration: dict[str, Any] | None = None  # calibration.json

    @property
    def usable(self) -> bool:
        return self.summary is not None and self.status in ("finished", "stopped_early")


def read_run(folder: Path, name: str, config: dict, groups: list[str], cell: str) -> RunRecord:
    status = runfolder.status_of(folder)
    if status == "partial":  # a run still going or killed: the report shows it as not finished
        status = "missing"
    return RunRecord(name, folder, config, groups, cell, status, runfolder.read_summary(folder),
                     runfolder.read_metrics(folder), runfolder.read_quantiles(folder),
                     predictions=runfolder.read_predictions(folder), robustness=runfolder.read_robustness(folder),
                     calibration=runfolder.read_calibration(folder))


def collect_study(study_dir: Path) -> tuple[dict[str, Any], list[RunRecord]]:
    """(study.yaml contents, one record per planned run, in plan order)."""
    record = sf.read_record(study_dir)
    plan = sf.read_plan(study_dir)
    runs = [read_run(sf.run_dir(study_dir, p["name"]), p["name"], p["config"], p["groups"], p["cell"]) for p in plan]
    for r, p in zip(runs, plan):
        r.cells = dict(p.get("cells", {}))
    return record, runs


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def by_cell(runs: list[RunRecord], group: str) -> dict[str, list[RunRecord]]:
    """Runs of one comparison grouped by cell label (seeds together), in plan order."""
    cells: dict[str, list[RunRecord]] = {}
    for r in runs:
        if group in r.groups:
            label = r.config["norm"] if group == "norms" else r.cells.get(group, r.cell)
            cells.setdefault(label, []).append(r)
    return cells


def cell_metric(records: list[RunRecord], split: str, metric: str) -> tuple[float, float, int]:
    vals = [r.summary[split][metric] for r in records if r.usable and r.summary.get(split)]
    m, s = mean_std(vals)
    return m, s, len(vals)


def cell_status(records: list[RunRecord]) -> str:
    """'' when every seed finished; otherwise what went wrong, e.g. 'diverged (epoch 2) in 1/3 seeds'."""
    bad = [r for r in records if not r.usable]
    if not bad:
        return ""
    parts = []
    for r in bad:
        if r.status == "diverged" and r.summary and r.summary.get("diverged"):
            parts.append(f"diverged (epoch {r.summary['diverged']['epoch']})")
        else:
            parts.append(r.status)
    return f"{', '.join(sorted(set(parts)))} in {len(bad)}/{len(records)} seeds"


def mean_curve(records: list[RunRecord], column: str) -> tuple[list[float], list[float]]:
    """Per-epoch mean of ``column`` over the seeds that reached each epoch."""
    per_epoch: dict[int, list[float]] = {}
    for r in records:
        for row in r.rows:
            if column in row and not math.isnan(row[column]):
                per_epoch.setdefault(int(row["epoch"]), []).append(row[column])
    epochs = sorted(per_epoch)
    return [float(e) for e in epochs], [statistics.fmean(per_epoch[e]) for e in epochs]


def mean_quantiles(records: list[RunRecord], layer: str) -> tuple[list[float], list[list[float]]]:
    per_epoch: dict[int, list[list[float]]] = {}
    for r in records:
        for e in (r.quantiles or {}).get("epochs", []):
            if layer in e:
                per_epoch.setdefault(int(e["epoch"]), []).append(e[layer])
    epochs = sorted(per_epoch)
    return [float(e) for e in epochs], [[statistics.fmean(col) for col in zip(*per_epoch[e])] for e in epochs]


def rank(values: dict[str, float], higher_is_better: bool = True) -> list[tuple[int, str, float]]:
    """Rank labels by value (NaN last), computed from the numbers."""
    items = [(k, v) for k, v in values.items() if not math.isnan(v)]
    items.sort(key=lambda kv: -kv[1] if higher_is_better else kv[1])
    return [(i + 1, k, v) for i, (k, v) in enumerate(items)]
