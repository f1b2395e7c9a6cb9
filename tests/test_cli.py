"""The command line: flags generated from TrainConfig (types, choices, help), booleans, --version,
completion, did-you-mean, study files, safe changes on --resume, one-line warnings."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from normlab import __version__, cli
from normlab.config import RESUME_SAFE, TrainConfig, make_config, read_yaml
from normlab.registry import MODELS, NORMS, OPTIMIZERS, SCHEDULES
from normlab.study.plan import preset_names

from conftest import make_image_folder

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("normlab: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _help(command: str, capsys) -> str:
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    return " ".join(out.split())  # unwrap argparse's line breaks


@pytest.mark.parametrize("command", ["train", "study"])
def test_every_setting_has_a_flag_with_help_and_registry_choices(command, capsys):
    text = _help(command, capsys)
    for f in fields(TrainConfig):
        if command == "study" and f.name == "out":
            continue  # the study's --out is the study folder
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in text, flag
        assert f.metadata["help"].split()[0] in text, f.name
    # choices come from the registries, not from a copy
    for registry in (NORMS, OPTIMIZERS, SCHEDULES, MODELS):
        assert "{" + ",".join(registry) + "}" in text
    assert "--nesterov [true|false], --no-nesterov" in text and "V " not in text


def test_out_default_in_help_is_the_real_run_name(capsys):
    text = _help("train", capsys)
    assert f"runs/{TrainConfig().run_name()}" in text


def test_type_errors_are_one_line_naming_setting_and_type(capsys):
    code, _, err = run(["train", "--lr", "abc"], capsys)
    one_line_error(code, err, "--lr", "a number", "'abc'")
    code, _, err = run(["train", "--epochs", "2.5"], capsys)
    one_line_error(code, err, "--epochs", "whole number")
    code, _, err = run(["study", "--nesterov", "maybe"], capsys)
    one_line_error(code, err, "--nesterov", "true or false")


def test_did_you_mean_looks_at_the_command_given(capsys):
    code, _, err = run(["train", "--norm", "gm"], capsys)
    one_line_error(code, err, "did you mean 'gn'?")
    code, _, err = run(["study", "--nrom", "bn"], capsys)
    one_line_error(code, err, "did you mean --norm?", "normlab study --help")
    # a flag of another command: no hint that names the flag itself
    code, _, err = run(["report", "x", "--classes", "a"], capsys)
    assert "did you mean --classes" not in one_line_error(code, err, "unrecognized arguments")
    code, _, err = run(["trian"], capsys)
    one_line_error(code, err, "did you mean 'train'?")


def test_boolean_flags(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.update(cli.config_overrides(args)) or 0)
    parser = cli.build_parser()
    for argv, want in ((["--nesterov"], True), (["--no-nesterov"], False), (["--nesterov", "false"], False),
                       (["--nesterov", "yes"], True)):
        seen.clear()
        args = parser.parse_args(["train", *argv])
        args.func(args)
        assert seen == {"nesterov": want}, argv
    args = parser.parse_args(["train", "--sync-bn", "false", "--depth", "2"])  # README and torchrun spellings
    assert (args.sync_bn, args.n) == (False, 2)


def test_version_without_building_the_parser(capsys, monkeypatch):
    monkeypatch.setattr(cli, "build_parser", lambda: pytest.fail("--version must not need torch"))
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"normlab {__version__}"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script(shell, capsys):
    code, out, _ = run(["completion", shell], capsys)
    assert code == 0
    assert "normlab" in out and "--norm" in out and "torch_bn" in out and "--no-nesterov" in out
    if shell == "bash":
        assert "complete " in out


def test_unknown_preset_lists_the_presets(capsys):
    assert {"quick", "cifar10-paper", "birds"} <= set(preset_names())
    code, _, err = run(["study", "--preset", "quik", "--plan-only"], capsys)
    one_line_error(code, err, "did you mean 'quick'?", *preset_names())


def test_study_config_file_is_a_study_file(tmp_path, capsys):
    spec = tmp_path / "my.yaml"
    spec.write_text("study:\n  name: mine\n  norms: [bn, gn]\n  batch_norms: []\n  augment_modes: []\n"
                    "train:\n  dataset: folder\n  epochs: 1\n")
    out = tmp_path / "study"
    code, _, err = run(["study", "--config", str(spec), "--out", str(out), "--plan-only",
                        "--data-root", str(tmp_path)], capsys)
    assert code == 0, err
    plan = read_yaml(out / "study.yaml")
    assert plan["study"]["name"] == "mine" and plan["study"]["norms"] == ["bn", "gn"]
    code, _, err = run(["study", "--config", str(spec), "--preset", "quick"], capsys)
    one_line_error(code, err, "not allowed with")


# ------------------------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A 1-epoch run whose summary is removed: as if it had been killed after its last checkpoint."""
    base = tmp_path_factory.mktemp("resume")
    data = make_image_folder(base / "data", per_split={"train": 12, "val": 4, "test": 4}, size=8)
    run_dir = base / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-root", str(data), "--image-size", "8", "--n", "1",
                     "--epochs", "1", "--batch-size", "12", "--threads", "1", "--eval-batch-size", "16",
                     "--probe-size", "4", "--progress", "off", "--out", str(run_dir)]) == 0
    return run_dir


def test_resume_refuses_unsafe_changes_with_one_line(interrupted_run, capsys):
    (interrupted_run / "summary.json").unlink(missing_ok=True)
    code, _, err = run(["train", "--resume", str(interrupted_run), "--lr", "0.5"], capsys)
    one_line_error(code, err, "lr cannot change", "start a new run")
    code, _, err = run(["train", "--resume", str(interrupted_run), "--epochs", "0"], capsys)
    one_line_error(code, err, "epochs")
    code, _, err = run(["train", "--resume", str(interrupted_run), "--lr", "0.1", "--progress", "off"], capsys)
    assert code == 0, err  # an unchanged value is no change


def test_resume_with_more_epochs_continues(interrupted_run, capsys):
    (interrupted_run / "summary.json").unlink(missing_ok=True)
    code, _, err = run(["train", "--resume", str(interrupted_run), "--epochs", "2", "--patience", "5",
                        "--progress", "off"], capsys)
    assert code == 0, err
    with open(interrupted_run / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    saved = make_config(read_yaml(interrupted_run / "config.yaml"))
    assert (saved.epochs, saved.patience) == (2, 5)
    code, _, err = run(["train", "--resume", str(interrupted_run), "--epochs", "3"], capsys)
    one_line_error(code, err, "finished")
    assert set(RESUME_SAFE) >= {"epochs", "patience", "progress", "threads"}


def test_warnings_print_as_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", per_split={"train": 6, "val": 2, "test": 2}, size=8)
    for name in ("blue",):
        for f in (data / "val" / name).iterdir():
            f.unlink()
        (data / "val" / name).rmdir()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "normlab", "train", "--dataset", "folder", "--data-root", str(data),
                          "--image-size", "8", "--n", "1", "--epochs", "1", "--batch-size", "6", "--threads", "1",
                          "--probe-size", "2", "--progress", "off", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "blue" in ln]
    assert lines and all(ln.startswith("normlab: warning: ") for ln in lines), res.stderr
    assert "UserWarning" not in res.stderr and "warnings.warn" not in res.stderr


@pytest.mark.parametrize("argv", [["completion", "bash"], ["study", "--help"]])
def test_a_reader_that_stops_reading_is_no_error(argv):
    """`normlab completion bash | head` ended in a BrokenPipeError traceback, exit 1: the reader going away is
    the pipe's normal end (exit 141, as a shell tool killed by SIGPIPE), with nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "normlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})
    proc.stdout.close()  # before the command writes anything: its first flush meets a closed pipe
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    # argparse's help drops a failed write itself (0); anything else sees it and ends as SIGPIPE would (141)
    assert code == (0 if "--help" in argv else cli.SIGPIPE_EXIT) and err == "", (code, err)


def test_study_help_states_the_value_each_option_will_have(capsys):
    """`study --help` showed TrainConfig's defaults (epochs 10, lr 0.1, n 3) where the preset plans 5, 0.05, 1,
    and 13 options stated no default at all."""
    import argparse

    text = _help("study", capsys)
    assert "--epochs N maximum number of epochs [default: 5 (preset quick)]" in text
    assert "--lr X peak learning rate [default: 0.05 (preset quick)]" in text
    assert "[default: 1 (preset quick)]" in text and "[default: 10]" not in text
    assert "batch-size cells: 5 (preset quick) (batch_max_epochs), unless --epochs is given" in text
    parser = cli.build_parser(["study", "--preset", "cifar10-paper", "--help"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["study"]
    for action in sub._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings
    epochs = next(a for a in sub._actions if a.dest == "epochs")
    assert "[default: 100 (preset cifar10-paper)]" in epochs.help
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in train._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings


@pytest.mark.parametrize("argv", [["--help"], ["study", "--help"], ["train", "--help"], ["completion", "bash"]])
def test_the_command_line_is_built_without_torch(argv):
    """Building the parser imported torch and torchvision (5-12 s for `normlab --help` or `completion`): the
    choices are the registries' names, and torch is imported only by the commands that compute."""
    code = ("import sys\n"
            "from normlab import cli\n"
            "code = cli.main(sys.argv[1:])\n"
            "heavy = [m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules]\n"
            "sys.stderr.write(f'heavy={heavy}'); sys.exit(code)")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert res.returncode == 0 and "heavy=[]" in res.stderr, res.stderr[-2000:]
