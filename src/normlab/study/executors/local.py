"""``--executor local``: child processes on this machine, ``jobs`` at a time, GPUs shared by slots."""

from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import time

from normlab.study.executors import Report, RunTask, child_env, gpu_slots, run_child, run_state, visible_gpus


class LocalExecutor:
    name = "local"

    def __init__(self, jobs: int = 1, runs_per_gpu: int = 1, log=print) -> None:
        self.jobs, self.runs_per_gpu, self.log = jobs, runs_per_gpu, log

    def slots(self, tasks: list[RunTask]) -> list[str | None]:
        on_gpu = any(t.device != "cpu" for t in tasks)
        gpus = visible_gpus() if on_gpu else []
        return gpu_slots(self.jobs, gpus, self.runs_per_gpu)

    def run(self, tasks: list[RunTask], report: Report, should_stop=None) -> None:
        """Run every task, ``jobs`` at a time; once ``should_stop()`` says so (a full disk), start no more."""
        slots = self.slots(tasks)
        jobs = len(slots)
        free: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        for slot in slots:
            free.put(slot)
        # CPU runs split the cores between them
        threads = max(1, (os.cpu_count() or 1) // jobs)

        def one(task: RunTask) -> None:
            gpu = free.get()
            try:
                if should_stop is not None and should_stop():
                    return
                verb = "resuming" if run_state(task.folder) == "partial" else "starting"
                where = f" on GPU {gpu}" if gpu is not None and jobs > 1 else ""
                self.log(f"[{task.index}/{task.total}] {verb} {task.name}{where}")
                t0 = time.perf_counter()
                env = child_env(gpu=gpu, threads=threads if gpu is None else None, plain=jobs > 1)
                rc = run_child(task.folder, task.plan_file, env, log_file=task.folder / "train.log" if jobs > 1 else None)
                report(task, rc, time.perf_counter() - t0, f"see {task.folder / 'train.log'}" if jobs > 1 else "")
            finally:
                free.put(gpu)

        if jobs == 1:
            for task in tasks:
                one(task)
            return
        with cf.ThreadPoolExecutor(jobs) as pool:
            for fut in [pool.submit(one, t) for t in tasks]:
                fut.result()
