"""The SQLite store: the only module that imports sqlite3.

One file, WAL journal, synchronous=FULL (a commit that returned survives power loss: the
collector acks only after commit, and an acked record is deleted from the agent's outbox).
One connection, guarded by a lock, serves every gRPC stream: SQLite has one writer at a
time anyway. Reads for the audit use their own connection (``snapshot``), so a long audit
never holds up ingest. SQLite's own automatic checkpoints keep the WAL near 16 MiB (1000
pages); a background checkpoint thread was measured and made no difference.

The schema is versioned: ``MIGRATIONS`` is applied forward at open, all pending steps in
one transaction, and a database migrated by newer code is refused.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from creditmeter.collector.clock import WallClock, wall_clock_us
from creditmeter.collector.errors import (
    AgentMismatch,
    AgentRevoked,
    EnrollmentError,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreError,
    UnknownAgent,
)
from creditmeter.collector.rollup import Rollup, hourly_sums
from creditmeter.collector.rows import ENERGY_ABSENT, HASH, ROW_COLUMNS, SEQ, RecordRow
from creditmeter.collector.store import (
    NO_HEAD,
    AgentInfo,
    ChainHead,
    StoredRecord,
    UsageTotal,
    canonical_public_key_hex,
    check_agent_id,
    first_new_index,
)
from creditmeter.collector.verifier import VerifiedBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "agents and their records",
        (
            """CREATE TABLE agents (
                agent_id TEXT PRIMARY KEY NOT NULL,
                public_key_hex TEXT NOT NULL,
                enrolled_at_us INTEGER NOT NULL,
                revoked_at_us INTEGER,
                head_seq INTEGER NOT NULL DEFAULT 0,
                head_hash BLOB NOT NULL DEFAULT x''
            )""",
            # record holds the bytes exactly as received: the evidence. The other columns
            # are extracted from them for queries; audit checks they still agree.
            # No FOREIGN KEY to agents: SQLite would look the agent up for every row, and
            # ingest only inserts for the agent whose row it has just read.
            """CREATE TABLE records (
                agent_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                hash BLOB NOT NULL,
                record BLOB NOT NULL,
                signature BLOB,
                start_us INTEGER NOT NULL,
                end_us INTEGER NOT NULL,
                host TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                gpu_index INTEGER NOT NULL,
                gpu_parent_uuid TEXT NOT NULL,
                pid INTEGER NOT NULL,
                create_time_us INTEGER NOT NULL,
                process_name TEXT NOT NULL,
                account TEXT NOT NULL,
                model TEXT NOT NULL,
                job_id TEXT NOT NULL,
                attribution_source INTEGER NOT NULL,
                busy_us INTEGER NOT NULL,
                wall_us INTEGER NOT NULL,
                energy_mj INTEGER,
                gap_us INTEGER NOT NULL,
                source INTEGER NOT NULL,
                received_at_us INTEGER NOT NULL,
                PRIMARY KEY (agent_id, seq)
            )""",
        ),
    ),
    Migration(
        2,
        "hourly rollups per account and model, backfilled from the records",
        (
            """CREATE TABLE rollups_hourly (
                hour_start_us INTEGER NOT NULL,
                account TEXT NOT NULL,
                model TEXT NOT NULL,
                busy_us INTEGER NOT NULL,
                wall_us INTEGER NOT NULL,
                record_count INTEGER NOT NULL,
                PRIMARY KEY (hour_start_us, account, model)
            ) WITHOUT ROWID""",
            """INSERT INTO rollups_hourly
                SELECT start_us - start_us % 3600000000, account, model,
                       SUM(busy_us), SUM(wall_us), COUNT(*)
                FROM records GROUP BY 1, 2, 3""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_ENERGY_COLUMN = ROW_COLUMNS.index("energy_mj")
_INSERT_COLUMNS = ", ".join(ROW_COLUMNS)
# energy_mj arrives as ENERGY_ABSENT rather than None (see verifier.RecordRow).
_INSERT_VALUES = ", ".join(
    f"NULLIF(?, {ENERGY_ABSENT})" if i == _ENERGY_COLUMN else "?" for i in range(len(ROW_COLUMNS))
)
_INSERT = f"INSERT INTO records ({_INSERT_COLUMNS}) VALUES ({_INSERT_VALUES})"
# Records go in as multi-row INSERTs of power-of-two sizes (1000 rows: 512 + 256 + 128 +
# 64 + 32 + 8), each SQL text compiled once and kept in sqlite3's statement cache. One
# statement per chunk instead of one step per row saves Python-to-SQLite round trips, and
# sqlite3 releases the GIL for the whole chunk, so another stream's verification runs on the
# second core meanwhile; executemany would re-take the GIL after every row.
_MAX_CHUNK_ROWS = 512
_CHUNK_SQL = {
    rows: f"INSERT INTO records ({_INSERT_COLUMNS}) VALUES "
    + ", ".join([f"({_INSERT_VALUES})"] * rows)
    for rows in (2**n for n in range(_MAX_CHUNK_ROWS.bit_length()))
}
# The batch's last record carries the batch's head signature.
_INSERT_SIGNED = f"INSERT INTO records ({_INSERT_COLUMNS}, signature) VALUES ({_INSERT_VALUES}, ?)"
_UPSERT_ROLLUP = """
    INSERT INTO rollups_hourly (hour_start_us, account, model, busy_us, wall_us, record_count)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (hour_start_us, account, model) DO UPDATE SET
        busy_us = busy_us + excluded.busy_us,
        wall_us = wall_us + excluded.wall_us,
        record_count = record_count + excluded.record_count"""
_SELECT_AGENT = """
    SELECT agent_id, public_key_hex, enrolled_at_us, revoked_at_us, head_seq, head_hash
    FROM agents"""
_SELECT_RECORDS = (
    "SELECT "
    + ", ".join(
        f"COALESCE(energy_mj, {ENERGY_ABSENT})" if name == "energy_mj" else name
        for name in ROW_COLUMNS
    )
    + ", signature FROM records ORDER BY agent_id, seq"
)

PAGE_SIZE = 16384  # bytes
BUSY_TIMEOUT_S = 5.0  # how long a write waits for another writer (a CLI enroll) to finish


class SQLiteStore:
    """A Store in one SQLite file. Thread-safe; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        create: bool = True,
        migrate: bool = True,
        clock_us: WallClock = wall_clock_us,
        migrations: Sequence[Migration] = MIGRATIONS,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        """Opens (and with ``create`` creates) the database and migrates it forward.

        Raises StoreError when the file is missing (without ``create``) or not a database,
        SchemaTooNew when newer code migrated it, and StoreError when it is older than this
        code and ``migrate`` is off (read-only commands do not migrate under a running
        collector).
        """
        self.path = path
        self._clock_us = clock_us
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        if not create and not path.exists():
            raise StoreError(f"no database at {path}")
        self._conn: sqlite3.Connection | None = self._connect()
        try:
            with _translated(f"opening {path}"):
                _migrate(self._conn, migrations, migrate, clock_us)
        except BaseException:
            self._conn.close()
            raise
        # Older SQLite builds allow only 999 parameters a statement.
        max_params = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._chunk_sizes = [
            n for n in sorted(_CHUNK_SQL, reverse=True) if n * len(ROW_COLUMNS) <= max_params
        ]

    # -- agents --------------------------------------------------------------------------

    def enroll_agent(self, agent_id: str, public_key_hex: str) -> AgentInfo:
        check_agent_id(agent_id)
        key_hex = canonical_public_key_hex(public_key_hex)
        with self._write(f"enrolling agent {agent_id!r}") as conn:
            existing = _agent(conn, agent_id)
            if existing is not None:
                return _check_reenrollment(existing, key_hex)
            conn.execute(
                "INSERT INTO agents (agent_id, public_key_hex, enrolled_at_us) VALUES (?, ?, ?)",
                (agent_id, key_hex, self._clock_us()),
            )
            agent = _agent(conn, agent_id)
        assert agent is not None
        return agent

    def revoke_agent(self, agent_id: str) -> AgentInfo:
        with self._write(f"revoking agent {agent_id!r}") as conn:
            conn.execute(
                "UPDATE agents SET revoked_at_us = ? WHERE agent_id = ? AND revoked_at_us IS NULL",
                (self._clock_us(), agent_id),
            )
            agent = _agent(conn, agent_id)
        if agent is None:
            raise EnrollmentError("no such agent is enrolled", agent_id=agent_id)
        return agent

    def get_agent(self, agent_id: str) -> AgentInfo | None:
        with self._lock, _translated(f"reading agent {agent_id!r}"):
            return _agent(self._connection(), agent_id)

    # -- ingest --------------------------------------------------------------------------

    def ingest(self, agent_id: str, batch: VerifiedBatch) -> ChainHead:
        records = batch.records
        if records.agent_id != agent_id:
            raise AgentMismatch(
                f"batch is for agent {records.agent_id!r}", agent_id=agent_id, field="agent_id"
            )
        with self._write(f"storing records of agent {agent_id!r}") as conn:
            head = _locked_head(conn, agent_id)
            start = first_new_index(
                agent_id, head, records, lambda first, last: _hashes(conn, agent_id, first, last)
            )
            rows = records.rows
            if start == len(rows):
                return head  # all duplicates: acknowledge again, store nothing
            new_rows = rows[start:] if start else rows
            _insert_rows(conn, new_rows[:-1], self._chunk_sizes)
            conn.execute(_INSERT_SIGNED, (*new_rows[-1], bytearray(batch.signature)))
            sums = records.sums if start == 0 else hourly_sums(new_rows)
            # In key order: where several writers share the rollups (PostgreSQL), rows locked
            # in one order everywhere cannot deadlock.
            conn.executemany(
                _UPSERT_ROLLUP,
                [
                    (*key, busy_us, wall_us, count)
                    for key, (busy_us, wall_us, count) in sorted(sums.items())
                ],
            )
            new_head = ChainHead(new_rows[-1][SEQ], bytes(new_rows[-1][HASH]))
            conn.execute(
                "UPDATE agents SET head_seq = ?, head_hash = ? WHERE agent_id = ?",
                (new_head.seq, new_head.hash, agent_id),
            )
        return new_head

    # -- reading -------------------------------------------------------------------------

    def usage(self, from_us: int | None, to_us: int | None) -> list[UsageTotal]:
        with self._lock, _translated("reading usage"):
            cursor = self._connection().execute(
                """SELECT account, model, SUM(busy_us), SUM(wall_us), SUM(record_count)
                   FROM rollups_hourly WHERE hour_start_us >= ? AND hour_start_us < ?
                   GROUP BY account, model ORDER BY account, model""",
                (-(2**63) if from_us is None else from_us, 2**63 - 1 if to_us is None else to_us),
            )
            return [UsageTotal(*row) for row in cursor]

    @contextmanager
    def snapshot(self) -> Iterator[SQLiteSnapshot]:
        with _translated(f"reading {self.path}"):
            conn = self._connect()
            try:
                conn.execute("BEGIN")  # one read transaction: one consistent view
                yield SQLiteSnapshot(conn)
            finally:
                conn.close()

    def close(self) -> None:
        """Waits for a transaction in progress, then closes. Later calls raise StoreClosed."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- plumbing ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        with _translated(f"opening {self.path}"):
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # used under self._lock from gRPC's threads
            )
            try:
                # Takes effect only on a new, empty file: must come before WAL mode writes
                # the header. 16 KiB pages made inserts ~10 % cheaper than the default 4 KiB
                # (fewer page splits and WAL frames for ~450-byte rows).
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
            return conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed(f"store {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction. BEGIN IMMEDIATE takes SQLite's write lock up front: the
        single-file equivalent of locking the agent's row."""
        with self._lock, _translated(action):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


class SQLiteSnapshot:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def agents(self) -> list[AgentInfo]:
        with _translated("reading agents"):
            rows = self._conn.execute(_SELECT_AGENT + " ORDER BY agent_id").fetchall()
        return [_agent_info(row) for row in rows]

    def records(self) -> Iterator[StoredRecord]:
        with _translated("reading records"):
            for row in self._conn.execute(_SELECT_RECORDS):
                columns = tuple(row[:-1])
                yield StoredRecord(row[0], row[1], row[2], row[3], row[-1], columns)

    def rollups(self) -> Iterator[Rollup]:
        with _translated("reading rollups"):
            cursor = self._conn.execute(
                """SELECT hour_start_us, account, model, busy_us, wall_us, record_count
                   FROM rollups_hourly ORDER BY hour_start_us, account, model"""
            )
            for row in cursor:
                yield Rollup(*row)


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turns sqlite3's exceptions into StoreError (StoreBusy when another writer held the
    database for longer than the busy timeout)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreBusy(f"{action}: database is locked by another writer") from exc
        raise StoreError(f"{action}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"{action}: {exc}") from exc


def _migrate(
    conn: sqlite3.Connection, migrations: Sequence[Migration], migrate: bool, clock_us: WallClock
) -> None:
    """Applies the pending migrations in one transaction: a failure leaves the database as
    it was."""
    known = migrations[-1].version if migrations else 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at_us INTEGER NOT NULL
            )"""
        )
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > known:
            raise SchemaTooNew(
                f"database schema version {current} is newer than this collector's "
                f"({known}): upgrade creditmeter-collector"
            )
        pending = [m for m in migrations if m.version > current]
        if pending and not migrate:
            raise StoreError(
                f"database schema version {current} is older than this collector's ({known}); "
                "run `creditmeter-collector serve` (or enroll) once to migrate it"
            )
        for migration in pending:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)",
                (migration.version, migration.description, clock_us()),
            )
            log.info(
                "migrated database to schema version %d: %s",
                migration.version,
                migration.description,
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _agent(conn: sqlite3.Connection, agent_id: str) -> AgentInfo | None:
    row = conn.execute(_SELECT_AGENT + " WHERE agent_id = ?", (agent_id,)).fetchone()
    return None if row is None else _agent_info(row)


def _agent_info(row: tuple[str, str, int, int | None, int, bytes]) -> AgentInfo:
    agent_id, key_hex, enrolled_at_us, revoked_at_us, head_seq, head_hash = row
    head = ChainHead(head_seq, head_hash) if head_seq else NO_HEAD
    return AgentInfo(agent_id, key_hex, enrolled_at_us, revoked_at_us, head)


def _check_reenrollment(existing: AgentInfo, key_hex: str) -> AgentInfo:
    if existing.revoked:
        raise EnrollmentError(
            "was revoked; revocation is final, enroll the host under a new agent id",
            agent_id=existing.agent_id,
        )
    if existing.public_key_hex != key_hex:
        raise EnrollmentError(
            "is already enrolled with another public key (key rotation is not supported "
            "yet: enroll the host under a new agent id)",
            agent_id=existing.agent_id,
        )
    return existing


def _locked_head(conn: sqlite3.Connection, agent_id: str) -> ChainHead:
    """The agent's stored head, read inside the write transaction."""
    row = conn.execute(
        "SELECT head_seq, head_hash, revoked_at_us FROM agents WHERE agent_id = ?", (agent_id,)
    ).fetchone()
    if row is None:
        raise UnknownAgent("is not enrolled", agent_id=agent_id)
    head_seq, head_hash, revoked_at_us = row
    if revoked_at_us is not None:
        raise AgentRevoked(f"was revoked at {revoked_at_us} µs", agent_id=agent_id)
    return ChainHead(head_seq, head_hash) if head_seq else NO_HEAD


def _insert_rows(
    conn: sqlite3.Connection, rows: Sequence[RecordRow], chunk_sizes: Sequence[int]
) -> None:
    start = 0
    for size in chunk_sizes:  # largest first
        while len(rows) - start >= size:
            conn.execute(_CHUNK_SQL[size], list(chain.from_iterable(rows[start : start + size])))
            start += size


def _hashes(
    conn: sqlite3.Connection, agent_id: str, first: int, last: int
) -> list[tuple[int, bytes]]:
    return conn.execute(
        "SELECT seq, hash FROM records WHERE agent_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
        (agent_id, first, last),
    ).fetchall()
