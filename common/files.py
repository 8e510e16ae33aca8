"""Files only their owner may read: databases of records, jobs and the ledger.

sqlite3.connect creates a missing database with the process's umask (0644 under the usual
022): every local user could then read usage records and accounts. SQLite gives its -wal
and -shm files the database file's own permissions, so creating that file first, mode 0600
whatever the umask, keeps all three private.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

PRIVATE_MODE = 0o600


def create_private(path: Path, mode: int = PRIVATE_MODE) -> bool:
    """Creates ``path`` empty with exactly ``mode`` unless it exists; True if it created
    it. Raises OSError (FileNotFoundError when its directory is missing)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; exactly ``mode`` regardless
    finally:
        os.close(fd)
    return True


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a reader that went away


def exit_quietly_on_broken_pipe(main: Callable[[], int]) -> NoReturn:
    """Runs a command's ``main`` and exits with its status. Output piped into a reader
    that stops early (``creditmeter-collector report | head``) ends the command as a
    SIGPIPE would, without a traceback (the Python docs' recipe: stdout is pointed at
    /dev/null so that the interpreter's final flush cannot fail again)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(code)
