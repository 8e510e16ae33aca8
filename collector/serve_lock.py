"""One ``serve`` per SQLite file: the README says "SQLite is one file and one collector", and
two servers on one file would take each other's write turns and each believe it holds every
agent's chain head. The first takes an exclusive lock on ``<db>.serve`` for its lifetime (the
kernel drops it when the process dies, however it dies) and writes its PID there; a second
refuses to start, naming that PID. Commands (report, enroll, audit) take no such lock: they
may run beside the server. PostgreSQL needs none: several collectors share it by design.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from creditmeter.collector.errors import CollectorError
from creditmeter.files import create_private


class StoreInUse(CollectorError):
    """Another collector process serves this SQLite database (SQLite is one file and one
    collector; use PostgreSQL for several)."""


def hold_serve_lock(db_path: Path) -> int:
    """Takes the lock (for as long as the returned descriptor stays open: the process's
    life). Raises StoreInUse naming the holder's PID, or OSError."""
    lock = db_path.with_name(db_path.name + ".serve")
    create_private(lock)
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(
            f"another collector (pid {holder}) serves {db_path}: SQLite is one file and one "
            "collector (use PostgreSQL for several)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
