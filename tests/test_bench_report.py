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


def agreement_row(norm, backend, dtype, inp, y, grad, cpp_calls=0, buffers=None, own=None, source="torch",
                  exact=None):
    q = {"y": {"abs": y, "rel": y / 2}, "dx": {"abs": grad / 4, "rel": grad / 8},
         "grad.bias": {"abs": grad, "rel": grad / 2}}
    if buffers is not None:
        q["buffer.running_var"] = {"abs": buffers, "rel": buffers / 10}
    row = {"norm": norm, "source": source, "backend": backend, "dtype": dtype, "input": inp, "cpp_calls": cpp_calls,
           "atol": 1e-5, "rtol": 1e-4, "vs_same": q, "vs_f64": exact or q, "no_reference": []}
    if dtype == "float32":
        row["ref_own"] = own if own is not None else q
    return row


def agreement_result() -> dict:
    rows = []
    for backend, calls in (("ops", 0), ("cpp", 8)):  # bn: C++ kernels on the cpp back-end
        rows += [agreement_row("bn", backend, "float32", "mean0.5", 1e-6, 8e-6, calls, buffers=1e-7),
                 agreement_row("bn", backend, "float64", "mean0.5", 4e-15, 2e-14, calls, buffers=3e-16),
                 agreement_row("bn", backend, "float32", "mean1e3", 1e-4, 8e-3, calls, buffers=2e-5),
                 agreement_row("bn", backend, "float64", "mean1e3", 1e-12, 2e-11, calls, buffers=1e-13)]
    tiny = {"y": {"abs": 1e-8, "rel": 1e-8}, "dx": {"abs": 1e-8, "rel": 1e-8}}
    exact = {"y": {"abs": 1e-14, "rel": 1e-14}, "dx": {"abs": 3e-14, "rel": 3e-14}}
    big = {"y": {"abs": 1e-3, "rel": 1e-3}, "dx": {"abs": 1e-3, "rel": 1e-3}}
    # evonorm_s0: no kernels; float64 stops at float32 size against the reference as it is, exact against the
    # float64-kept one; at large mean it rounds more than the float32 reference (output) and less (grads)
    for backend in ("ops", "cpp"):
        rows += [agreement_row("evonorm_s0", backend, "float32", "mean0.5", 1e-6, 4e-6, source="timm"),
                 agreement_row("evonorm_s0", backend, "float64", "mean0.5", 3e-7, 3e-6, source="timm", exact=exact),
                 agreement_row("evonorm_s0", backend, "float32", "mean1e3", 2e-4, 1e-6, own={**tiny, "dx": big["dx"]},
                               source="timm"),
                 agreement_row("evonorm_s0", backend, "float64", "mean1e3", 5e-3, 7e-2, source="timm", exact=exact)]
    return {"quick": False, "shape": [8, 16, 6, 6], "steps": 2,
            "inputs": {"mean0.5": {"mean": 0.5, "std": 1.0}, "mean1e3": {"mean": 1000.0, "std": 1.0}},
            "machine": {"logical_cpus": 2, "cpu": "CPU X", "date": "2026-12-05"}, "results": rows}


def test_agreement_section_renders_each_norm_per_back_end_with_its_findings(run_all):
    text = "\n".join(run_all.agreement_section(agreement_result(), "Measured at commit `abc`"))
    assert text.startswith("## 9. Every norm against its reference")
    # bn ran the C++ kernels: one row per back-end; evonorm_s0 has none: one row
    assert "| bn | torch | tensor ops | 1e-05 / 0.0001 | 1.0e-06 (5e-07) | 8.0e-06 (4e-06), bias | " \
           "1.0e-07 (1e-08) | 4.0e-15 (2e-15) | 2.0e-14 (1e-14), bias | 3.0e-16 (3e-17) |" in text
    assert "| bn | torch | C++ kernels |" in text
    assert text.count("| evonorm_s0 | timm |") == 1 and "| evonorm_s0 | timm | either (no C++ kernels) |" in text
    # large mean: float32 against float64, with the float32 reference's own rounding; no buffers: –
    assert ("| evonorm_s0 | either (no C++ kernels) | 2.0e-04 (1e-04) | 1.0e-06 (5e-07), bias | – | "
            "1.0e-08 (1e-08) / 1.0e-03 (1e-03) | 1.0e-14 (1e-14) | 3.0e-14 (3e-14), dx | – |") in text
    assert "* Largest float32 difference at mean 0.5: output 1.0e-06 (bn, ops), gradients 8.0e-06 (bn, ops, bias)" in text
    assert "Large mean, float32: relative difference above 2× the float32 reference's own" in text
    # once each: the norm has one row; bn rounds as its reference does
    assert ("above 1e-6: evonorm_s0 (ops, output: 1e-04 vs the reference's 1e-08). Rounding less than the float32 "
            "reference by more than 2×: evonorm_s0 (ops, grads: 5e-07 vs the reference's 1e-03).") in text
    assert ("float64 differences above 1e-10 relative against the reference as the tests run it (float32-sized, "
            "where float64 rounding is ~1e-16): **evonorm_s0**: timm's EvoNorm2dS0 takes the group variance in "
            "float32 (`x.float().var(...)`); against the reference with float64 kept throughout, 3e-14 at most: "
            "normlab's layer is exact.") in text
    assert "Smoke test" not in text
    assert "Smoke test (`--quick`)" in "\n".join(run_all.agreement_section({**agreement_result(), "quick": True}, ""))
