"""The PostgreSQL store: the only module that imports psycopg.

Several collector processes may write one PostgreSQL database, and an agent may reconnect to
any of them, so two collectors can hold the same agent's batch (a retry after a timeout, a
reconnect after a collector was killed) at the same moment. Every decision is therefore made
inside the database transaction that stores the batch.

Locking: ``SELECT … FROM agents WHERE agent_id = … FOR UPDATE``. Ingest reads the agent's
head and revocation first and updates the head last, so the row lock is the lock ingest needs
anyway: the second collector's transaction waits on it, then (READ COMMITTED re-reads the
locked row) sees the first one's head and its records as duplicates (``first_new_index``).
Chosen over a transaction-scoped advisory lock per agent because the row lock
  * cannot collide: advisory keys are 64-bit hashes of agent ids, shared by every schema and
    every application on the database;
  * also serializes with ``revoke`` (an UPDATE of the same row): an ingest that began before
    a revocation commits before it, one that began after is refused;
  * needs no extra statement, and shows in ``pg_locks`` as the agents row it protects.
A lock held by a collector that hangs is bounded by ``lock_timeout`` (waiters give up with
StoreBusy, UNAVAILABLE: the agent retries) and ``idle_in_transaction_session_timeout`` (the
database ends the hung transaction); a killed collector's transactions end with its
connection.

Rollups are upserted in the same transaction, in the same statement that moves the head
(``_advance``, the last before the commit), in key order everywhere, so two writers never
wait for each other's rows in opposite orders (no deadlock). Each transaction takes exactly
one agent lock, first, and only rollup locks after it. The rollup key carries a ``shard``
(crc32 of the agent id mod ``ROLLUP_SHARDS``): an upserted rollup row stays locked until
commit, WAL flush included, so if every agent of a large account shared one row per hour,
all collectors would commit that account's batches one after another. Readers sum shards.

Bulk path: after the agent's row is locked, ``first_new_index`` has already told which
records are new (and compared every resent one with the stored hash), so the new rows are
written with one binary ``COPY`` straight into ``records``; the primary key (agent_id, seq)
is the dedup key, claimed in the commit. A staging table plus ``INSERT … SELECT … ON
CONFLICT DO NOTHING`` writes every row twice to settle a question the row lock has already
settled (bench/pg_ingest.py measures both). A unique violation in the COPY means records
above the stored head exist: StoreCorrupt. An ingest is six round trips (BEGIN, lock,
COPY's two, advance, COMMIT; seven when resent records are compared). Measured and left
out: psycopg's pipeline mode (more CPU than the round trips it saves on a local network)
and INSERTs instead of COPY for small batches (cheaper below about three rows only).

Connections: a small pool (``_Pool``), each connection lent to one thread for one
transaction; writes from several gRPC streams of one collector run in parallel and share
PostgreSQL's WAL flushes (group commit). psycopg_pool is not a dependency: lending and
discarding broken connections is all that is needed here. A connection that broke (database
restarted, failover, network) fails the request it serves with StoreError (UNAVAILABLE, the
agent retries) and is discarded; the next request connects afresh. A commit whose
acknowledgement was lost may have committed: the agent's retry is then acknowledged as a
duplicate.

Durability: commits wait for the WAL flush (``synchronous_commit`` is left on): the
collector acks only after commit, and an acked record is deleted from the agent's outbox.

Migrations: ``MIGRATIONS`` are applied forward at open, all pending steps in one transaction
(PostgreSQL DDL is transactional), under an advisory lock per schema so that collectors
starting together migrate once; a database migrated by newer code is refused.

Text keys use ``COLLATE "C"``: byte order, the same as SQLite's, whatever the database's
locale, and cheaper comparisons in the primary-key index.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg.types.string import BytesBinaryDumper

from creditmeter.collector.clock import WallClock, wall_clock_us
from creditmeter.collector.errors import (
    AgentMismatch,
    AgentRevoked,
    ConfigError,
    EnrollmentError,
    InsaneField,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreCorrupt,
    StoreError,
    UnknownAgent,
)
from creditmeter.collector.rollup import Rollup, RollupKey, RollupSums, hourly_sums
from creditmeter.collector.rows import ENERGY_ABSENT, ENERGY_MJ, HASH, ROW_COLUMNS, SEQ, RecordRow
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

Connection = psycopg.Connection[TupleRow]
Cursor = psycopg.Cursor[TupleRow]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


# Integers are BIGINT throughout: the proto's uint32 (pid, gpu index) do not fit INTEGER,
# and one type per column kind keeps the binary COPY's type list obvious.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "agents and their records",
        (
            """CREATE TABLE agents (
                agent_id TEXT COLLATE "C" PRIMARY KEY,
                public_key_hex TEXT NOT NULL,
                enrolled_at_us BIGINT NOT NULL,
                revoked_at_us BIGINT,
                head_seq BIGINT NOT NULL DEFAULT 0,
                head_hash BYTEA NOT NULL DEFAULT ''
            )""",
            # record holds the bytes exactly as received: the evidence. The other columns
            # are extracted from them for queries; audit checks they still agree. No FOREIGN
            # KEY to agents: it would cost an index probe per row, and ingest only inserts
            # for the agent whose row it holds locked.
            """CREATE TABLE records (
                agent_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                hash BYTEA NOT NULL,
                record BYTEA NOT NULL,
                signature BYTEA,
                start_us BIGINT NOT NULL,
                end_us BIGINT NOT NULL,
                host TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                gpu_index BIGINT NOT NULL,
                gpu_parent_uuid TEXT NOT NULL,
                pid BIGINT NOT NULL,
                create_time_us BIGINT NOT NULL,
                process_name TEXT NOT NULL,
                account TEXT NOT NULL,
                model TEXT NOT NULL,
                job_id TEXT NOT NULL,
                attribution_source BIGINT NOT NULL,
                busy_us BIGINT NOT NULL,
                wall_us BIGINT NOT NULL,
                energy_mj BIGINT,
                gap_us BIGINT NOT NULL,
                source BIGINT NOT NULL,
                received_at_us BIGINT NOT NULL,
                PRIMARY KEY (agent_id, seq)
            )""",
        ),
    ),
    Migration(
        2,
        "hourly rollups per account and model (sharded by agent), backfilled from the records",
        (
            """CREATE TABLE rollups_hourly (
                hour_start_us BIGINT NOT NULL,
                account TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                shard SMALLINT NOT NULL DEFAULT 0,
                busy_us BIGINT NOT NULL,
                wall_us BIGINT NOT NULL,
                record_count BIGINT NOT NULL,
                PRIMARY KEY (hour_start_us, account, model, shard)
            )""",
            # Readers sum the shards, so the backfill may put everything in shard 0.
            """INSERT INTO rollups_hourly
                SELECT start_us - start_us % 3600000000, account, model, 0,
                       SUM(busy_us), SUM(wall_us), COUNT(*)
                FROM records GROUP BY 1, 2, 3""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

ROLLUP_SHARDS: Final = 16
DEFAULT_POOL_SIZE: Final = 4  # connections per collector process; see capacity.md
LOCK_TIMEOUT_S: Final = 5.0  # how long ingest waits for an agent row another collector holds
# The database ends a transaction left idle this long (a collector hung mid-transaction),
# releasing the agent's row; ingest transactions are never idle for more than milliseconds.
IDLE_IN_TRANSACTION_TIMEOUT_S: Final = 60.0
# Connection defaults; the URL may override any of them. Keepalives notice a vanished
# database host within about a minute instead of the kernel's two hours.
_CONNECT_DEFAULTS: Final = {
    "application_name": "creditmeter-collector",
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
# Serializes migrations of collectors that start together (with the schema's name hash).
_MIGRATION_LOCK_CLASS: Final = 0x43524D31  # "CRM1"

# The binary COPY of records (public for bench/pg_ingest.py's raw COPY of the same rows).
RECORD_COPY_COLUMNS = (*ROW_COLUMNS, "signature")
_COPY_RECORDS = f"COPY records ({', '.join(RECORD_COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
RECORD_COPY_TYPES: Final = (
    "text",  # agent_id
    "int8",  # seq
    "bytea",  # hash
    "bytea",  # record
    "int8",  # start_us
    "int8",  # end_us
    "text",  # host
    "text",  # gpu_uuid
    "int8",  # gpu_index
    "text",  # gpu_parent_uuid
    "int8",  # pid
    "int8",  # create_time_us
    "text",  # process_name
    "text",  # account
    "text",  # model
    "text",  # job_id
    "int8",  # attribution_source
    "int8",  # busy_us
    "int8",  # wall_us
    "int8",  # energy_mj
    "int8",  # gap_us
    "int8",  # source
    "int8",  # received_at_us
    "bytea",  # signature
)
assert len(RECORD_COPY_TYPES) == len(RECORD_COPY_COLUMNS)
# The head moves and the batch's rollups are added in one statement, one round trip. The
# agents row is the one the transaction locked first, so the UPDATE never waits; unnest
# yields the rollup rows in array order and the INSERT takes them in that order, so they are
# locked in the order the caller sorted them.
_ADVANCE = """
    WITH head AS (UPDATE agents SET head_seq = %s, head_hash = %s WHERE agent_id = %s)
    INSERT INTO rollups_hourly
        (hour_start_us, account, model, shard, busy_us, wall_us, record_count)
    SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::smallint[], %s::bigint[],
                         %s::bigint[], %s::bigint[])
    ON CONFLICT (hour_start_us, account, model, shard) DO UPDATE SET
        busy_us = rollups_hourly.busy_us + excluded.busy_us,
        wall_us = rollups_hourly.wall_us + excluded.wall_us,
        record_count = rollups_hourly.record_count + excluded.record_count"""
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
_AUDIT_FETCH_ROWS = 5000  # records fetched per round trip while the audit streams them


class PostgresStore:
    """A Store in a PostgreSQL database (one schema of it). Thread-safe; see the module
    docstring for the locking and the bulk path."""

    def __init__(
        self,
        url: str,
        *,
        create: bool = True,
        migrate: bool = True,
        clock_us: WallClock = wall_clock_us,
        migrations: Sequence[Migration] = MIGRATIONS,
        pool_size: int = DEFAULT_POOL_SIZE,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        rollup_shards: int = ROLLUP_SHARDS,
    ) -> None:
        """Connects to ``url`` (a libpq URI or conninfo) and migrates the schema forward.

        Raises ConfigError for a malformed URL; StoreError when the database cannot be
        reached, the role may not log in, or (without ``create``) holds no creditmeter
        schema; SchemaTooNew when newer code migrated it; StoreError when it is older than
        this code and ``migrate`` is off (read-only commands do not migrate under a running
        collector).
        """
        if pool_size < 1 or rollup_shards < 1:
            raise ValueError("pool_size and rollup_shards must be at least 1")
        self._conninfo, self.where = _conninfo(url)
        self._clock_us = clock_us
        self._lock_timeout_s = lock_timeout_s
        self._rollup_shards = rollup_shards
        with _translated(f"opening {self.where}", self.where):
            conn = self._connect()
            try:
                _migrate(conn, migrations, create=create, migrate=migrate, clock_us=clock_us)
                self._prepare_session(conn)
            except BaseException:
                conn.close()
                raise
        self._pool = _Pool(self._connect_for_pool, pool_size, lock_timeout_s, self.where)
        self._pool.put(conn)

    # -- agents --------------------------------------------------------------------------

    def enroll_agent(self, agent_id: str, public_key_hex: str) -> AgentInfo:
        check_agent_id(agent_id)
        key_hex = canonical_public_key_hex(public_key_hex)
        with self._transaction(f"enrolling agent {agent_id!r}") as cur:
            # ON CONFLICT: two enrolments of one id at once cannot both insert.
            cur.execute(
                """INSERT INTO agents (agent_id, public_key_hex, enrolled_at_us)
                   VALUES (%s, %s, %s) ON CONFLICT (agent_id) DO NOTHING""",
                (agent_id, key_hex, self._clock_us()),
            )
            inserted = cur.rowcount == 1
            agent = _agent(cur, agent_id)
        assert agent is not None
        return agent if inserted else _check_reenrollment(agent, key_hex)

    def revoke_agent(self, agent_id: str) -> AgentInfo:
        with self._transaction(f"revoking agent {agent_id!r}") as cur:
            cur.execute(
                """UPDATE agents SET revoked_at_us = %s
                   WHERE agent_id = %s AND revoked_at_us IS NULL""",
                (self._clock_us(), agent_id),
            )
            agent = _agent(cur, agent_id)
        if agent is None:
            raise EnrollmentError("no such agent is enrolled", agent_id=agent_id)
        return agent

    def get_agent(self, agent_id: str) -> AgentInfo | None:
        with self._statement(f"reading agent {agent_id!r}") as cur:
            return _agent(cur, agent_id)

    # -- ingest --------------------------------------------------------------------------

    def ingest(self, agent_id: str, batch: VerifiedBatch) -> ChainHead:
        records = batch.records
        if records.agent_id != agent_id:
            raise AgentMismatch(
                f"batch is for agent {records.agent_id!r}", agent_id=agent_id, field="agent_id"
            )
        with self._transaction(f"storing records of agent {agent_id!r}") as cur:
            head = _locked_head(cur, agent_id)
            start = first_new_index(
                agent_id, head, records, lambda first, last: _hashes(cur, agent_id, first, last)
            )
            rows = records.rows
            if start == len(rows):
                return head  # all duplicates: acknowledge again, store nothing
            new_rows = rows[start:] if start else rows
            with _refused_rows(agent_id, head):
                _copy_records(cur, new_rows, batch.signature)
            new_head = ChainHead(new_rows[-1][SEQ], bytes(new_rows[-1][HASH]))
            sums = records.sums if start == 0 else hourly_sums(new_rows)
            _advance(cur, agent_id, new_head, self._shard(agent_id), sums)
        return new_head

    # -- reading -------------------------------------------------------------------------

    def usage(self, from_us: int | None, to_us: int | None) -> list[UsageTotal]:
        with self._statement("reading usage") as cur:
            cur.execute(
                """SELECT account, model, SUM(busy_us)::bigint, SUM(wall_us)::bigint,
                          SUM(record_count)::bigint
                   FROM rollups_hourly WHERE hour_start_us >= %s AND hour_start_us < %s
                   GROUP BY account, model ORDER BY account, model""",
                (-(2**63) if from_us is None else from_us, 2**63 - 1 if to_us is None else to_us),
            )
            return [UsageTotal(*row) for row in cur]

    @contextmanager
    def snapshot(self) -> Iterator[PostgresSnapshot]:
        """A REPEATABLE READ transaction on a connection of its own: a long audit holds no
        pool connection and no lock, and is not ended as idle between fetches."""
        with _translated(f"reading {self.where}", self.where):
            conn = self._connect()
        try:
            with _translated(f"reading {self.where}", self.where):
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield PostgresSnapshot(conn, self.where)
        finally:
            conn.close()

    def close(self) -> None:
        """Waits (up to the lock timeout) for transactions in progress, then closes every
        connection. Later calls raise StoreClosed."""
        self._pool.close()

    # -- plumbing ------------------------------------------------------------------------

    def _shard(self, agent_id: str) -> int:
        # crc32, not hash(): the same agent must map to the same shard in every process.
        return zlib.crc32(agent_id.encode()) % self._rollup_shards

    def _connect(self) -> Connection:
        # autocommit: transactions are explicit (conn.transaction()), and a lone read is
        # not left open as a transaction.
        conn = psycopg.connect(self._conninfo, autocommit=True)
        # The binary COPY looks bytea's dumper up by type oid, and the last one registered
        # for it is psycopg.dbapi20's pure-Python one (for its Binary wrapper). Registering
        # the C dumper again makes it the oid's dumper: measured ~1.4 µs less per blob,
        # two blobs per record.
        conn.adapters.register_dumper(bytearray, BytesBinaryDumper)
        return conn

    def _connect_for_pool(self) -> Connection:
        conn = self._connect()
        try:
            self._prepare_session(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare_session(self, conn: Connection) -> None:
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', %s, false)",
            (
                f"{round(self._lock_timeout_s * 1000)}ms",
                f"{round(IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)}ms",
            ),
        )

    @contextmanager
    def _transaction(self, action: str) -> Iterator[Cursor]:
        """One transaction on a pooled connection; psycopg errors leave as StoreErrors."""
        with (
            _translated(action, self.where),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            yield cur

    @contextmanager
    def _statement(self, action: str) -> Iterator[Cursor]:
        """A cursor for one read statement, which is its own transaction (autocommit): no
        BEGIN and COMMIT round trips for the health probe's and each Hello's agent lookup."""
        with (
            _translated(action, self.where),
            self._pool.connection() as conn,
            conn.cursor() as cur,
        ):
            yield cur


class PostgresSnapshot:
    def __init__(self, conn: Connection, where: str) -> None:
        self._conn = conn
        self._where = where

    def agents(self) -> list[AgentInfo]:
        with _translated("reading agents", self._where):
            rows = self._conn.execute(_SELECT_AGENT + " ORDER BY agent_id").fetchall()
        return [_agent_info(row) for row in rows]

    def records(self) -> Iterator[StoredRecord]:
        with (
            _translated("reading records", self._where),
            # A server-side cursor: the audit streams the records, never holds them all.
            self._conn.cursor(name="audit_records") as cur,
        ):
            cur.itersize = _AUDIT_FETCH_ROWS
            cur.execute(_SELECT_RECORDS)
            for row in cur:
                yield StoredRecord(row[0], row[1], row[2], row[3], row[-1], tuple(row[:-1]))

    def rollups(self) -> Iterator[Rollup]:
        with _translated("reading rollups", self._where):
            cursor = self._conn.execute(
                """SELECT hour_start_us, account, model, SUM(busy_us)::bigint,
                          SUM(wall_us)::bigint, SUM(record_count)::bigint
                   FROM rollups_hourly GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
            )
            for row in cursor:
                yield Rollup(*row)


class _Pool:
    """Up to ``size`` connections, each lent to one thread at a time.

    Connections are made on demand and kept while healthy: one that broke, or that is
    returned inside a transaction, is closed instead of lent again.
    """

    def __init__(
        self, connect: Callable[[], Connection], size: int, wait_s: float, where: str
    ) -> None:
        self._connect = connect
        self._size = size
        self._wait_s = wait_s
        self._where = where
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._closed = False

    def put(self, conn: Connection) -> None:
        """Adds a connection made elsewhere (the one that migrated)."""
        self._give_back(conn)

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        if self._closed:
            raise StoreClosed(f"store {self._where} is closed")
        if not self._slots.acquire(timeout=self._wait_s):
            raise StoreBusy(
                f"all {self._size} connections to {self._where} stayed busy for "
                f"{self._wait_s:.1f} s"
            )
        try:
            conn = self._take()
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        # Taking every slot waits for the connections lent out; they close on return.
        deadline_s = time.monotonic() + self._wait_s
        taken = [
            self._slots.acquire(timeout=max(0.0, deadline_s - time.monotonic()))
            for _ in range(self._size)
        ]
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for got in taken:
            if got:
                self._slots.release()

    def _take(self) -> Connection:
        with self._lock:
            if self._closed:
                raise StoreClosed(f"store {self._where} is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()  # outside the lock: connecting takes a round trip or more

    def _give_back(self, conn: Connection) -> None:
        healthy = (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == TransactionStatus.IDLE
        )
        with self._lock:
            if healthy and not self._closed:
                self._idle.append(conn)
                return
        conn.close()


# -- helpers ---------------------------------------------------------------------------------


def _conninfo(url: str) -> tuple[str, str]:
    """The conninfo to connect with (our defaults, then the URL's settings) and a name for
    the database in messages: user@host:port/dbname, never the password."""
    try:
        params: dict[str, Any] = {**_CONNECT_DEFAULTS, **conninfo_to_dict(url)}
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"store URL is not a usable PostgreSQL URL: {_first_line(exc)}") from exc
    host = params.get("host") or params.get("hostaddr") or "localhost"
    user = f"{params['user']}@" if params.get("user") else ""
    where = f"PostgreSQL {user}{host}:{params.get('port') or 5432}/{params.get('dbname', '')}"
    return make_conninfo(**params), where


@contextmanager
def _translated(action: str, where: str) -> Iterator[None]:
    """Turns psycopg's exceptions into StoreErrors. Waits that ran out (a row lock held by
    another collector, a deadlock victim, a timeout) are StoreBusy; a connection refused or
    lost (database restarting, failing over, unreachable) is StoreError; both are
    UNAVAILABLE to the agent, which retries."""
    try:
        yield
    except (
        pg_errors.LockNotAvailable,
        pg_errors.DeadlockDetected,
        pg_errors.SerializationFailure,
        pg_errors.QueryCanceled,
    ) as exc:
        raise StoreBusy(f"{action}: {where}: {_first_line(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise StoreError(f"{action}: {where} unavailable: {_first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"{action}: {where}: {_first_line(exc)}") from exc


def _first_line(exc: psycopg.Error) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _migrate(
    conn: Connection,
    migrations: Sequence[Migration],
    *,
    create: bool,
    migrate: bool,
    clock_us: WallClock,
) -> None:
    """Applies the pending migrations in one transaction: a failure leaves the schema as it
    was."""
    known = migrations[-1].version if migrations else 0
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))",
            (_MIGRATION_LOCK_CLASS,),
        )
        current = _schema_version(conn, create)
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
                "INSERT INTO schema_version VALUES (%s, %s, %s)",
                (migration.version, migration.description, clock_us()),
            )
            log.info(
                "migrated database to schema version %d: %s",
                migration.version,
                migration.description,
            )


def _schema_version(conn: Connection, create: bool) -> int:
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not (row and row[0]):
        schema = conn.execute("SELECT current_schema()").fetchone()
        if not create:
            raise StoreError(
                f"no creditmeter database in schema {schema[0] if schema else None!r} "
                "(no schema_version table)"
            )
        conn.execute(
            """CREATE TABLE schema_version (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at_us BIGINT NOT NULL
            )"""
        )
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def _agent(cur: Cursor, agent_id: str) -> AgentInfo | None:
    row = cur.execute(_SELECT_AGENT + " WHERE agent_id = %s", (agent_id,)).fetchone()
    return None if row is None else _agent_info(row)


def _agent_info(row: TupleRow) -> AgentInfo:
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


def _locked_head(cur: Cursor, agent_id: str) -> ChainHead:
    """The agent's stored head; its row stays locked until the transaction ends (see the
    module docstring)."""
    row = cur.execute(
        "SELECT head_seq, head_hash, revoked_at_us FROM agents WHERE agent_id = %s FOR UPDATE",
        (agent_id,),
    ).fetchone()
    if row is None:
        raise UnknownAgent("is not enrolled", agent_id=agent_id)
    head_seq, head_hash, revoked_at_us = row
    if revoked_at_us is not None:
        raise AgentRevoked(f"was revoked at {revoked_at_us} µs", agent_id=agent_id)
    return ChainHead(head_seq, head_hash) if head_seq else NO_HEAD


def _hashes(cur: Cursor, agent_id: str, first: int, last: int) -> list[tuple[int, bytes]]:
    cur.execute(
        "SELECT seq, hash FROM records WHERE agent_id = %s AND seq BETWEEN %s AND %s ORDER BY seq",
        (agent_id, first, last),
    )
    return [(seq, hash_) for seq, hash_ in cur]


@contextmanager
def _refused_rows(agent_id: str, head: ChainHead) -> Iterator[None]:
    """Raises StoreCorrupt when a seq above the head is already stored, and InsaneField when
    PostgreSQL refuses a value (a NUL character in a label, which text columns cannot hold:
    the verifier lets it through, and UNAVAILABLE would have the agent retry it for ever)."""
    try:
        yield
    except pg_errors.UniqueViolation as exc:
        raise StoreCorrupt(
            f"records above the stored head (seq {head.seq}) are already stored",
            agent_id=agent_id,
        ) from exc
    except psycopg.DataError as exc:  # raised by psycopg itself, or by the server's COPY
        raise InsaneField(
            f"a label cannot be stored: {_first_line(exc)}", agent_id=agent_id
        ) from exc


def _record_values(rows: Sequence[RecordRow], signature: bytes) -> Iterator[tuple[object, ...]]:
    """The rows as stored: energy_mj NULL when absent, the last one with the signature."""
    last = len(rows) - 1
    for index, row in enumerate(rows):
        values: tuple[object, ...] = row
        if row[ENERGY_MJ] == ENERGY_ABSENT:
            values = (*row[:ENERGY_MJ], None, *row[ENERGY_MJ + 1 :])
        yield (*values, signature if index == last else None)


def _copy_records(cur: Cursor, rows: Sequence[RecordRow], signature: bytes) -> None:
    with cur.copy(_COPY_RECORDS) as copy:
        copy.set_types(RECORD_COPY_TYPES)
        write = copy.write_row
        for values in _record_values(rows, signature):
            write(values)


def _advance(
    cur: Cursor, agent_id: str, head: ChainHead, shard: int, sums: dict[RollupKey, RollupSums]
) -> None:
    """Moves the agent's head and adds ``sums`` to the rollups. Rollups are upserted in key
    order: writers that lock rows in one order everywhere cannot deadlock. This is the
    transaction's last statement: an upserted rollup row stays locked until the commit ends,
    and other agents of the same account and hour may be waiting for it."""
    keys = sorted(sums)
    cur.execute(
        _ADVANCE,
        (
            head.seq,
            head.hash,
            agent_id,
            [hour_us for hour_us, _, _ in keys],
            [account for _, account, _ in keys],
            [model for _, _, model in keys],
            [shard] * len(keys),
            [sums[key][0] for key in keys],
            [sums[key][1] for key in keys],
            [sums[key][2] for key in keys],
        ),
    )
