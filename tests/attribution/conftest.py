"""Fixtures of the attribution tests: a real registry file, a real server on a real socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from creditmeter.agent.jobapi import JobServer, TimePolicy, create_server
from creditmeter.agent.jobs import JobRegistry, Owner

SAMPLES = Path(__file__).resolve().parent / "samples"
T0_US = 1_700_000_000_000_000  # µs since the epoch


class FakeClock:
    """A wall clock the test sets; the job API only reads wall time."""

    def __init__(self, wall_s: float) -> None:
        self.wall_s = wall_s

    def monotonic(self) -> float:
        return self.wall_s

    def wall(self) -> float:
        return self.wall_s

    def boottime(self) -> float:
        return self.wall_s

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.is_set()


def this_process() -> Owner:
    """This test process as the meter keys it, computed here independently of the agent."""
    return Owner(psutil.Process().pid, round(psutil.Process().create_time() * 1_000_000))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[JobRegistry]:
    reg = JobRegistry(tmp_path / "jobs.db", max_open_per_process=4, max_open_total=8)
    yield reg
    reg.close()


@pytest.fixture
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # mktemp keeps the path short: a Unix socket path must fit in 107 bytes.
    return tmp_path_factory.mktemp("s")


@pytest.fixture
def server(registry: JobRegistry, socket_dir: Path) -> Iterator[JobServer]:
    srv = create_server(socket_dir / "jobs.sock", registry, policy=TimePolicy())
    yield srv
    srv.stop(None)
