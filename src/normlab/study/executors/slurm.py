"""``--executor slurm``: the runs become one Slurm job array, submitted and watched through submitit.

Each array element runs ``TrainJob``: the ``normlab train`` child of one run, with its output in
``<run>/train.log`` and submitit's own logs and pickles in ``<study>/slurm/``. On preemption or when the
time limit comes near, Slurm signals the job; submitit calls ``TrainJob.checkpoint``, which stops the child
(SIGINT: finished epochs are in ``last.pt``) and hands back the same job, which submitit requeues; the
requeued job resumes from ``last.pt``. Time-outs are requeued ``max_retries`` times, preemptions always.

Slurm gives whole GPUs: ``--gpus-per-run`` is rounded up. Sharing a GPU between runs needs the cluster's
own sharing (e.g. ``--slurm-option gres=shard:1``).
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import submitit

from normlab.errors import NormlabError
from normlab.study.executors import ExecutorOptions, Report, RunTask, child_env, run_child


class TrainJob:
    """What one array element runs; picklable (the child process handle is not kept when pickled)."""

    def __init__(self, folder: str, plan_file: str, threads: int, grace_s: float = 60.0) -> None:
        self.folder, self.plan_file, self.threads, self.grace_s = folder, plan_file, threads, grace_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _proc=None)

    def __call__(self) -> int:
        def started(proc: subprocess.Popen) -> None:
            self._proc = proc

        return run_child(Path(self.folder), Path(self.plan_file), child_env(threads=self.threads),
                         log_file=Path(self.folder) / "train.log", on_start=started, die_with_parent=True,
                         ignore_term=True)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Preempted or about to time out: stop the child cleanly so the requeued job finds the lock free."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + self.grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None:
                proc.kill()
        return submitit.helpers.DelayedSubmission(TrainJob(self.folder, self.plan_file, self.threads, self.grace_s))


# a job in one of these states still has processes on its node (or will have): not ended yet
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                           "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"})


def ended(jobs: list[submitit.Job]) -> list[submitit.Job]:
    """Those of ``jobs`` that are over, processes included. submitit's ``done()`` is true as soon as the job
    has written its result, while Slurm's step (``srun``) and the job script are still exiting; a Slurm job
    is over once ``squeue`` no longer shows it in an active state (one call for all of them). submitit's
    local jobs are over when ``done()`` says so: it waits for their process."""
    done = [j for j in jobs if j.done()]
    slurm = [j for j in done if isinstance(j, submitit.SlurmJob)]
    if not slurm:
        return done
    try:
        res = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %T",
                              "--jobs=" + ",".join(j.job_id for j in slurm)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return done  # no answer from the scheduler: the results are there, do not wait forever
    # an error here means the jobs are gone from the controller ("Invalid job id specified") or it is down
    lines = res.stdout.splitlines() if res.returncode == 0 else []
    active = {parts[0] for parts in map(str.split, lines) if len(parts) >= 2 and parts[1] in ACTIVE_STATES}
    return [j for j in done if j.job_id not in active]


def wait_ended(job: submitit.Job, poll_s: float = 0.5, timeout_s: float = 300.0) -> None:
    """Block until ``job`` is over on the cluster (``ended``), its result already being there."""
    deadline = time.monotonic() + timeout_s
    while not ended([job]):
        if time.monotonic() > deadline:
            raise NormlabError(f"Slurm job {job.job_id} still runs {timeout_s:.0f} s after it wrote its "
                               f"result; see squeue -j {job.job_id}")
        time.sleep(poll_s)


class SlurmExecutor:
    name = "slurm"

    def __init__(self, options: ExecutorOptions, study_dir: Path, log=print) -> None:
        self.options, self.study_dir, self.log = options, Path(study_dir), log

    def executor(self, tasks: list[RunTask]) -> submitit.AutoExecutor:
        o = self.options
        try:
            ex = submitit.AutoExecutor(folder=self.study_dir / "slurm", cluster=o.cluster,
                                       slurm_max_num_timeout=o.max_retries)
        except Exception as e:  # submitit raises several kinds when sbatch is missing
            raise NormlabError(f"--executor slurm: no Slurm here ({e}); run on a Slurm login node") from None
        gpus = o.gpus_per_run
        if gpus is None:  # --device auto may well mean a CPU-only cluster: ask for GPUs only when told to
            gpus = 1 if any(t.device == "cuda" for t in tasks) else 0
        params = {"name": f"normlab-{self.study_dir.name}", "timeout_min": o.time_min, "cpus_per_task": o.cpus_per_run or 1,
                  "slurm_array_parallelism": o.array_parallelism}
        if gpus:
            params["gpus_per_node"] = math.ceil(gpus)
        if o.mem_gb is not None:
            params["mem_gb"] = o.mem_gb
        if o.partition:
            params["slurm_partition"] = o.partition
        if o.slurm_options:
            params["slurm_additional_parameters"] = dict(o.slurm_options)
        ex.update_parameters(**params)
        return ex

    def run(self, tasks: list[RunTask], report: Report, should_stop=None) -> None:
        # every run is submitted at once: after a full disk (``should_stop``) the queued ones end on their own,
        # each reported as stopped by the full disk, not as failed
        ex = self.executor(tasks)
        threads = self.options.cpus_per_run or 1
        with ex.batch():
            jobs = [ex.submit(TrainJob(str(t.folder), str(t.plan_file), threads)) for t in tasks]
        t0 = time.perf_counter()
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        self.log(f"submitted {len(tasks)} runs as {ex.cluster} job(s) {', '.join(ids)}; logs in "
                 f"{self.study_dir / 'slurm'} and <run>/train.log")
        pending = dict(zip(jobs, tasks))
        try:
            while pending:
                for job in ended(list(pending)):  # reported once its processes are gone, not at its result
                    task = pending.pop(job)
                    try:
                        rc, note = job.result(), ""
                    except Exception as e:  # the job failed or was cancelled: its log says why
                        rc, note = None, f"job {job.job_id}: {str(e).strip().splitlines()[0][:200]}"
                    report(task, rc, time.perf_counter() - t0, note or f"see {task.folder / 'train.log'}")
                if pending:
                    time.sleep(self.options.poll_s)
        finally:
            for job in pending:  # interrupted: nothing of ours keeps running on the cluster
                job.cancel(check=False)
