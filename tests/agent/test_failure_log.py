"""What the log says while the collector cannot be reached: a line when trouble starts or
changes, a summary a minute, a line when it ends; every try at DEBUG."""

from __future__ import annotations

import logging

import pytest

from creditmeter.agent.failure_log import FailureLog


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    taken = [(r.levelname, r.getMessage()) for r in caplog.records]
    caplog.clear()
    return taken


def test_one_line_per_change_a_summary_a_minute_and_one_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    failures = FailureLog(logging.getLogger("test.failures"), clock)
    for attempt in range(1, 31):  # a try every 2 s for a minute
        failures.failed(
            logging.WARNING, "refused", f"failed: refused; retrying in 2.0 s ({attempt})"
        )
        clock.now_s += 2.0
    said = lines(caplog)
    assert said[0] == ("WARNING", "failed: refused; retrying in 2.0 s (1)")
    assert [level for level, _ in said[1:]] == ["DEBUG"] * 29  # each try, at debug only
    failures.failed(logging.WARNING, "refused", "failed: refused; retrying in 2.0 s (31)")
    assert lines(caplog) == [
        (
            "WARNING",
            "failed: refused; retrying in 2.0 s (31) (30 failed tries in the last 60 s, 31 "
            "since 60 s ago)",
        )
    ]
    failures.failed(logging.ERROR, "unauthenticated", "cannot deliver: not enrolled")
    assert lines(caplog) == [("ERROR", "cannot deliver: not enrolled")]  # another trouble
    clock.now_s += 5.0
    failures.recovered()
    assert lines(caplog) == [
        ("INFO", "stream to the collector open again after 32 failed tries over 65 s")
    ]
    failures.recovered()  # a resume without trouble before it says nothing
    failures.failed(logging.WARNING, "refused", "failed: refused")
    assert lines(caplog) == [("WARNING", "failed: refused")]  # the same trouble, anew
