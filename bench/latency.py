"""Latency from a window's close to its records being durable at the collector, on loopback.

The agent's side is real: its outbox (SQLite, fsync) and shipper (one gRPC stream); so is
the collector's (verifier, SQLite store, fsync before the ack). A window of 64 records (8
GPUs × 8 processes) closes every 100 ms; latency runs from just before the outbox write to
the ack that covers the window's last record.

Bar: p99 < 1 s.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from bench.common import Result, percentile
from bench.records import T0_US, WINDOW_US
from creditmeter import chain
from creditmeter.agent.outbox import Outbox
from creditmeter.agent.shipper import Shipper, insecure_channel_factory
from creditmeter.collector.server import create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.v1 import usage_pb2

RECORDS_PER_WINDOW = 64
INTERVAL_S = 0.1


class _Acks:
    """Notes when each ack arrives: the shipper calls it from its thread."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.changed = threading.Condition()

    def batch_sent(self, records: int) -> None:
        pass

    def records_acked(self, records: int, oldest_lag_s: float) -> None:
        with self.changed:
            self.changed.notify_all()

    def stream_ended(self, outcome: str, detail: str) -> None:
        pass

    def wait_acked(self, seq: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while self.outbox.acked_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"seq {seq} not acked within {timeout_s} s")
                self.changed.wait(left)


def _drafts(window: int) -> list[usage_pb2.UsageRecord]:
    start = T0_US + window * WINDOW_US
    return [
        usage_pb2.UsageRecord(
            host="bench-host",
            start_unix_us=start,
            end_unix_us=start + WINDOW_US,
            gpu=usage_pb2.GpuRef(uuid=f"GPU-bench-{i % 8}", index=i % 8),
            process=usage_pb2.ProcessRef(pid=1000 + i, create_time_us=T0_US, name="python3"),
            attribution=usage_pb2.Attribution(account=f"acct-{i % 5}", model="sdxl"),
            busy_us=5_000_000 + i,
            wall_us=WINDOW_US,
        )
        for i in range(RECORDS_PER_WINDOW)
    ]


def latencies(folder: Path, windows: int) -> list[float]:
    key = chain.generate_key()
    store = SQLiteStore(folder / "collector.db")
    store.enroll_agent("latency-agent", chain.public_key_hex(key))
    server, port = create_server("127.0.0.1:0", store)
    server.start()
    outbox = Outbox.open(folder / "outbox.db", "latency-agent", key)
    acks = _Acks(outbox)
    shipper = Shipper(
        outbox, insecure_channel_factory(f"127.0.0.1:{port}"), "latency-agent", observer=acks
    )
    stop = threading.Event()
    shipping = threading.Thread(target=shipper.run, args=(stop,))
    shipping.start()
    out = []
    try:
        next_close = time.monotonic()
        for w in range(windows):
            next_close += INTERVAL_S
            start = time.perf_counter()
            last = outbox.append(_drafts(w))[-1]
            acks.wait_acked(last, timeout_s=30)
            out.append(time.perf_counter() - start)
            stop.wait(max(0.0, next_close - time.monotonic()))
    finally:
        stop.set()
        shipping.join()
        outbox.close()
        server.stop(0)
        store.close()
    return out


def run(quick: bool = False) -> tuple[list[Result], str]:
    with tempfile.TemporaryDirectory(prefix="cm-latency-") as tmp:
        lat = latencies(Path(tmp), 100 if quick else 400)
    p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
    results = [
        Result("latency", "window close → durable at collector, p50", p50, "ms"),
        Result(
            "latency",
            "window close → durable at collector, p99",
            p99,
            "ms",
            target="p99 < 1 s",
            ok=p99 < 1000,
        ),
    ]
    return (
        results,
        f"{len(lat)} windows of {RECORDS_PER_WINDOW} records: p50 {p50:.1f} ms, p99 {p99:.1f} ms",
    )
