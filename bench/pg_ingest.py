"""Collector ingest into PostgreSQL: records/s verified and committed at batch 1000, beside
raw COPY of the same rows in the same run.

Every figure is records/s with one commit per batch, the median over repeats; batch 1000
unless said otherwise:

  raw COPY         the rows, binary COPY into a scratch table shaped like ``records`` (same
                   columns, same primary key), and the batch's signature INSERTed into one
                   shaped like ``segments``: what the database itself costs (baseline)
  staging COPY     the same rows through a temporary staging table and INSERT … SELECT … ON
                   CONFLICT DO NOTHING (and the same segment INSERT): the bulk path the store
                   does not take (pg_store.py)
  store            PostgresStore.ingest of batches verified beforehand: row lock, dedup
                   decision, COPY, head, rollups, commit
  verified         Verifier.verify + PostgresStore.ingest, in 1 and in 2 threads (streams;
                   a collector serves each stream in its own thread)
  2 collectors     the same in 2 processes (two collectors on one PostgreSQL, the scale-out
                   this store exists for): each verifies with its own interpreter, so the
                   verifier's CPU is no longer held to one core by the GIL
  small batches    the same at batch 10 in 8 streams: what agents send in steady state (a
                   window of an 8-GPU host), where the cost per commit dominates

The database runs on the same machine and shares its cores. PostgreSQL is at
$CREDITMETER_BENCH_POSTGRES_URL (default: the local test database); a scratch schema is
created and dropped. Bar: ≥ 50,000 records/s verified and committed.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.string import BytesBinaryDumper

from bench.common import Result, median
from bench.records import Chain
from creditmeter.collector.clock import wall_clock_us
from creditmeter.collector.pg_store import RECORD_COPY_COLUMNS, RECORD_COPY_TYPES, PostgresStore
from creditmeter.collector.rows import AGENT_ID, SEQ, RecordRow
from creditmeter.collector.verifier import VerifiedBatch, Verifier
from creditmeter.v1 import ingest_pb2

URL_ENV = "CREDITMETER_BENCH_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
BATCH = 1000
TARGET = 50_000  # records/s, verified and committed
# Agents ship as their windows close: an 8-GPU host's window is ~10 records every 10 s. At
# that size the cost per transaction (signature, round trips, commit) dominates.
SMALL_BATCH = 10
SMALL_STREAMS = 8
SWITCH_INTERVAL_S = 0.0002  # as `creditmeter-collector serve` runs (see collector.main)
_COLUMNS = ", ".join(RECORD_COPY_COLUMNS)

Conn = psycopg.Connection[tuple[object, ...]]
Segment = tuple[Sequence[RecordRow], bytes]  # a batch's rows and its head signature


def run(quick: bool = False) -> tuple[list[Result], str]:
    repeats = 3 if quick else 5
    batches = 10 if quick else 20  # per figure and repeat
    small_batches = 400 if quick else 800  # of SMALL_BATCH, per repeat
    samples: dict[str, list[float]] = {}
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with _scratch_schema(os.environ.get(URL_ENV, DEFAULT_URL)) as url:
            store = PostgresStore(url)
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    # The store's connections dump bytea with psycopg's C dumper
                    # (pg_store.PostgresStore._connect); so does the baseline.
                    conn.adapters.register_dumper(bytearray, BytesBinaryDumper)
                    for table in ("records", "segments"):
                        conn.execute(f"CREATE TABLE raw_{table} (LIKE {table} INCLUDING ALL)")
                        conn.execute(f"CREATE TABLE staged_{table} (LIKE {table} INCLUDING ALL)")
                    for repeat in range(repeats):
                        figures = _one_repeat(store, conn, url, repeat, batches, small_batches)
                        for name, value in figures.items():
                            samples.setdefault(name, []).append(value)
                    row = conn.execute(
                        "SELECT (pg_total_relation_size('records')"
                        " + pg_total_relation_size('segments'))::float8 / COUNT(*) FROM records"
                    ).fetchone()
                    samples["stored_bytes_per_record"] = [float(row[0]) if row else 0.0]  # type: ignore[arg-type]
            finally:
                store.close()
    finally:
        sys.setswitchinterval(previous)
    return _results({name: median(values) for name, values in samples.items()})


def _one_repeat(
    store: PostgresStore, conn: Conn, url: str, repeat: int, batches: int, small_batches: int
) -> dict[str, float]:
    verifier = Verifier()
    figures: dict[str, float] = {}
    verified = [
        (agent.agent_id, verifier.verify(batch, agent.key.public_key()))
        for agent, agent_batches in _enrolled(store, f"store{repeat}", 2, batches // 2)
        for batch in agent_batches
    ]
    segments = [(batch.records.rows, batch.signature) for _, batch in verified]
    figures["raw"] = _rate(len(segments), lambda: _raw_copy(conn, segments))
    figures["staging"] = _rate(len(segments), lambda: _staging_copy(conn, segments))
    figures["store"] = _rate(len(verified), lambda: _ingest_all(store, verified))
    costs = []
    for streams in (1, 2):
        work = _enrolled(store, f"v{streams}-{repeat}", streams, batches // streams)
        before = _Cost.now(conn)
        figures[f"verified_{streams}"] = _rate(
            batches, lambda work=work: _verify_and_ingest(store, verifier, work)
        )
        if streams == 2:
            costs.append((batches * BATCH, batches, _Cost.now(conn) - before))
    figures["collectors_2"] = _two_collectors(url, f"p{repeat}", batches // 2)
    work = _enrolled(
        store, f"small-{repeat}", SMALL_STREAMS, small_batches // SMALL_STREAMS, SMALL_BATCH
    )
    before = _Cost.now(conn)
    figures["small"] = _rate(
        small_batches, lambda: _verify_and_ingest(store, verifier, work), SMALL_BATCH
    )
    costs.append((small_batches * SMALL_BATCH, small_batches, _Cost.now(conn) - before))
    figures.update(_unit_costs(*costs))
    return figures


@dataclass(frozen=True)
class _Cost:
    """What a run cost: CPU of this process (the collector's share: verification and the
    store's client side), CPU of PostgreSQL's processes when they run on this machine, and
    WAL written."""

    collector_cpu_s: float
    postgres_cpu_s: float
    wal_bytes: float

    @staticmethod
    def now(conn: Conn) -> _Cost:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        wal = float(row[0]) if row else 0.0  # type: ignore[arg-type]
        return _Cost(time.process_time(), _postgres_cpu_s(), wal)

    def __sub__(self, other: _Cost) -> _Cost:
        return _Cost(
            self.collector_cpu_s - other.collector_cpu_s,
            self.postgres_cpu_s - other.postgres_cpu_s,
            self.wal_bytes - other.wal_bytes,
        )


def _unit_costs(big: tuple[int, int, _Cost], small: tuple[int, int, _Cost]) -> dict[str, float]:
    """Cost per record and per commit, from a run of large batches and one of small ones:
    cost = records × per_record + commits × per_commit, solved for both."""
    (n_big, k_big, c_big), (n_small, k_small, c_small) = big, small
    det = n_big * k_small - n_small * k_big
    out = {}
    for name in ("collector_cpu_s", "postgres_cpu_s", "wal_bytes"):
        b, s = getattr(c_big, name), getattr(c_small, name)
        out[f"{name}_per_record"] = (b * k_small - s * k_big) / det
        out[f"{name}_per_commit"] = (n_big * s - n_small * b) / det
    return out


def _postgres_cpu_s() -> float:
    """User + system CPU of every process named postgres on this machine (0 when the
    database runs elsewhere, or its processes are not readable)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")].startswith("postgres"):
            fields = text[text.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _results(m: dict[str, float]) -> tuple[list[Result], str]:
    name = "ingest PostgreSQL"
    raw = m["raw"]
    results = [
        Result(
            name,
            "verified + committed, batch 1000, 1 stream",
            m["verified_1"],
            "rec/s",
            "raw COPY",
            raw,
            f"≥ {TARGET:,} rec/s",
            m["verified_1"] >= TARGET,
        ),
        Result(
            name,
            "verified + committed, batch 1000, 2 streams",
            m["verified_2"],
            "rec/s",
            "raw COPY",
            raw,
            f"≥ {TARGET:,} rec/s",
            m["verified_2"] >= TARGET,
        ),
        Result(
            name,
            "verified + committed, batch 1000, 2 collector processes",
            m["collectors_2"],
            "rec/s",
            "raw COPY",
            raw,
            f"≥ {TARGET:,} rec/s",
            m["collectors_2"] >= TARGET,
        ),
        Result(
            name,
            "store.ingest of verified batches, batch 1000",
            m["store"],
            "rec/s",
            "raw COPY",
            raw,
        ),
        Result(
            name,
            "staging table + INSERT … ON CONFLICT (not used)",
            m["staging"],
            "rec/s",
            "raw COPY",
            raw,
        ),
        Result(
            name,
            f"verified + committed, batch {SMALL_BATCH}, {SMALL_STREAMS} streams",
            m["small"],
            "rec/s",
        ),
        Result(name, "collector CPU per record", m["collector_cpu_s_per_record"] * 1e6, "µs"),
        Result(name, "collector CPU per commit", m["collector_cpu_s_per_commit"] * 1e6, "µs"),
        Result(name, "PostgreSQL CPU per record", m["postgres_cpu_s_per_record"] * 1e6, "µs"),
        Result(name, "PostgreSQL CPU per commit", m["postgres_cpu_s_per_commit"] * 1e6, "µs"),
        Result(name, "WAL per record", m["wal_bytes_per_record"], "bytes"),
        Result(name, "WAL per commit", m["wal_bytes_per_commit"], "bytes"),
        Result(
            name,
            "stored per record (records + segments, tables + indexes)",
            m["stored_bytes_per_record"],
            "bytes",
        ),
    ]
    detail = (
        f"batch {BATCH}: verified + committed {m['verified_1']:,.0f} rec/s in 1 stream, "
        f"{m['verified_2']:,.0f} in 2, {m['collectors_2']:,.0f} by 2 collector processes; "
        f"store alone {m['store']:,.0f} "
        f"({m['store'] / raw:.2f} × raw COPY {raw:,.0f}); staging path {m['staging']:,.0f}; "
        f"batch {SMALL_BATCH} in {SMALL_STREAMS} streams: {m['small']:,.0f} rec/s "
        f"({m['small'] / SMALL_BATCH:,.0f} commits/s). Cost per record + per commit: "
        f"collector CPU {m['collector_cpu_s_per_record'] * 1e6:.1f} + "
        f"{m['collector_cpu_s_per_commit'] * 1e6:.0f} µs, PostgreSQL CPU "
        f"{m['postgres_cpu_s_per_record'] * 1e6:.1f} + {m['postgres_cpu_s_per_commit'] * 1e6:.0f}"
        f" µs, WAL {m['wal_bytes_per_record']:.0f} + {m['wal_bytes_per_commit']:.0f} bytes; "
        f"{m['stored_bytes_per_record']:.0f} bytes stored per record"
    )
    return results, detail


def _two_collectors(url: str, prefix: str, batches: int) -> float:
    """Records/s of two collector processes each verifying and committing its own agent's
    batches into one database, from the first start to the last finish."""
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(3)
    spans = context.Queue()
    workers = [
        context.Process(
            target=_collector_process, args=(url, f"{prefix}-{i}", batches, ready, spans)
        )
        for i in range(2)
    ]
    for w in workers:
        w.start()
    ready.wait()  # both have made their batches: timing starts now
    results = [spans.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return sum(r[2] for r in results) / (end - start)


def _collector_process(url: str, prefix: str, batches: int, ready: Any, spans: Any) -> None:
    store = PostgresStore(url)
    try:
        work = _enrolled(store, prefix, 1, batches)
        verifier = Verifier()
        agent, agent_batches = work[0]
        key = agent.key.public_key()
        ready.wait()
        start = time.perf_counter()
        for batch in agent_batches:
            store.ingest(agent.agent_id, verifier.verify(batch, key))
        spans.put((start, time.perf_counter(), len(agent_batches) * BATCH))
    finally:
        store.close()


def _enrolled(
    store: PostgresStore, prefix: str, agents: int, batches: int, size: int = BATCH
) -> list[tuple[Chain, list[ingest_pb2.RecordBatch]]]:
    """Fresh agents, enrolled, with their batches made (outside any timing)."""
    work = []
    for index in range(agents):
        agent = Chain(f"{prefix}-{index}-{uuid.uuid4().hex[:6]}")
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
        work.append((agent, [agent.batch(size) for _ in range(batches)]))
    return work


def _rate(batch_count: int, body: Callable[[], None], size: int = BATCH) -> float:
    start = time.perf_counter()
    body()
    return batch_count * size / (time.perf_counter() - start)


def _ingest_all(store: PostgresStore, verified: Sequence[tuple[str, VerifiedBatch]]) -> None:
    for agent_id, batch in verified:
        store.ingest(agent_id, batch)


def _verify_and_ingest(
    store: PostgresStore,
    verifier: Verifier,
    work: Sequence[tuple[Chain, list[ingest_pb2.RecordBatch]]],
) -> None:
    """One thread per agent, as the collector serves one stream per thread."""

    def stream(agent: Chain, batches: list[ingest_pb2.RecordBatch]) -> None:
        key = agent.key.public_key()
        for batch in batches:
            store.ingest(agent.agent_id, verifier.verify(batch, key))

    threads = [threading.Thread(target=stream, args=item) for item in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _copy_rows(
    cur: psycopg.Cursor[tuple[object, ...]], table: str, rows: Sequence[RecordRow]
) -> None:
    with cur.copy(f"COPY {table} ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(RECORD_COPY_TYPES)
        write = copy.write_row
        for row in rows:
            write(row)


def _insert_segment(
    cur: psycopg.Cursor[tuple[object, ...]], table: str, rows: Sequence[RecordRow], signature: bytes
) -> None:
    """The batch's segment row, as the store writes one per batch (it folds the INSERT into
    the statement that moves the head; here it is a statement of its own)."""
    cur.execute(
        f"INSERT INTO {table} (agent_id, last_seq, signature, received_at_us) "
        "VALUES (%s, %s, %s, %s)",
        (rows[-1][AGENT_ID], rows[-1][SEQ], signature, wall_clock_us()),
    )


def _raw_copy(conn: Conn, batches: Sequence[Segment]) -> None:
    for rows, signature in batches:
        with conn.transaction(), conn.cursor() as cur:
            _copy_rows(cur, "raw_records", rows)
            _insert_segment(cur, "raw_segments", rows, signature)


def _staging_copy(conn: Conn, batches: Sequence[Segment]) -> None:
    conn.execute("CREATE TEMPORARY TABLE staging (LIKE records) ON COMMIT DELETE ROWS")
    try:
        for rows, signature in batches:
            with conn.transaction(), conn.cursor() as cur:
                _copy_rows(cur, "staging", rows)
                cur.execute(
                    f"INSERT INTO staged_records ({_COLUMNS}) SELECT {_COLUMNS} FROM staging "
                    "ON CONFLICT DO NOTHING"
                )
                _insert_segment(cur, "staged_segments", rows, signature)
    finally:
        conn.execute("DROP TABLE staging")


@contextmanager
def _scratch_schema(base_url: str) -> Iterator[str]:
    """A schema of its own for one run, dropped after; yields the URL that selects it."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"no PostgreSQL for the benchmark at {base_url} (set {URL_ENV}): {exc}"
        ) from exc
    separator = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    found, text = run(quick="--quick" in sys.argv)
    for result in found:
        print(result)
    print(text)
