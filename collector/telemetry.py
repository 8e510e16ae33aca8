"""The collector's Prometheus metrics, and the health watchdog that feeds systemd.

``CollectorTelemetry`` is the servicer's ``IngestObserver``: the servicer tells it about
streams, committed batches and refusals, and it keeps the counters. ``HealthWatchdog``
probes the store on a monotonic schedule; while the store answers it pings systemd's
watchdog and reports SERVING on the gRPC health service, and when it stops answering it
reports NOT_SERVING (load balancers move agents away) and stops pinging (systemd restarts
the collector after ``WatchdogSec=``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

from creditmeter.collector.clock import WallClock
from creditmeter.collector.errors import (
    ChainFork,
    ChainHole,
    CollectorError,
    SeqConflict,
    StoreError,
)
from creditmeter.collector.store import AgentStatus
from creditmeter.metrics import Registry
from creditmeter.sdnotify import Notifier

log = logging.getLogger(__name__)

# From a SQLite commit (~1 ms) to a PostgreSQL across a busy network (~1 s).
_STORE_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# How often the store is probed when systemd's watchdog does not set the pace.
DEFAULT_PROBE_INTERVAL_S: Final = 10.0


class IngestObserver(Protocol):
    """What the Ingest servicer reports; called from gRPC's threads, so it must be quick."""

    def stream_opened(self) -> None: ...

    def stream_closed(self) -> None: ...

    def batch_committed(self, received: int, stored: int, store_s: float) -> None:
        """``received`` records in the batch, ``stored`` of them new (the rest were resent);
        ``store_s`` verifying and committing it took."""
        ...

    def refused(self, error: CollectorError) -> None:
        """A stream ended with ``error`` (its gRPC status is ``error.status``)."""
        ...


class NullIngestObserver:
    def stream_opened(self) -> None:
        pass

    def stream_closed(self) -> None:
        pass

    def batch_committed(self, received: int, stored: int, store_s: float) -> None:
        pass

    def refused(self, error: CollectorError) -> None:
        pass


class CollectorTelemetry:
    """Creates every collector metric; an ``IngestObserver``."""

    def __init__(self, registry: Registry) -> None:
        self.registry = r = registry
        self._streams = r.gauge("creditmeter_collector_streams", "Ingest streams open now.")
        self._batches = r.counter(
            "creditmeter_collector_batches_total", "Batches committed and acknowledged."
        )
        self._received = r.counter(
            "creditmeter_collector_records_received_total",
            "Records in committed batches, including ones resent and already stored.",
        )
        self._ingested = r.counter(
            "creditmeter_collector_records_ingested_total", "Records newly stored."
        )
        self._rejects = r.counter(
            "creditmeter_collector_rejects_total",
            "Streams ended by a refusal, by gRPC status and error class (the reason).",
            ["status", "reason"],
        )
        self._gaps = r.counter(
            "creditmeter_collector_chain_gaps_total",
            "Batches refused because records before them never arrived (ChainHole).",
        )
        self._forks = r.counter(
            "creditmeter_collector_chain_forks_total",
            "Batches refused because they contradict the stored chain (ChainFork, SeqConflict).",
        )
        self.store_seconds = r.histogram(
            "creditmeter_collector_store_duration_seconds",
            "Time the store took, by operation (ingest: one batch verified and committed; "
            "probe: health).",
            ["operation"],
            buckets=_STORE_BUCKETS_S,
        )
        self.store_up = r.gauge(
            "creditmeter_collector_store_up", "1 if the store answered the last health probe."
        )
        self.api_refusals = r.counter(
            "creditmeter_collector_api_refusals_total",
            "Query/admin API calls refused for want of a valid credential, by method.",
            ["method"],
        )

    def watch_quarantine(self, held: Callable[[], int]) -> None:
        """Reports ``held()`` (records in quarantine now) at every scrape; NaN while the
        store cannot answer."""

        def read() -> float:
            try:
                return float(held())
            except CollectorError:
                return math.nan

        self.registry.gauge(
            "creditmeter_collector_quarantined_records",
            "Records kept unbilled because a field broke the checks, not yet released "
            "(creditmeter-collector quarantine list).",
            callback=read,
        )

    def watch_agents(
        self, statuses: Callable[[], list[AgentStatus]], clock_us: WallClock, silent_after_s: float
    ) -> None:
        """Reports at every scrape how many enrolled agents are silent (``silent_agents``);
        NaN while the store cannot answer."""

        def read() -> float:
            try:
                return float(silent_agents(statuses(), clock_us(), silent_after_s))
            except CollectorError:
                return math.nan

        self.registry.gauge(
            "creditmeter_collector_agents_silent",
            "Enrolled agents not revoked whose last batch arrived longer ago than "
            "server.agent_silent_after, or that never delivered one: down or cut off (an "
            "agent writes at least every few minutes, idle or not).",
            callback=read,
        )

    def stream_opened(self) -> None:
        self._streams.inc()

    def stream_closed(self) -> None:
        self._streams.dec()

    def batch_committed(self, received: int, stored: int, store_s: float) -> None:
        self._batches.inc()
        self._received.inc(received)
        self._ingested.inc(stored)
        self.store_seconds.labels(operation="ingest").observe(store_s)

    def refused(self, error: CollectorError) -> None:
        self._rejects.labels(status=error.status.name, reason=type(error).__name__).inc()
        if isinstance(error, ChainHole):
            self._gaps.inc()
        elif isinstance(error, ChainFork | SeqConflict):
            self._forks.inc()

    def api_refused(self, method: str, error: Exception) -> None:
        self.api_refusals.labels(method=method).inc()


def silent_agents(statuses: list[AgentStatus], now_us: int, silent_after_s: float) -> int:
    """How many of the agents not revoked have not delivered for ``silent_after_s``: their
    last batch arrived before then, or none ever did."""
    since_us = now_us - round(silent_after_s * 1e6)
    return sum(
        1
        for s in statuses
        if not s.revoked and (s.last_received_us is None or s.last_received_us < since_us)
    )


# -- the health watchdog ------------------------------------------------------------------


class HealthTarget(Protocol):
    """What the watchdog tells about health (``collector.server.IngestServer``)."""

    def set_serving(self, serving: bool) -> None: ...


class HealthWatchdog:
    """Probes the store every ``interval_s``; pings systemd only while it answers."""

    def __init__(
        self,
        probe: Callable[[], object],
        notifier: Notifier,
        target: HealthTarget,
        telemetry: CollectorTelemetry,
        *,
        interval_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._notifier = notifier
        self._target = target
        self._telemetry = telemetry
        # Half of WatchdogSec= (sd_watchdog_enabled(3)), so one slow probe still fits.
        self._interval_s = interval_s or notifier.watchdog_interval_s() or DEFAULT_PROBE_INTERVAL_S
        self._monotonic = monotonic
        self._healthy: bool | None = None
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(
            target=self.run, args=(stop,), name="health-watchdog", daemon=True
        )
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set: probe, report, wait for the next deadline."""
        deadline = self._monotonic()
        while not stop.is_set():
            self.check()
            deadline += self._interval_s
            now = self._monotonic()
            if deadline <= now:  # a slow probe: skip the missed beats rather than bunch up
                deadline = now + self._interval_s
            stop.wait(deadline - now)

    def check(self) -> bool:
        """One probe; True when the store answered."""
        started = self._monotonic()
        try:
            self._probe()
        except StoreError as exc:
            healthy, problem = False, str(exc)
        except Exception as exc:  # a bug in a store: unhealthy, and the thread lives on
            log.exception("store health probe failed")
            healthy, problem = False, repr(exc)
        else:
            healthy, problem = True, ""
        self._telemetry.store_seconds.labels(operation="probe").observe(self._monotonic() - started)
        self._telemetry.store_up.set(1.0 if healthy else 0.0)
        if healthy:
            self._notifier.watchdog()
        self._report(healthy, problem)
        return healthy

    def _report(self, healthy: bool, problem: str) -> None:
        if healthy == self._healthy:
            return
        if healthy and self._healthy is not None:
            log.warning("the store answers again: serving")
            self._notifier.status("serving")
        elif not healthy:
            log.error("the store does not answer (%s): health NOT_SERVING", problem)
            self._notifier.status(f"store not answering: {problem}")
        self._healthy = healthy
        self._target.set_serving(healthy)
