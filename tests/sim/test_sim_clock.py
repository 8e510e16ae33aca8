"""ManualClock, SimClock and the shared anchor that lets a restarted agent continue time."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from creditmeter.simnvml import ManualClock, SimClock
from creditmeter.simnvml.anchor import AnchorFile


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(start_wall_s=1000.0)
    assert (clock.monotonic(), clock.wall(), clock.now_us()) == (0.0, 1000.0, 0)
    clock.advance(1.5)
    assert (clock.monotonic(), clock.wall()) == (1.5, 1001.5)
    event = threading.Event()
    assert clock.wait(event, 2.0) is False
    assert clock.monotonic() == 3.5  # wait advanced the clock
    event.set()
    assert clock.wait(event, 2.0) is True
    assert clock.monotonic() == 3.5  # a set event does not wait
    with pytest.raises(ValueError):
        clock.advance_us(-1)


def test_wall_jump_moves_wall_not_monotonic() -> None:
    clock = ManualClock(start_wall_s=1000.0)
    clock.advance(10)
    clock.jump_wall(-5)
    assert (clock.monotonic(), clock.wall()) == (10.0, 1005.0)
    assert clock.wall_us_at(9_999_999) == 1_009_999_999  # before the jump: unchanged
    assert clock.wall_us_at(10_000_000) == 1_005_000_000


def test_sim_clock_runs_at_its_speed() -> None:
    clock = SimClock(speed=1000.0, start_wall_s=500.0)
    time.sleep(0.02)
    elapsed = clock.monotonic()
    assert 20.0 <= elapsed < 60.0  # 20 ms real at ×1000, with slack for a busy machine
    assert clock.wall() == pytest.approx(500.0 + clock.monotonic(), abs=1.0)
    started = time.monotonic()
    assert clock.wait(threading.Event(), 10.0) is False  # 10 sim s = 10 ms real
    assert 0.009 <= time.monotonic() - started < 0.5


def test_shared_clock_continues_one_timeline(tmp_path: Path) -> None:
    anchor = tmp_path / "clock.json"
    first = SimClock.shared(anchor, speed=100.0, start_wall=2000.0)
    time.sleep(0.01)
    second = SimClock.shared(anchor, speed=100.0, start_wall=9999.0)  # the anchor wins
    assert second.start_wall_us == first.start_wall_us == 2_000_000_000
    a, b = first.monotonic(), second.monotonic()
    assert a >= 1.0 and abs(a - b) < 0.5
    assert json.loads(anchor.read_text())["speed"] == 100.0
    with pytest.raises(ValueError, match="speed"):
        SimClock.shared(anchor, speed=10.0)


def test_shared_clock_continues_in_another_process(tmp_path: Path) -> None:
    anchor = tmp_path / "clock.json"
    clock = SimClock.shared(anchor, speed=10.0, start_wall=2000.0)
    code = (
        "import sys; from creditmeter.simnvml import SimClock; "
        f"c = SimClock.shared({str(anchor)!r}, speed=10.0); print(c.monotonic(), c.wall())"
    )
    before = clock.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    after = clock.monotonic()
    child_monotonic, child_wall = map(float, out.stdout.split())
    assert before <= child_monotonic <= after
    assert child_wall == pytest.approx(2000.0 + child_monotonic, abs=1e-3)


def test_wall_jump_on_a_shared_clock_reaches_every_reader(tmp_path: Path) -> None:
    anchor = tmp_path / "clock.json"
    first = SimClock.shared(anchor, speed=1.0, start_wall=2000.0)
    second = SimClock.shared(anchor, speed=1.0)
    second.jump_wall(3600)
    assert first.wall() == pytest.approx(2000.0 + 3600 + first.monotonic(), abs=0.1)
    third = SimClock.shared(anchor, speed=1.0)  # a process started after the jump
    assert third.wall() == pytest.approx(first.wall(), abs=0.1)


def test_a_held_timeline_stands_at_zero_until_released(tmp_path: Path) -> None:
    anchor = AnchorFile(tmp_path / "clock.json")
    anchor.open_or_create(100.0, 2000.0, held=True)
    clock = SimClock.shared(anchor.path, speed=100.0)
    assert clock.held()
    assert (clock.now_us(), clock.wall()) == (0, 2000.0)
    assert clock.wait(threading.Event(), 0.0) is False  # no sim time asked for: no wait
    clock.jump_wall(5)  # made at t=0, the only time there is
    started = anchor.release()
    assert not clock.held() and started.wall_jumps == ((0, 5_000_000),)
    assert started.start_wall_us == 2_000_000_000  # what was stamped is not restamped
    now_us = clock.now_us()
    assert clock.wall_us_at(now_us) == 2_005_000_000 + now_us  # one reading, two clocks
    assert anchor.release() == started  # a running timeline is left as it is


class CountedEvent(threading.Event):
    """An event that counts the waits on it: how a test sees a waiter still waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def test_a_wait_on_a_held_timeline_lasts_until_the_release_then_its_length(
    tmp_path: Path,
) -> None:
    """A loop on sim deadlines (the agent's) neither spins nor runs ahead while held."""
    anchor = AnchorFile(tmp_path / "clock.json")
    anchor.open_or_create(1000.0, None, held=True)
    clock = SimClock.shared(anchor.path, speed=1000.0)
    event, returned = CountedEvent(), list[bool]()
    waiter = threading.Thread(target=lambda: returned.append(clock.wait(event, 2.0)))
    waiter.start()
    deadline = time.monotonic() + 10
    while event.waits < 5:  # a wait on a running clock would be one 2 ms wait
        assert time.monotonic() < deadline and not returned, returned
        time.sleep(0.001)
    assert not returned and clock.monotonic() == 0.0
    anchor.release()
    waiter.join(10)
    assert returned == [False]
    assert clock.monotonic() >= 2.0  # the whole wait ran on the released timeline


def test_a_set_event_ends_a_wait_on_a_held_timeline(tmp_path: Path) -> None:
    anchor = AnchorFile(tmp_path / "clock.json")
    anchor.open_or_create(1.0, None, held=True)
    clock = SimClock.shared(anchor.path, speed=1.0)
    event = threading.Event()
    threading.Timer(0.0, event.set).start()
    assert clock.wait(event, 3600.0) is True  # a SIGTERM ends a held agent's loop
    assert clock.held()
