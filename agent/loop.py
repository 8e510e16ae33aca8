"""The agent's metering loop: poll on a monotonic deadline, close windows, write records."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from creditmeter.agent.gpu import Clock
from creditmeter.agent.records import Flusher
from creditmeter.agent.usage import WindowUsage
from creditmeter.v1 import usage_pb2

log = logging.getLogger(__name__)


class MeterLike(Protocol):
    def poll(self) -> list[WindowUsage]: ...

    def close_window(self) -> list[WindowUsage]: ...

    def state(self) -> bytes: ...

    def written_through_us(self) -> int: ...

    def read_through_us(self) -> dict[str, int]: ...

    def settle_now(self) -> None: ...

    def settled_through(self, read_us: dict[str, int]) -> bool: ...

    def retire(self) -> list[WindowUsage]: ...


DraftBuilder = Callable[[Sequence[WindowUsage]], list[usage_pb2.UsageRecord]]


@dataclass(frozen=True, slots=True)
class Retired:
    """How a retiring agent's last metering ended."""

    evidence_complete: bool  # every GPU's evidence of the time read at the start came in
    written: bool  # the last records and the state are in the outbox (else: nothing moved)


@dataclass(slots=True)
class LoopStats:
    cycles: int = 0
    last_cycle_s: float = 0.0  # perf_counter seconds the latest cycle took
    windows_closed: int = 0


class MeterLoop:
    """Polls every ``poll_interval_s`` and closes windows every ``window_s`` (clock seconds).

    Deadlines advance on the monotonic clock and skip, rather than bunch up, after a stall;
    the wall clock only labels records, so stepping it never shortens or stretches a window.
    """

    def __init__(
        self,
        meter: MeterLike,
        flusher: Flusher,
        drafts: DraftBuilder,
        clock: Clock,
        *,
        poll_interval_s: float = 1.0,
        window_s: float = 10.0,
        heartbeat: Callable[[], None] = lambda: None,
        observe_cycle: Callable[[float], None] = lambda seconds: None,
        on_written: Callable[[int], None] = lambda through_us: None,
    ) -> None:
        self._meter = meter
        self._flusher = flusher
        self._drafts = drafts
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._window_s = window_s
        self._heartbeat = heartbeat
        self._observe_cycle = observe_cycle
        self._on_written = on_written
        self.stats = LoopStats()

    def run(self, stop: threading.Event, ready: Callable[[], None] = lambda: None) -> None:
        """Meter until ``stop`` is set, then close every window and write it. ``ready`` is
        called once where metering starts is durable, before the first poll."""
        # Where metering starts is made durable before the first poll, and before the agent
        # says it is ready. An agent killed before its first window close would otherwise
        # leave no state, and its restart would be a first start: metering from the
        # driver's newest period, with the busy time since this start billed to nobody and
        # reported nowhere (the SIGKILL e2e test kills it as soon as it says it is ready).
        self._write([])
        ready()
        next_poll = self._clock.monotonic()
        next_close = next_poll + self._window_s
        while not self._clock.wait(stop, next_poll - self._clock.monotonic()):
            self.cycle(close=self._clock.monotonic() >= next_close)
            now = self._clock.monotonic()
            next_poll = _advance(next_poll, self._poll_interval_s, now)
            if now >= next_close:
                next_close = _advance(next_close, self._window_s, now)
            self._heartbeat()
        self.cycle(close=True)  # SIGTERM: the open windows go to the outbox before exit

    def retire(self, deadline: float) -> Retired:
        """Meter until every GPU's evidence covers the time read at the first poll (each
        process's late samples in), or until ``deadline`` (clock monotonic seconds), then
        settle everything read and write it: the last records of a host leaving service."""
        self._write([])
        self.cycle(close=False)
        read_us = self._meter.read_through_us()
        never = threading.Event()
        next_poll = self._clock.monotonic()
        while True:
            self._meter.settle_now()
            complete = self._meter.settled_through(read_us)
            now = self._clock.monotonic()
            if complete or now >= deadline:
                break
            next_poll = _advance(next_poll, self._poll_interval_s, now)
            self._clock.wait(never, min(next_poll, deadline) - now)
            self.cycle(close=False)
        written = self._write(self._meter.retire())
        if written:
            self._on_written(self._meter.written_through_us())
        return Retired(complete, written)

    def cycle(self, *, close: bool) -> None:
        started = time.perf_counter()
        finals = self._meter.poll()
        if finals:
            self._write(finals)
        if close:
            if self._write(self._meter.close_window()):
                # Everything up to the committed cursors is durable: job spans before it
                # will never be needed again, even by a meter replaying after a crash.
                self._on_written(self._meter.written_through_us())
            self.stats.windows_closed += 1
        self.stats.cycles += 1
        self.stats.last_cycle_s = time.perf_counter() - started
        self._observe_cycle(self.stats.last_cycle_s)

    def _write(self, usages: list[WindowUsage]) -> bool:
        drafts = self._drafts(usages)
        return self._flusher.write(drafts, self._meter.state(), self._clock.monotonic())


def _advance(deadline: float, interval: float, now: float) -> float:
    """The next deadline after ``now`` on the grid of ``interval`` from ``deadline``."""
    deadline += interval
    if deadline <= now:
        skipped = int((now - deadline) // interval) + 1
        deadline += skipped * interval
    return deadline
