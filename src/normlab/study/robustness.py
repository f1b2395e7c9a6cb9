"""A study's robustness and calibration steps: after training, from the saved best weights (never retrains).

For every usable run: ``calibration.json`` (always; one eval pass per split) and, when the study's
robustness step is on (``StudyConfig.robustness_on``), ``robustness.json``. Then corruption errors are
normalized by the ``torch_bn`` runs of the norm comparison (mean over their seeds), as Hendrycks &
Dietterich normalize by AlexNet. A run whose step fails keeps its training results; its
``robustness.json`` says ``{"failed": message}`` and the report marks it.

The corrupted sets are generated once per data set, corruption and severity (``normlab.data.corruptions``'
cache), so the runs of a study share them.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from normlab import runfolder
from normlab.errors import NormlabError
from normlab import studyfolder as sf

BASELINE = "torch_bn"


def _study_config(record: dict[str, Any]):
    from normlab.study.plan import StudyConfig

    names = {f.name for f in fields(StudyConfig)}
    return StudyConfig(**{k: v for k, v in record.items() if k in names})


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, NormlabError) else f"{type(exc).__name__}: {text}"[:300]


def robustness_step(study_dir: Path, plan: list[dict[str, Any]], record: dict[str, Any], dataset: str,
                    device: str = "cpu", log=print) -> None:
    from normlab.analysis.calibration import run_calibration
    from normlab.analysis.robustness import (BATCH_SIZES, PRIOR_N, normalize_runs, robustness_settings,
                                             run_robustness)

    study = _study_config(record)
    on = study.robustness_on(dataset)
    settings = robustness_settings(study.robustness_corruptions, sorted(set(study.robustness_severities)),
                                   study.robustness_test_time, PRIOR_N, BATCH_SIZES, 0,
                                   study.robustness_batch_stats_images)
    usable = []
    for p in plan:
        folder = sf.run_dir(study_dir, p["name"])
        summary = runfolder.read_summary(folder)
        if not summary or summary.get("status") == "diverged" or not summary.get("val"):
            continue
        usable.append(p)
        loaded = None
        if runfolder.read_calibration(folder) is None:
            try:
                from normlab.analysis.galleries import load_run

                loaded = load_run(folder, device)
                run_calibration(folder, loaded=loaded)
            except Exception as exc:  # the run and the rest of the study stand; the report shows no calibration
                log(f"calibration of {p['name']} failed: {_one_line(exc)}")
        if not on:
            continue
        saved = runfolder.read_robustness(folder) or {}
        if saved.get("settings") == settings and saved.get("accuracy"):
            continue
        log(f"robustness: {p['name']} ({len(settings['severities'])} severities)")
        try:
            run_robustness(folder, corruptions=study.robustness_corruptions, severities=settings["severities"],
                           test_time=study.robustness_test_time, batch_stats_images=settings["batch_stats_images"],
                           device=device, loaded=loaded)
        except Exception as exc:  # one run's failure is recorded, never the study's end
            log(f"robustness of {p['name']} failed: {_one_line(exc)}")
            runfolder.write_robustness(folder, {"failed": _one_line(exc), "settings": settings})
    if not on:
        return
    results = {p["name"]: runfolder.read_robustness(sf.run_dir(study_dir, p["name"])) or {} for p in usable}
    baseline = [p["name"] for p in usable if p["config"].get("norm") == BASELINE and "norms" in p["groups"]]
    baseline = baseline or [p["name"] for p in usable if p["config"].get("norm") == BASELINE]
    for name, res in normalize_runs(results, baseline, BASELINE).items():
        if res.get("accuracy") and res != results[name]:
            runfolder.write_robustness(sf.run_dir(study_dir, name), res)
