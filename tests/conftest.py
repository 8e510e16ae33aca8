"""Fixtures every test gets."""

from __future__ import annotations

import logging
from collections.abc import Iterator

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
