"""The lock of a run folder (and of a study folder): one writer at a time, a dead holder's lock taken over.

Owned by the run folder (``normlab.runfolder`` re-exports it): ``normlab train`` holds it on its run folder,
``normlab study`` on its study folder, and the study runner asks it whether a run is busy elsewhere."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from normlab.errors import FolderBusy, NormlabError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: pid check only
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """A lock file stopping two processes from writing one run folder; a stale lock (dead pid) is taken over."""

    HEARTBEAT_S, STALE_S = 30.0, 300.0

    def __init__(self, folder: Path, log=print, what: str = "run folder",
                 way_out: str = "wait for it to finish or stop it (or use another --out)") -> None:
        self.path = Path(folder) / ".lock"
        self.log = log
        self.what, self.way_out = what, way_out

    def __enter__(self) -> RunLock:
        """Take the lock: an OS lock (``flock``) on ``.lock`` makes two starters race safely and dies with its
        process; the "pid host" written inside names the holder, and a live holder also counts (other writers,
        and filesystems whose ``flock`` is local to each node, e.g. NFS mounted ``local_lock=all`` or Lustre
        ``localflock``). A pid of another host cannot be checked from here: that holder counts as alive while
        it refreshes the file's mtime (a heartbeat every ``HEARTBEAT_S``), and as gone ``STALE_S`` after."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        self._in_use(_read_pid(self.path))
                    try:
                        replaced = os.fstat(fd).st_ino != os.stat(self.path).st_ino
                    except FileNotFoundError:
                        replaced = True
                    if replaced:  # its holder released and removed it meanwhile: lock the new file
                        os.close(fd)
                        continue
                pid, host = _read_owner(self.path)
                if pid is not None and (pid, host) != (os.getpid(), _HOST):
                    if _holder_alive(self.path, pid, host):
                        self._in_use(pid, host)
                    self.log(f"taking over a stale lock in {self.path.parent} (process {_who(pid, host)} is gone)")
                elif pid is None and os.fstat(fd).st_size:
                    self.log(f"taking over a stale lock in {self.path.parent} (unreadable lock file)")
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {_HOST}".encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._remove_stale_temp_files()
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, daemon=True, name="normlab-lock-heartbeat").start()
            return self
        raise NormlabError(f"could not lock {self.path}: remove the file if no normlab process uses the folder")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _in_use(self, pid: int | None, host: str | None = None) -> None:
        who = f"process {pid} on {host or _HOST}" if pid is not None else "another process"
        raise FolderBusy(f"{self.what} {self.path.parent} is in use by {who}: {self.way_out}") from None

    def _remove_stale_temp_files(self) -> None:
        """Half-written ``.<name>.*.tmp`` files (see ``normlab.io.atomic_write``) left by a killed process: with
        the lock held no one else writes here, so they are garbage."""
        for tmp in self.path.parent.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    @staticmethod
    def check_free(folder: Path) -> None:
        """Raise if a live process other than this one holds the lock of ``folder`` (before touching it)."""
        path = Path(folder) / ".lock"
        pid, host = _read_owner(path)
        if pid is not None and (pid, host) != (os.getpid(), _HOST) and _holder_alive(path, pid, host):
            raise FolderBusy(f"run folder {folder} is in use by process {pid} on {host or _HOST}: wait for it to "
                             "finish or stop it (or use another --out)")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            if _read_owner(self.path) == (os.getpid(), _HOST):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # releases the flock


_HOST = socket.gethostname()


def _read_owner(path: Path) -> tuple[int | None, str | None]:
    """(pid, host) of the lock's holder; a file of older versions holds only a pid (this host's)."""
    try:
        parts = path.read_text().split()
        pid = int(parts[0])
    except (OSError, ValueError, IndexError):  # missing, empty (being written) or garbage
        return None, None
    return (pid, parts[1] if len(parts) > 1 else _HOST) if pid > 0 else (None, None)


def _who(pid: int, host: str | None) -> str:
    return f"{pid}" if host in (None, _HOST) else f"{pid} on {host}"


def _read_pid(path: Path) -> int | None:
    return _read_owner(path)[0]


def _holder_alive(path: Path, pid: int, host: str | None) -> bool:
    if host in (None, _HOST):
        return _alive(pid)
    try:  # another node: only its heartbeat can tell
        return time.time() - path.stat().st_mtime < RunLock.STALE_S
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
