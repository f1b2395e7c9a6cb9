"""DDP and study parallelism on this machine (issue: beyond one machine).

A. `torchrun --nproc-per-node 2` (gloo, 1 thread per rank) against one process (1 thread; and 2 threads
   for the wall time) on the same run: the differences of the final metrics, and the wall times.
B. The same small study with `--jobs 1` and `--jobs 2`: wall times.

    python bench/bench_distributed.py            # CIFAR-10 tarball subset; Fashion-MNIST for the study
    python bench/bench_distributed.py --quick

Writes bench/results/distributed.json and bench/results/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
TARBALL = HERE.parent.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def ddp_vs_single(tmp: Path, quick: bool) -> dict:
    args = ["train", "--dataset", "cifar10", "--data-root", str(TARBALL), "--depth", "1",
            "--train-subset", "2000" if quick else "10000", "--eval-subset", "1000" if quick else "5000",
            "--epochs", "2" if quick else "3", "--batch-size", "128", "--lr", "0.1", "--augment", "standard",
            "--progress", "off"]
    env = dict(os.environ)
    out = {}
    # warm the data cache so neither side pays the decode
    _run([sys.executable, "-m", "normlab", *args, "--epochs", "1", "--train-subset", "256", "--out", str(tmp / "warm")], env)
    # the metric comparison uses 1 thread per process on both sides (the same arithmetic per process)
    out["one_process_seconds"] = _run([sys.executable, "-m", "normlab", *args, "--threads", "1", "--out",
                                       str(tmp / "one")], env)
    out["one_process_2threads_seconds"] = _run([sys.executable, "-m", "normlab", *args, "--threads", "2", "--out",
                                                str(tmp / "one2")], env)
    out["two_process_seconds"] = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                       "--master-addr", "127.0.0.1", "--master-port", str(_port()),
                                       "-m", "normlab", *args, "--threads", "1", "--out", str(tmp / "two")],
                                      dict(env, OMP_NUM_THREADS="1"))
    a = json.loads((tmp / "one" / "summary.json").read_text())
    b = json.loads((tmp / "two" / "summary.json").read_text())
    out["one"] = {s: {m: a[s][m] for m in ("acc", "macro_f1", "loss")} for s in ("train", "val", "test")}
    out["two"] = {s: {m: b[s][m] for m in ("acc", "macro_f1", "loss")} for s in ("train", "val", "test")}
    out["command"] = "normlab " + " ".join(args)
    return out


def study_jobs(tmp: Path, quick: bool) -> dict:
    spec = tmp / "study.yaml"
    spec.write_text(json.dumps({
        "study": {"name": "jobs", "norms": ["bn", "gn", "ln", "in"], "batch_norms": [], "augment_modes": []},
        "train": {"dataset": "fashion-mnist", "n": 1, "train_subset": 2000 if quick else 5000, "eval_subset": 1000,
                  "epochs": 2 if quick else 3, "progress": "off"},
    }))  # JSON is YAML
    out = {}
    for jobs in (1, 2):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "normlab", "study", "--preset", str(spec), "--out",
                              str(tmp / f"study{jobs}"), "--jobs", str(jobs)], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(res.stderr[-2000:])
        out[f"jobs{jobs}_seconds"] = time.perf_counter() - t0
    out["runs"] = 4
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    RES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {"ddp": ddp_vs_single(tmp, a.quick), "study": study_jobs(tmp, a.quick), "quick": a.quick}
    (RES / "distributed.json").write_text(json.dumps(result, indent=1))
    d, s = result["ddp"], result["study"]
    lines = ["| split | metric | 1 process | 2 processes (DDP, synced BN) | difference |", "|---|---|---|---|---|"]
    for split in ("train", "val", "test"):
        for m in ("acc", "macro_f1", "loss"):
            x, y = d["one"][split][m], d["two"][split][m]
            lines.append(f"| {split} | {m} | {x:.4f} | {y:.4f} | {y - x:+.4f} |")
    lines += ["", f"Both sides use 1 thread per process. Wall time: 1 process × 1 thread {d['one_process_seconds']:.1f} s, "
              f"1 process × 2 threads {d['one_process_2threads_seconds']:.1f} s, 2 processes × 1 thread (gloo) "
              f"{d['two_process_seconds']:.1f} s. Run: `{d['command']}`.", "",
              f"Study of {s['runs']} runs: `--jobs 1` {s['jobs1_seconds']:.1f} s, `--jobs 2` {s['jobs2_seconds']:.1f} s "
              f"(ratio {s['jobs1_seconds'] / s['jobs2_seconds']:.2f}×)."]
    (RES / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
