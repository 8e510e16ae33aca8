"""The create-time check the meter runs for every listed process at every poll."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from creditmeter.agent.errors import ProcessGone
from creditmeter.agent.procfs import ProcFs, PsutilProcessTable


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_create_time_from_stat_equals_psutils(child: subprocess.Popen[bytes]) -> None:
    assert ProcFs().create_time_s(child.pid) == psutil.Process(child.pid).create_time()


def test_a_live_process_is_answered_without_reading_proc_again(
    child: subprocess.Popen[bytes],
) -> None:
    table = PsutilProcessTable()
    reads: list[int] = []
    procfs = ProcFs()

    def counting(pid: int) -> float:
        reads.append(pid)
        return procfs.create_time_s(pid)

    table._procfs.create_time_s = counting  # type: ignore[method-assign]
    first = table.create_time(child.pid)
    assert [table.create_time(child.pid) for _ in range(5)] == [first] * 5
    assert reads == [child.pid]  # the pidfd said "still running" five times


def test_an_exited_process_is_noticed_even_if_its_pid_were_reused(
    child: subprocess.Popen[bytes],
) -> None:
    table = PsutilProcessTable()
    table.create_time(child.pid)
    child.kill()
    child.wait()
    # Its pidfd is now readable: the cached time is dropped and /proc is read afresh, which
    # for a reused pid would give the new holder's create time.
    with pytest.raises(ProcessGone):
        table.create_time(child.pid)
