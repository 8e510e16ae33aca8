"""The SQLite store: what only it does (its file, its locking, its schema versions). What
every store guarantees is tested against SQLite and PostgreSQL in test_store_contract.py."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from creditmeter import chain
from creditmeter.collector.audit import audit
from creditmeter.collector.errors import (
    SchemaTooNew,
    Status,
    StoreBusy,
    StoreError,
)
from creditmeter.collector.ledger_store import Dimension
from creditmeter.collector.sqlite_store import MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from creditmeter.collector.store import UsageTotal
from creditmeter.collector.verifier import VerifiedBatch, Verifier
from creditmeter.v1 import ingest_pb2, usage_pb2

from .conftest import NOW_US
from .records import BUSY_US, T0_US, WALL_US, WINDOW_US, AgentChain


def verified(verifier: Verifier, agent: AgentChain, batch: ingest_pb2.RecordBatch) -> VerifiedBatch:
    return verifier.verify(batch, agent.key.public_key())


def test_a_database_locked_by_another_writer_is_busy_and_stores_nothing(
    agent: AgentChain, verifier: Verifier, db_path: Path
) -> None:
    impatient = SQLiteStore(db_path, busy_timeout_s=0.05)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreBusy) as caught:
            impatient.ingest(agent.agent_id, verified(verifier, agent, agent.extend(1)))
        assert caught.value.status is Status.UNAVAILABLE
        blocker.execute("ROLLBACK")
        assert impatient.ingest(agent.agent_id, verified(verifier, agent, agent.batch(1, 1)))
    finally:
        blocker.close()
        impatient.close()


# -- schema ----------------------------------------------------------------------------------


def schema_versions(db_path: Path) -> list[int]:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY 1")]


def test_a_new_database_gets_every_migration(store: SQLiteStore, db_path: Path) -> None:
    assert schema_versions(db_path) == list(range(1, 18)) == [m.version for m in MIGRATIONS]
    assert SCHEMA_VERSION == 17


# The records table as schema version 1 made it: every field extracted into a column.
V1_COLUMNS = (
    "agent_id, seq, hash, record, signature, start_us, end_us, host, gpu_uuid, gpu_index, "
    "gpu_parent_uuid, pid, create_time_us, process_name, account, model, job_id, "
    "attribution_source, busy_us, wall_us, energy_mj, gap_us, source, received_at_us"
)


def v1_row(record: bytes, signature: bytes | None) -> tuple[object, ...]:
    rec = usage_pb2.UsageRecord.FromString(record)
    gpu, process, attribution = rec.gpu, rec.process, rec.attribution
    return (
        rec.agent_id,
        rec.seq,
        chain.record_hash(record),
        record,
        signature,
        rec.start_unix_us,
        rec.end_unix_us,
        rec.host,
        gpu.uuid,
        gpu.index,
        gpu.parent_uuid,
        process.pid,
        process.create_time_us,
        process.name,
        attribution.account,
        attribution.model,
        attribution.job_id,
        attribution.source,
        rec.busy_us,
        rec.wall_us,
        rec.energy_mj,
        0,
        rec.source,
        NOW_US,
    )


def test_an_older_database_is_migrated_and_its_rollups_backfilled(
    db_path: Path, verifier: Verifier
) -> None:
    old = SQLiteStore(db_path, migrations=MIGRATIONS[:1])  # as schema version 1 left it
    old.close()
    agent = AgentChain()
    with (
        closing(sqlite3.connect(db_path)) as conn,
        conn,
    ):  # enrolled as version 1 did: no key history
        conn.execute(
            "INSERT INTO agents (agent_id, public_key_hex, enrolled_at_us) VALUES (?, ?, ?)",
            (agent.agent_id, agent.public_key_hex, NOW_US),
        )
    batch = agent.extend(4)
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.executemany(
            f"INSERT INTO records ({V1_COLUMNS}) VALUES ({', '.join('?' * 24)})",
            [
                v1_row(record, batch.signature if seq == 4 else None)
                for seq, record in enumerate(batch.records, 1)
            ],
        )
        conn.execute(
            "UPDATE agents SET head_seq = 4, head_hash = ?",
            (chain.record_hash(batch.records[-1]),),
        )
    assert schema_versions(db_path) == [1]

    current = SQLiteStore(db_path)
    try:
        assert schema_versions(db_path) == list(range(1, 18))
        with closing(sqlite3.connect(db_path)) as conn, conn:
            assert conn.execute("SELECT * FROM records ORDER BY seq").fetchall() == [
                (agent.agent_id, seq, T0_US + (seq - 1) * WINDOW_US, record)
                for seq, record in enumerate(batch.records, 1)
            ]
            assert conn.execute(
                "SELECT agent_id, last_seq, signature FROM segments"
            ).fetchall() == [(agent.agent_id, 4, batch.signature)]
        assert audit(current, verifier).findings == []
        assert current.usage(None, None) == [
            UsageTotal("acme", "llama-3-70b", 4 * BUSY_US, 4 * WALL_US, 4)
        ]
        by_host = current.grouped_usage(None, None, frozenset({Dimension.HOST, Dimension.ACCOUNT}))
        assert [(g.host, g.account, g.busy_us, g.record_count) for g in by_host] == [
            ("gpu-host-17", "acme", 4 * BUSY_US, 4)
        ]
    finally:
        current.close()


def test_an_older_database_is_not_migrated_by_read_only_commands(db_path: Path) -> None:
    SQLiteStore(db_path, migrations=MIGRATIONS[:1]).close()
    with pytest.raises(StoreError, match="older than this collector's"):
        SQLiteStore(db_path, migrate=False)
    assert schema_versions(db_path) == [1]


def test_a_database_from_newer_code_is_refused(store: SQLiteStore, db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute(
            "INSERT INTO schema_version VALUES (?, 'from the future', 0)", (SCHEMA_VERSION + 1,)
        )
    newer = f"version {SCHEMA_VERSION + 1} is newer than this collector's \\({SCHEMA_VERSION}\\)"
    with pytest.raises(SchemaTooNew, match=newer):
        SQLiteStore(db_path)


def test_a_failed_migration_leaves_the_database_as_it_was(db_path: Path) -> None:
    SQLiteStore(db_path, migrations=MIGRATIONS[:1]).close()
    broken = (
        *MIGRATIONS,
        type(MIGRATIONS[0])(SCHEMA_VERSION + 1, "broken", ("CREATE TABLE agents (x)",)),
    )
    with pytest.raises(StoreError, match="already exists"):
        SQLiteStore(db_path, migrations=broken)
    assert schema_versions(db_path) == [1]  # versions 2-4 rolled back with 5


def test_a_missing_database_is_not_created_when_asked_not_to(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no database at"):
        SQLiteStore(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_a_file_that_is_no_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="file is not a database"):
        SQLiteStore(path)


def test_a_new_database_uses_16_kib_pages_in_wal_mode(store: SQLiteStore, db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_sorter_may_use_a_helper_thread_where_there_is_a_second_core(
    store: SQLiteStore,
) -> None:
    """Large GROUP BYs (reports over weeks of device-hours) sort 1.6× faster with one."""
    helpers = store._connection().execute("PRAGMA threads").fetchone()[0]
    assert helpers == (1 if (os.cpu_count() or 1) > 1 else 0)
