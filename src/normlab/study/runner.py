"""Run a study's plan: each run is a ``normlab train`` child process in ``<study>/runs/<name>``.

Re-running the same command skips finished runs (``summary.json``) and resumes unfinished ones from
``last.pt``. Where the runs execute is the executor's business (``normlab.study.executors``: ``local``
child processes, ``jobs`` at a time, or one Ray task / Slurm array job per run); this module decides what
to run and records how each run ended, as it ends. A run that fails is recorded and the study goes on;
the report shows it. Two ends are not failures: a run held by another live process is "running elsewhere"
(its child exits with ``EXIT_BUSY``), and a full disk (``EXIT_DISK_FULL``, or ``DiskFull`` while writing the
study's own files) stops the study from starting more runs; a rerun of the same command completes it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from normlab.config import dump_yaml
from normlab.errors import EXIT_BUSY, EXIT_DISK_FULL, DiskFull, FolderBusy, NormlabError
from normlab.io import write_text
from normlab import runfolder
from normlab.runfolder import RunLock, run_state
from normlab.study.executors import ExecutorOptions, RunTask, make_options, train_command
from normlab.study.plan import Run

__all__ = ["HARMLESS", "check_study_dir", "execute", "run_state"]


def execute(study_dir: Path, runs: list[Run], jobs: int = 1, log=print, plan_only: bool = False,
            options: ExecutorOptions | dict[str, Any] | None = None,
            on_finished: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Run (or skip, or resume) every run; return name -> final state (finished | failed | skipped | busy, i.e.
    running elsewhere). ``plan_only`` writes ``plan/<name>.yaml`` and prints one ``normlab train`` command per
    run instead. ``on_finished(name, state)`` is called (one call at a time) as each run ends, e.g. to update
    results. A full disk stops the study from starting more runs and raises ``DiskFull`` once the runs under
    way have ended."""
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
            runfolder.clear_failure(folder)  # an earlier attempt's failed.json: the summary is the truth
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
        except FolderBusy as e:
            log(f"{run.name}: running elsewhere, not started here ({e})")
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
    full: list[DiskFull] = []  # the first full disk seen: no run starts after it

    def report(task: RunTask, returncode: int | None, seconds: float, note: str) -> None:
        folder = task.folder
        summary = runfolder.read_summary(folder)  # written last by the run: it finished, whatever its exit code
        where = f"[{task.index}/{task.total}] {task.name}"
        with lock:
            try:
                if summary is not None:
                    s = summary
                    extra = f"test acc {s['test']['acc']:.4f}" if s.get("test") else s.get("status", "")
                    late = f" (its process then exited with code {returncode})" if returncode else ""
                    log(f"{where}: {s.get('status')} in {seconds:.0f}s, {extra}{late}")
                    runfolder.clear_failure(folder)
                    state = "finished"
                elif returncode == EXIT_BUSY:
                    log(f"{where}: running elsewhere (another live process holds {folder}); not started here")
                    state = "busy"
                elif returncode == EXIT_DISK_FULL:
                    if not full:
                        full.append(DiskFull(folder))
                        log(f"{where}: stopped, disk full at {folder} (its finished epochs are kept); "
                            "no more runs start")
                    else:
                        log(f"{where}: stopped, disk full (its finished epochs are kept)")
                    state = "disk_full"
                else:
                    code = "no exit code" if returncode is None else f"exit code {returncode}"
                    log(f"{where}: FAILED ({code}); the study goes on" + (f"; {note}" if note else ""))
                    runfolder.write_failure(folder, returncode, train_command(folder, task.plan_file),
                                            executor=executor.name, note=note)
                    state = "failed"
                outcome[task.name] = state
                if on_finished is not None:
                    on_finished(task.name, state)
            except DiskFull as exc:  # the study's own files (failed.json, results.csv) found the disk full
                if not full:
                    full.append(exc)
                    log(f"{where}: disk full at {exc.path}; no more runs start")
                outcome.setdefault(task.name, "disk_full")

    if tasks:
        executor.run(tasks, report, should_stop=lambda: bool(full))
    if full:
        left = [t.name for t in tasks if t.name not in outcome]
        for name in left:
            outcome[name] = "not_started"
        raise DiskFull(full[0].path, (f"{len(left)} of {len(tasks)} runs not started; " if left else "")
                       + "free space and rerun the same normlab study command (it skips finished runs and resumes "
                       "stopped ones)")
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
