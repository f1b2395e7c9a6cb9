"""Run a study's plan: each run is a ``normlab train`` child process in ``<study>/runs/<name>``.

Re-running the same command skips finished runs (``summary.json``) and resumes unfinished ones from
``last.pt``. Where the runs execute is the executor's business (``normlab.study.executors``: ``local``
child processes, ``jobs`` at a time, or one Ray task / Slurm array job per run); this module decides what
to run and records how each run ended, as it ends. A run that fails is recorded and the study goes on;
the report shows it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from normlab.config import dump_yaml
from normlab.errors import NormlabError
from normlab.io import write_text
from normlab import runfolder
from normlab.runfolder import run_state
from normlab.study.executors import ExecutorOptions, RunTask, make_options, train_command
from normlab.study.plan import Run
from normlab.train.runtime import RunLock

__all__ = ["HARMLESS", "check_study_dir", "execute", "run_state"]


def execute(study_dir: Path, runs: list[Run], jobs: int = 1, log=print, plan_only: bool = False,
            options: ExecutorOptions | dict[str, Any] | None = None,
            on_finished: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Run (or skip, or resume) every run; return name -> final state (finished | failed | skipped | busy).
    ``plan_only`` writes ``plan/<name>.yaml`` and prints one ``normlab train`` command per run instead.
    ``on_finished(name, state)`` is called (one call at a time) as each run ends, e.g. to update results."""
    if not isinstance(options, ExecutorOptions):
        options = make_options(options)
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
            log(" ".join(c for c in train_command(folder, plan_file)[2:] if c != "--force"))
        return {run.name: "planned" for run, _, _ in todo}
    tasks = []
    for run, folder, plan_file in todo:
        try:  # a run still going (an earlier study command, another node): leave it alone
            RunLock.check_free(folder)
        except NormlabError as e:
            log(f"{run.name}: not started, {e}")
            outcome[run.name] = "busy"
            continue
        tasks.append(RunTask(run.name, folder, plan_file, str(run.config.get("device", "auto"))))
    for i, task in enumerate(tasks, 1):
        task.index, task.total = i, len(tasks)
    executor = make_executor(options, jobs, study_dir, log=log)
    skipped = len(runs) - len(todo)
    how = f" ({jobs} at a time)" if jobs > 1 and executor.name == "local" else ""
    how += f" on {executor.name}" if executor.name != "local" else ""
    log(f"study {study_dir}: {len(runs)} runs, {skipped} already finished, {len(tasks)} to run{how}")
    lock = threading.Lock()

    def report(task: RunTask, returncode: int | None, seconds: float, note: str) -> None:
        folder = task.folder
        summary = runfolder.read_summary(folder) if returncode == 0 else None
        ok = summary is not None
        with lock:
            if ok:
                s = summary
                extra = f"test acc {s['test']['acc']:.4f}" if s.get("test") else s.get("status", "")
                log(f"[{task.index}/{task.total}] {task.name}: {s.get('status')} in {seconds:.0f}s, {extra}")
            else:
                code = "no exit code" if returncode is None else f"exit code {returncode}"
                log(f"[{task.index}/{task.total}] {task.name}: FAILED ({code}); the study goes on"
                    + (f"; {note}" if note else ""))
                runfolder.write_failure(folder, returncode, train_command(folder, task.plan_file),
                                        executor=executor.name, note=note)
            state = outcome[task.name] = "finished" if ok else "failed"
            if on_finished is not None:
                on_finished(task.name, state)

    if tasks:
        executor.run(tasks, report)
    return outcome


# Changing these adds runs or redoes analyses without invalidating finished runs.
HARMLESS = {("study", "seeds"), ("study", "name"), ("study", "gradcam_classes"), ("study", "gradcam_per_class"),
            ("study", "gradcam_max_classes"), ("study", "executor"), ("train", "progress")}
# the robustness step only reads finished runs: changing it re-evaluates, never mixes trainings
HARMLESS |= {("study", k) for k in ("robustness", "robustness_severities", "robustness_corruptions",
                                    "robustness_test_time", "robustness_batch_stats_images")}


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


def make_executor(options: ExecutorOptions, jobs: int, study_dir: Path, log=print):
    if options.executor == "local":
        from normlab.study.executors.local import LocalExecutor

        return LocalExecutor(jobs=jobs, runs_per_gpu=options.runs_per_gpu, log=log)
    if options.executor == "ray":
        try:
            from normlab.study.executors.ray import RayExecutor
        except ImportError as e:
            raise NormlabError(f"--executor ray needs Ray: pip install 'normlab[ray]' ({e})") from None
        return RayExecutor(options, log=log)
    try:
        from normlab.study.executors.slurm import SlurmExecutor
    except ImportError as e:
        raise NormlabError(f"--executor slurm needs submitit: pip install 'normlab[slurm]' ({e})") from None
    return SlurmExecutor(options, study_dir, log=log)
