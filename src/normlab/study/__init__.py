"""``normlab study``: plan the runs, run (or skip/resume) them, analyse the saved runs, write the report."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from normlab.config import dump_yaml, read_yaml
from normlab.errors import NormlabError
from normlab.io import read_json, write_json, write_text
from normlab.study.plan import StudyConfig, check_base, load_preset, make_study_config, plan_runs, study_record
from normlab.study.executors import make_options
from normlab.study.runner import check_study_dir, execute

__all__ = ["StudyConfig", "analyse_study", "run_study"]


def run_study(spec: str, out: str | Path | None = None, *, study_overrides: dict[str, Any] | None = None,
              train_overrides: dict[str, Any] | None = None, jobs: int = 1, force: bool = False,
              plan_only: bool = False, log=print, executor_options: dict[str, Any] | None = None) -> Path:
    """Run the study described by preset/YAML ``spec`` (with overrides) in ``out``; return the report path."""
    t0 = time.perf_counter()
    study_data, train_data, path = load_preset(spec)
    study = make_study_config({**study_data, **(study_overrides or {})}, where=str(path))
    base = check_base({**train_data, **(train_overrides or {})})
    if jobs < 1:
        raise NormlabError(f"--jobs {jobs}: must be >= 1")
    study_dir = Path(out or Path("studies") / study.name)
    record = study_record(study, base)
    check_study_dir(study_dir, record, force)
    runs = plan_runs(study, base)
    study_dir.mkdir(parents=True, exist_ok=True)
    write_text(study_dir / "study.yaml", dump_yaml(record))
    write_json(study_dir / "plan.json", [dataclasses.asdict(r) for r in runs])
    state_path = study_dir / "state.json"
    previous = read_json(state_path).get("wall_seconds", 0.0) if state_path.is_file() else 0.0
    outcome = execute(study_dir, runs, jobs=jobs, log=log, plan_only=plan_only,
                      options=make_options(study.executor, executor_options))
    if plan_only:
        return study_dir / "plan.json"
    analyse_study(study_dir, log=log)
    state = read_json(state_path) if state_path.is_file() else {}
    state.update(last_outcome=outcome, wall_seconds=previous + time.perf_counter() - t0)
    write_json(state_path, state)
    from normlab.report.build import build_report

    md, html = build_report(study_dir)
    log(f"report: {html} (and {md.name})")
    return html


def analyse_study(study_dir: Path, device: str = "cpu", log=print) -> None:
    """Confusion matrices and misclassified grids for every finished run that lacks them; Grad-CAM for the
    best run (by val accuracy) of the norm comparison. Reads checkpoints only: nothing is retrained."""
    from normlab.analysis.galleries import run_analyses
    from normlab.analysis.gradcam import run_gradcam

    study = read_json(study_dir / "plan.json")
    record = read_yaml(study_dir / "study.yaml")["study"]
    best, best_acc = None, -1.0
    for p in study:
        folder = study_dir / "runs" / p["name"]
        summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else None
        if not summary or summary.get("status") == "diverged" or not summary.get("val"):
            continue
        if not (folder / "misclassified_val.png").is_file():
            run_analyses(folder, device=device)
        if "norms" in p["groups"] and summary["val"]["acc"] > best_acc:
            best, best_acc = p["name"], summary["val"]["acc"]
    state_path = study_dir / "state.json"
    state = read_json(state_path) if state_path.is_file() else {}
    if best is not None:
        gc_dir = study_dir / "runs" / best / "gradcam"
        settings = [record.get(k) for k in ("gradcam_classes", "gradcam_per_class", "gradcam_max_classes")]
        if (state.get("gradcam_run") != best or state.get("gradcam_settings") != settings
                or not (gc_dir / "gradcam.json").is_file()):
            log(f"Grad-CAM on the best run: {best} (val acc {best_acc:.4f})")
            run_gradcam(study_dir / "runs" / best, classes=record.get("gradcam_classes"),
                        per_class=record.get("gradcam_per_class", 5), max_classes=record.get("gradcam_max_classes", 10),
                        device=device)
        state.update(gradcam_run=best, gradcam_settings=settings)
        write_json(state_path, state)
