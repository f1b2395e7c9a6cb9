"""The Python API as a user meets it: ``help(normlab.train)`` shows every setting as a keyword with its default,
errors name keywords (never command-line flags), and ``progress="off"`` prints nothing."""

from __future__ import annotations

import inspect
import pydoc

import pytest

import normlab
from normlab.config import TrainConfig
from normlab.errors import NormlabError

from conftest import make_image_folder


def test_help_shows_a_real_signature_and_every_setting():
    sig = inspect.signature(normlab.train)
    names = [f.name for f in __import__("dataclasses").fields(TrainConfig)]
    assert list(sig.parameters) == ["force", "resume", "log", *names]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sig.parameters.values())
    assert sig.parameters["norm"].default == "bn" and sig.parameters["epochs"].default == 10
    text = pydoc.render_doc(normlab.train, renderer=pydoc.plaintext)
    assert "_Entry" not in text and "**settings" not in text
    assert "norm: normalization layer (one of bn, in, bin, ln, gn, nn, torch_bn" in text
    assert "force: overwrite an output folder" in text


@pytest.mark.parametrize("text, expect", [
    ("output folder r already holds a run: continue it with `normlab train --resume r`, choose another --out, or "
     "pass --force to overwrite it",
     "output folder r already holds a run: continue it with `normlab.train(resume=r)`, choose another out=..., or "
     "pass force=True to overwrite it"),
    ("--resume: epochs=3 is less than the run's 5", "resume: epochs=3 is less than the run's 5"),
    ("use --device cpu (or auto)", "use device=cpu (or auto)"),
    ("pass the folder as --data-root", "pass the folder as data_root=..."),
])
def test_flags_in_messages_become_keywords(text, expect):
    assert normlab.keyword_message(text) == expect


def test_progress_off_prints_nothing_and_errors_name_keywords(tmp_path, capfd):
    data = make_image_folder(tmp_path / "data", per_split={"train": 8, "val": 4})
    settings = dict(dataset="folder", data_root=str(data), image_size=16, n=1, epochs=1, batch_size=8,
                    probe_size=8, eval_batch_size=32, out=str(tmp_path / "run"))
    capfd.readouterr()
    summary = normlab.train(progress="off", **settings)
    out, err = capfd.readouterr()
    assert summary["status"] == "finished" and out == "" and err == "", (out, err)
    with pytest.raises(NormlabError) as info:  # the folder holds a run now
        normlab.train(progress="off", **settings)
    message = str(info.value)
    assert "force=True" in message and f"normlab.train(resume={tmp_path / 'run'})" in message
    assert "--" not in message


def test_api_errors_keep_their_type_exit_code_and_cause():
    """Rewording flags as keywords must not turn a full disk or a busy folder into a plain error: callers catch
    DiskFull / FolderBusy, and the exit codes (74, 75) and the cause chain go with them."""
    from normlab import _keywords
    from normlab.errors import DiskFull, FolderBusy

    cause = OSError(28, "No space left on device")
    with pytest.raises(DiskFull) as info:
        with _keywords():
            raise DiskFull("/x/best.pt") from cause
    assert info.value.exit_code == 74 and info.value.path == "/x/best.pt" and info.value.__cause__ is cause
    assert "--resume" not in str(info.value) and "resume" in str(info.value)
    with pytest.raises(FolderBusy) as busy:
        with _keywords():
            raise FolderBusy("folder s is in use by process 1 on h: use another --out")
    assert busy.value.exit_code == 75 and "--out" not in str(busy.value) and "out=" in str(busy.value)
