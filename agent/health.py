"""gRPC health (grpc.health.v1) for the agent, on a local TCP address (``health.listen``).

Probes (``grpc_health_probe -addr 127.0.0.1:9466``, Kubernetes, Consul) ask for one of:

* ``""`` or ``creditmeter.agent.Meter``: SERVING while the metering loop completes cycles.
  A loop that has not finished a cycle for ``stale_after_s`` (a hung NVML call, a stuck
  outbox write) is NOT_SERVING, the same condition that stops systemd's watchdog pings.
* ``creditmeter.agent.Shipper``: SERVING while a stream to the collector is open.
  NOT_SERVING means records wait in the outbox, which is safe but worth an alert if long.

A TCP port rather than the job API socket: probes and orchestrators speak TCP, the job API
socket is reserved for the job group, and the job API may be disabled. The address is
local by default; the service tells nothing a metrics scrape would not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from creditmeter.agent.errors import AgentError

METER_SERVICE: Final = "creditmeter.agent.Meter"
SHIPPER_SERVICE: Final = "creditmeter.agent.Shipper"
_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthListenError(AgentError):
    """``health.listen`` cannot be bound: malformed, or the port is taken (another agent?)."""


class AgentHealth(health.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """The health servicer, brought up to date at every Check and every metering cycle."""

    def __init__(
        self,
        connected: Callable[[], bool],
        *,
        stale_after_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._connected = connected
        self._stale_after_s = stale_after_s
        self._monotonic = monotonic
        self._cycle_lock = threading.Lock()  # not _lock: the base class has one
        self._last_cycle_s: float | None = None

    def cycle_done(self) -> None:
        """Called by the metering loop after every cycle (real time, not simulated)."""
        with self._cycle_lock:
            self._last_cycle_s = self._monotonic()
        self.refresh()

    def refresh(self) -> None:
        with self._cycle_lock:
            last = self._last_cycle_s
        metering = last is not None and self._monotonic() - last <= self._stale_after_s
        meter_status = _SERVING if metering else _NOT_SERVING
        self.set("", meter_status)
        self.set(METER_SERVICE, meter_status)
        self.set(SHIPPER_SERVICE, _SERVING if self._connected() else _NOT_SERVING)

    def Check(self, request: Any, context: Any) -> Any:  # the RPC's name in health.proto
        self.refresh()  # a hung loop updates nothing: staleness is judged when asked
        return super().Check(request, context)


class HealthServer:
    """The started gRPC server; ``stop`` answers NOT_SERVING from then on, then closes."""

    def __init__(self, server: Any, servicer: AgentHealth, port: int) -> None:
        self._server = server
        self.servicer = servicer
        self.port = port

    def stop(self, grace_s: float = 1.0) -> None:
        self.servicer.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()


def serve_health(listen: str, servicer: AgentHealth) -> HealthServer:
    """Serves ``servicer`` on ``listen`` ("host:port"; port 0 picks one). Raises
    HealthListenError when the address cannot be bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        options=[("grpc.so_reuseport", 0)],  # a second agent must fail, not share the port
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise HealthListenError(f"health.listen {listen}: cannot listen: {exc}") from None
    if port == 0:
        raise HealthListenError(f"health.listen {listen}: cannot listen")
    servicer.refresh()
    server.start()
    return HealthServer(server, servicer, port)
