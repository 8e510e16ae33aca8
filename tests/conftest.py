"""Fixtures every test gets."""

from __future__ import annotations

import logging
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from creditmeter.logs import remove_handler


@pytest.fixture(autouse=True)
def _no_log_handler_left_behind() -> Iterator[None]:
    """``setup_logging`` (a daemon's ``main``) binds its handler to the ``sys.stdout`` of
    the moment: under capsys, a stream closed with the test that made it. Left on the root
    logger, a later test's log line fails on it ("--- Logging error ---" on stderr: the
    trace replay tests after tests/ops/test_agent_daemon.py in one process)."""
    yield
    remove_handler(logging.getLogger())


class _WarnedIfLeftOpen(sqlite3.Connection):
    """Python 3.13's warning for a connection the garbage collector closes, on older
    Pythons too: the suite runs with -W error, so a connection a code path leaves open
    fails the test that happens to collect it, on every Python CI or a user runs."""

    def __del__(self) -> None:
        try:
            self.total_changes  # noqa: B018 - raises ProgrammingError once closed
        except sqlite3.ProgrammingError:
            return
        warnings.warn(f"unclosed database in {self!r}", ResourceWarning, stacklevel=1)


if sys.version_info < (3, 13):
    _connect = sqlite3.connect

    def _connect_warned(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", _WarnedIfLeftOpen)
        return _connect(*args, **kwargs)

    sqlite3.connect = _connect_warned  # type: ignore[assignment]
