"""A report pauses Python's cyclic garbage collector while it builds its rows, and always
turns it back on as it found it: also when the store fails, and when reports overlap."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from creditmeter.collector.ledger_store import Dimension, UsageGroup
from creditmeter.collector.prices import PriceBook
from creditmeter.collector.report import DEFAULT_GROUP_BY, Period, build_report

DEADLINE_S = 30.0
GROUP = UsageGroup("acme", "sdxl", None, None, None, 7_500_000, 0, 1)


class _WatchingStore:
    """Grouped rollups, noting whether the collector ran while the report read them; then
    ``during`` (a test's hook: wait, raise)."""

    def __init__(self, during: Callable[[], None] = lambda: None) -> None:
        self.collector_on: list[bool] = []
        self._during = during

    def grouped_usage(
        self,
        from_us: int | None,
        to_us: int | None,
        dimensions: frozenset[Dimension],
        account: str | None = None,
    ) -> list[UsageGroup]:
        self.collector_on.append(gc.isenabled())
        self._during()
        return [GROUP]


@pytest.fixture
def collector_on() -> Iterator[None]:
    """The collector on, as a process starts, and on again after the test whatever it did."""
    gc.enable()
    yield
    gc.enable()


def _report(store: Any, prices: PriceBook) -> list[int]:
    return [
        row.credits_micro for row in build_report(store, Period(), DEFAULT_GROUP_BY, prices).rows
    ]


def test_paused_while_reading_and_on_again_after(collector_on: None, prices: PriceBook) -> None:
    store = _WatchingStore()
    assert _report(store, prices) == [7_500_000]
    assert store.collector_on == [False]
    assert gc.isenabled()


def test_left_off_when_it_was_off(collector_on: None, prices: PriceBook) -> None:
    gc.disable()
    _report(_WatchingStore(), prices)
    assert not gc.isenabled()


def test_on_again_when_the_store_fails(collector_on: None, prices: PriceBook) -> None:
    def fail() -> None:
        raise OSError("disk I/O error")

    with pytest.raises(OSError, match="disk I/O error"):
        _report(_WatchingStore(fail), prices)
    assert gc.isenabled()


def test_overlapping_reports_turn_it_on_when_the_last_ends(
    collector_on: None, prices: PriceBook
) -> None:
    """The first report to start ends first: the second is still building, so the collector
    stays paused until it ends too."""
    second_reading = threading.Event()
    first_done = threading.Event()
    failures: list[BaseException] = []

    def hold_second() -> None:
        second_reading.set()
        if not first_done.wait(DEADLINE_S):
            raise TimeoutError("the first report never ended")

    def second() -> None:
        try:
            _report(_WatchingStore(hold_second), prices)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def start_second() -> None:
        thread.start()
        assert second_reading.wait(DEADLINE_S), "the second report never read"

    thread = threading.Thread(target=second)
    first = _WatchingStore(start_second)
    _report(first, prices)
    paused_between = not gc.isenabled()
    first_done.set()
    thread.join(DEADLINE_S)
    assert not thread.is_alive() and not failures
    assert first.collector_on == [False]
    assert paused_between, "the first report's end turned the collector on under the second"
    assert gc.isenabled()
