"""Study executors: GPU placement, options, the cross-host run lock, and real Ray / Slurm (or submitit's local
executor) running a small study end to end, with a worker killed or a job preempted mid-run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from normlab.cli import build_parser
from normlab.errors import NormlabError
from normlab.study import run_study
from normlab.study import executors as ex
from normlab.study.executors import local as local_mod
from normlab.study.plan import Run
from normlab.study.runner import execute
from normlab.runfolder import RunLock

from conftest import IN_CI, REPO, make_image_folder

CELLS = ("bn", "gn", "ln", "in")
EPOCHS = 5


def need(module: str):
    """The extras are in the `test` extra: missing in CI is a failure, elsewhere a skip."""
    try:
        return __import__(module)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{module} is not installed; CI installs normlab[test] which includes it")
        pytest.skip(f"{module} is not installed (pip install 'normlab[{'ray' if module == 'ray' else 'slurm'}]')")


# ------------------------------------------------------------------------------------------ GPU slots

@pytest.mark.parametrize("listed, count, jobs, per_gpu, expected", [
    (None, 2, 4, 1, ["0", "1"]),  # capped at one run per GPU
    (None, 2, 4, 2, ["0", "1", "0", "1"]),  # round-robin, two per GPU
    ("4,5,6,7", 4, 4, 1, ["4", "5", "6", "7"]),  # the scheduler's GPUs, not 0-3
    ("4,5,6,7", 4, 2, 1, ["4", "5"]),
    ("6, 2", 2, 3, 2, ["6", "2", "6"]),
    ("GPU-8f6b1c2e-aaaa,GPU-0d1e2f3a-bbbb", 2, 4, 2,
     ["GPU-8f6b1c2e-aaaa", "GPU-0d1e2f3a-bbbb", "GPU-8f6b1c2e-aaaa", "GPU-0d1e2f3a-bbbb"]),
    ("MIG-5c4a3b2d-cccc", 1, 3, 3, ["MIG-5c4a3b2d-cccc"] * 3),
    ("3,-1,5", 1, 2, 1, ["3"]),  # CUDA stops at an invalid entry; device_count says 1
    ("", 0, 3, 1, [None, None, None]),  # no GPU visible: CPU runs
    (None, 0, 2, 4, [None, None]),
])
def test_gpu_slots_follow_the_inherited_visible_devices(listed, count, jobs, per_gpu, expected):
    env = {} if listed is None else {"CUDA_VISIBLE_DEVICES": listed}
    assert ex.gpu_slots(jobs, ex.visible_gpus(env, count=count), per_gpu) == expected


def test_local_executor_places_children_on_the_inherited_gpus(tmp_path, monkeypatch):
    """--jobs 4 --runs-per-gpu 2 under CUDA_VISIBLE_DEVICES=4,5: every child sees one of 4/5, never more than two
    at once on one GPU; finished runs are reported through on_finished as they end."""
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    seen: list[str] = []
    running: Counter = Counter()
    peak: Counter = Counter()
    guard = threading.Lock()

    def fake_child(folder, plan_file, env, log_file=None, **kw):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with guard:
            seen.append(gpu)
            running[gpu] += 1
            peak[gpu] = max(peak[gpu], running[gpu])
        time.sleep(0.2)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps({"status": "finished", "test": {"acc": 0.5}}))
        with guard:
            running[gpu] -= 1
        return 0

    monkeypatch.setattr(local_mod, "run_child", fake_child)
    runs = [Run(f"r{i}", {"device": "cuda"}, ["norms"], f"r{i}") for i in range(8)]
    finished: list[tuple[str, str]] = []
    lines: list[str] = []
    out = execute(tmp_path, runs, jobs=4, log=lines.append, options={"runs_per_gpu": 2},
                  on_finished=lambda name, state: finished.append((name, state)))
    assert out == {f"r{i}": "finished" for i in range(8)}
    assert sorted(finished) == sorted(out.items())
    assert set(seen) == {"4", "5"} and len(seen) == 8
    assert max(peak.values()) == 2
    assert any("on GPU 4" in line for line in lines) and any("on GPU 5" in line for line in lines)


# ------------------------------------------------------------------------------------------- options

def test_options_from_yaml_then_flags():
    args = build_parser().parse_args(["study", "--executor", "slurm", "--slurm-partition", "gpu", "--slurm-time", "90",
                                      "--slurm-option", "account=abc", "--slurm-option", "qos=high",
                                      "--runs-per-gpu", "3", "--gpus-per-run", "0.5"])
    flags = ex.options_from_args(args)
    o = ex.make_options({"executor": "ray", "partition": "cpu", "max_retries": 7, "time-min": 30}, flags)
    assert (o.executor, o.partition, o.time_min, o.max_retries, o.runs_per_gpu, o.gpus_per_run) == \
        ("slurm", "gpu", 90, 7, 3, 0.5)
    assert o.slurm_options == {"account": "abc", "qos": "high"}
    assert ex.make_options("ray").executor == "ray"
    assert ex.make_options(None, {}).executor == "local"
    with pytest.raises(NormlabError, match="unknown setting 'partitoin'"):
        ex.make_options({"partitoin": "gpu"})
    with pytest.raises(NormlabError, match="--runs-per-gpu 0"):
        ex.make_options({"runs_per_gpu": 0})
    with pytest.raises(NormlabError, match="KEY=VALUE"):
        ex.options_from_args(build_parser().parse_args(["study", "--slurm-option", "account"]))


def test_sbatch_script_has_partition_time_gpus_and_array(tmp_path, slurm_cluster):
    """The sbatch script submitit writes from our options; needs `srun` on the PATH (submitit's test for a
    Slurm cluster), which the session's `slurm_cluster` installs, whichever test runs first."""
    submitit = need("submitit")
    from normlab.study.executors.slurm import SlurmExecutor

    if slurm_cluster != "slurm":
        pytest.skip("no real Slurm here (scripts/slurm-local.sh needs root or an installed slurm-wlm)")

    o = ex.make_options({"executor": "slurm", "partition": "gpu", "time_min": 90, "gpus_per_run": 1,
                         "cpus_per_run": 4, "mem_gb": 16, "array_parallelism": 2, "slurm_options": {"account": "abc"}})
    tasks = [ex.RunTask(f"r{i}", tmp_path / f"r{i}", tmp_path / f"r{i}.yaml", "cuda") for i in range(4)]
    executor = SlurmExecutor(o, tmp_path / "study").executor(tasks)
    params = executor._executor.parameters
    text = submitit.slurm.slurm._make_sbatch_string(command="python -m x", folder=executor.folder, map_count=4, **params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --array=0-3%2", "#SBATCH --account=abc", "#SBATCH --mem=16GB", "#SBATCH --signal=USR2@90"):
        assert line in text.splitlines(), (line, text)
    assert str(tmp_path / "study" / "slurm") in text  # logs under the study folder
    cpu = SlurmExecutor(ex.make_options({"executor": "slurm"}), tmp_path / "s").executor(
        [ex.RunTask("r", tmp_path / "r", tmp_path / "r.yaml", "auto")])
    assert "gpus_per_node" not in cpu._executor.parameters  # --device auto does not ask a CPU cluster for GPUs


def test_ray_task_retries_a_child_killed_by_a_signal_not_a_failed_one(tmp_path, monkeypatch):
    need("ray")
    from normlab.study.executors import ray as ray_mod

    codes = iter([-9, 2])
    monkeypatch.setattr(ray_mod, "run_child", lambda *a, **k: next(codes))
    with pytest.raises(ray_mod.RunInterrupted, match="signal 9"):  # retried by Ray (retry_exceptions)
        ray_mod.train_task(str(tmp_path), str(tmp_path / "p.yaml"), 1)
    assert ray_mod.train_task(str(tmp_path), str(tmp_path / "p.yaml"), 1) == 2  # an error exit: recorded, not retried


def test_slurm_checkpoint_stops_the_child_and_hands_back_a_fresh_job(tmp_path):
    need("submitit")
    import pickle
    import sys

    from normlab.study.executors.slurm import TrainJob

    job = TrainJob(str(tmp_path), str(tmp_path / "p.yaml"), 2, grace_s=20)
    job._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    delayed = job.checkpoint()
    assert job._proc.poll() is not None and job._proc.returncode != -signal.SIGKILL  # SIGINT, not the kill
    again = delayed.function
    assert isinstance(again, TrainJob) and again is not job and again._proc is None
    assert (again.folder, again.plan_file, again.threads) == (job.folder, job.plan_file, 2)
    assert pickle.loads(pickle.dumps(job))._proc is None  # a process handle never travels


def test_slurm_job_has_ended_only_once_squeue_no_longer_runs_it(tmp_path, monkeypatch):
    """submitit's done() is true as soon as the result pickle is written, while srun and the job script still
    exit: a run is reported (and the study ends) only when Slurm no longer lists its job as active."""
    import pickle

    submitit = need("submitit")
    from normlab.study.executors import slurm as slurm_mod

    job, other = submitit.SlurmJob(tmp_path, "4242_1"), submitit.SlurmJob(tmp_path, "4242_2")
    job.paths.result_pickle.parent.mkdir(parents=True, exist_ok=True)
    job.paths.result_pickle.write_bytes(pickle.dumps(("success", 0)))
    other.paths.result_pickle.write_bytes(pickle.dumps(("success", 0)))
    answers = iter([(0, "4242_1 COMPLETING\n4242_2 COMPLETED\n"), (0, "4242_1 COMPLETED\n4242_2 COMPLETED\n"),
                    (1, "")])  # the last: both purged from the controller ("Invalid job id specified")
    calls: list[list[str]] = []

    def squeue(cmd, **kwargs):
        calls.append(cmd)
        rc, out = next(answers)
        return subprocess.CompletedProcess(cmd, rc, out, "slurm_load_jobs error: Invalid job id specified" * rc)

    monkeypatch.setattr(slurm_mod.subprocess, "run", squeue)
    assert job.done() and slurm_mod.ended([job, other]) == [other]  # result written, its step still exiting
    assert slurm_mod.ended([job, other]) == [job, other]
    assert slurm_mod.ended([job, other]) == [job, other]
    assert len(calls) == 3 and calls[0][0] == "squeue" and "--jobs=4242_1,4242_2" in calls[0]  # one call for all


# ------------------------------------------------------------------------------------- the run lock

def test_lock_of_another_host_counts_while_its_heartbeat_is_fresh(tmp_path, monkeypatch):
    """A pid of another node says nothing here: the holder's heartbeat (the lock file's mtime) decides."""
    lock = tmp_path / ".lock"
    lock.write_text(f"{os.getpid()} node-elsewhere-17")  # our own pid, on another host: not us
    with pytest.raises(NormlabError, match="in use by process .* on node-elsewhere-17"):
        RunLock.check_free(tmp_path)
    with pytest.raises(NormlabError, match="in use"):
        with RunLock(tmp_path, print):
            pass
    old = time.time() - RunLock.STALE_S - 5
    os.utime(lock, (old, old))
    RunLock.check_free(tmp_path)
    messages: list[str] = []
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path, messages.append):
        host = lock.read_text().split()[1]
        assert host == os.uname().nodename
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 5  # the holder keeps it fresh
    assert messages == [f"taking over a stale lock in {tmp_path} (process {os.getpid()} on node-elsewhere-17 is gone)"]
    assert not lock.exists()


def test_busy_run_is_not_started_twice(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / "runs" / "r0"
        folder.mkdir(parents=True)
        (folder / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}")
        lines: list[str] = []
        out = execute(tmp_path, [Run("r0", {"device": "cpu"}, ["norms"], "r0")], log=lines.append)
        assert out == {"r0": "busy"}
        assert any(f"in use by process {sleeper.pid}" in line for line in lines)
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------ end to end

def write_spec(path: Path, data_root: Path) -> Path:
    spec = {"study": {"name": "exec", "norms": list(CELLS), "batch_norms": [], "augment_modes": ["none"],
                      "augment_norm": "bn", "gradcam_per_class": 1, "gradcam_max_classes": 1},
            "train": {"dataset": "folder", "data_root": str(data_root), "image_size": 32, "n": 1, "epochs": EPOCHS,
                      "batch_size": 16, "lr": 0.05, "eval_batch_size": 64, "probe_size": 16, "progress": "plain",
                      "threads": 1, "device": "cpu"}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("exec")
    os.environ["NORMLAB_CACHE"] = str(root / "cache")  # module scope: shared by the Ray/Slurm children
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    data = make_image_folder(root / "data", per_split={"train": 96, "val": 12, "test": 12}, size=32)
    return {"root": root, "spec": write_spec(root / "exec.yaml", data)}


def results(run: Path) -> tuple:
    """What must not depend on the executor or on an interruption: every metric but the timings."""
    s = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k}
                for r in csv.DictReader(f)]
    return rows, {k: s[k] for k in ("train", "val", "test", "status", "best_epoch") if k in s}


def our_processes(root: Path) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(root) in cmd and "normlab" in cmd:
            found.append(p)
    return found


def ray_daemons() -> set[int]:
    import psutil

    names = ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard")
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any(n in " ".join(p.info["cmdline"] or []) for n in names)}


@pytest.fixture(scope="module")
def ray_study(env):
    need("ray")
    before = ray_daemons()
    lines: list[str] = []
    study = env["root"] / "ray-study"
    report = run_study(str(env["spec"]), study, log=lines.append,
                       executor_options={"executor": "ray", "ray_num_cpus": 2, "cpus_per_run": 1})
    return study, report, lines, before


def test_ray_runs_a_study_end_to_end(ray_study, env):
    import ray

    study, report, lines, before = ray_study
    assert report.is_file()
    assert any("4 runs, 0 already finished, 4 to run on ray" in line for line in lines), lines
    done = [line for line in lines if ": finished in " in line]
    assert len(done) == 4, lines
    for cell in CELLS:
        assert json.loads((study / "runs" / f"{cell}-b16-none-s0" / "summary.json").read_text())["status"] == "finished"
    assert not ray.is_initialized()  # we started it, so we shut it down
    deadline = time.time() + 20
    while (ray_daemons() - before or our_processes(env["root"])) and time.time() < deadline:
        time.sleep(0.5)
    assert not our_processes(env["root"]), "a normlab train child outlived the study"
    assert not ray_daemons() - before, "Ray processes outlived the study"
    again: list[str] = []
    run_study(str(env["spec"]), study, log=again.append, executor_options={"executor": "ray", "ray_num_cpus": 2})
    assert any("4 already finished, 0 to run" in line for line in again), again


def _kill_mid_run(run: Path, root: Path, victim: str) -> dict:
    """Wait for the run's first checkpoint, then SIGKILL the worker that runs it ("parent") or its child."""
    import psutil

    deadline = time.time() + 240
    while not (run / "last.pt").is_file() and time.time() < deadline:
        time.sleep(0.01)
    assert (run / "last.pt").is_file(), "the run never saved a checkpoint"
    child = next(p for p in our_processes(root) if str(run) in " ".join(p.cmdline()) and "train" in p.cmdline())
    target = child.parent() if victim == "parent" else child
    assert not (run / "summary.json").exists(), "the run finished before it could be killed: make epochs longer"
    info = {"killed": " ".join(target.cmdline())[:120], "pid": target.pid, "at": time.time()}
    os.kill(target.pid, signal.SIGKILL)
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running(), "the training child outlived its killed worker"
    return info


def test_ray_worker_killed_mid_run_is_retried_and_resumes(ray_study, env):
    need("ray")
    ref_study = ray_study[0]
    study = env["root"] / "ray-fault"
    run = study / "runs" / "gn-b16-none-s0"
    box: dict = {}

    def go():
        lines: list[str] = []
        box["lines"] = lines
        run_study(str(env["spec"]), study, log=lines.append, study_overrides={"norms": ["gn"], "augment_modes": []},
                  executor_options={"executor": "ray", "ray_num_cpus": 2, "max_retries": 2})

    t = threading.Thread(target=go)
    t.start()
    try:
        killed = _kill_mid_run(run, env["root"], victim="parent")
    finally:
        t.join(300)
    assert not t.is_alive()
    log = (run / "train.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("# ")]
    assert len(headers) == 2 and "--resume" in headers[1] and "--resume" not in headers[0], log
    assert "ray::" in killed["killed"] or "default_worker" in killed["killed"], killed
    assert results(run) == results(ref_study / "runs" / "gn-b16-none-s0")
    assert any("gn-b16-none-s0: finished" in line for line in box["lines"]), box["lines"]
    assert not our_processes(env["root"])


# ------------------------------------------------------------------------------------------- Slurm

def test_slurm_runs_a_study_end_to_end(slurm_cluster, ray_study, env):
    study = env["root"] / "slurm-study"
    lines: list[str] = []
    run_study(str(env["spec"]), study, log=lines.append,
              executor_options={"executor": "slurm", "cluster": slurm_cluster, "time_min": 30, "poll_s": 0.5,
                                "array_parallelism": 2})
    assert len([line for line in lines if ": finished in " in line]) == 4, lines
    for cell in CELLS:
        name = f"{cell}-b16-none-s0"
        assert results(study / "runs" / name) == results(ray_study[0] / "runs" / name), name  # same as on Ray
    logs = list((study / "slurm").glob("*_log.out"))
    assert len(logs) == 4, sorted(p.name for p in (study / "slurm").iterdir())
    if slurm_cluster == "slurm":
        scripts = list((study / "slurm").glob("*_submission.sh"))
        assert scripts and "#SBATCH --array=0-3%2" in scripts[0].read_text()


def test_slurm_preempted_job_is_requeued_and_resumes(slurm_cluster, ray_study, env):
    from normlab.study.executors.slurm import SlurmExecutor, TrainJob, wait_ended

    study = env["root"] / "slurm-preempt"
    name = "ln-b16-none-s0"
    run_study(str(env["spec"]), study, plan_only=True, study_overrides={"norms": ["ln"], "augment_modes": []},
              log=lambda _: None)
    task = ex.RunTask(name, study / "runs" / name, study / "plan" / f"{name}.yaml", "cpu")
    executor = SlurmExecutor(ex.make_options({"executor": "slurm", "cluster": slurm_cluster, "time_min": 30}),
                             study).executor([task])
    job = executor.submit(TrainJob(str(task.folder), str(task.plan_file), 1, grace_s=30))
    deadline = time.time() + 240
    while not (task.folder / "last.pt").is_file() and time.time() < deadline:
        time.sleep(0.01)
    assert (task.folder / "last.pt").is_file() and not (task.folder / "summary.json").exists()
    job._interrupt()  # what Slurm does on preemption (SIGTERM, then submitit's USR2)
    assert job.result() == 0
    # the result is there before the job's srun and script have exited: the study reports a run only once its
    # job has ended on the cluster (slurm.ended), and so does this test before it looks for leftovers
    wait_ended(job)
    log = (task.folder / "train.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("# ")]
    assert len(headers) == 2 and "--resume" in headers[1], log
    assert results(task.folder) == results(ray_study[0] / "runs" / name)
    assert not our_processes(env["root"])
