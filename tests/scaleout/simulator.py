"""Light simulated agents for the scale-out test: many agents in one process.

Each ``SimAgent`` is the real delivery half of an agent: an ``agent.outbox.Outbox`` (real
seqs, chain, signatures, fsync) and an ``agent.shipper.Shipper`` (real gRPC stream, acks,
resends, backoff) in a thread of its own. Instead of a meter it appends drafts whose busy µs
come from a seeded generator, and adds them up as it goes: the ground truth. Its channel
factory picks one of the collectors that is alive at that moment, so a reconnect after a
crash or a recycled stream may land on another collector.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from creditmeter import chain
from creditmeter.agent.backoff import Backoff
from creditmeter.agent.outbox import Outbox
from creditmeter.agent.settings import IDLE_CLOSE
from creditmeter.agent.shipper import KEEPALIVE_OPTIONS, Shipper
from creditmeter.v1 import usage_pb2

WINDOW_US = 10_000_000
GPUS = 4
ACCOUNTS = ("acme", "globex", "initech", "hooli", "")  # "" is unattributed


class Endpoint:
    """A collector as the agents see it: an address, and whether its process is up."""

    def __init__(self, address: str, alive: Callable[[], bool]) -> None:
        self.address = address
        self.alive = alive


@dataclass
class SimAgent:
    agent_id: str
    key: Ed25519PrivateKey
    outbox: Outbox
    rng: random.Random
    start_us: int
    shipper: Shipper | None = None
    truth_busy_us: int = 0
    truth_records: int = 0
    addresses_used: set[str] = field(default_factory=set)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def public_key_hex(self) -> str:
        return chain.public_key_hex(self.key)

    def append_some(self, most: int) -> None:
        """Appends 1..most records (one window of several GPUs), as a meter closing windows
        would, and adds them to the truth once they are durable."""
        drafts = [self._draft(self.truth_records + i) for i in range(self.rng.randint(1, most))]
        self.outbox.append(drafts)
        self.truth_busy_us += sum(d.busy_us for d in drafts)
        self.truth_records += len(drafts)

    def start(
        self,
        endpoints: Sequence[Endpoint],
        rng: random.Random,
        idle_close_s: float | None = IDLE_CLOSE.default,
    ) -> None:
        """Ships in a thread of its own; closes idle streams as the agent does by default."""
        self.shipper = Shipper(
            self.outbox,
            self._channel_factory(endpoints, rng),
            self.agent_id,
            ack_timeout_s=10.0,
            # Quick retries: a collector is back within a second or two in this test.
            backoff=Backoff(initial_s=0.05, cap_s=1.0, rng=random.Random(rng.random())),
            idle_close_s=idle_close_s,
        )
        self._thread = threading.Thread(
            target=self.shipper.run, args=(self._stop,), name=f"ship-{self.agent_id}"
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            assert not self._thread.is_alive(), f"{self.agent_id}: shipper did not stop"
        self.outbox.close()

    def _channel_factory(
        self, endpoints: Sequence[Endpoint], rng: random.Random
    ) -> Callable[[], Any]:
        lock = threading.Lock()

        def channel() -> Any:
            live = [e for e in endpoints if e.alive()] or list(endpoints)
            with lock:
                address = rng.choice(live).address
            self.addresses_used.add(address)
            return grpc.insecure_channel(address, options=KEEPALIVE_OPTIONS)

        return channel

    def _draft(self, index: int) -> usage_pb2.UsageRecord:
        gpu = index % GPUS
        start_us = self.start_us + (index // GPUS) * WINDOW_US
        return usage_pb2.UsageRecord(
            host=f"{self.agent_id}.example",
            start_unix_us=start_us,
            end_unix_us=start_us + WINDOW_US,
            gpu=usage_pb2.GpuRef(uuid=f"GPU-{self.agent_id}-{gpu}", index=gpu),
            process=usage_pb2.ProcessRef(pid=1000 + gpu, create_time_us=start_us, name="python"),
            attribution=usage_pb2.Attribution(
                account=self.rng.choice(ACCOUNTS),
                model="llama-3-70b",
                source=usage_pb2.ATTRIBUTION_SOURCE_ENVIRONMENT,
            ),
            busy_us=self.rng.randrange(0, WINDOW_US + 1),
            wall_us=WINDOW_US,
            source=usage_pb2.MEASUREMENT_SOURCE_NVML_PROCESS_UTIL,
        )


def make_agents(folder: Path, count: int, seed: int) -> list[SimAgent]:
    """``count`` agents with outboxes under ``folder``; their records start two days ago."""
    start_us = time.time_ns() // 1000 - 2 * 86_400_000_000
    agents = []
    for index in range(count):
        agent_id = f"sim-{index:03d}"
        key = chain.generate_key()
        outbox = Outbox.open(folder / f"{agent_id}.outbox", agent_id, key)
        agents.append(SimAgent(agent_id, key, outbox, random.Random(f"{seed}-{index}"), start_us))
    return agents
