"""``normlab evaluate RUN`` (a run's weights scored on its own or another data set of the same classes, files
like training writes, never retraining) and ``normlab.load_run(RUN)`` (the model with its weights in one call)."""

from __future__ import annotations

import json

import pytest
import torch

import normlab
from normlab import cli, runfolder
from normlab.analysis.galleries import predictions
from normlab.config import make_config
from normlab.data import load_data
from normlab.errors import NormlabError

from conftest import CIFAR_TARBALL, make_image_folder, require


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("eval") / "run"
    normlab.train(dataset="folder", data_root=str(image_folder), n=1, epochs=2, batch_size=16, lr=0.05,
                  out=str(out), progress="off")
    return out


def run(argv, capsys):
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_evaluate_on_its_own_data_reproduces_the_summary(trained, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir() if p.is_file()}
    code, out, err = run(["evaluate", str(trained)], capsys)
    assert code == 0, err
    record = json.loads((trained / "eval" / "folder-test.json").read_text())
    summary = runfolder.read_summary(trained)
    for key in ("acc", "micro_f1", "macro_f1", "confusion"):
        assert record[key] == summary["test"][key], key
    assert record["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)
    assert record["weights"] == "best.pt" and record["normalization"] == "run" and record["images"] == 24
    assert (trained / "eval" / "folder-test.png").stat().st_size > 1000
    assert str(trained / "eval" / "folder-test.json") in out
    # nothing of the run itself changed: no retraining, no rewritten summary or checkpoint
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir() if p.is_file()} == before


def test_evaluate_on_another_data_set_of_the_same_classes(trained, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", per_split={"train": 3, "val": 3, "test": 5}, seed=7)
    code, _, err = run(["evaluate", str(trained), "--data-root", str(other), "--split", "val", "--out",
                        str(tmp_path / "ev"), "--weights", "last"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "ev" / "folder-other-val.json").read_text())
    assert record["images"] == 9 and record["weights"] == "last.pt" and record["data_root"] == str(other)
    assert sum(map(sum, record["confusion"])) == 9 and 0 <= record["acc"] <= 1
    assert record["classes"] == ["blue", "green", "red"] and (tmp_path / "ev" / "folder-other-val.png").is_file()


def test_evaluate_errors_are_one_line(trained, tmp_path, capsys):
    wrong = make_image_folder(tmp_path / "wrong", classes=("cat", "dog", "eel"), per_split={"train": 2, "val": 2})
    one_line(*run(["evaluate", str(trained), "--data-root", str(wrong), "--split", "val"], capsys)[::2],
             "class mismatch", "3 classes (blue, green, red)", "(cat, dog, eel)")
    one_line(*run(["evaluate", str(trained), "--data-root", str(tmp_path / "nowhere")], capsys)[::2],
             "data root", "does not exist")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    one_line(*run(["evaluate", str(empty)], capsys)[::2], "has no best.pt (no trained weights)")
    one_line(*run(["evaluate", str(tmp_path / "no-run")], capsys)[::2], "run folder", "does not exist")
    no_test = make_image_folder(tmp_path / "no-test", per_split={"train": 2, "val": 2})
    one_line(*run(["evaluate", str(trained), "--data-root", str(no_test)], capsys)[::2], "no test split")


def test_load_run_reproduces_the_summary_test_accuracy(trained):
    loaded = normlab.load_run(trained)
    summary = runfolder.read_summary(trained)
    assert loaded.summary == summary and loaded.config.norm == "bn" and not loaded.model.training
    assert loaded.classes == summary["classes"] and loaded.epoch == summary["best_epoch"]
    data = load_data(make_config(loaded.config.to_dict()), max_eval=loaded.config.eval_subset)
    _, y, preds, _ = predictions(loaded.model, data, "test")
    assert (preds == y).float().mean().item() == pytest.approx(summary["test"]["acc"])
    model, config = normlab.load_run(trained, which="last")
    assert config.epochs == 2 and isinstance(model, torch.nn.Module)
    with pytest.raises(NormlabError, match="which='final'"):
        normlab.load_run(trained, which="final")


def test_load_run_of_a_checkpoint_without_the_data_record(trained, tmp_path):
    """Checkpoints written before they recorded classes and normalization still load (classes from the summary)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    ckpt = torch.load(old / "best.pt", weights_only=True)
    del ckpt["data"]
    torch.save(ckpt, old / "best.pt")
    loaded = normlab.load_run(old)
    assert loaded.classes == ["blue", "green", "red"] and loaded.mean is None


@pytest.mark.slow
def test_evaluate_a_cifar_run_on_the_jpg_tarball(tmp_path, capsys):
    require(CIFAR_TARBALL, "CIFAR-10 jpg tarball")
    out = tmp_path / "c"
    normlab.train(dataset="cifar10", data_root=str(CIFAR_TARBALL), n=1, epochs=1, train_subset=500, eval_subset=200,
                  out=str(out), progress="off")
    code, _, err = run(["evaluate", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "eval" / "cifar10-test.json").read_text())
    assert record["acc"] == runfolder.read_summary(out)["test"]["acc"] and record["images"] == 200
