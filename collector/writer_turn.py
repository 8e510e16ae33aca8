"""Writers of one SQLite file take turns on a lock file beside it, across processes.

SQLite's busy handler polls its write lock with sleeps that grow from 1 ms to 100 ms. Two
ingest workers (ingest_workers.py) each hold the lock for a few milliseconds a batch, so a
waiting worker slept well past the other's commit: both cores were idle a third of the
time and the rate swung between 40,000 and 150,000 records/s from run to run (measured).
A worker waiting here instead polls every 0.1 ms to 1 ms.

This only decides whose turn it is: SQLite's locking still guards the data, and a writer
that does not take turns here (the sqlite3 shell, an older collector) is waited for by
SQLite's own handler as before.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Final

from creditmeter.collector.errors import StoreBusy

log = logging.getLogger(__name__)

_FIRST_POLL_S: Final = 0.0001
_LONGEST_POLL_S: Final = 0.001


class WriterTurn:
    """A context manager: the body runs while this process holds the turn. Not reentrant;
    one per SQLiteStore, used under its thread lock."""

    def __init__(self, database: Path, timeout_s: float) -> None:
        self.path = database.with_name(database.name + "-turn")
        self._timeout_s = timeout_s
        self._fd = _open(self.path)

    def __enter__(self) -> None:
        if self._fd is None:
            return
        deadline = time.monotonic() + self._timeout_s
        pause_s = _FIRST_POLL_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusy(
                        f"another process kept its turn to write {self.path.parent} for "
                        f"{self._timeout_s} s"
                    ) from None
                time.sleep(pause_s)
                pause_s = min(pause_s * 2, _LONGEST_POLL_S)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open(path: Path) -> int | None:
    """The lock file, created if need be. flock() works on a read-only descriptor, so a file
    another user created (an administrator's CLI run as root) still serves; without one,
    writers fall back on SQLite's busy handler alone."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        pass
    except OSError as exc:
        log.warning("cannot create %s (%s): writers wait on SQLite's busy handler", path, exc)
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot open %s (%s): writers wait on SQLite's busy handler", path, exc)
        return None
