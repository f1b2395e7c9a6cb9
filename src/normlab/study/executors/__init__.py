"""How a study's runs are executed: one seam, three engines.

The study plans its runs; an executor runs each as one ``normlab train`` child process in
``<study>/runs/<name>`` and reports every run back as it ends. ``local`` is a pool of child processes on
this machine, ``ray`` makes each run a Ray task, ``slurm`` each run an element of a Slurm job array (through
submitit). All three share the worker side (``run_child``): the command is chosen when the run *starts*
(``--resume`` if the folder holds a ``last.pt``), so a retried or requeued run continues where it stopped,
and the run lock in the folder (``normlab.runfolder.RunLock``) keeps one cell from running twice.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from normlab.errors import EXIT_DISK_FULL, NormlabError, disk_full_cause
from normlab.runfolder import run_state

EXECUTORS = ("local", "ray", "slurm")


@dataclass
class ExecutorOptions:
    executor: str = "local"  # local | ray | slurm
    runs_per_gpu: int = 1  # runs sharing one GPU (local --jobs slots; Ray's fractional num_gpus)
    cpus_per_run: int | None = None  # ray/slurm: CPU cores per run (default 1; the child uses as many threads)
    gpus_per_run: float | None = None  # ray/slurm: GPUs per run (default: 1/runs_per_gpu on GPUs, 0 on CPU runs)
    max_retries: int = 3  # ray: re-runs after a worker or node dies; slurm: requeues after a time-out
    ray_address: str | None = None  # join this Ray cluster (default: start a local Ray instance)
    ray_num_cpus: int | None = None  # size of the local Ray instance (default: every core)
    partition: str | None = None  # slurm partition
    time_min: int = 24 * 60  # slurm time limit per run in minutes (the run is requeued when it hits it)
    array_parallelism: int = 256  # slurm: array elements running at once
    mem_gb: float | None = None  # slurm memory per run
    slurm_options: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {account: x}
    cluster: str = "slurm"  # slurm | local (submitit's local executor: the same jobs without a Slurm)
    poll_s: float = 2.0  # slurm: how often job states are read

    def validate(self) -> ExecutorOptions:
        if self.executor not in EXECUTORS:
            raise NormlabError(f"--executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.runs_per_gpu < 1:
            raise NormlabError(f"--runs-per-gpu {self.runs_per_gpu}: must be >= 1")
        if self.cpus_per_run is not None and self.cpus_per_run < 1:
            raise NormlabError(f"--cpus-per-run {self.cpus_per_run}: must be >= 1")
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            raise NormlabError(f"--gpus-per-run {self.gpus_per_run}: must be >= 0")
        if self.max_retries < 0 or self.time_min < 1:
            raise NormlabError("--max-retries must be >= 0 and --slurm-time >= 1 (minutes)")
        if self.cluster not in ("slurm", "local"):
            raise NormlabError(f"executor cluster {self.cluster!r}: slurm or local")
        return self


def make_options(*layers: dict[str, Any] | None) -> ExecutorOptions:
    """Options from the study YAML's ``study: executor:`` mapping, then flags (later layers win; None = unset)."""
    names = {f.name for f in dataclasses.fields(ExecutorOptions)}
    values: dict[str, Any] = {}
    for layer in layers:
        if isinstance(layer, str):  # `executor: ray` in the study YAML
            layer = {"executor": layer}
        for key, value in (layer or {}).items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise NormlabError(f"study executor: unknown setting {key!r}; use {', '.join(sorted(names))}")
            if value is not None:
                values[key] = value
    return ExecutorOptions(**values).validate()


def add_executor_flags(parser) -> None:
    """The ``normlab study`` flags of the executors (the CLI adds them in one call)."""
    g = parser.add_argument_group("where the runs execute (also `executor:` in the study YAML's `study:` part)")
    g.add_argument("--executor", choices=EXECUTORS, help="local: child processes here (default); ray: one Ray task "
                   "per run; slurm: one Slurm array job per run (submitit)")
    g.add_argument("--runs-per-gpu", type=int, metavar="K", help="runs sharing each GPU (default 1): --jobs J then "
                   "spreads J runs round-robin over the visible GPUs, at most K on each; on Ray each run asks for 1/K GPU")
    g.add_argument("--cpus-per-run", type=int, metavar="C", help="ray/slurm: CPU cores per run (default 1)")
    g.add_argument("--gpus-per-run", type=float, metavar="G", help="ray: GPUs per run, fractional (default 1/K when "
                   "the cluster has GPUs, 0 for --device cpu); slurm: whole GPUs (default 1 with --device cuda, else 0)")
    g.add_argument("--max-retries", type=int, metavar="N", help="ray: retries of a run whose worker or node died; "
                   "slurm: requeues after a time-out (default 3); preempted Slurm jobs are always requeued")
    g.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. auto or ray://head:10001); "
                   "default: a local Ray instance, shut down when the study ends")
    g.add_argument("--slurm-partition", dest="partition", metavar="P", help="Slurm partition")
    g.add_argument("--slurm-time", dest="time_min", type=int, metavar="MIN", help="time limit per run in minutes "
                   "(default 1440); a run that hits it is requeued and resumes from last.pt")
    g.add_argument("--slurm-option", dest="slurm_options", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, repeatable (e.g. account=abc, qos=high)")


def options_from_args(args) -> dict[str, Any]:
    """The executor flags that were given, as a mapping for ``make_options``."""
    keys = ("executor", "runs_per_gpu", "cpus_per_run", "gpus_per_run", "max_retries", "ray_address", "partition",
            "time_min", "slurm_options")
    out = {k: getattr(args, k, None) for k in keys}
    if out["slurm_options"]:
        pairs = {}
        for item in out["slurm_options"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise NormlabError(f"--slurm-option {item!r}: write KEY=VALUE, e.g. account=abc")
            pairs[key.strip()] = value.strip()
        out["slurm_options"] = pairs
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class RunTask:
    """One run to execute: its folder, the plan file it starts from, and its place in the study's log."""

    name: str
    folder: Path
    plan_file: Path
    device: str
    index: int = 0
    total: int = 0


Report = Callable[[RunTask, "int | None", float, str], None]  # (task, exit code or None, seconds, note)
# executor.run(tasks, report, should_stop): should_stop() -> True once no more runs may start (a full disk)




def train_command(folder: Path, plan_file: Path, python: str | None = None) -> list[str]:
    base = [python or sys.executable, "-m", "normlab", "train"]
    if run_state(folder) == "partial":
        return base + ["--resume", str(folder)]
    # "new": nothing worth keeping (at most a config.yaml of a run killed before its first epoch ended)
    return base + ["--config", str(plan_file), "--out", str(folder), "--force"]


def _die_with_parent(ignore_term: bool = False) -> Callable[[], None]:
    """``preexec_fn``: the child gets SIGKILL when the worker that started it dies (Linux), so a killed Ray
    worker or Slurm step leaves no training behind that still holds the run's lock."""
    try:  # looked up before the fork: the worker has threads, so the child must not touch the loader's locks
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the scheduler's own clean-up has to do
        prctl = None
    parent = os.getpid()

    def setup() -> None:
        if ignore_term:  # Slurm sends SIGTERM before the checkpoint signal; the worker stops the child itself
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the worker died before the line above: follow it now
                os.kill(os.getpid(), signal.SIGKILL)
    return setup


def run_child(folder: Path, plan_file: Path, env: dict[str, str] | None = None, log_file: Path | None = None,
              on_start: Callable[[subprocess.Popen], None] | None = None, die_with_parent: bool = False,
              ignore_term: bool = False) -> int:
    """Run one ``normlab train`` child to its end and return its exit code (the worker side of every executor).
    Polls instead of ``wait()`` so a signal handler in this process (submitit's checkpoint) can stop it. A disk
    too full to hold the run folder or its log ends the run with ``EXIT_DISK_FULL``, like the child would."""
    try:
        return _run_child(folder, plan_file, env, log_file, on_start, die_with_parent, ignore_term)
    except OSError as exc:
        if disk_full_cause(exc) is None:
            raise
        return EXIT_DISK_FULL


def _run_child(folder: Path, plan_file: Path, env, log_file, on_start, die_with_parent, ignore_term) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = train_command(folder, plan_file)
    kwargs: dict[str, Any] = {"env": env}
    if die_with_parent and sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _die_with_parent(ignore_term)
    logf = open(log_file, "a") if log_file is not None else None  # noqa: SIM115 - closed below
    try:
        if logf is not None:
            now = time.time()
            logf.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} "
                       f"{os.uname().nodename} pid {os.getpid()}: "
                       f"{' '.join(cmd[2:])}\n")
            logf.flush()
            kwargs.update(stdout=logf, stderr=subprocess.STDOUT)
        proc = subprocess.Popen(cmd, **kwargs)
        if on_start is not None:
            on_start(proc)
        while proc.poll() is None:
            time.sleep(0.2)
        return proc.returncode
    finally:
        if logf is not None:
            logf.close()


def child_env(base: dict[str, str] | None = None, *, gpu: str | None = None, threads: int | None = None,
              plain: bool = True) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if plain:
        env["NORMLAB_PROGRESS"] = "plain"
    return env


def visible_gpus(env: dict[str, str] | None = None, count: int | None = None) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices, ``GPU-<uuid>`` or MIG ids).
    A scheduler that gave us GPUs 4-7 sets ``CUDA_VISIBLE_DEVICES=4,5,6,7``: the runs must go there, not to 0-3.
    CUDA stops reading the list at the first invalid entry; ``count`` (``torch.cuda.device_count()``, which
    applies that rule) says how many entries are real."""
    env = os.environ if env is None else env
    if count is None:
        import torch

        count = torch.cuda.device_count()
    if count <= 0:
        return []
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    entries = [e.strip() for e in listed.split(",") if e.strip()]
    return entries[:count]


def gpu_slots(jobs: int, gpus: list[str], runs_per_gpu: int = 1) -> list[str | None]:
    """One entry per concurrent run: the GPU it gets (round-robin, at most ``runs_per_gpu`` runs on each), or
    None for CPU runs. On GPUs, ``jobs`` is capped at ``len(gpus) * runs_per_gpu``."""
    if not gpus:
        return [None] * max(1, jobs)
    jobs = max(1, min(jobs, len(gpus) * runs_per_gpu))
    return [gpus[s % len(gpus)] for s in range(jobs)]

