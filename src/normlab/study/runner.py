"""Run a study's plan: each run is a ``normlab train`` child process in ``<study>/runs/<name>``.

Re-running the same command skips finished runs (``summary.json``) and resumes unfinished ones from
``last.pt``. ``jobs`` runs go at once: one per visible GPU, or CPU processes sharing the cores. A run
that fails is recorded and the study goes on; the report shows it.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from normlab.config import dump_yaml
from normlab.errors import NormlabError
from normlab.io import read_json, write_json, write_text
from normlab.study.plan import Run


def run_state(folder: Path) -> str:
    if (folder / "summary.json").is_file():
        return "finished"
    if (folder / "last.pt").is_file():
        return "partial"
    return "new"


def _command(run: Run, folder: Path, plan_file: Path) -> list[str]:
    base = [sys.executable, "-m", "normlab", "train"]
    state = run_state(folder)
    if state == "partial":
        return base + ["--resume", str(folder)]
    # "new": nothing worth keeping (at most a config.yaml of a run killed before its first epoch ended)
    return base + ["--config", str(plan_file), "--out", str(folder), "--force"]


def _env(slot: int, jobs: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    else:  # split the cores between the concurrent CPU runs
        threads = max(1, (os.cpu_count() or 1) // jobs)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if jobs > 1:
        env["NORMLAB_PROGRESS"] = "plain"
    return env


def execute(study_dir: Path, runs: list[Run], jobs: int = 1, log=print, plan_only: bool = False) -> dict[str, str]:
    """Run (or skip, or resume) every run; return name -> final state (finished | failed | skipped).
    ``plan_only`` writes ``plan/<name>.yaml`` and prints one ``normlab train`` command per run instead."""
    runs_dir, plan_dir = study_dir / "runs", study_dir / "plan"
    outcome: dict[str, str] = {}
    todo = []
    for run in runs:
        folder = runs_dir / run.name
        plan_file = plan_dir / f"{run.name}.yaml"
        write_text(plan_file, dump_yaml({k: v for k, v in run.config.items() if k != "out"}))
        if run_state(folder) == "finished":
            outcome[run.name] = "skipped"
        else:
            todo.append((run, folder, plan_file))
    if plan_only:
        for run, folder, plan_file in todo:
            log(" ".join(c for c in _command(run, folder, plan_file)[2:] if c != "--force"))
        return {run.name: "planned" for run, _, _ in todo}
    skipped = len(runs) - len(todo)
    log(f"study {study_dir}: {len(runs)} runs, {skipped} already finished, {len(todo)} to run"
        + (f" ({jobs} at a time)" if jobs > 1 else ""))
    if jobs > 1 and any(r.config["device"] != "cpu" for r, _, _ in todo) and torch.cuda.device_count():
        jobs = min(jobs, torch.cuda.device_count())
    slots = list(range(jobs))

    def one(item: tuple[Run, Path, Path], index: int) -> tuple[str, str]:
        run, folder, plan_file = item
        slot = slots.pop() if slots else 0
        try:
            cmd = _command(run, folder, plan_file)
            verb = "resuming" if "--resume" in cmd else "starting"
            log(f"[{index}/{len(todo)}] {verb} {run.name}")
            t0 = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            if jobs == 1:
                proc = subprocess.run(cmd, env=_env(slot, jobs, run.config["device"]))
            else:
                with open(folder / "train.log", "a") as logf:
                    proc = subprocess.run(cmd, env=_env(slot, jobs, run.config["device"]), stdout=logf,
                                          stderr=subprocess.STDOUT)
            ok = proc.returncode == 0 and (folder / "summary.json").is_file()
            state = "finished" if ok else "failed"
            if ok:
                s = read_json(folder / "summary.json")
                extra = f"test acc {s['test']['acc']:.4f}" if s.get("test") else s.get("status", "")
                log(f"[{index}/{len(todo)}] {run.name}: {s.get('status')} in {time.perf_counter() - t0:.0f}s, {extra}")
            else:
                log(f"[{index}/{len(todo)}] {run.name}: FAILED (exit code {proc.returncode}); the study goes on"
                    + (f"; see {folder / 'train.log'}" if jobs > 1 else ""))
                write_json(folder / "failed.json", {"returncode": proc.returncode, "command": cmd})
            return run.name, state
        finally:
            slots.append(slot)

    if jobs == 1:
        for i, item in enumerate(todo, 1):
            name, state = one(item, i)
            outcome[name] = state
    else:
        with cf.ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one, item, i) for i, item in enumerate(todo, 1)]
            for fut in futures:
                name, state = fut.result()
                outcome[name] = state
    return outcome


# Changing these adds runs or redoes analyses without invalidating finished runs.
HARMLESS = {("study", "seeds"), ("study", "name"), ("study", "gradcam_classes"), ("study", "gradcam_per_class"),
            ("study", "gradcam_max_classes"), ("train", "progress")}


def check_study_dir(study_dir: Path, record: dict, force: bool) -> None:
    """A study folder holds one study: refuse to mix in runs of different settings."""
    from normlab.config import read_yaml

    saved_path = study_dir / "study.yaml"
    if not saved_path.is_file():
        return
    saved = read_yaml(saved_path)
    if force:
        return
    diffs = []
    for part in ("study", "train"):
        a, b = saved.get(part, {}), record.get(part, {})
        diffs += [f"{part}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k) and (part, k) not in HARMLESS]
    if not diffs:
        return
    raise NormlabError(f"study folder {study_dir} holds a study with other settings ({'; '.join(diffs[:3])}): "
                       "use another --out, or --force to add runs with the new settings next to the old ones")
