"""Robustness: SIGKILLed runs resume to the same result, run-folder locks, divergence, bad input, safe loading.

The kill tests drive real ``python -m normlab train`` processes; the bad-input tests call ``normlab.cli.main``
in-process (same code path as the command: a NormlabError becomes one ``normlab: error:`` line, exit 2; any
other exception would surface here as a test error, i.e. a traceback the user would have seen).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab import cli
from normlab.config import dump_yaml, make_config
from normlab.errors import EXIT_BUSY, NormlabError
from normlab.models import build_model
from normlab.train import loop
from normlab.checkpoint import load_checkpoint, save_checkpoint
from normlab.runfolder import RunLock

from conftest import make_image_folder

TIMING = {"epoch_seconds", "images_per_s", "eval_seconds"}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------ helpers

def read_rows(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def results(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {k: s[k] for k in ("status", "diverged", "epochs_run", "best_epoch", "train", "val", "test")}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``normlab ARGV`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str, exit_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith("normlab: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def last_epoch(run: Path) -> int | None:
    try:
        return int(torch.load(run / "last.pt", weights_only=True)["state"]["epoch"])
    except Exception:  # noqa: BLE001 - not there yet
        return None


# ------------------------------------------------------------------------------- SIGKILL + resume

KILL_ARGS = ["--dataset", "folder", "--image-size", "32", "--n", "1", "--epochs", "3", "--batch-size", "8",
             "--lr", "0.05", "--augment", "standard", "--norm", "bin", "--dropout", "0.2", "--patience", "5",
             "--threads", "1", "--eval-batch-size", "64", "--probe-size", "16", "--progress", "plain"]

# Slow checkpoint writes: the temp file gets half the bytes, then the process stalls (and is killed there).
STALL_WRAPPER = r"""
import io, os, sys, time
from pathlib import Path
import torch
import normlab.io as nio
import normlab.checkpoint as ck

def slow_save(path, obj):
    def write(f):
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        if Path(path).name == "last.pt" and obj["state"]["epoch"] == 2:
            Path(os.environ["STALL_MARK"]).write_text(str(os.getpid()))
            time.sleep(120)
        f.write(data[len(data) // 2:])
    nio.atomic_write(path, write)

ck.save_torch = slow_save
from normlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def kill_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    data = make_image_folder(base / "data", per_split={"train": 160, "val": 12, "test": 12})
    env = {**os.environ, "NORMLAB_CACHE": str(base / "cache")}
    ref = base / "reference"
    res = subprocess.run([sys.executable, "-m", "normlab", "train", *KILL_ARGS, "--data-root", str(data),
                          "--out", str(ref)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    with open(ref / "metrics.csv", newline="") as f:
        epoch_s = max(float(r["epoch_seconds"]) for r in csv.DictReader(f))
    return {"data": data, "env": env, "ref": ref, "epoch_s": epoch_s}


def _start(kill_env, out: Path, *prefix: str, extra_env=None) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "w")
    cmd = [sys.executable, *prefix, "train", *KILL_ARGS, "--data-root", str(kill_env["data"]), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**kill_env["env"], **(extra_env or {})},
                            start_new_session=True)


def _resume(kill_env, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normlab", "train", "--resume", str(run)], capture_output=True,
                          text=True, env=kill_env["env"], timeout=600)


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(kill_env, tmp_path):
    run = tmp_path / "run"
    proc = _start(kill_env, run, "-m", "normlab")
    try:
        _wait(lambda: last_epoch(run) == 1, proc, "epoch 1 was saved")
        time.sleep(random.uniform(0.15, 0.6) * kill_env["epoch_s"])  # somewhere inside epoch 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    killed_after = last_epoch(run)
    assert killed_after in (1, 2), killed_after  # last.pt is always a whole checkpoint
    assert int((run / ".lock").read_text().split()[0]) == proc.pid  # a dead process's lock is left behind...
    res = _resume(kill_env, run)
    assert res.returncode == 0, res.stderr
    assert f"taking over a stale lock in {run} (process {proc.pid} is gone)" in res.stderr  # ...and taken over
    assert f"resuming {run} after epoch {killed_after}" in res.stderr
    assert read_rows(run) == read_rows(kill_env["ref"])
    assert results(run) == results(kill_env["ref"])
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_the_old_checkpoint(kill_env, tmp_path):
    run = tmp_path / "run"
    mark = tmp_path / "stalled"
    proc = _start(kill_env, run, "-c", STALL_WRAPPER, extra_env={"STALL_MARK": str(mark)})
    try:
        _wait(mark.exists, proc, "the epoch-2 checkpoint write started")
        torn = list(run.glob(".last.pt.*.tmp"))
        assert len(torn) == 1 and torn[0].stat().st_size > 0  # half-written temp file next to last.pt
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last_epoch(run) == 1  # the old last.pt is intact and loadable
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["state"]["epoch"] == 1 and len(ckpt["state"]["rows"]) == 1
    with pytest.raises(Exception):  # the temp file really is torn
        torch.load(torn[0], weights_only=True)
    assert len(read_rows(run)) == 1  # metrics.csv follows last.pt: both still say epoch 1; resume redoes 2
    res = _resume(kill_env, run)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr and "after epoch 1" in res.stderr
    assert read_rows(run) == read_rows(kill_env["ref"])
    assert results(run) == results(kill_env["ref"])
    assert not list(run.glob(".*.tmp")), "stale temp files were not cleaned up"


# ------------------------------------------------------------------------------------------- locks

def _pending_run(folder: Path, image_folder: Path) -> Path:
    """A run folder that holds a config but no checkpoint yet (as right after a start)."""
    cfg = make_config(dict(dataset="folder", data_root=str(image_folder), image_size=16, n=1, epochs=1,
                           batch_size=16, progress="off", probe_size=16, out=str(folder)))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
    return folder


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_live_lock_refuses_resume_with_one_line(image_folder, tmp_path, capsys, sleeper):
    run = _pending_run(tmp_path / "run", image_folder)
    (run / ".lock").write_text(str(sleeper.pid))
    code, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, f"in use by process {sleeper.pid}", exit_code=EXIT_BUSY)
    assert (run / ".lock").read_text() == str(sleeper.pid)  # the other process's lock is untouched
    assert not (run / "last.pt").exists()


def test_live_lock_refuses_force_without_deleting(image_folder, tmp_path, capsys, sleeper):
    run = _pending_run(tmp_path / "run", image_folder)
    (run / "metrics.csv").write_text("epoch\n1\n")
    (run / ".lock").write_text(str(sleeper.pid))
    code, err = run_cli(["train", "--config", str(run / "config.yaml"), "--force"], capsys)
    assert_one_line_error(code, err, f"in use by process {sleeper.pid}", exit_code=EXIT_BUSY)
    assert (run / "metrics.csv").read_text() == "epoch\n1\n"  # --force did not wipe a live run


def test_stale_lock_is_taken_over_with_a_message(tmp_path):
    (tmp_path / ".lock").write_text(str(pid := dead_pid()))
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"torn")
    (tmp_path / ".metrics.csv.x.tmp").write_bytes(b"torn")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    messages: list[str] = []
    with RunLock(tmp_path, messages.append):
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        assert not list(tmp_path.glob(".*.tmp"))  # stale temp files of a killed writer are removed
        assert (tmp_path / "keep.tmp").exists()
    assert messages == [f"taking over a stale lock in {tmp_path} (process {pid} is gone)"]
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("content", ["", "garbage", "-1", "0"])
def test_empty_or_garbage_lock_is_stale(tmp_path, content):
    """An empty lock (writer killed between create and write) must not read as pid -1: kill(-1, 0) succeeds."""
    (tmp_path / ".lock").write_text(content)
    messages: list[str] = []
    with RunLock(tmp_path, messages.append):
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert all("stale lock" in m for m in messages) and len(messages) == (content != "")


HOLD_LOCK = r"""
import sys, time
from pathlib import Path
from normlab.runfolder import RunLock
with RunLock(Path(sys.argv[1]), print):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(120)
"""


def test_lock_held_by_a_running_process(image_folder, tmp_path, capsys):
    run = _pending_run(tmp_path / "run", image_folder)
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run), str(ready)])
    try:
        deadline = time.time() + 60
        while not ready.exists() and holder.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        code, err = run_cli(["train", "--resume", str(run)], capsys)
        assert_one_line_error(code, err, f"in use by process {holder.pid}", exit_code=EXIT_BUSY)
        with pytest.raises(NormlabError, match="in use"):
            with RunLock(run, print):
                pass
    finally:
        holder.kill()
        holder.wait()
    messages: list[str] = []
    with RunLock(run, messages.append):  # the holder was SIGKILLed: its lock is stale now
        pass
    assert messages == [f"taking over a stale lock in {run} (process {holder.pid} is gone)"]


# -------------------------------------------------------------------------------------- divergence

def _poison_gradient(monkeypatch, at_call: int) -> None:
    """Make the gradient of the first parameter infinite at the ``at_call``-th backward pass."""
    real = loop.build_model
    calls = {"n": 0}

    def build(*args, **kw):
        model = real(*args, **kw)

        def hook(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] == at_call else grad

        next(model.parameters()).register_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", build)


def _tiny(folder, out, **kw):
    base = dict(dataset="folder", data_root=str(folder), image_size=16, n=1, epochs=2, batch_size=16, lr=0.05,
                eval_batch_size=64, probe_size=16, progress="off", out=str(out), threads=1)
    base.update(kw)
    return make_config(base)


@pytest.mark.parametrize("grad_clip, at_call, where", [
    (1.0, 3, (1, 2)),  # epoch 1, step 2 (72 train images / 16 = 5 steps per epoch)
    (None, 3, (1, 2)),  # without clipping the gradient is checked too
    (None, 10, (2, 4)),  # the very last step: caught before nan weights are evaluated and saved as "finished"
])
def test_non_finite_gradient_stops_the_run_cleanly(grad_clip, at_call, where, image_folder, tmp_path, monkeypatch):
    _poison_gradient(monkeypatch, at_call=at_call)
    run = loop.train(_tiny(image_folder, tmp_path / "run", grad_clip=grad_clip))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    d = summary["diverged"]
    assert (d["epoch"], d["step"], d["grad"]) == (*where, "non-finite")
    assert np.isfinite(d["loss"])  # the loss was fine: the gradient check caught it
    assert summary["epochs_run"] == where[0] - 1
    if where[0] == 1:
        assert not (run / "last.pt").exists()  # nothing non-finite was saved
    else:
        ckpt = load_checkpoint(run / "last.pt")
        assert ckpt["state"]["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        assert all(np.isfinite(list(r.values())).all() for r in read_rows(run))


# ------------------------------------------------------------------------------ bad image folders

def _rng_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _truncated_jpeg(p: Path) -> None:
    buf = io.BytesIO()
    _rng_rgb(64, 64).save(buf, "JPEG")
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


# item -> (how to add it to train/red of a good folder, outcome)
#   outcome "skip": skipped with a reason, counted in the summary; "ok": decoded and trained on;
#   "ignored": not an image, counted as ignored
BAD_ITEMS = {
    "truncated_jpeg": (lambda d: _truncated_jpeg(d / "trunc.jpg"), "skip"),
    "zero_byte": (lambda d: (d / "zero.png").write_bytes(b""), "skip"),
    "not_an_image_with_image_ext": (lambda d: (d / "fake.jpg").write_bytes(b"PK\x03\x04 zip, not a jpeg" * 10),
                                    "skip"),
    "text_file": (lambda d: (d / "README.txt").write_text("notes\n"), "ignored"),
    "cmyk": (lambda d: _rng_rgb(20, 12).convert("CMYK").save(d / "cmyk.jpg"), "ok"),
    "16_bit": (lambda d: Image.fromarray(np.full((10, 10), 50000, np.uint16)).save(d / "deep.png"), "ok"),
    "palette": (lambda d: _rng_rgb(16, 16).convert("P").save(d / "pal.png", transparency=0), "ok"),
    "rgba": (lambda d: _rng_rgb(16, 16).convert("RGBA").save(d / "rgba.png"), "ok"),
    "1x1": (lambda d: _rng_rgb(1, 1).save(d / "dot.png"), "ok"),
    "very_large": (lambda d: Image.new("RGB", (4000, 3000), (200, 10, 10)).save(d / "huge.jpg", quality=50), "ok"),
    "nested_folders": (lambda d: (d / "a" / "b" / "c").mkdir(parents=True) or _rng_rgb(16, 16).save(
        d / "a" / "b" / "c" / "deep.png"), "ok"),
    "dangling_symlink": (lambda d: os.symlink(d / "nowhere.png", d / "dangling.png"), "skip"),
    "self_symlink_file": (lambda d: os.symlink(d / "self.png", d / "self.png"), "skip"),
}


@pytest.fixture
def good_folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_split={"train": 6, "val": 3, "test": 3}, size=8)


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "folder", "--data-root", str(data), "--image-size", "8", "--n", "1",
            "--epochs", "1", "--batch-size", "8", "--probe-size", "8", "--progress", "off", "--threads", "1",
            "--out", str(out), *extra]


@pytest.mark.parametrize("item", list(BAD_ITEMS))
def test_bad_image_item(item, good_folder, tmp_path, capsys):
    add, outcome = BAD_ITEMS[item]
    add(good_folder / "train" / "red")
    code, err = run_cli(_train_argv(good_folder, tmp_path / "skip"), capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    data = summary["data"]
    assert summary["status"] == "finished"
    assert data["counts"]["train"] == 18 + (outcome == "ok")
    assert data["num_skipped"] == (outcome == "skip")
    assert data["num_ignored"] == (outcome == "ignored")
    if outcome == "skip":
        (path, reason), = data["skipped"]
        assert Path(path).parent == good_folder / "train" / "red" and reason
        code, err = run_cli(_train_argv(good_folder, tmp_path / "error", "--on-bad-image", "error"), capsys)
        assert_one_line_error(code, err, f"unreadable image {path}", "--on-bad-image skip")
        assert not (tmp_path / "error" / "summary.json").exists()
    else:
        code, err = run_cli(_train_argv(good_folder, tmp_path / "error", "--on-bad-image", "error"), capsys)
        assert code == 0, err


def test_decompression_bomb_is_skipped_not_decoded(good_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # PIL refuses > 2x this many pixels
    Image.new("RGB", (600, 400)).save(good_folder / "train" / "red" / "bomb.png")
    code, err = run_cli(_train_argv(good_folder, tmp_path / "run"), capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert data["num_skipped"] == 1 and "DecompressionBomb" in data["skipped"][0][1]


def test_unreadable_file(good_folder, tmp_path, capsys):
    target = good_folder / "train" / "red" / "locked.png"
    _rng_rgb(8, 8).save(target)
    target.chmod(0)
    try:
        readable = os.access(target, os.R_OK)  # root (and CAP_DAC_OVERRIDE) reads it anyway
        code, err = run_cli(_train_argv(good_folder, tmp_path / "run"), capsys)
        assert code == 0, err
        data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
        if readable:
            assert data["num_skipped"] == 0 and data["counts"]["train"] == 19
        else:
            assert data["num_skipped"] == 1 and "PermissionError" in data["skipped"][0][1]
    finally:
        target.chmod(0o644)


def test_unreadable_class_subfolder(good_folder, tmp_path, capsys):
    sub = good_folder / "train" / "red" / "private"
    sub.mkdir()
    _rng_rgb(8, 8).save(sub / "x.png")
    sub.chmod(0)
    try:
        readable = os.access(sub, os.R_OK | os.X_OK)
        code, err = run_cli(_train_argv(good_folder, tmp_path / "run"), capsys)
        if readable:  # running as root
            assert code == 0, err
        else:
            assert_one_line_error(code, err, f"cannot read folder {sub}", "chmod")
    finally:
        sub.chmod(0o755)


def test_symlink_loop_does_not_duplicate_images(good_folder, tmp_path, capsys):
    red = good_folder / "train" / "red"
    os.symlink("..", red / "up")  # train/red/up -> train/: a loop
    os.symlink(".", red / "here")  # train/red/here -> train/red: a loop
    code, err = run_cli(_train_argv(good_folder, tmp_path / "run"), capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert data["counts"]["train"] == 18  # each image once
    assert data["num_ignored"] == 2 and data["num_skipped"] == 0


def test_empty_class_folder_is_one_line(good_folder, tmp_path, capsys):
    (good_folder / "train" / "purple").mkdir()
    code, err = run_cli(_train_argv(good_folder, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, str(good_folder / "train" / "purple"), "holds no images")


def test_class_of_train_missing_in_val_is_a_documented_warning(good_folder, tmp_path, capsys):
    shutil.rmtree(good_folder / "val" / "blue")
    with pytest.warns(UserWarning, match="'blue' has no folder"):
        code, err = run_cli(_train_argv(good_folder, tmp_path / "run"), capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any("'blue'" in w for w in summary["data"]["warnings"])
    assert sum(map(sum, summary["val"]["confusion"])) == 6  # val = red + green only


def test_class_of_val_missing_in_train_is_one_line(good_folder, tmp_path, capsys):
    shutil.copytree(good_folder / "val" / "red", good_folder / "val" / "pink")
    code, err = run_cli(_train_argv(good_folder, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "'pink' is not in", "add train/pink/")


# ------------------------------------------------------------------------------------------ configs

def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needles", [
    ("nrom: bn\n", ["unknown setting 'nrom'", "did you mean 'norm'"]),
    ("batch-sise: 8\n", ["unknown setting 'batch_sise'", "did you mean 'batch_size'"]),
    ("epochs: 2.5\n", ["epochs=2.5", "wrong type"]),
    ("lr: [0.1]\n", ["lr=[0.1]", "wrong type"]),
    ("sync_bn: maybe\n", ["sync_bn='maybe'", "wrong type"]),
    ("norm: {a: 1}\n", ["norm=", "wrong type"]),
    ("epochs:\n", ["epochs cannot be empty"]),
    ("batch_size: 0\n", ["batch_size=0", ">= 1"]),
    ("batch_size: -4\n", ["batch_size=-4", ">= 1"]),
    ("image_size: 0\n", ["image_size=0", ">= 1"]),
    ("eval_batch_size: -1\n", ["eval_batch_size=-1"]),
    ("probe_size: 0\n", ["probe_size=0"]),
    ("lr: 0\n", ["lr=0.0", "> 0"]),
    ("val_fraction: 1.0\n", ["val_fraction=1.0", "between 0 and 1"]),
    ("grad_clip: -1\n", ["grad_clip=-1.0"]),
    ("batch_size: 1\nnorm: bin\n", ["batch_size=1", "BatchNorm", "--batch-size 2"]),
    ("batch_size: 1\nnorm: torch_bn\n", ["batch_size=1", "BatchNorm"]),
    ("norm: gn\ngn_groups: 32\n", ["gn_groups=32", "divisor of 16"]),
    ("norm: gn\ngn_groups: 0\n", ["gn_groups=0", ">= 1"]),
    ("- a\n- b\n", ["must hold a mapping"]),
    ("norm: [unclosed\n", ["not valid YAML"]),
])
def test_bad_config_file_is_one_line(text, needles, tmp_path, capsys, good_folder):
    cfg = _yaml(tmp_path, text)
    code, err = run_cli(["train", "--data-root", str(good_folder), "--out", str(tmp_path / "run"), "--config",
                         str(cfg)], capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_batch_size_one_with_group_norm_is_fine(good_folder, tmp_path, capsys):
    code, err = run_cli(_train_argv(good_folder, tmp_path / "run", "--batch-size", "1", "--norm", "gn",
                                    "--gn-groups", "4"), capsys)
    assert code == 0, err


def test_output_that_is_a_file_is_one_line(good_folder, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    code, err = run_cli(_train_argv(good_folder, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "is not a folder", "another --out")


def test_resume_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    code, err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "no config.yaml")


# --------------------------------------------------------------------------------------- safe loading

def test_yaml_python_tags_are_refused(good_folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = _yaml(tmp_path, f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err = run_cli(_train_argv(good_folder, tmp_path / "run", "--config", str(cfg)), capsys)
    assert_one_line_error(code, err, "not valid YAML", "python/object")
    cfg.write_text("norm: !!python/object:normlab.config.TrainConfig {}\n")
    code, err = run_cli(_train_argv(good_folder, tmp_path / "run", "--config", str(cfg)), capsys)
    assert_one_line_error(code, err, "not valid YAML")
    assert not marker.exists()


def test_run_config_yaml_with_python_tag_is_refused_on_resume(good_folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, "not valid YAML")
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    data = make_image_folder(base / "data", per_split={"train": 6, "val": 3, "test": 3}, size=8)
    cfg = make_config(dict(dataset="folder", data_root=str(data), image_size=8, n=1, epochs=1, batch_size=8,
                           probe_size=8, progress="off", threads=1, out=str(base / "run")))
    old = os.environ.get("NORMLAB_CACHE")
    os.environ["NORMLAB_CACHE"] = str(base / "cache")
    try:
        loop.train(cfg)
    finally:
        if old is None:
            os.environ.pop("NORMLAB_CACHE")
        else:
            os.environ["NORMLAB_CACHE"] = old
    return base / "run", cfg


def _unfinished_copy(finished_run, tmp_path: Path) -> Path:
    src, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "summary.json").unlink()
    return run


def test_pickle_payload_checkpoint_is_refused(finished_run, tmp_path, capsys):
    run = _unfinished_copy(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(str(marker)), "config": {}}, run / "last.pt")  # weights_only=False style payload
    code, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, str(run / "last.pt"), "cannot be read")
    assert not marker.exists()


def test_truncated_checkpoint_is_one_line(finished_run, tmp_path, capsys):
    run = _unfinished_copy(finished_run, tmp_path)
    blob = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(blob[: len(blob) // 3])
    code, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, str(run / "last.pt"), "truncated")
    (run / "best.pt").write_bytes(b"")
    code, err = run_cli(["gradcam", str(run), "--per-class", "1"], capsys)
    assert_one_line_error(code, err, str(run / "best.pt"))


@pytest.mark.parametrize("other, needles", [
    (dict(norm="gn"), ["norm='gn'"]),
    (dict(norm="ln"), ["norm='ln'"]),
    (dict(n=2), ["n=2", "unexpected"]),
    (dict(shortcut="B"), ["shortcut='B'"]),
    ("classes", ["shape mismatch"]),
])
def test_checkpoint_of_another_model_names_the_mismatch(other, needles, finished_run, tmp_path, capsys):
    run = _unfinished_copy(finished_run, tmp_path)
    _, cfg = finished_run
    if other == "classes":
        other_cfg, k = cfg, 5
    else:
        other_cfg, k = make_config({**cfg.to_dict(), **other}), 3
    model = build_model(other_cfg, 3, k)
    save_checkpoint(run / "last.pt", model, other_cfg, optimizer={}, rng={}, state={})
    code, err = run_cli(["train", "--resume", str(run)], capsys)
    line = assert_one_line_error(code, err, str(run / "last.pt"), "does not fit this model", *needles)
    assert "matching run" in line


def test_checkpoint_without_model_is_one_line(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(NormlabError, match="not a normlab checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save([1, 2, 3], tmp_path / "y.pt")
    with pytest.raises(NormlabError, match="not a normlab checkpoint"):
        load_checkpoint(tmp_path / "y.pt")


# ---------------------------------------------------------------------------------- file permissions

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_result_files_honour_the_umask_like_open(umask, mode, tmp_path, monkeypatch):
    """A study folder on a shared disk must be readable by the group: atomic writes get open()'s mode."""
    import normlab.io as nio

    monkeypatch.setattr(nio, "_UMASK", None)  # the umask is read once per process
    old = os.umask(umask)
    try:
        nio.write_json(tmp_path / "summary.json", {"a": 1})
        nio.save_torch(tmp_path / "last.pt", {"w": torch.zeros(2)})
        (tmp_path / "plain.txt").write_text("x")  # what open() gives under this umask
    finally:
        os.umask(old)
    for name in ("summary.json", "last.pt", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert nio.read_json(tmp_path / "summary.json") == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
