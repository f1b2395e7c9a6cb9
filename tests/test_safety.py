"""Nothing lost, nothing misleading: full disks, concurrent studies, non-finite settings, recovery of damaged
run folders, temp files of killed writers, files the data loader ignores.

Training runs here are tiny (8-pixel images, ResNet-8, 1-2 epochs) and run in-process through
``normlab.cli.main``, the command's own code path: a traceback would surface as a test error.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from normlab import cli, io as nio, runfolder
from normlab.config import make_config, min_image_size
from normlab.errors import EXIT_BUSY, EXIT_DISK_FULL, DiskFull, NormlabError, disk_full_cause
from normlab.study import run_study
from normlab.study import runner as study_runner
from normlab.study.executors import local as local_executor
from normlab.train import loop

from conftest import make_image_folder


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab: error: "), err
    assert "Traceback" not in err
    return lines[0]


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "folder", "--data-root", str(data), "--image-size", "8", "--n", "1",
            "--epochs", "2", "--batch-size", "8", "--probe-size", "8", "--progress", "off", "--threads", "1",
            "--out", str(out), *extra]


def animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("safe") / "data", per_split={"train": 8, "val": 3, "test": 3},
                             size=8)
    animated_gif(root / "train" / "red" / "moving.gif")  # not an image normlab reads: must be named
    return root


@pytest.fixture(scope="module")
def unfinished(data, tmp_path_factory):
    """A run whose process failed after its last epoch, while drawing curves.png: everything but the summary."""
    run = tmp_path_factory.mktemp("unfinished") / "run"
    real = loop.plot_curves

    def broken(*a, **k):
        raise RuntimeError("matplotlib broke")

    loop.plot_curves = broken
    try:
        with pytest.raises(RuntimeError, match="matplotlib broke"):
            cli.main(train_argv(data, run))
    finally:
        loop.plot_curves = real
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------------------------------ full disk

def test_disk_full_cause_is_found_anywhere_in_the_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from e
    except RuntimeError as exc:
        assert disk_full_cause(exc).errno == errno.ENOSPC
    assert disk_full_cause(RuntimeError("other")) is None


def test_full_disk_in_a_checkpoint_write_is_one_line_and_resume_completes(data, tmp_path, capsys, monkeypatch):
    """torch reports ENOSPC as a RuntimeError whose cause is the OSError: one line, exit 74, nothing torn."""
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(isinstance(obj, dict) and "model" in obj)  # checkpoints, not the data cache
        if sum(calls) >= 3:  # epoch 1 wrote best.pt and last.pt; the disk is full from epoch 2 on
            f.write(b"partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 0 vs 64") from e
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_cli(train_argv(data, run), capsys)
    assert code == EXIT_DISK_FULL
    line = one_line(err)
    assert line in (f"normlab: error: disk full at {run / 'best.pt'}: free space and rerun with --resume",
                    f"normlab: error: disk full at {run / 'last.pt'}: free space and rerun with --resume")
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 1  # the epoch-1 file, intact
    assert not list(run.glob(".*.tmp")) and not (run / "summary.json").exists()
    monkeypatch.setattr(torch, "save", real_save)
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 0, err
    assert runfolder.read_summary(run)["epochs_run"] == 2


def test_study_stops_starting_runs_on_a_full_disk_and_says_so(data, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "study": {"name": "full", "norms": ["bn", "gn", "ln"], "batch_norms": [], "augment_modes": []},
        "train": {"dataset": "folder", "data_root": str(data), "image_size": 8, "n": 1, "epochs": 1,
                  "batch_size": 8, "probe_size": 8, "progress": "off"}}))
    started = []

    def child(folder, plan_file, *a, **k):
        started.append(folder.name)
        return EXIT_DISK_FULL  # what `normlab train` returns when the disk filled up under it

    monkeypatch.setattr(local_executor, "run_child", child)
    study = tmp_path / "study"
    code, out, err = run_cli(["study", "--preset", str(spec), "--out", str(study)], capsys)
    assert code == EXIT_DISK_FULL and started == ["bn-b8-none-s0"]  # no run started after the full disk
    assert one_line(err) == (f"normlab: error: disk full at {study / 'runs' / 'bn-b8-none-s0'}: 2 of 3 runs not "
                             "started; free space and rerun the same normlab study command (it skips finished runs "
                             "and resumes stopped ones)")
    assert "[1/3] bn-b8-none-s0: stopped, disk full" in out and "FAILED" not in out
    assert not list(study.glob("runs/*/failed.json"))
    assert (study / "results.csv").is_file() and not (study / ".lock").exists()

    # results.csv itself cannot be written: still one line, no traceback
    def no_space(_study_dir):
        raise DiskFull(Path(_study_dir) / "results.csv")

    monkeypatch.setattr("normlab.study.update_results", no_space)
    with pytest.raises(DiskFull, match=f"disk full at {study / 'runs'}"):  # a NormlabError: the CLI's one line
        run_study(str(spec), study, log=lambda _: None)
    assert not (study / ".lock").exists()


# --------------------------------------------------------------------------------------- one truth

def test_a_run_that_failed_before_its_summary_is_not_finished(unfinished, tmp_path, capsys):
    """summary.json is written last: a failure while drawing curves.png leaves a run to resume, not a finished
    one, and the study runner does not keep a failed.json next to a summary."""
    run = copy_of(unfinished, tmp_path)
    assert not (run / "summary.json").exists() and (run / "last.pt").is_file()
    assert runfolder.run_state(run) == "partial" and runfolder.status_of(run) == "partial"
    runfolder.write_failure(run, 1, ["normlab", "train"])
    assert runfolder.status_of(run) == "failed"
    code, out, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 0, err
    assert runfolder.status_of(run) == "finished" and (run / "curves.png").is_file()
    # a later study run of the folder: finished, and the earlier attempt's failed.json goes
    from normlab.study.plan import Run

    (tmp_path / "runs").mkdir()
    shutil.move(str(run), tmp_path / "runs" / "r")
    outcome = study_runner.execute(tmp_path, [Run("r", {"seed": 0}, [], "c")], log=lambda _: None)
    assert outcome == {"r": "skipped"} and not (tmp_path / "runs" / "r" / "failed.json").exists()


def test_runner_records_busy_and_late_exit_codes_honestly(tmp_path, monkeypatch):
    """A child whose folder another live process holds (exit 75) is running elsewhere, not failed; a child that
    exits non-zero after its summary was written finished."""
    from normlab.study.plan import Run

    runs = [Run("busy", {"seed": 0}, [], "a"), Run("late", {"seed": 0}, [], "b")]

    def child(folder, plan_file, *a, **k):
        folder.mkdir(parents=True, exist_ok=True)
        if folder.name == "late":
            runfolder.write_summary(folder, {"status": "finished"})
            return 1
        return EXIT_BUSY

    monkeypatch.setattr(local_executor, "run_child", child)
    lines: list[str] = []
    outcome = study_runner.execute(tmp_path, runs, log=lines.append)
    assert outcome == {"busy": "busy", "late": "finished"}
    assert not list(tmp_path.glob("runs/*/failed.json"))
    assert not any("FAILED" in line for line in lines), lines
    assert any("busy: running elsewhere" in line for line in lines)


# ------------------------------------------------------------------------------ two studies at once

@pytest.mark.slow
def test_second_study_on_a_live_study_folder_is_refused(data, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "study": {"name": "twice", "norms": ["bn"], "batch_norms": [], "augment_modes": [], "gradcam_per_class": 1},
        "train": {"dataset": "folder", "data_root": str(data), "image_size": 8, "n": 1, "epochs": 1,
                  "batch_size": 8, "probe_size": 8, "progress": "off"}}))
    study = tmp_path / "study"
    cmd = [sys.executable, "-m", "normlab", "study", "--preset", str(spec), "--out", str(study)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (study / ".lock").is_file() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == EXIT_BUSY
    line = one_line(second.stderr)
    assert line == (f"normlab: error: study folder {study} is in use by process {first.pid} on {os.uname().nodename}: "
                    "wait for that study to finish or stop it, or use another --out; rerunning the same command later "
                    "continues it")
    assert "FAILED" not in out + err + second.stdout
    assert not list(study.glob("runs/*/failed.json"))
    state = json.loads((study / "state.json").read_text())
    assert "failed" not in state["last_outcome"].values()
    assert runfolder.status_of(study / "runs" / "bn-b8-none-s0") == "finished"


def test_report_refuses_a_study_folder_a_live_study_holds(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "plan.json").write_text("[]")
        (tmp_path / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}")
        code, _, err = run_cli(["report", str(tmp_path)], capsys)
        assert code == EXIT_BUSY and f"study folder {tmp_path} is in use by process {sleeper.pid}" in one_line(err)
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--momentum", "nan"),
                                         ("--weight-decay", "-inf"), ("--warmup-epochs", "nan"),
                                         ("--step-milestones", "0.5,nan"), ("--grad-clip", "inf")])
def test_non_finite_settings_are_refused(flag, value, tmp_path, capsys):
    code, _, err = run_cli(train_argv(tmp_path / "data", tmp_path / "run", f"{flag}={value}"), capsys)
    assert code == 2
    name = flag[2:].replace("-", "_")
    assert one_line(err).startswith(f"normlab: error: config: {name}=")
    assert "is not a finite number: give a real value (nan and inf are refused)" in err
    assert not (tmp_path / "run").exists()


def test_json_files_are_strict(tmp_path):
    runfolder.write_summary(tmp_path, {"status": "diverged", "val": {"loss": float("nan"), "acc": 0.5},
                                       "x": [float("inf"), -float("inf"), 1.0], "t": torch.tensor(float("nan"))})
    runfolder.write_quantiles(tmp_path, [0.5], [{"epoch": 1, "last_norm": [float("nan")]}])

    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    for name in ("summary.json", "quantiles.json"):
        json.loads((tmp_path / name).read_text(), parse_constant=refuse)
    assert math.isnan(runfolder.read_quantiles(tmp_path)["epochs"][0]["last_norm"][0])  # readers get NaN back
    summary = runfolder.read_summary(tmp_path)
    assert summary["val"] == {"loss": None, "acc": 0.5} and summary["x"] == [None, None, 1.0] and summary["t"] is None


@pytest.mark.parametrize("size, norm, smallest", [(1, "bn", 4), (3, "bn", 4), (4, "in", 5), (2, "gn", 4)])
def test_image_sizes_the_network_cannot_use_are_refused(size, norm, smallest, tmp_path, capsys):
    code, _, err = run_cli(train_argv(tmp_path / "data", tmp_path / "run", "--image-size", str(size), "--norm", norm),
                           capsys)
    assert code == 2
    assert one_line(err).startswith(f"normlab: error: config: image_size={size} is too small: resnet down-samples by 4")
    assert err.strip().endswith(f"use --image-size {smallest} or more")
    assert min_image_size("resnet18", "bn") == 8  # three stride-2 stages on small inputs
    make_config({"image_size": smallest, "norm": norm})  # the minimum itself is fine


# ------------------------------------------------------------------------------------------ recovery

def test_damaged_last_pt_is_refused_with_the_way_out(unfinished, tmp_path, capsys):
    run = copy_of(unfinished, tmp_path)
    blob = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(blob[: len(blob) // 2])
    metrics = (run / "metrics.csv").read_text()
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(f"normlab: error: --resume {run}: {run / 'last.pt'} cannot be read (")
    assert line.endswith(f"it is truncated or damaged, so the run cannot continue from it; start it over with "
                         f"`normlab train --resume {run} --force` (retrains from epoch 1 with its saved settings)")
    (run / "last.pt").unlink()  # what the old advice said to do: now refused, never silently retrained
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 2 and one_line(err) == (
        f"normlab: error: --resume {run}: last.pt is missing but metrics.csv records 2 finished epochs; resuming "
        f"would retrain from epoch 1, so nothing is done: start it over with `normlab train --resume {run} --force` "
        "(retrains from epoch 1 with its saved settings)")
    assert (run / "metrics.csv").read_text() == metrics
    code, out, err = run_cli(["train", "--resume", str(run), "--force"], capsys)
    assert code == 0, err
    assert f"starting {run} over from epoch 1 (--force)" in out + err
    assert runfolder.read_summary(run)["epochs_run"] == 2


def test_deleted_config_yaml_is_recovered_from_last_pt(unfinished, tmp_path, capsys):
    run = copy_of(unfinished, tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").unlink()
    code, out, err = run_cli(["train", "--out", str(run)] + train_argv(Path("x"), run)[1:-2], capsys)
    assert code == 2 and f"continue it with `normlab train --resume {run}`" in one_line(err)
    code, out, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 0, err
    assert f"{run / 'config.yaml'} is missing: using the settings saved in {run / 'last.pt'}" in out + err
    assert yaml.safe_load((run / "config.yaml").read_text()) == saved
    assert runfolder.status_of(run) == "finished"
    # the ignored animated GIF is named, in a warning line and in the summary
    gif = str(Path(saved["data_root"]) / "train" / "red" / "moving.gif")
    assert runfolder.read_summary(run)["data"]["ignored"] == [gif]
    warning = next(line for line in (out + err).splitlines() if line.startswith("warning: ignored"))
    assert warning.startswith("warning: ignored 1 file that is not an image normlab reads (.jpg") and gif in warning
    # neither config.yaml nor a readable checkpoint: one line with the way out
    for name in ("config.yaml", "last.pt", "best.pt", "summary.json"):
        (run / name).unlink()
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 2 and "no config.yaml there and no readable last.pt or best.pt" in one_line(err)


def test_refused_data_leaves_no_run_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_split={"train": 6, "val": 3, "test": 3}, size=8)
    (data / "train" / "purple").mkdir()
    code, _, err = run_cli(train_argv(data, tmp_path / "runs" / "r"), capsys)
    assert code == 2 and "holds no images" in one_line(err)
    assert not (tmp_path / "runs" / "r").exists()


# ------------------------------------------------------------------------------------ temp files

def test_temp_files_of_killed_writers_are_removed_and_nothing_else(tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    figures.mkdir()
    # a report killed in the middle of a write (SIGKILL: no clean-up of its own)
    script = ("import os, signal, sys; from normlab.io import atomic_write; "
              "atomic_write(sys.argv[1], lambda f: os.kill(os.getpid(), signal.SIGKILL))")
    proc = subprocess.run([sys.executable, "-c", script, str(figures / "bars.png")], env={**os.environ})
    assert proc.returncode == -signal.SIGKILL
    (killed,) = figures.glob(".bars.png.*.tmp")
    assert killed.stat().st_size == 0
    old = time.time() - nio.STALE_TEMP_S - 60
    legacy_old = figures / ".heat.png.abcd1234.tmp"  # an older version's name: stale only by age
    legacy_new = figures / ".heat.png.wxyz5678.tmp"
    live = figures / f".live.png.{os.getpid()}@{nio._HOST_TAG}.abcd1234.tmp"  # this process: in use
    other_host_fresh = figures / ".x.png.12@elsewhere.abcd1234.tmp"
    foreign = figures / ".someone-elses.tmp"  # not our pattern: never touched
    for p in (legacy_old, legacy_new, live, other_host_fresh, foreign):
        p.write_bytes(b"")
    os.utime(legacy_old, (old, old))
    os.utime(foreign, (old, old))
    monkeypatch.setattr(nio, "_swept", set())
    nio.write_text(figures / "report.md", "x")
    assert not killed.exists() and not legacy_old.exists()
    assert legacy_new.exists() and live.exists() and other_host_fresh.exists() and foreign.exists()
    assert sorted(p.name for p in figures.iterdir() if not p.name.startswith(".")) == ["report.md"]


def test_full_disk_outside_train_says_to_rerun_that_command(tmp_path):
    import argparse

    msg = str(cli._for_command(DiskFull(tmp_path / "figures" / "bars.png"), argparse.Namespace(command="report")))
    assert msg == f"disk full at {tmp_path / 'figures' / 'bars.png'}: free space and rerun the same normlab report command"
    assert str(cli._for_command(DiskFull(tmp_path), argparse.Namespace(command="train"))).endswith(
        "free space and rerun with --resume")


def test_a_run_that_stopped_early_and_failed_before_its_summary_trains_no_more(unfinished, tmp_path, capsys):
    run = copy_of(unfinished, tmp_path)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["state"]["stopped_early"] = True  # what last.pt holds when early stopping ended the run
    torch.save(ckpt, run / "last.pt")
    code, _, err = run_cli(["train", "--resume", str(run), "--epochs", "4"], capsys)
    assert code == 0, err
    summary = runfolder.read_summary(run)
    assert summary["status"] == "stopped_early" and summary["epochs_run"] == 2
    assert len(runfolder.read_metrics(run)) == 2
