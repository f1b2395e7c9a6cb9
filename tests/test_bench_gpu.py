"""bench/bench_gpu.py end to end on the CPU (--quick, tiny shapes): the GPU acceptance script stays runnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_quick_on_cpu_writes_its_json_and_table(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--device", "cpu", "--quick",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["env"]["device"] == "cpu" and r["env"]["torch"] == __import__("torch").__version__
    eq = r["equivalence"]
    assert isinstance(eq, list) and {row["norm"] for row in eq} == {"bn", "in", "ln", "gn", "bin"}
    assert all(row["ok"] for row in eq), [row for row in eq if not row["ok"]]
    assert {"y", "dx", "weight", "bias"} <= set(eq[0]["err"])
    assert r["syncs"] == [{"skipped": "needs CUDA (set_sync_debug_mode)"}]
    timed = [row for row in r["step_time"] if "ratio" in row]
    assert {row["norm"] for row in timed} == {"bn", "gn"} and all(row["ratio"] > 0 for row in timed)
    resume = r["train"]["resume"]
    assert (resume["rc"], resume["resumed"], resume["status"], resume["epochs_run"]) == (0, True, "finished", 2)
    assert r["study"] == {"skipped": "quick mode"}
    table = out.with_suffix(".md").read_text()
    assert "Equivalence: 10/10" in table and "| bn | 16 | 8 | eager |" in table
