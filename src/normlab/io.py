"""normlab's files: the cache root, and crash-safe writes (a kill at any instant leaves the old file or
the new one, never a torn one)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any



def cache_dir() -> Path:
    """``$NORMLAB_CACHE`` or ``~/.cache/normlab``: decoded data sets, unpacked archives, built kernels."""
    env = os.environ.get("NORMLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "normlab"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # os.umask can only be read by setting it; the set-and-restore pair is not thread-safe, so it is done
    # once per process (the umask of a training process does not change while it runs)
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync it, then rename over ``path``.

    The file gets the mode ``open()`` would give it (0o666 less the umask): mkstemp creates 0o600, which
    would hide every result file from the rest of a group sharing a study folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    import torch  # here only: the rest of this module (and the command line that reads JSON with it) needs no torch

    atomic_write(path, lambda f: torch.save(obj, f))
