"""normlab's files: the cache root, and crash-safe writes (a kill at any instant leaves the old file or
the new one, never a torn one).

A write that runs out of space raises ``errors.DiskFull`` naming the file (the old file stays). The temp
files of writes whose process was killed are removed the next time this process writes into their folder
(only names of this writer's pattern, only when their writer is gone). JSON is strict: NaN and infinities are
written as ``null`` (the file's own fields say why a value is missing, e.g. a summary's ``status``)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from normlab.errors import DiskFull, disk_full_cause


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


_HOST_TAG = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:16] or "host"
# .<name>.<pid>@<host>.<mkstemp's 8 characters>.tmp; older versions wrote .<name>.<8 characters>.tmp
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]{1,16})\.)?[a-z0-9_]{8}\.tmp$")
STALE_TEMP_S = 3600.0  # a temp file of another host (or of an older version) untouched this long is garbage
_swept: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def stale_temp_files(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Temp files of ``atomic_write`` in ``folder`` whose writer is gone: a dead pid of this host, or (another
    host's, or an older version's without a pid) untouched for ``STALE_TEMP_S``. Nothing else is listed."""
    now = time.time() if now is None else now
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        m = _TEMP.match(e.name)
        if m is None or not e.is_file(follow_symlinks=False):
            continue
        if m["pid"] is not None and m["host"] == _HOST_TAG:
            if int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                out.append(Path(e.path))
            continue
        try:
            if now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                out.append(Path(e.path))
        except OSError:
            pass
    return out


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove what ``stale_temp_files`` lists (a kill at the wrong instant leaves one behind); return it."""
    removed = []
    for tmp in stale_temp_files(folder):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync it, then rename over ``path``.

    The file gets the mode ``open()`` would give it (0o666 less the umask): mkstemp creates 0o600, which
    would hide every result file from the rest of a group sharing a study folder. The first write of this
    process into a folder removes the stale temp files of killed writers there. A full disk raises
    ``DiskFull`` naming ``path``, whatever layer noticed it (torch wraps the OSError in a RuntimeError)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if str(path.parent) not in _swept:
            _swept.add(str(path.parent))
            remove_stale_temp_files(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST_TAG}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not isinstance(exc, DiskFull) and disk_full_cause(exc) is not None:
            raise DiskFull(path) from exc
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def strict(data: Any) -> Any:
    """``data`` with every NaN or infinity (floats, numpy and 0-d tensor numbers) replaced by None."""
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    return data


def _number(value: Any) -> float | None:
    number = float(value)  # numpy scalars, 0-d tensors
    return number if math.isfinite(number) else None


def json_text(data: Any) -> str:
    """Strict JSON (RFC 8259: no NaN/Infinity tokens, which strict readers reject): non-finite numbers are null."""
    return json.dumps(strict(data), indent=2, default=_number, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json_text(data))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
