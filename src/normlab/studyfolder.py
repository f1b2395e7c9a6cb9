"""The study folder: its file names, ``state.json`` (one read-modify-write owner) and ``results.csv``.

=================  ==========================================================================================
``study.yaml``     ``{"study": StudyConfig fields, "train": shared TrainConfig settings}``
``plan.json``      ``[{"name", "config", "groups", "cell", "cells"}]``: every planned run, in order
``plan/<run>.yaml`` the config each run is started with (cluster recipe)
``state.json``     study-level progress: ``wall_seconds``, ``last_outcome``, ``gradcam_run`` (the run whose
                   Grad-CAM gallery the report shows), ``gradcam_settings``, ``gradcam_compare`` (the
                   cross-norm comparison's folder and runs)
``results.csv``    one row per planned run (``RESULT_COLUMNS`` + the settings the study varies + the robustness and
                   calibration columns, ``runfolder.ROBUSTNESS_COLUMNS``)
``runs/<run>/``    one run folder each (``normlab.runfolder``) · ``figures/`` · ``report.md`` · ``report.html``
=================  ==========================================================================================
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from normlab import runfolder
from normlab.io import read_json, write_json, write_text

STUDY_YAML = "study.yaml"
PLAN = "plan.json"
PLAN_DIR = "plan"
STATE = "state.json"
RESULTS = "results.csv"
RUNS = "runs"
FIGURES = "figures"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
GRADCAM_COMPARE_DIR = "gradcam_compare"

# state.json keys
WALL_SECONDS = "wall_seconds"
LAST_OUTCOME = "last_outcome"
GRADCAM_RUN = "gradcam_run"
GRADCAM_SETTINGS = "gradcam_settings"
GRADCAM_COMPARE = "gradcam_compare"

# never "varied settings": they differ per run by construction or say nothing about the model
_NOT_SETTINGS = {"out", "seed", "progress"}
RESULT_COLUMNS = (("run", "cell", "groups", "seed", "status")
                  + tuple(f"{s}_{m}" for s in runfolder.SPLITS for m in ("loss",) + runfolder.SCORES)
                  + ("epochs_run", "best_epoch", "steady_seconds_per_epoch", "first_epoch_seconds", "wall_seconds",
                     "diverged_epoch"))


def run_dir(study_dir: str | Path, name: str) -> Path:
    return Path(study_dir) / RUNS / name


def is_study(study_dir: str | Path) -> bool:
    return (Path(study_dir) / PLAN).is_file()


def read_plan(study_dir: str | Path) -> list[dict[str, Any]]:
    return read_json(Path(study_dir) / PLAN)


def write_plan(study_dir: str | Path, plan: list[dict[str, Any]]) -> None:
    write_json(Path(study_dir) / PLAN, plan)


def read_record(study_dir: str | Path) -> dict[str, Any]:
    from normlab.config import read_yaml

    return read_yaml(Path(study_dir) / STUDY_YAML)


def write_record(study_dir: str | Path, record: dict[str, Any]) -> None:
    from normlab.config import dump_yaml

    write_text(Path(study_dir) / STUDY_YAML, dump_yaml(record))


def read_state(study_dir: str | Path) -> dict[str, Any]:
    path = Path(study_dir) / STATE
    return read_json(path) if path.is_file() else {}


def update_state(study_dir: str | Path, **changes: Any) -> dict[str, Any]:
    """Read ``state.json``, apply ``changes`` and write it back: the only writer of the file."""
    state = read_state(study_dir)
    state.update(changes)
    write_json(Path(study_dir) / STATE, state)
    return state


# ----------------------------------------------------------------------------------------- results.csv


def varied_settings(plan: list[dict[str, Any]]) -> list[str]:
    """The config keys whose value differs between planned runs (seed apart), in config order."""
    keys: list[str] = []
    for p in plan:
        keys += [k for k in p["config"] if k not in keys]
    out = []
    for k in keys:
        if k in _NOT_SETTINGS:
            continue
        values = {json.dumps(p["config"].get(k), sort_keys=True, default=str) for p in plan}
        if len(values) > 1:
            out.append(k)
    return out


def result_rows(study_dir: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one row per planned run) read from the run folders: nothing is computed from weights."""
    plan = read_plan(study_dir)
    settings = varied_settings(plan)
    columns = list(RESULT_COLUMNS[:4]) + settings + list(RESULT_COLUMNS[4:]) + list(runfolder.ROBUSTNESS_COLUMNS)
    rows = []
    for p in plan:
        folder = run_dir(study_dir, p["name"])
        summary = runfolder.read_summary(folder)
        timing = (summary or {}).get("timing") or runfolder.timing(runfolder.read_metrics(folder))
        row: dict[str, Any] = {"run": p["name"], "cell": p["cell"], "groups": ";".join(p["groups"]),
                               "seed": p["config"].get("seed"), "status": runfolder.status_of(folder)}
        row.update({k: p["config"].get(k) for k in settings})
        row.update(runfolder.final_scores(summary))
        row.update(epochs_run=(summary or {}).get("epochs_run"), best_epoch=(summary or {}).get("best_epoch"),
                   steady_seconds_per_epoch=timing.get("steady_seconds_per_epoch"),
                   first_epoch_seconds=timing.get("first_epoch_seconds"),
                   wall_seconds=(summary or {}).get("wall_seconds"),
                   diverged_epoch=((summary or {}).get("diverged") or {}).get("epoch"))
        row.update(runfolder.robustness_scores(folder))
        rows.append(row)
    return columns, rows


def results_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v)
                         for k, v in row.items()})
    return buf.getvalue()


def update_results(study_dir: str | Path) -> Path:
    """(Re)write ``results.csv`` from the run folders. Cheap (JSON and CSV reads only): call it whenever a
    run finishes, so the table is current while a study is still running."""
    columns, rows = result_rows(study_dir)
    path = Path(study_dir) / RESULTS
    write_text(path, results_text(columns, rows))
    return path


def load_study(study_dir: str | Path):
    """The study's results as a pandas DataFrame, one row per planned run (fresh from the run folders)."""
    try:
        import pandas as pd
    except ImportError:
        from normlab.errors import NormlabError

        raise NormlabError("load_study needs pandas: pip install 'normlab[data]' (or pip install pandas)") from None
    study_dir = Path(study_dir)
    if not is_study(study_dir):
        from normlab.errors import NormlabError

        raise NormlabError(f"{study_dir} is not a study folder (no {PLAN}): give the folder `normlab study` wrote")
    columns, rows = result_rows(study_dir)
    return pd.DataFrame(rows, columns=columns)
