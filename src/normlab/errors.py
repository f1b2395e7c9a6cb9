"""One exception type for everything a user can get wrong.

The CLI turns a `NormlabError` into a single line on stderr (no traceback); the message must name the
problem and the fix. Two kinds carry their own exit code, so that a study can tell them from a failed run
when its ``normlab train`` child ends: a full disk (``DiskFull``: stop starting runs) and a folder held by
another live process (``FolderBusy``: the run goes on elsewhere, it did not fail).
"""

from __future__ import annotations

import errno
import os

EXIT_ERROR = 2  # bad input or configuration
EXIT_DISK_FULL = 74  # sysexits' EX_IOERR: no space left where the results go; free space and rerun
EXIT_BUSY = 75  # sysexits' EX_TEMPFAIL: another live process holds the folder; try again when it is done


class NormlabError(ValueError):
    """Bad input or configuration: the message names the setting/file and how to fix it."""

    exit_code = EXIT_ERROR


class DiskFull(NormlabError):
    """No space left on the device that holds ``path``; what was written before is intact (atomic writes)."""

    exit_code = EXIT_DISK_FULL

    RESUME = "free space and rerun with --resume"

    def __init__(self, path: str | os.PathLike | None, advice: str = RESUME) -> None:
        self.path, self.advice = path, advice
        super().__init__(f"disk full at {path if path is not None else 'the output folder'}: {advice}")


class FolderBusy(NormlabError):
    """A run or study folder is held by another live process (its lock)."""

    exit_code = EXIT_BUSY


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` with errno ENOSPC (or EDQUOT, a full quota) anywhere in ``exc``'s chain of causes and
    contexts, or None. torch reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc...]``
    whose cause is the OSError; Python's own writes raise the OSError itself."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), exc.path)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
