"""``normlab study``: plan the runs, run (or skip/resume) them, analyse the saved runs, write the report."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from normlab import runfolder
from normlab.errors import DiskFull, NormlabError
from normlab.runfolder import RunLock
from normlab import studyfolder as sf
from normlab.studyfolder import load_study, update_results
from normlab.study.plan import StudyConfig, check_base, load_preset, make_study_config, plan_runs, study_record
from normlab.study.executors import make_options
from normlab.study.runner import check_study_dir, execute

__all__ = ["StudyConfig", "analyse_study", "load_study", "run_study", "study_lock", "update_results"]


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
    created = not study_dir.exists()
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        with study_lock(study_dir, log):
            return _run_study(study_dir, study, base, record, t0, jobs, force, plan_only, log, executor_options)
    finally:
        if created:  # refused before anything was written (other settings, a bad preset): no empty folder left
            with contextlib.suppress(OSError):
                study_dir.rmdir()


def study_lock(study_dir: Path, log=print) -> RunLock:
    """The study folder's lock: one ``normlab study`` (or ``normlab report``) writes a study folder at a time.
    A second one is refused with the holder's pid and host, so no run is ever reported failed because the
    other study was training it."""
    return RunLock(study_dir, log, what="study folder",
                   way_out="wait for that study to finish or stop it, or use another --out; rerunning the same "
                           "command later continues it")


def _run_study(study_dir: Path, study, base, record, t0, jobs, force, plan_only, log, executor_options) -> Path:
    check_study_dir(study_dir, record, force)
    runs = plan_runs(study, base)
    sf.write_record(study_dir, record)
    sf.write_plan(study_dir, [dataclasses.asdict(r) for r in runs])
    previous = sf.read_state(study_dir).get(sf.WALL_SECONDS, 0.0)
    try:
        outcome = execute(study_dir, runs, jobs=jobs, log=log, plan_only=plan_only,
                          options=make_options(study.executor, executor_options),
                          on_finished=lambda _name, _state: update_results(study_dir))
    except DiskFull:
        with contextlib.suppress(DiskFull):  # the table of what finished, if it still fits
            update_results(study_dir)
        raise
    if plan_only:
        return study_dir / sf.PLAN
    update_results(study_dir)
    analyse_study(study_dir, log=log)
    sf.update_state(study_dir, **{sf.LAST_OUTCOME: outcome, sf.WALL_SECONDS: previous + time.perf_counter() - t0})
    from normlab.report.build import build_report

    md, html = build_report(study_dir)
    log(f"report: {html} (and {md.name}); results table: {study_dir / sf.RESULTS}")
    return html


def analyse_study(study_dir: Path, device: str = "cpu", log=print) -> None:
    """Confusion matrices and misclassified grids for every finished run that lacks them; calibration, and
    corruption robustness where the study's robustness step is on (``study.robustness``); Grad-CAM for the
    best run (by val accuracy) of the norm comparison, and the same chosen val images explained by the
    first seed of every variant side by side; ``results.csv``. Reads checkpoints only: nothing is retrained."""
    from normlab.analysis.galleries import run_analyses
    from normlab.analysis.gradcam import run_gradcam

    study_dir = Path(study_dir)
    plan = sf.read_plan(study_dir)
    record = sf.read_record(study_dir)["study"]
    best, best_acc = None, -1.0
    compare: dict[str, str] = {}  # norm -> its lowest-seed usable run of the norm comparison
    for p in plan:
        folder = sf.run_dir(study_dir, p["name"])
        summary = runfolder.read_summary(folder)
        if not summary or summary.get("status") == "diverged" or not summary.get("val"):
            continue
        if runfolder.misclassified_file(folder) is None or not (folder / runfolder.PREDICTIONS).is_file():
            run_analyses(folder, device=device)
        if "norms" in p["groups"]:
            compare.setdefault(p["config"]["norm"], p["name"])
            if summary["val"]["acc"] > best_acc:
                best, best_acc = p["name"], summary["val"]["acc"]
    from normlab.study.robustness import robustness_step

    robustness_step(study_dir, plan, record, sf.read_record(study_dir)["train"].get("dataset", ""), device, log)
    update_results(study_dir)
    state = sf.read_state(study_dir)
    settings = [record.get(k) for k in ("gradcam_classes", "gradcam_per_class", "gradcam_max_classes")]
    if best is not None:
        gc_dir = sf.run_dir(study_dir, best) / runfolder.GRADCAM_DIR
        if (state.get(sf.GRADCAM_RUN) != best or state.get(sf.GRADCAM_SETTINGS) != settings
                or not (gc_dir / runfolder.GRADCAM_INDEX).is_file()):
            log(f"Grad-CAM on the best run: {best} (val acc {best_acc:.4f})")
            run_gradcam(sf.run_dir(study_dir, best), classes=record.get("gradcam_classes"),
                        per_class=record.get("gradcam_per_class", 5), max_classes=record.get("gradcam_max_classes", 10),
                        device=device)
        sf.update_state(study_dir, **{sf.GRADCAM_RUN: best, sf.GRADCAM_SETTINGS: settings})
    if len(compare) > 1:
        _compare_gradcam(study_dir, compare, record, settings, device, log)


def _compare_gradcam(study_dir: Path, compare: dict[str, str], record: dict, settings: list, device: str,
                     log) -> None:
    from normlab.analysis.gradcam import compare_gradcam

    out = study_dir / sf.GRADCAM_COMPARE_DIR
    wanted = {"runs": compare, "settings": settings}
    state = sf.read_state(study_dir)
    if state.get(sf.GRADCAM_COMPARE) == wanted and (out / runfolder.GRADCAM_INDEX).is_file():
        return
    log(f"Grad-CAM across norms: the same val images explained by {', '.join(compare)}")
    try:
        compare_gradcam([sf.run_dir(study_dir, name) for name in compare.values()], out,
                        labels=list(compare), classes=record.get("gradcam_classes"),
                        max_classes=record.get("gradcam_max_classes", 10), device=device)
    except NormlabError as exc:  # e.g. runs of other data after --force: the rest of the report still stands
        log(f"Grad-CAM across norms skipped: {exc}")
        return
    sf.update_state(study_dir, **{sf.GRADCAM_COMPARE: wanted})
