"""The training loop end to end on a small generated image folder, and on real data (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from normlab.config import make_config
from normlab.errors import NormlabError
from normlab.train import loop
from normlab.train.loop import train

from conftest import CIFAR_TARBALL, FASHION_DIR, require

TIMING = {"epoch_seconds", "images_per_s", "eval_seconds"}


def small_cfg(folder, out, **kw):
    base = dict(dataset="folder", data_root=str(folder), image_size=16, n=1, epochs=2, batch_size=16, lr=0.05,
                eval_batch_size=64, probe_size=16, progress="off", out=str(out))
    base.update(kw)
    return make_config(base)


def read_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def test_run_folder_has_everything(image_folder, tmp_path):
    run = train(small_cfg(image_folder, tmp_path / "run"))
    for name in ("config.yaml", "metrics.csv", "best.pt", "last.pt", "summary.json", "curves.png", "quantiles.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    rows = read_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for split in ("train", "val"):
        for m in ("loss", "error", "acc", "micro_f1", "macro_f1"):
            assert f"{split}_{m}" in rows[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    for split in ("train", "val", "test"):
        assert {"acc", "micro_f1", "macro_f1", "confusion"} <= set(summary[split])
        assert abs(summary[split]["acc"] - summary[split]["micro_f1"]) < 1e-6  # single-label: acc == micro-F1
    assert sum(map(sum, summary["test"]["confusion"])) == 24
    q = json.loads((run / "quantiles.json").read_text())
    assert [e["epoch"] for e in q["epochs"]] == [0, 1, 2]
    assert len(q["epochs"][1]["last_norm"]) == 4 and q["epochs"][1]["last_norm"] == sorted(q["epochs"][1]["last_norm"])
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["config"]["norm"] == "bn" and ckpt["state"]["epoch"] == 2
    assert (run / "curves.png").stat().st_size > 10_000


def test_learns_the_generated_folder(image_folder, tmp_path):
    run = train(small_cfg(image_folder, tmp_path / "run", epochs=6, lr=0.05))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["acc"] >= 0.8, summary["val"]  # 3 classes: chance is 0.33


def test_cpu_runs_are_deterministic(image_folder, tmp_path):
    a = train(small_cfg(image_folder, tmp_path / "a", augment="standard"))
    b = train(small_cfg(image_folder, tmp_path / "b", augment="standard"))
    c = train(small_cfg(image_folder, tmp_path / "c", augment="standard", seed=1))
    assert read_rows(a) == read_rows(b)
    assert read_rows(a) != read_rows(c)


def test_resume_after_interruption_matches_uninterrupted(image_folder, tmp_path, monkeypatch):
    cfg = dict(epochs=3, augment="standard", norm="bin", dropout=0.2)
    full = train(small_cfg(image_folder, tmp_path / "full", **cfg))

    real_save = loop.save_checkpoint

    def save_then_die(path, *args, **kw):
        real_save(path, *args, **kw)
        if path.name == "last.pt" and kw["state"]["epoch"] == 1:
            raise KeyboardInterrupt  # as if killed right after epoch 1 was saved

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(image_folder, tmp_path / "cut", **cfg))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert not (tmp_path / "cut" / ".lock").exists()
    resumed = train(None, resume_dir=tmp_path / "cut")
    assert read_rows(resumed) == read_rows(full)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((resumed / "summary.json").read_text())
    assert a["test"] == b["test"]


def test_refuses_to_overwrite_a_run(image_folder, tmp_path):
    cfg = small_cfg(image_folder, tmp_path / "run", epochs=1)
    train(cfg)
    before = (tmp_path / "run" / "metrics.csv").read_bytes()
    with pytest.raises(NormlabError, match="already holds a run.*--force"):
        train(cfg)
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == before
    train(cfg, force=True)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_diverging_run_is_marked_not_crashed(image_folder, tmp_path):
    run = train(small_cfg(image_folder, tmp_path / "run", norm="nn", lr=1e8, optimizer="sgd", epochs=2))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged"]["epoch"] == 1


def test_bf16_training_on_cpu(image_folder, tmp_path):
    run = train(small_cfg(image_folder, tmp_path / "run", precision="bf16", norm="gn", gn_groups=4))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["val"]["loss"] == summary["val"]["loss"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "normlab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--norm", "bx"], "did you mean 'bn'"),
    (["--n", "0"], "n=0"),
    (["--norm", "gn", "--gn-groups", "3"], "gn_groups"),
    (["--batch-size", "1", "--norm", "bn"], "BatchNorm"),
    (["--epochs", "two"], "wrong type"),
    (["--data-root", "/nonexistent/data"], "/nonexistent/data"),
    (["--nrom", "bn"], "did you mean --norm?"),
])
def test_cli_bad_input_is_one_line(args, needle, image_folder, tmp_path):
    base = ["train", "--dataset", "folder", "--data-root", str(image_folder), "--out", str(tmp_path / "r")]
    res = cli(*base, *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab: error:"), res.stderr
    assert needle in lines[0]


def test_cli_trains_and_prints_the_run_folder(image_folder, tmp_path):
    out = tmp_path / "r"
    res = cli("train", "--dataset", "folder", "--data-root", str(image_folder), "--image-size", "16", "--n", "1",
              "--epochs", "1", "--batch-size", "16", "--out", str(out), "--progress", "plain")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    assert "epoch   1/1" in res.stderr
    again = cli("train", "--dataset", "folder", "--data-root", str(image_folder), "--out", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    res = cli("train", "--resume", str(out))
    assert res.returncode == 0 and "already finished" in res.stderr


@pytest.mark.slow
def test_fashion_mnist_end_to_end(tmp_path):
    require(FASHION_DIR / "train-images-idx3-ubyte.gz", "Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    run = train(make_config(dict(dataset="fashion-mnist", n=1, epochs=2, batch_size=64, lr=0.05, train_subset=3000,
                                 progress="off", out=str(tmp_path / "fm"))))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["acc"] > 0.6, summary["test"]  # chance: 0.1
    assert summary["classes"][0] == "T-shirt/top"


@pytest.mark.slow
def test_cifar10_jpeg_folder_end_to_end(tmp_path):
    require(CIFAR_TARBALL, "the CIFAR-10 JPEG tarball")
    run = train(make_config(dict(dataset="cifar10", data_root=str(CIFAR_TARBALL), n=1, epochs=3, batch_size=64,
                                 lr=0.05, train_subset=5000, augment="standard", progress="off",
                                 out=str(tmp_path / "c10"))))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["acc"] > 0.3, summary["test"]  # chance: 0.1
    assert sum(map(sum, summary["test"]["confusion"])) == 10_000


def test_result_lines_show_with_the_progress_display_off(capsys, monkeypatch):
    from normlab.train.progress import EpochProgress

    monkeypatch.delenv("NORMLAB_PROGRESS", raising=False)
    off = EpochProgress("off")
    off.log("an epoch line")
    off.say("done: finished")
    assert capsys.readouterr().err == "done: finished\n"
    plain = EpochProgress("plain")
    plain.say("done: finished")
    assert capsys.readouterr().err == "done: finished\n"
