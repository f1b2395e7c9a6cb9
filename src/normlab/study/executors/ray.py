"""``--executor ray``: every run is one Ray task that runs the ``normlab train`` child process.

Why a child process inside the task rather than training in the Ray worker itself: a crash, an OOM kill or
a diverging run cannot take the worker (or the driver) down with it, the run lock and ``--resume`` logic
are the same as for the other executors, and each run gets a fresh interpreter with its own thread
settings. Resources are declared per task (``num_cpus``, fractional ``num_gpus`` so several small runs
share one GPU; Ray sets ``CUDA_VISIBLE_DEVICES`` for the worker, which the child inherits).

Failure handling: if a worker or its node dies, Ray re-runs the task (``max_retries``); the child dies with
its worker (``PR_SET_PDEATHSIG``), so the retry finds the lock free and resumes from ``last.pt``. A child
killed by a signal (e.g. the OOM killer) raises ``RunInterrupted``, which Ray retries too. A child that
exits with an error (bad settings, a bug) is not retried: the study records it as failed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray

from normlab.study.executors import ExecutorOptions, Report, RunTask, child_env, run_child


class RunInterrupted(RuntimeError):
    """The training child was killed by a signal: worth another try (it resumes from last.pt)."""


def train_task(folder: str, plan_file: str, threads: int) -> int:
    env = child_env(threads=threads)
    rc = run_child(Path(folder), Path(plan_file), env, log_file=Path(folder) / "train.log", die_with_parent=True)
    if rc < 0:
        raise RunInterrupted(f"normlab train in {folder} was killed by signal {-rc}")
    return rc


class RayExecutor:
    name = "ray"

    def __init__(self, options: ExecutorOptions, log=print) -> None:
        self.options, self.log = options, log

    def _connect(self) -> bool:
        """Join the given cluster or start a local instance; True when we started it (and must shut it down)."""
        if ray.is_initialized():
            return False
        env_vars = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}  # workers must import normlab
        kwargs = {"include_dashboard": False, "log_to_driver": False,
                  "runtime_env": {"env_vars": env_vars} if env_vars else None}
        if self.options.ray_address is not None:
            ray.init(address=self.options.ray_address, **kwargs)
            return True
        try:
            ray.init(num_cpus=self.options.ray_num_cpus, **kwargs)
        except Exception as e:  # noqa: BLE001 - a loaded machine can miss Ray's start-up timeouts once
            self.log(f"starting a local Ray instance failed ({str(e).strip()[:200]}); trying once more")
            ray.shutdown()
            ray.init(num_cpus=self.options.ray_num_cpus, **kwargs)
        return True

    def resources(self, tasks: list[RunTask]) -> tuple[int, float]:
        cpus = self.options.cpus_per_run or 1
        gpus = self.options.gpus_per_run
        if gpus is None:
            on_gpu = any(t.device != "cpu" for t in tasks) and ray.cluster_resources().get("GPU", 0) > 0
            gpus = 1.0 / self.options.runs_per_gpu if on_gpu else 0.0
        return cpus, gpus

    def run(self, tasks: list[RunTask], report: Report, should_stop=None) -> None:
        # every run is submitted at once: after a full disk (``should_stop``) the queued ones end on their own,
        # each reported as stopped by the full disk, not as failed
        started = self._connect()
        pending: dict = {}
        try:
            cpus, gpus = self.resources(tasks)
            remote = ray.remote(train_task)
            for task in tasks:
                task.folder.mkdir(parents=True, exist_ok=True)
                ref = remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=self.options.max_retries,
                                     retry_exceptions=[RunInterrupted], name=f"normlab:{task.name}").remote(
                    str(task.folder), str(task.plan_file), cpus)
                pending[ref] = (task, time.perf_counter())
            where = self.options.ray_address or "a local Ray instance"
            self.log(f"submitted {len(tasks)} runs to {where} ({cpus} CPU, {gpus:g} GPU each, "
                     f"up to {self.options.max_retries} retries); logs in <run>/train.log")
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task, t0 = pending.pop(ref)
                    try:
                        rc, note = ray.get(ref), ""
                    except ray.exceptions.RayError as e:  # retries exhausted, or the task could not run
                        rc, note = None, f"Ray: {str(e).strip().splitlines()[-1][:300]}"
                    report(task, rc, time.perf_counter() - t0, note or f"see {task.folder / 'train.log'}")
        finally:
            for ref in pending:  # interrupted: leave nothing running on the cluster
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()
