"""bench/run_all.py: BENCHMARKS.md is exactly what it generates from bench/results/, every table is stamped, and
``--stale`` names the tables whose code changed after their stamped commit (docstring-only edits do not count)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_md_is_generated_only(run_all):
    assert (ROOT / "BENCHMARKS.md").read_text() == run_all.report(), (
        "BENCHMARKS.md differs from what bench/run_all.py generates: edit run_all.py or the results, then run "
        "`python bench/run_all.py --report-only`")


def test_every_table_is_stamped_with_commit_cpu_and_date(run_all):
    text = run_all.report()
    sections = text.split("\n## ")[1:]
    assert len(sections) >= 6
    for section in sections:
        assert "Measured at commit `" in section or "| `python bench/" in section, section[:80]
    cmds = run_all.load("commands.json")
    for name, _ in run_all.JOBS:
        if name not in cmds:  # a job added since the last run of the benchmarks: no results, so no table yet
            assert run_all.load(f"{name}.json") is None, f"{name} has results but no stamp in commands.json"
            assert name in run_all.DEPS and all((ROOT / p).exists() for p in run_all.DEPS[name]), name
            continue
        assert len(cmds[name]["commit"]) == 40 and cmds[name]["date"], name
        assert name in run_all.DEPS and all((ROOT / p).exists() for p in run_all.DEPS[name]), name


def commit(repo: Path, message: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True, env=env)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_stale_counts_code_changes_to_a_jobs_files_only(run_all, tmp_path):
    repo = tmp_path / "repo"
    kernel = repo / "src" / "normlab" / "norms" / "batch.py"
    kernel.parent.mkdir(parents=True)
    (repo / "bench").mkdir()
    (repo / "bench" / "bench_norms.py").write_text("print(1)\n")
    kernel.write_text('"""BN."""\n\n\ndef f(x):\n    """Twice x."""\n    return 2 * x\n')
    (repo / "README.md").write_text("readme\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    measured = commit(repo, "measured")

    def line():
        return next(x for x in run_all.stale({"norms": {"commit": measured}}, repo) if x.startswith("norms:"))

    assert "up to date" in line()
    (repo / "README.md").write_text("other\n")  # not a file the benchmark depends on
    kernel.write_text('"""BatchNorm, reworded."""\n\n\ndef f(x):  # a comment\n    """2x."""\n    return 2 * x\n')
    commit(repo, "docs only")
    assert "up to date" in line()
    kernel.write_text('"""BatchNorm, reworded."""\n\n\ndef f(x):\n    return x + x\n')
    commit(repo, "faster f")
    assert "STALE" in line() and "src/normlab/norms/batch.py" in line() and "faster f" in line()
    assert "no stamp" in next(x for x in run_all.stale({}, repo) if x.startswith("norms:"))


def robustness_result(quick: bool = False) -> dict:
    return {"quick": quick, "images": 10_000, "source": "CIFAR-10 test (x)", "corruptions": ["a", "b", "c"],
            "severities": [1, 2, 3, 4, 5], "model": "ResNet-20", "norm": "bn", "batch_statistics": True,
            "eval_batch_size": 512, "threads": 2, "args": {"batch_stats_images": 2000},
            "machine": {"logical_cpus": 2, "cpu": "CPU X", "date": "2026-12-05"},
            "seconds": {"generate": 30.0, "load": 1.0, "plain": 20.0, "adapted": 40.0, "mixed": 25.0,
                        "batch_stats": 14.0},
            "fingerprint_seconds": 0.0, "first_run_seconds": 130.0, "later_run_seconds": 100.0,
            "generate_seconds_per_corruption": {"a": 5.0, "b": 20.0, "c": 5.0},
            "context": {"clean_eval_seconds": 2.0, "train_epoch_seconds": 50.0, "train_epoch_images": 45_000,
                        "train_batch": 128, "train_epoch_steps": 352, "train_steps_timed": 40}}


def test_robustness_section_sets_each_phase_against_an_evaluation_and_an_epoch(run_all):
    text = "\n".join(run_all.robustness_section(robustness_result(), "Measured at commit `abc`"))
    assert text.startswith("## 8. Cost of the robustness step per run at CIFAR-10 size "
                           "(10,000 test images × 3 corruptions × 5 severities, 2 cores)")
    assert "| **total per run, bn** | every run | **100.0** | 50.0 | 2.00 |" in text
    assert "| load the cached sets | every run | 1.0 | 0.5 | 0.02 |" in text
    assert "| total per run, a norm without batch statistics (load + plain) | every run | 21.0 | 10.5 | 0.42 |" in text
    assert "as much as 2.0 training epochs (0.4 for a norm without batch statistics)" in text
    assert "Generation per corruption, seconds over severities 1, 2, 3, 4, 5: b 20.0, a 5.0, c 5.0." in text
    assert "Smoke test" not in text
    assert "Smoke test (`--quick`)" in "\n".join(run_all.robustness_section(robustness_result(True), ""))
