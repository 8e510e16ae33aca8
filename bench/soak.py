"""Soak: many simulated agents against one collector process for a long time.

The collector is the real daemon (``creditmeter-collector serve``, SQLite store, fsync per
batch) in a process of its own, so its memory can be watched (RSS, sampled with psutil).
The agents are light clients in a few worker processes (grpc.aio, one TCP connection and one
long-lived stream each, as a real agent keeps): each holds a real Ed25519 key enrolled at the
collector and sends a real signed hash chain, a batch of records every window, waits for
the ack, checks that it names its head, and after a recycled or broken stream resumes from
the collector's Ack and resends what was not acknowledged.

Bars: memory flat (RSS at the end within 10 % of RSS after warm-up, and its trend over the
run's second half below 1 % of it a minute), and no record lost (the records and busy µs
stored equal the ones the agents sent and saw acknowledged, and every batch sent was
acknowledged).

    python -m bench.soak [--quick]      # 1,000 agents × 10 min; quick: 100 agents × 1 min
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import Result, markdown, median, percentile
from creditmeter import chain
from creditmeter.collector.stores import open_store
from creditmeter.v1 import ingest_pb2, usage_pb2

BIN = Path(sys.executable).parent
METHOD = "/creditmeter.v1.Ingest/Stream"
RSS_GROWTH_MAX = 0.10  # RSS at the end over RSS after warm-up, at most
SLOPE_MAX_PER_MIN = 0.01  # second-half RSS trend, per minute, as a fraction of it
TREND_MIN_S = 300.0  # shorter runs report the trend without judging it


@dataclass(frozen=True)
class Plan:
    agents: int
    duration_s: float  # how long the agents send
    window_s: float  # each agent sends one batch per window, as a real agent closes one
    records_per_batch: int  # processes per host
    workers: int  # client processes
    max_stream_age_s: float  # the collector recycles streams this often
    sample_every_s: float  # RSS samples
    warmup_s: float  # RSS after this is the reference


FULL = Plan(1000, 600.0, 10.0, 5, 2, 120.0, 5.0, 60.0)
QUICK = Plan(100, 60.0, 2.0, 5, 2, 15.0, 1.0, 10.0)


# -- one simulated agent -------------------------------------------------------------------


class StreamEnded(Exception):
    """The collector ended the stream (recycling) before acknowledging a batch."""


@dataclass
class AgentTotals:
    """What one worker's agents sent and saw acknowledged."""

    agents: int = 0
    batches_acked: int = 0
    records_acked: int = 0
    busy_acked_us: int = 0
    unacked_at_end: int = 0  # batches sent and never acknowledged: must stay 0
    streams: int = 0
    stream_ends: Counter[str] = field(default_factory=Counter)
    ack_latencies_ms: list[float] = field(default_factory=list)

    def add(self, other: AgentTotals) -> None:
        self.agents += other.agents
        self.batches_acked += other.batches_acked
        self.records_acked += other.records_acked
        self.busy_acked_us += other.busy_acked_us
        self.unacked_at_end += other.unacked_at_end
        self.streams += other.streams
        self.stream_ends.update(other.stream_ends)
        self.ack_latencies_ms.extend(other.ack_latencies_ms)


@dataclass
class _Pending:
    request: ingest_pb2.IngestRequest
    last_seq: int
    head_hash: bytes
    records: int
    busy_us: int


class SimAgent:
    """One agent's chain: records numbered, linked and signed as the outbox does."""

    def __init__(self, agent_id: str, seed: bytes, plan: Plan, rng: random.Random) -> None:
        self.agent_id = agent_id
        self.key = Ed25519PrivateKey.from_private_bytes(seed)
        self.plan = plan
        self.rng = rng
        self.seq = 0
        self.prev_hash = chain.GENESIS_HASH
        self.pending: _Pending | None = None  # sent (or to be resent), not yet acked
        self.totals = AgentTotals(agents=1)

    def next_batch(self) -> _Pending:
        """The next window's records, chained and signed."""
        now_us = time.time_ns() // 1000
        start_us = now_us - int(self.plan.window_s * 1_000_000)
        records, busy_total = [], 0
        for process in range(self.plan.records_per_batch):
            self.seq += 1
            busy_us = self.rng.randrange(0, int(self.plan.window_s * 1_000_000))
            rec = _record(self.agent_id, self.seq, self.prev_hash, process, start_us, now_us)
            rec.busy_us = busy_us
            data = rec.SerializeToString(deterministic=True)
            self.prev_hash = chain.record_hash(data)
            records.append(data)
            busy_total += busy_us
        batch = ingest_pb2.RecordBatch(
            agent_id=self.agent_id,
            records=records,
            signature=chain.sign_head(self.key, self.prev_hash),
        )
        request = ingest_pb2.IngestRequest(batch=batch)
        return _Pending(request, self.seq, self.prev_hash, len(records), busy_total)

    def acked(self, ack: ingest_pb2.Ack, sent_at: float) -> None:
        pending = self.pending
        assert pending is not None
        if ack.acked_seq != pending.last_seq or ack.head_hash != pending.head_hash:
            raise AssertionError(f"{self.agent_id}: ack {ack.acked_seq} is not our head")
        self.totals.batches_acked += 1
        self.totals.records_acked += pending.records
        self.totals.busy_acked_us += pending.busy_us
        self.totals.ack_latencies_ms.append((time.monotonic() - sent_at) * 1000)
        self.pending = None

    def resumed(self, ack: ingest_pb2.Ack) -> bool:
        """Whether the pending batch (if any) must be resent after the collector's Ack."""
        pending = self.pending
        if pending is not None and ack.acked_seq == pending.last_seq:
            self.acked(ack, time.monotonic())  # stored before the stream broke
            return False
        return pending is not None


def _record(
    agent_id: str, seq: int, prev_hash: bytes, process: int, start_us: int, end_us: int
) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        agent_id=agent_id,
        seq=seq,
        prev_hash=prev_hash,
        host=agent_id,
        start_unix_us=start_us,
        end_unix_us=end_us,
        gpu=usage_pb2.GpuRef(uuid=f"GPU-{agent_id}-{process}", index=process, name="H100"),
        process=usage_pb2.ProcessRef(pid=1000 + process, create_time_us=start_us, name="python3"),
        attribution=usage_pb2.Attribution(
            account=f"acct-{process}",
            model="llama",
            source=usage_pb2.ATTRIBUTION_SOURCE_ENVIRONMENT,
        ),
        wall_us=end_us - start_us,
        source=usage_pb2.MEASUREMENT_SOURCE_NVML_PROCESS_UTIL,
    )


async def _agent_loop(agent: SimAgent, address: str, stop_at: float) -> None:
    """Keep one stream open; send a batch every window until ``stop_at``; then make sure
    the last batch sent was acknowledged."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.stream_stream(
            METHOD,
            request_serializer=ingest_pb2.IngestRequest.SerializeToString,
            response_deserializer=ingest_pb2.IngestResponse.FromString,
        )
        await asyncio.sleep(agent.rng.uniform(0, agent.plan.window_s))  # spread the load
        while True:
            agent.totals.streams += 1
            try:
                await _one_stream(agent, stream(), stop_at)
                return
            except (StreamEnded, grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
                agent.totals.stream_ends[_why(exc)] += 1
                await asyncio.sleep(agent.rng.uniform(0.05, 0.5))


def _why(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"error: {exc.code().name}"
    return str(exc) if isinstance(exc, StreamEnded) else type(exc).__name__


async def _one_stream(agent: SimAgent, call: Any, stop_at: float) -> None:
    hello = ingest_pb2.IngestRequest(hello=ingest_pb2.Hello(agent_id=agent.agent_id))
    await call.write(hello)
    if agent.resumed((await _read(call)).ack):
        await _send(agent, call)  # what the last stream left unacknowledged
    next_at = time.monotonic()
    while True:
        next_at += agent.plan.window_s
        if next_at >= stop_at:
            break
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        agent.pending = agent.next_batch()
        await _send(agent, call)
    await call.done_writing()


async def _send(agent: SimAgent, call: Any) -> None:
    assert agent.pending is not None
    sent_at = time.monotonic()
    try:
        await call.write(agent.pending.request)
    except asyncio.InvalidStateError as exc:  # the call already ended (recycled)
        raise StreamEnded("ended while sending") from exc
    agent.acked((await _read(call)).ack, sent_at)


async def _read(call: Any) -> ingest_pb2.IngestResponse:
    response = await call.read()  # raises AioRpcError when the stream ends in an error
    if response is grpc.aio.EOF:
        raise StreamEnded(f"ended: {(await call.code()).name}")
    assert isinstance(response, ingest_pb2.IngestResponse)
    return response


async def _agents(
    address: str, agents: list[tuple[str, bytes]], plan: Plan, stop_at: float
) -> AgentTotals:
    sims = [SimAgent(a, seed, plan, random.Random(a)) for a, seed in agents]
    give_up_s = stop_at - time.monotonic() + 120.0
    await asyncio.wait_for(
        asyncio.gather(*(_agent_loop(s, address, stop_at) for s in sims)), give_up_s
    )
    totals = AgentTotals()
    for sim in sims:
        sim.totals.unacked_at_end = int(sim.pending is not None)
        totals.add(sim.totals)
    return totals


def _worker(
    address: str, agents: list[tuple[str, bytes]], plan: Plan, stop_wall: float
) -> AgentTotals:
    """One client process: its share of the agents on one event loop."""
    stop_at = time.monotonic() + (stop_wall - time.time())
    return asyncio.run(_agents(address, agents, plan, stop_at))


# -- the collector and its memory -----------------------------------------------------------


def _tree(process: psutil.Process) -> list[psutil.Process]:
    """The collector and its ingest worker processes."""
    return [process, *process.children(recursive=True)]


class RssSampler(threading.Thread):
    """Samples the RSS of the collector's whole process tree (server and ingest workers)."""

    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        self.stop = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            rss_mib = sum(p.memory_info().rss for p in _tree(self.process)) / 2**20
            self.samples.append((time.monotonic() - self.started_at, rss_mib))
            self.stop.wait(self.every_s)


def _start_collector(work: Path, url: str, plan: Plan) -> tuple[subprocess.Popen[bytes], int]:
    port_file = work / "port"
    args = [str(BIN / "creditmeter-collector"), "serve", "--db", url]
    args += ["--listen", "127.0.0.1:0", "--port-file", str(port_file), "--metrics-listen", ""]
    for key, value in (
        ("server.max_streams", str(plan.agents + 64)),
        ("server.max_stream_age", f"{plan.max_stream_age_s:g}s"),
        ("log.level", "warning"),
    ):
        args += ["--set", f"{key}={value}"]
    with (work / "collector.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"collector did not start:\n{(work / 'collector.log').read_text()}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _enroll(url: str, seeds: dict[str, bytes]) -> None:
    """Enrolls every agent's public key, as ``creditmeter-collector enroll`` does."""
    store = open_store(url, create=True)
    try:
        for agent_id, seed in seeds.items():
            key = Ed25519PrivateKey.from_private_bytes(seed)
            store.enroll_agent(agent_id, chain.public_key_hex(key))
    finally:
        store.close()


def _stored(db: Path) -> tuple[int, int]:
    """(records, busy µs) the collector stored, the busy time read from the record bytes."""
    count = busy_us = 0
    rec = usage_pb2.UsageRecord()
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for (record,) in conn.execute("SELECT record FROM records"):
            rec.ParseFromString(record)
            count, busy_us = count + 1, busy_us + rec.busy_us
    return count, busy_us


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


# -- the run --------------------------------------------------------------------------------


@dataclass
class SoakRun:
    plan: Plan
    totals: AgentTotals
    stored_records: int
    stored_busy_us: int
    rss: list[tuple[float, float]]
    collector_cpu_s: float
    real_s: float


def soak(plan: Plan) -> SoakRun:
    _raise_fd_limit(4 * plan.agents + 256)
    seeds = {f"soak-{i:04d}": os.urandom(32) for i in range(plan.agents)}
    with tempfile.TemporaryDirectory(prefix="creditmeter-soak-") as tmp:
        work = Path(tmp)
        db = work / "collector.db"
        url = f"sqlite://{db}"
        _enroll(url, seeds)
        collector, port = _start_collector(work, url, plan)
        try:
            sampler = RssSampler(collector.pid, plan.sample_every_s)
            sampler.start()
            started = time.monotonic()
            totals = _drive(f"127.0.0.1:{port}", seeds, plan)
            real_s = time.monotonic() - started
            sampler.stop.set()
            sampler.join()
            cpu_s = sum(sum(p.cpu_times()[:2]) for p in _tree(psutil.Process(collector.pid)))
            stored = _stored(db)
        finally:
            collector.terminate()
            collector.wait(timeout=60)
    return SoakRun(plan, totals, *stored, sampler.samples, cpu_s, real_s)


def _drive(address: str, seeds: dict[str, bytes], plan: Plan) -> AgentTotals:
    items = list(seeds.items())
    shares = [items[i :: plan.workers] for i in range(plan.workers)]
    stop_wall = time.time() + plan.duration_s
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    with context.Pool(plan.workers) as pool:
        parts = pool.starmap(_worker, [(address, share, plan, stop_wall) for share in shares])
    totals = AgentTotals()
    for part in parts:
        totals.add(part)
    return totals


# -- the figures ----------------------------------------------------------------------------


def _slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares trend of RSS, MiB per minute."""
    if len(samples) < 2:
        return 0.0
    ts = [t for t, _ in samples]
    ys = [y for _, y in samples]
    t_mean, y_mean = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - t_mean) ** 2 for t in ts)
    cov = sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys, strict=True))
    return 60.0 * cov / var if var else 0.0


def results(run: SoakRun) -> tuple[list[Result], str]:
    plan, totals = run.plan, run.totals
    after_warmup = [(t, y) for t, y in run.rss if t >= plan.warmup_s] or run.rss
    second_half = [(t, y) for t, y in run.rss if t >= plan.duration_s / 2] or after_warmup
    first, last = after_warmup[0][1], run.rss[-1][1]
    peak = max(y for _, y in run.rss)
    slope = _slope_per_min(second_half)
    # A minute cannot tell a leak from caches still filling: the trend is judged only on
    # runs long enough for its second half to lie well past the warm-up.
    trend_ok = slope <= SLOPE_MAX_PER_MIN * first if plan.duration_s >= TREND_MIN_S else None
    flat = last <= first * (1 + RSS_GROWTH_MAX) and trend_ok is not False
    lost_records = totals.records_acked - run.stored_records
    complete = (
        lost_records == 0
        and totals.busy_acked_us == run.stored_busy_us
        and totals.unacked_at_end == 0
    )
    name = f"soak ({plan.agents} agents, {plan.duration_s / 60:g} min)"
    out = [
        Result(
            name,
            "collector RSS at the end",
            last,
            "MiB",
            "after warm-up",
            first,
            f"≤ {1 + RSS_GROWTH_MAX:g}× after warm-up",
            last <= first * (1 + RSS_GROWTH_MAX),
        ),
        Result(name, "collector RSS peak", peak, "MiB", "after warm-up", first),
        Result(
            name,
            "collector RSS trend, 2nd half",
            slope,
            "MiB/min",
            "",
            None,
            f"≤ {SLOPE_MAX_PER_MIN:.0%} of RSS a minute" if trend_ok is not None else "",
            trend_ok,
        ),
        Result(
            name,
            "records stored",
            run.stored_records,
            "records",
            "sent and acked",
            totals.records_acked,
            "= sent",
            complete,
        ),
        Result(
            name,
            "busy µs stored",
            run.stored_busy_us,
            "µs",
            "sent and acked",
            totals.busy_acked_us,
            "= sent",
            totals.busy_acked_us == run.stored_busy_us,
        ),
        Result(name, "ack latency p50", median(totals.ack_latencies_ms), "ms"),
        Result(name, "ack latency p99", percentile(totals.ack_latencies_ms, 99), "ms"),
        Result(name, "collector CPU", 100 * run.collector_cpu_s / run.real_s, "% of a core"),
    ]
    ends = ", ".join(f"{k} {v}" for k, v in sorted(totals.stream_ends.items())) or "none"
    detail = (
        f"{plan.agents} agents × {run.real_s:.0f} s, one batch of {plan.records_per_batch} "
        f"records per {plan.window_s:g} s window: {totals.batches_acked} batches, "
        f"{totals.records_acked} records acked, {run.stored_records} stored "
        f"(lost {lost_records}, unacked at the end {totals.unacked_at_end}); "
        f"{totals.streams} streams (ends: {ends}); collector RSS after warm-up "
        f"{first:.1f} MiB, end {last:.1f}, peak {peak:.1f}, trend {slope:+.2f} MiB/min over "
        f"the second half ({len(run.rss)} samples) → {'flat' if flat else 'GROWING'}; "
        f"{'no record lost' if complete else 'RECORDS LOST'}"
    )
    return out, detail


def run(quick: bool) -> tuple[list[Result], str]:
    return results(soak(QUICK if quick else FULL))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="100 agents for a minute")
    args = parser.parse_args()
    found, detail = run(args.quick)
    print(markdown(found))
    print(detail)
    return 0 if all(r.ok is not False for r in found) else 1


if __name__ == "__main__":
    sys.exit(main())
