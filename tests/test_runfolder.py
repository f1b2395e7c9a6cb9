"""The run-folder and study-folder owners: round trips, state.json, results.csv, HParams, the Python API."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import normlab
from normlab import runfolder
from normlab import studyfolder as sf

from conftest import make_image_folder

ROWS = [{"epoch": e, "lr": 0.1 / e, **{f"{s}_{m}": 0.1 * e for s in ("train", "val")
                                         for m in ("loss", "error", "acc", "micro_f1", "macro_f1")},
         "epoch_seconds": secs, "images_per_s": 1000.0 / secs, "eval_seconds": 0.5}
        for e, secs in ((1, 15.6), (2, 2.9), (3, 3.1), (4, 2.8))]


def test_run_folder_round_trip(tmp_path):
    run = tmp_path / "run"
    assert runfolder.run_state(run) == "new" and runfolder.status_of(run) == "missing"
    assert runfolder.read_metrics(run) == [] and runfolder.read_summary(run) is None
    runfolder.write_metrics(run, ROWS)
    back = runfolder.read_metrics(run)
    assert back == [{k: float(v) for k, v in r.items()} for r in ROWS]
    header = (run / runfolder.METRICS).read_text().splitlines()[0].split(",")
    assert header == [c for c in runfolder.METRIC_COLUMNS]  # documented column order
    runfolder.write_quantiles(run, (0.01, 0.99), [{"epoch": 0, "last_norm": [-2.0, 2.0]}])
    assert runfolder.read_quantiles(run)["epochs"][0]["last_norm"] == [-2.0, 2.0]
    (run / runfolder.LAST).write_bytes(b"x")
    assert runfolder.run_state(run) == "partial" and runfolder.holds_run(run)
    summary = {"status": "stopped_early", "val": {"acc": 0.5, "loss": 1.0}, "timing": runfolder.timing(ROWS)}
    runfolder.write_summary(run, summary)
    got = runfolder.read_summary(run)
    assert got["schema_version"] == runfolder.SCHEMA_VERSION and got["val"] == {"acc": 0.5, "loss": 1.0}
    assert runfolder.run_state(run) == "finished" and runfolder.status_of(run) == "stopped_early"
    flat = runfolder.final_scores(got)
    assert flat["val_acc"] == 0.5 and flat["test_acc"] is None
    runfolder.write_predictions(run, {"test": ([0, 1, 2], [0, 2, 2])})
    assert runfolder.read_predictions(run) == {"test": {"true": [0, 1, 2], "pred": [0, 2, 2]}}
    # a summary written before the schema had a version reads as version 1
    (run / runfolder.SUMMARY).write_text(json.dumps({"status": "finished"}))
    assert runfolder.read_summary(run)["schema_version"] == 1


def test_timing_separates_the_first_epoch():
    t = runfolder.timing(ROWS)
    assert t["first_epoch_seconds"] == 15.6
    assert t["steady_seconds_per_epoch"] == pytest.approx(2.9)  # median of epochs 2..4, not the 6.1 s mean
    assert t["first_epoch_extra_seconds"] == pytest.approx(12.7) and t["steady_epochs"] == 3
    one = runfolder.timing(ROWS[:1])
    assert one["steady_seconds_per_epoch"] is None and one["first_epoch_seconds"] == 15.6


def _fake_study(study_dir: Path) -> None:
    plan = []
    for norm in ("bn", "gn"):
        for seed in (0, 1):
            name = f"{norm}-s{seed}"
            plan.append({"name": name, "config": {"norm": norm, "seed": seed, "epochs": 4, "out": None,
                                                  "batch_size": 128}, "groups": ["norms"], "cell": norm, "cells": {}})
    sf.write_plan(study_dir, plan)
    sf.write_record(study_dir, {"study": {"name": "fake", "seeds": 2}, "train": {"epochs": 4}})
    for i, p in enumerate(plan[:3]):
        run = sf.run_dir(study_dir, p["name"])
        runfolder.write_metrics(run, ROWS)
        runfolder.write_summary(run, {"status": "finished", "epochs_run": 4, "best_epoch": 3,
                                      "val": {"acc": 0.8 + i / 100}, "test": {"acc": 0.7 + i / 100},
                                      "wall_seconds": 30.0})
    runfolder.write_failure(sf.run_dir(study_dir, plan[3]["name"]), 1, ["normlab", "train"])


def test_study_folder_state_and_results(tmp_path):
    _fake_study(tmp_path)
    assert sf.read_state(tmp_path) == {}
    sf.update_state(tmp_path, **{sf.GRADCAM_RUN: "bn-s0"})
    sf.update_state(tmp_path, **{sf.WALL_SECONDS: 12.0})  # a second writer keeps the first one's key
    assert sf.read_state(tmp_path) == {sf.GRADCAM_RUN: "bn-s0", sf.WALL_SECONDS: 12.0}
    path = sf.update_results(tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 4
    header = lines[0].split(",")
    assert "norm" in header and "batch_size" not in header and "epochs" not in header  # only what varies
    assert header[:4] == ["run", "cell", "groups", "seed"]
    df = normlab.load_study(tmp_path)
    assert list(df["run"]) == ["bn-s0", "bn-s1", "gn-s0", "gn-s1"]
    assert list(df["status"]) == ["finished", "finished", "finished", "failed"]
    assert df.loc[2, "test_acc"] == pytest.approx(0.72) and math.isnan(df.loc[3, "test_acc"])
    assert df.loc[0, "steady_seconds_per_epoch"] == pytest.approx(2.9)


def test_api_names_survive_the_subpackages_of_the_same_name():
    import normlab.study.runner as runner
    import normlab.train.loop as loop  # sets normlab.train to the subpackage, were it not guarded

    assert callable(normlab.train) and callable(normlab.study)
    assert normlab.train.loop is loop and normlab.study.runner is runner
    assert normlab.train.__doc__.startswith("Train one model")


def test_train_api_returns_the_summary_leaves_torch_state_and_logs_hparams(tmp_path):
    data = make_image_folder(tmp_path / "data", per_split={"train": 8, "val": 4})
    torch.set_num_threads(1)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    expect_torch, expect_py, expect_np = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    lines: list[str] = []
    summary = normlab.train(dataset="folder", data_root=str(data), image_size=16, n=1, epochs=2, batch_size=8,
                            threads=2, eval_batch_size=32, probe_size=8, out=str(tmp_path / "run"), seed=3,
                            log=lines.append)
    assert torch.get_num_threads() == 1  # the run used 2 threads and gave them back
    assert torch.equal(torch.rand(3), expect_torch) and random.random() == expect_py and np.random.rand() == expect_np
    assert summary["status"] == "finished" and summary["run_dir"] == str(tmp_path / "run")
    assert summary["test"] is None and 0.0 <= summary["val"]["acc"] <= 1.0
    assert summary["world"]["world_size"] == 1 and summary["timing"]["steady_epochs"] == 1
    assert lines[-1].startswith("done: finished") and "val acc" in lines[-1] and "test acc" not in lines[-1]
    events = b"".join(p.read_bytes() for p in (tmp_path / "run").glob("events.out.tfevents.*"))
    assert b"_hparams_/session_start_info" in events and b"hparam/val_acc" in events
    assert b"train/loss" in events  # the per-epoch scalars stay


def test_console_says_skipped_files_and_val_acc_even_with_progress_off(tmp_path, capsys):
    from normlab.cli import main

    data = make_image_folder(tmp_path / "data", per_split={"train": 8, "val": 4})  # no test/ split
    (data / "train" / "red" / "broken.png").write_bytes(b"not an image")
    code = main(["train", "--dataset", "folder", "--data-root", str(data), "--image-size", "16", "--n", "1",
                 "--epochs", "1", "--batch-size", "8", "--probe-size", "8", "--progress", "off",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0
    lines = err.strip().splitlines()
    assert any(line.startswith("skipped 1 unreadable image file; listed in ") and "summary.json (data.skipped)" in line
               for line in lines), err
    assert lines[-1].startswith("done: finished") and "val acc" in lines[-1] and "test acc" not in lines[-1]
    assert "epoch   1/1" not in err  # progress off: only the result lines


def test_world_of_a_torchrun_run(monkeypatch):
    from normlab.train.loop import world_of

    assert world_of()["world_size"] == 1 and world_of()["ranks"] == [0]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    w = world_of()
    assert w["world_size"] == 4 and w["ranks"] == [0, 1, 2, 3] and w["nodes"] == 2 and w["local_world_size"] == 2


def test_a_data_warning_is_one_clean_line():
    import warnings

    from normlab.data.loader import _warn

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn("class 'emu' has no folder in /data/val: its validation accuracy is undefined", notes)
    (w,) = caught
    assert issubclass(w.category, UserWarning) and notes == [str(w.message)]
    shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, None)
    assert shown.count("\n") == 1 and "class 'emu'" in shown  # no source line of normlab's code under it
