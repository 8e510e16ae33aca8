"""The PostgreSQL store: what only it does. Several stores (collectors) on one database,
row locks, connections that break, schema versions, the URL. What every store guarantees is
in test_store_contract.py, which runs here too."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import psycopg
import pytest

from creditmeter import chain
from creditmeter.collector import pg_store
from creditmeter.collector.audit import audit
from creditmeter.collector.errors import (
    ConfigError,
    InsaneField,
    SchemaTooNew,
    Status,
    StoreBusy,
    StoreCorrupt,
    StoreError,
)
from creditmeter.collector.ledger_store import DeviceRollup
from creditmeter.collector.pg_store import MIGRATIONS, SCHEMA_VERSION, PostgresStore
from creditmeter.collector.rollup import account_sums
from creditmeter.collector.rows import ROW_COLUMNS
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.store import ChainHead, StoredRecord, UsageTotal
from creditmeter.collector.stores import open_store, redacted
from creditmeter.collector.verifier import VerifiedBatch, Verifier
from creditmeter.v1 import ingest_pb2, usage_pb2

from .backends import PostgresBackend, with_search_path
from .conftest import NOW_US
from .records import BUSY_US, WALL_US, AgentChain

pytestmark = pytest.mark.postgres

HOUR0_US = 1_749_999_600_000_000  # the hour the test records start in
GPU_UUID = "GPU-8f3c2a1e-0000-4000-8000-000000000017"  # of every test record


@pytest.fixture
def pg(postgres_url: str) -> Iterator[PostgresBackend]:
    """The test's schema, and every store opened on it closed at the end."""
    backend = PostgresBackend(postgres_url, clock_us=lambda: NOW_US)
    yield backend
    backend.close()


def verified(verifier: Verifier, agent: AgentChain, batch: ingest_pb2.RecordBatch) -> VerifiedBatch:
    return verifier.verify(batch, agent.key.public_key())


def head(agent: AgentChain, seq: int) -> ChainHead:
    return ChainHead(seq, chain.record_hash(agent.records[seq - 1]))


def count(pg: PostgresBackend, sql: str) -> int:
    return int(pg.rows(sql)[0][0])


def enrolled(store: PostgresStore, agent_id: str = "agent-1") -> AgentChain:
    agent = AgentChain(agent_id)
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    return agent


def enrolled_as_v1(pg: PostgresBackend, agent_id: str = "agent-1") -> AgentChain:
    """Enrolled as schema version 1 did: no key history."""
    agent = AgentChain(agent_id)
    pg.execute(
        "INSERT INTO agents (agent_id, public_key_hex, enrolled_at_us) VALUES (?, ?, ?)",
        agent.agent_id,
        agent.public_key_hex,
        1,
    )
    return agent


def in_threads(*calls: Callable[[], object]) -> list[object]:
    """Runs ``calls`` at the same moment (a barrier), one thread each; returns their results
    in order, or raises the first exception one of them raised."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# -- several collectors on one database --------------------------------------------------------


def test_two_collectors_receiving_the_same_retries_at_once_store_them_once(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    """An agent that timed out on collector A resends to collector B while A still works on
    the batch: both transactions run at once. The agent row lock makes the second one see the
    first one's records as duplicates; without it both would insert (a unique violation, or
    rollups counted twice)."""
    first, second = pg.open(), pg.open()
    agent = enrolled(first)
    for _ in range(25):
        start = len(agent.records) + 1
        agent.extend(8)
        retry = verified(verifier, agent, agent.batch(start, len(agent.records)))
        overlap = verified(verifier, agent, agent.batch(max(1, start - 3), len(agent.records)))
        acks = in_threads(
            partial(first.ingest, agent.agent_id, retry),
            partial(second.ingest, agent.agent_id, overlap),
        )
        assert acks == [head(agent, len(agent.records))] * 2
    assert count(pg, "SELECT COUNT(*) FROM records") == 200
    assert count(pg, "SELECT COUNT(*) FROM segments") == 25
    assert first.usage(None, None) == [
        UsageTotal("acme", "llama-3-70b", 200 * BUSY_US, 200 * WALL_US, 200)
    ]
    assert audit(first, verifier).findings == []


def test_writers_sharing_rollup_rows_do_not_deadlock(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    """Four collectors, agents whose batches touch the same rollup rows in opposite orders
    (acme then bert, bert then acme), one rollup shard so that every writer meets every
    other: rows upserted in key order never deadlock (PostgreSQL would abort one writer of a
    deadlock after deadlock_timeout, StoreBusy here)."""
    stores = [pg.open(rollup_shards=1, lock_timeout_s=30.0) for _ in range(4)]
    agents = [enrolled(stores[0], f"agent-{i}") for i in range(8)]

    def accounts(first: str, then: str) -> Callable[[usage_pb2.UsageRecord], None]:
        def label(rec: usage_pb2.UsageRecord) -> None:
            rec.attribution.account = first if rec.seq % 10 < 5 else then

        return label

    def deliver(store: PostgresStore, pair: Sequence[AgentChain]) -> None:
        for _ in range(10):
            for index, agent in enumerate(pair):
                label = accounts("acme", "bert") if index == 0 else accounts("bert", "acme")
                store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(10, label)))

    in_threads(*(lambda i=i: deliver(stores[i], agents[2 * i : 2 * i + 2]) for i in range(4)))
    assert [(u.account, u.busy_us, u.record_count) for u in stores[0].usage(None, None)] == [
        ("acme", 400 * BUSY_US, 400),
        ("bert", 400 * BUSY_US, 400),
    ]
    assert audit(stores[0], verifier).findings == []


def test_rollups_of_agents_in_different_shards_are_summed(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    store = pg.open(rollup_shards=4)
    agents = [enrolled(store, f"agent-{i}") for i in range(6)]
    for agent in agents:
        store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(3)))
    assert count(pg, "SELECT COUNT(DISTINCT shard) FROM rollups_hourly") > 1
    assert store.usage(None, None) == [
        UsageTotal("acme", "llama-3-70b", 18 * BUSY_US, 18 * WALL_US, 18)
    ]
    with store.snapshot() as snapshot:
        assert [r.record_count for r in snapshot.rollups()] == [18]


def test_collectors_starting_together_migrate_once(pg: PostgresBackend) -> None:
    opened = in_threads(*(pg.open for _ in range(4)))
    assert len(opened) == 4
    assert pg.rows("SELECT version FROM schema_version ORDER BY 1") == [
        (m.version,) for m in MIGRATIONS
    ]


def test_an_agent_locked_by_another_collector_is_busy_and_nothing_is_stored(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    """A collector that hangs inside a transaction holds the agent's row: the others give
    up after the lock timeout with StoreBusy (UNAVAILABLE: the agent retries later)."""
    impatient = pg.open(lock_timeout_s=0.2)
    agent = enrolled(impatient)
    with psycopg.connect(pg.url) as hung, hung.transaction():
        hung.execute("SELECT 1 FROM agents WHERE agent_id = %s FOR UPDATE", (agent.agent_id,))
        with pytest.raises(StoreBusy) as caught:
            impatient.ingest(agent.agent_id, verified(verifier, agent, agent.extend(2)))
        assert caught.value.status is Status.UNAVAILABLE
        assert "lock timeout" in str(caught.value)
    assert count(pg, "SELECT COUNT(*) FROM records") == 0
    assert impatient.ingest(agent.agent_id, verified(verifier, agent, agent.batch(1, 2))) == head(
        agent, 2
    )


def test_a_snapshot_is_one_moment_while_ingest_goes_on(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    store = pg.open()
    agent = enrolled(store)
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(3)))
    with store.snapshot() as snapshot:
        agents = snapshot.agents()
        store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(2)))
        assert [r.seq for r in snapshot.records()] == [1, 2, 3]
        assert [r.record_count for r in snapshot.rollups()] == [3]
    assert agents[0].head == head(agent, 3)


# -- connections -----------------------------------------------------------------------------


def test_a_lost_connection_fails_one_request_and_the_next_one_reconnects(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    """The database restarted, failed over or dropped us: the request in hand fails with
    UNAVAILABLE (the agent resends it) and the store connects afresh for the next."""
    name = f"cm-test-{uuid.uuid4().hex[:8]}"
    store = pg.open(pool_size=2)
    labelled = PostgresStore(f"{pg.url}&application_name={name}", clock_us=lambda: NOW_US)
    try:
        agent = enrolled(store)
        labelled.ingest(agent.agent_id, verified(verifier, agent, agent.extend(2)))
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
            name,
        )
        batch = verified(verifier, agent, agent.extend(3))
        with pytest.raises(StoreError) as caught:
            labelled.ingest(agent.agent_id, batch)
        assert caught.value.status is Status.UNAVAILABLE
        assert "unavailable" in str(caught.value)
        assert labelled.ingest(agent.agent_id, batch) == head(agent, 5)
    finally:
        labelled.close()
    assert count(pg, "SELECT COUNT(*) FROM records") == 5


def test_more_streams_than_connections_wait_their_turn(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    store = pg.open(pool_size=1)
    agents = [enrolled(store, f"agent-{i}") for i in range(6)]
    batches = [verified(verifier, agent, agent.extend(50)) for agent in agents]
    acks = in_threads(
        *(
            lambda a=a, b=b: store.ingest(a.agent_id, b)
            for a, b in zip(agents, batches, strict=True)
        )
    )
    assert acks == [head(agent, 50) for agent in agents]
    assert count(pg, "SELECT COUNT(*) FROM records") == 300


def test_an_unreachable_database_is_named_without_its_password() -> None:
    with pytest.raises(StoreError) as caught:
        PostgresStore("postgresql://collector:s3cret@127.0.0.1:1/creditmeter")
    message = str(caught.value)
    assert "PostgreSQL collector@127.0.0.1:1/creditmeter unavailable" in message
    assert "s3cret" not in message
    assert caught.value.status is Status.UNAVAILABLE


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://cm:s3cret@db:5432/cm", "postgresql://cm:***@db:5432/cm"),
        (
            "postgresql://cm@db/cm?password=s3cret&sslmode=require",
            "postgresql://cm@db/cm?password=***&sslmode=require",
        ),
        (
            "postgresql://cm@db/cm?passfile=/etc/pgpass",
            "postgresql://cm@db/cm?passfile=/etc/pgpass",
        ),
        ("sqlite:///var/lib/c.db", "sqlite:///var/lib/c.db"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_malformed_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a usable PostgreSQL URL"):
        open_store("postgresql://localhost/cm?no_such_setting=1", create=True)


def test_the_url_selects_the_store(postgres_url: str, tmp_path: Path) -> None:
    postgres = open_store(postgres_url, create=True)
    sqlite = open_store(f"sqlite://{tmp_path / 'c.db'}", create=True)
    try:
        assert isinstance(postgres, PostgresStore)
        assert isinstance(sqlite, SQLiteStore)
    finally:
        postgres.close()
        sqlite.close()


# -- what PostgreSQL refuses -------------------------------------------------------------------


def test_a_label_postgresql_cannot_hold_is_refused_and_nothing_is_stored(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    """Text columns (the rollups' labels) cannot hold NUL. The verifier refuses such labels
    first; should one reach the store anyway, it refuses the batch as INVALID_ARGUMENT
    rather than failing it as UNAVAILABLE, which the agent would retry forever."""
    store = pg.open()
    agent = enrolled(store)
    batch = verified(verifier, agent, agent.extend(3))
    device_sums = {
        (hour, host, gpu, "ac\x00me", model): sums
        for (hour, host, gpu, _, model), sums in batch.records.device_sums.items()
    }
    smuggled = replace(
        batch,
        records=replace(batch.records, sums=account_sums(device_sums), device_sums=device_sums),
    )
    with pytest.raises(InsaneField) as caught:
        store.ingest(agent.agent_id, smuggled)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert count(pg, "SELECT COUNT(*) FROM records") == 0
    assert count(pg, "SELECT COUNT(*) FROM segments") == 0
    assert count(pg, "SELECT head_seq FROM agents") == 0


@pytest.mark.parametrize("records", [1, 100], ids=["inserted", "copied"])
def test_records_above_the_head_are_a_corrupt_store_and_nothing_is_stored(
    pg: PostgresBackend, verifier: Verifier, records: int
) -> None:
    """A head that lags its records (a database restored in part, or edited): the dedup key
    refuses the second copy instead of the store storing it twice."""
    store = pg.open()
    agent = enrolled(store)
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(records)))
    pg.execute("UPDATE agents SET head_seq = 0, head_hash = ''")
    with pytest.raises(StoreCorrupt, match="records above the stored head"):
        store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(1, records)))
    assert count(pg, "SELECT SUM(record_count) FROM rollups_hourly") == records


def test_a_segment_above_the_head_is_a_corrupt_store_and_nothing_is_stored(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    """Records deleted behind the collector's back, their segment kept: the segment's key
    refuses the second one."""
    store = pg.open()
    agent = enrolled(store)
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(3)))
    pg.execute("DELETE FROM records")
    pg.execute("UPDATE agents SET head_seq = 0, head_hash = ''")
    with pytest.raises(StoreCorrupt, match="segments above the stored head"):
        store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(1, 3)))
    assert count(pg, "SELECT COUNT(*) FROM records") == 0
    assert count(pg, "SELECT SUM(record_count) FROM rollups_hourly") == 3


# -- schema ----------------------------------------------------------------------------------


def versions(pg: PostgresBackend) -> list[int]:
    return [row[0] for row in pg.rows("SELECT version FROM schema_version ORDER BY 1")]


def test_a_new_database_gets_every_migration(pg: PostgresBackend) -> None:
    pg.open()
    assert versions(pg) == [m.version for m in MIGRATIONS] == list(range(1, 17))
    assert SCHEMA_VERSION == 16
    assert columns(pg, "records") == sorted(ROW_COLUMNS)


def columns(pg: PostgresBackend, table: str) -> list[str]:
    """The table's column names, sorted (migration 1 made records' physical order)."""
    return sorted(
        row[0]
        for row in pg.rows(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            table,
        )
    )


def store_the_old_way(pg: PostgresBackend, agent: AgentChain, last_seqs: Sequence[int]) -> None:
    """Stores the agent's records up to the last of ``last_seqs`` as schema versions 1 to 4
    did (every field also in a column of records, each batch's signature on its last
    record), one batch ending at each of ``last_seqs``, and moves its head."""
    first = 1
    for batch, last in enumerate(last_seqs):
        signature = agent.batch(first, last).signature
        for seq in range(first, last + 1):
            data = agent.records[seq - 1]
            rec = usage_pb2.UsageRecord.FromString(data)
            row = {
                "agent_id": agent.agent_id,
                "seq": seq,
                "hash": chain.record_hash(data),
                "record": data,
                "signature": signature if seq == last else None,
                "start_us": rec.start_unix_us,
                "end_us": rec.end_unix_us,
                "host": rec.host,
                "gpu_uuid": rec.gpu.uuid,
                "gpu_index": rec.gpu.index,
                "gpu_parent_uuid": rec.gpu.parent_uuid,
                "pid": rec.process.pid,
                "create_time_us": rec.process.create_time_us,
                "process_name": rec.process.name,
                "account": rec.attribution.account,
                "model": rec.attribution.model,
                "job_id": rec.attribution.job_id,
                "attribution_source": rec.attribution.source,
                "busy_us": rec.busy_us,
                "wall_us": rec.wall_us,
                "energy_mj": rec.energy_mj if rec.HasField("energy_mj") else None,
                "gap_us": sum(gap.duration_us for gap in rec.gaps),
                "source": rec.source,
                "received_at_us": NOW_US + batch,
            }
            pg.execute(
                f"INSERT INTO records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                *row.values(),
            )
        first = last + 1
    pg.execute(
        "UPDATE agents SET head_seq = ?, head_hash = ? WHERE agent_id = ?",
        last_seqs[-1],
        chain.record_hash(agent.records[last_seqs[-1] - 1]),
        agent.agent_id,
    )


def test_an_older_database_is_migrated_and_its_rollups_backfilled(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    old = pg.open(migrations=MIGRATIONS[:1])  # as schema version 1 left it
    old.close()
    agent = enrolled_as_v1(pg)
    agent.extend(4)
    store_the_old_way(pg, agent, [4])
    assert versions(pg) == [1]

    current = pg.open()
    assert versions(pg) == list(range(1, 17))
    assert current.usage(None, None) == [
        UsageTotal("acme", "llama-3-70b", 4 * BUSY_US, 4 * WALL_US, 4)
    ]
    device = DeviceRollup(
        HOUR0_US, "gpu-host-17", GPU_UUID, "acme", "llama-3-70b", 4 * BUSY_US, 4 * WALL_US, 4
    )
    with current.snapshot() as snapshot:
        assert list(snapshot.device_rollups()) == [device]
    # Ingest then adds to its own shard; readers sum the backfilled one with it.
    current.ingest(agent.agent_id, verified(verifier, agent, agent.extend(1)))
    assert current.usage(None, None)[0].record_count == 5
    with current.snapshot() as snapshot:
        assert [r.record_count for r in snapshot.device_rollups()] == [5]
    assert audit(current, verifier).findings == []


def test_records_of_schema_version_4_keep_their_bytes_and_signatures(
    pg: PostgresBackend, verifier: Verifier
) -> None:
    """Migration 5 moves each batch's signature into segments and drops every column of
    records but the evidence and its key; what the bytes and the rollups say is unchanged."""
    pg.open(migrations=MIGRATIONS[:4]).close()
    agents = [enrolled_as_v1(pg, "agent-1"), enrolled_as_v1(pg, "agent-2")]
    for agent, last_seqs in zip(agents, ([3, 5, 6], [2]), strict=True):
        agent.extend(last_seqs[-1])
        store_the_old_way(pg, agent, last_seqs)
    pg.execute(  # the rollups as version 4's ingest kept them
        """INSERT INTO rollups_hourly
           SELECT start_us - start_us % 3600000000, account, model, 0, SUM(busy_us),
                  SUM(wall_us), COUNT(*) FROM records GROUP BY 1, 2, 3"""
    )
    pg.execute(
        """INSERT INTO rollups_device_hourly
           SELECT start_us - start_us % 3600000000, host, gpu_uuid, account, model, 0,
                  SUM(busy_us), SUM(wall_us), COUNT(*) FROM records GROUP BY 1, 2, 3, 4, 5"""
    )
    assert versions(pg) == [1, 2, 3, 4]

    current = pg.open()
    assert versions(pg) == list(range(1, 17))
    assert columns(pg, "records") == sorted(ROW_COLUMNS)
    signatures = {
        (agent.agent_id, last): agent.batch(first, last).signature
        for agent, bounds in zip(agents, ([(1, 3), (4, 5), (6, 6)], [(1, 2)]), strict=True)
        for first, last in bounds
    }
    assert pg.rows(
        "SELECT agent_id, last_seq, signature, received_at_us FROM segments ORDER BY 1, 2"
    ) == [
        ("agent-1", 3, signatures["agent-1", 3], NOW_US),
        ("agent-1", 5, signatures["agent-1", 5], NOW_US + 1),
        ("agent-1", 6, signatures["agent-1", 6], NOW_US + 2),
        ("agent-2", 2, signatures["agent-2", 2], NOW_US),
    ]
    expected = [
        StoredRecord(
            agent.agent_id,
            seq,
            agent.record(seq).start_unix_us,
            data,
            signatures.get((agent.agent_id, seq)),
        )
        for agent in agents
        for seq, data in enumerate(agent.records, 1)
    ]
    with current.snapshot() as snapshot:
        assert list(snapshot.records()) == expected
    assert audit(current, verifier).findings == []

    # Ingest goes on from the migrated head, resends compared with the migrated bytes.
    first = agents[0]
    first.extend(2)
    assert current.ingest(first.agent_id, verified(verifier, first, first.batch(5, 8))) == head(
        first, 8
    )
    assert count(pg, "SELECT COUNT(*) FROM records") == 10
    added = pg.rows("SELECT agent_id, last_seq, received_at_us FROM segments WHERE last_seq > 6")
    assert added == [("agent-1", 8, NOW_US)]
    assert current.usage(None, None) == [
        UsageTotal("acme", "llama-3-70b", 10 * BUSY_US, 10 * WALL_US, 10)
    ]
    assert audit(current, verifier).findings == []


def test_an_older_database_is_not_migrated_by_read_only_commands(pg: PostgresBackend) -> None:
    pg.open(migrations=MIGRATIONS[:1]).close()
    with pytest.raises(StoreError, match="older than this collector's"):
        pg.open(migrate=False)
    assert versions(pg) == [1]


def test_a_database_from_newer_code_is_refused(pg: PostgresBackend) -> None:
    pg.open().close()
    newer = SCHEMA_VERSION + 1
    pg.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", newer)
    with pytest.raises(SchemaTooNew, match=f"version {newer} is newer than this collector's"):
        pg.open()


def test_a_failed_migration_leaves_the_database_as_it_was(pg: PostgresBackend) -> None:
    pg.open(migrations=MIGRATIONS[:1]).close()
    broken = (*MIGRATIONS, pg_store.Migration(99, "broken", ("CREATE TABLE agents (x INT)",)))
    with pytest.raises(StoreError, match="already exists"):
        pg.open(migrations=broken)
    assert versions(pg) == [1]  # version 2 rolled back with 99
    assert pg.rows("SELECT to_regclass('rollups_hourly')") == [(None,)]


def test_an_empty_database_is_not_set_up_by_reading_commands(pg: PostgresBackend) -> None:
    with pytest.raises(StoreError, match="no creditmeter database in schema"):
        pg.open(create=False)
    assert pg.rows("SELECT to_regclass('schema_version')") == [(None,)]


def test_a_schema_that_does_not_exist_is_named(postgres_server: str) -> None:
    with pytest.raises(StoreError, match="schema"):
        PostgresStore(with_search_path(postgres_server, f"absent_{uuid.uuid4().hex[:8]}"))
