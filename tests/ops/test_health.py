"""Health as systemd and probes see it: the collector's store watchdog and the agent's gRPC
health service, each over real sockets with a clock the test moves."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from creditmeter.agent.health import (
    METER_SERVICE,
    SHIPPER_SERVICE,
    AgentHealth,
    HealthListenError,
    serve_health,
)
from creditmeter.collector.errors import StoreBusy
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.telemetry import CollectorTelemetry, HealthWatchdog
from creditmeter.metrics import Registry
from creditmeter.sdnotify import Notifier

from .processes import DEADLINE_S, NotifySocket, sample_value, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Store:
    """A store probe that answers, or raises StoreBusy while ``down``."""

    def __init__(self) -> None:
        self.down = False

    def probe(self) -> None:
        if self.down:
            raise StoreBusy("database is locked")


class Target:
    def __init__(self) -> None:
        self.serving: list[bool] = []

    def set_serving(self, serving: bool) -> None:
        self.serving.append(serving)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify")
    yield receiver
    receiver.close()


def test_watchdog_pings_only_while_the_store_answers(notify: NotifySocket) -> None:
    notifier = Notifier(str(notify.path), watchdog_usec=2_000_000)
    telemetry, store, target = CollectorTelemetry(Registry()), Store(), Target()
    watchdog = HealthWatchdog(store.probe, notifier, target, telemetry)
    try:
        assert watchdog.check()
        notify.wait_for("WATCHDOG=1")
        store.down = True
        assert not watchdog.check()
        notify.wait_for("STATUS=store not answering: database is locked")
        store.down = False
        assert watchdog.check()
        notify.wait_for("STATUS=serving")
    finally:
        notifier.close()
    assert notify.fields().count("WATCHDOG=1") == 2  # none while the store was down
    assert target.serving == [True, False, True]
    assert sample_value(_family(telemetry, "creditmeter_collector_store_up")) == 1


def test_watchdog_thread_keeps_time_and_stops(notify: NotifySocket) -> None:
    notifier = Notifier(str(notify.path), watchdog_usec=100_000)  # a ping every 50 ms
    watchdog = HealthWatchdog(Store().probe, notifier, Target(), CollectorTelemetry(Registry()))
    stop = threading.Event()
    watchdog.start(stop)
    try:
        for _ in range(3):
            pings = notify.fields().count("WATCHDOG=1")
            wait_until("another ping", lambda p=pings: notify.fields().count("WATCHDOG=1") > p)
    finally:
        stop.set()
        watchdog.join()
        notifier.close()


def _family(telemetry: CollectorTelemetry, name: str) -> Any:
    families = {f.name: f for f in text_string_to_metric_families(telemetry.registry.render())}
    return families[name]


# -- the agent's health service -------------------------------------------------------------


def check(port: int, service: str) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        request = health_pb2.HealthCheckRequest(service=service)
        return stub.Check(request, timeout=DEADLINE_S).status


def test_agent_health_follows_the_loop_and_the_stream() -> None:
    clock, connected = Clock(), [False]
    servicer = AgentHealth(lambda: connected[0], stale_after_s=10.0, monotonic=clock)
    server = serve_health("127.0.0.1:0", servicer)
    try:
        assert check(server.port, "") == NOT_SERVING  # no cycle yet
        servicer.cycle_done()
        assert check(server.port, "") == SERVING
        assert check(server.port, METER_SERVICE) == SERVING
        assert check(server.port, SHIPPER_SERVICE) == NOT_SERVING
        connected[0] = True
        assert check(server.port, SHIPPER_SERVICE) == SERVING
        clock.now_s += 10.5  # the loop hung: no cycle for longer than stale_after_s
        assert check(server.port, METER_SERVICE) == NOT_SERVING
        assert check(server.port, "") == NOT_SERVING
        servicer.cycle_done()
        assert check(server.port, "") == SERVING
        port = server.port
    finally:
        server.stop(0)
    with pytest.raises(grpc.RpcError):
        check(port, "")  # stopped: nobody answers


def test_agent_health_on_a_taken_port_is_named() -> None:
    first = serve_health("127.0.0.1:0", AgentHealth(lambda: True, stale_after_s=10.0))
    try:
        with pytest.raises(HealthListenError, match=f"health.listen 127.0.0.1:{first.port}"):
            serve_health(f"127.0.0.1:{first.port}", AgentHealth(lambda: True, stale_after_s=1))
    finally:
        first.stop(0)


def test_a_store_that_takes_no_writes_is_not_serving(tmp_path: Path) -> None:
    """Reads answer, every commit fails (a full disk, a file turned read-only): health must
    say NOT_SERVING, which a read probe would not."""
    store = SQLiteStore(tmp_path / "collector.db")
    telemetry, target = CollectorTelemetry(Registry()), Target()
    watchdog = HealthWatchdog(store.probe_write, Notifier(None), target, telemetry)
    try:
        assert watchdog.check()
        conn = store._connection()  # the store's own connection, made to refuse writes
        conn.execute("PRAGMA query_only = ON")
        assert store.get_agent("anyone") is None  # reads still answer
        assert not watchdog.check()
        conn.execute("PRAGMA query_only = OFF")
        assert watchdog.check()
        assert target.serving == [True, False, True]
    finally:
        store.close()
