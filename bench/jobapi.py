"""The job API's cost to the worker: µs per StartJob+EndJob.

Two figures, both against a real agent job API on a real Unix socket (registry on disk,
fsynced): the synchronous round trip (StartJob and EndJob each awaited), and what a worker
actually pays with ``with creditmeter.job(...)``, which only enqueues (a background thread
delivers). Beside them, a raw Unix-socket ping-pong of two small messages in the same run:
the floor of any request/response on this machine.

Target: p50 < 200 µs per StartJob+EndJob.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Result, percentile
from creditmeter.agent.jobapi import create_server
from creditmeter.agent.jobs import JobRegistry
from creditmeter.jobclient import JobClient, JobContext


def _ping_pong_us(pairs: int) -> list[float]:
    """Two request/response exchanges over a Unix socket pair, per sample."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def echo() -> None:
        while data := b.recv(256):
            b.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    out = []
    for _ in range(pairs):
        start = time.perf_counter()
        for _ in range(2):
            a.sendall(b"x" * 64)
            a.recv(256)
        out.append((time.perf_counter() - start) * 1e6)
    a.close()
    b.close()
    return out


def _round_trips_us(client: JobClient, pairs: int, prefix: str) -> list[float]:
    out = []
    for i in range(pairs):
        job_id = f"{prefix}-{i}"
        start = time.perf_counter()
        client.start_job(job_id, "acme", "sdxl")
        client.end_job(job_id)
        out.append((time.perf_counter() - start) * 1e6)
    return out


def _caller_cost_us(client: JobClient, pairs: int) -> list[float]:
    out = []
    for i in range(pairs):
        start = time.perf_counter()
        with JobContext(client, f"ctx-{i}", "acme", "sdxl", 1.0, ""):
            pass
        out.append((time.perf_counter() - start) * 1e6)
        if i % 50 == 49:
            client.flush(10.0)  # let the sender keep up, as between real generations
    return out


def run(quick: bool = False) -> tuple[list[Result], str]:
    pairs = 300 if quick else 2000
    with tempfile.TemporaryDirectory(prefix="cm-jobs-") as tmp:
        folder = Path(tmp)
        registry = JobRegistry(folder / "jobs.db")
        server = create_server(folder / "jobs.sock", registry)
        client = JobClient(str(folder / "jobs.sock"))
        try:
            _round_trips_us(client, 50, "warm")  # connect the channel
            sync = _round_trips_us(client, pairs, "rt")
            caller = _caller_cost_us(client, pairs)
            client.flush(30.0)
        finally:
            client.close()
            server.stop(1.0)
            registry.close()
    floor = _ping_pong_us(pairs)
    sync50, caller50, floor50 = (percentile(x, 50) for x in (sync, caller, floor))
    results = [
        Result(
            "job API",
            "cost to the worker, `with job()` (p50)",
            caller50,
            "µs",
            "raw Unix-socket ping-pong ×2",
            floor50,
            target="p50 < 200 µs",
            ok=caller50 < 200,
        ),
        Result("job API", "cost to the worker, `with job()` (p99)", percentile(caller, 99), "µs"),
        Result(
            "job API",
            "synchronous StartJob+EndJob round trip (p50)",
            sync50,
            "µs",
            "raw Unix-socket ping-pong ×2",
            floor50,
        ),
        Result("job API", "synchronous round trip (p99)", percentile(sync, 99), "µs"),
    ]
    detail = (
        f"with job(): p50 {caller50:.0f} µs, p99 {percentile(caller, 99):.0f} µs; synchronous "
        f"round trip p50 {sync50:.0f} µs, p99 {percentile(sync, 99):.0f} µs; raw socket "
        f"ping-pong ×2 p50 {floor50:.0f} µs"
    )
    return results, detail
