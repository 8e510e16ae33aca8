"""The SQLite store: the only module that imports sqlite3.

One file, WAL journal, synchronous=FULL (a commit that returned survives power loss: the
collector acks only after commit, and an acked record is deleted from the agent's outbox).
One connection a process, guarded by a lock, serves every thread: SQLite has one writer at
a time anyway. Ingest worker processes (ingest_workers.py) each open a store on the same
file and take turns writing (writer_turn.py). Reads for the audit use their own connection
(``snapshot``), so a long audit never holds up ingest. SQLite's own automatic checkpoints
keep the WAL near 16 MiB (1000 pages); a background checkpoint thread was measured and made
no difference.

The schema is versioned: ``MIGRATIONS`` is applied forward at open, all pending steps in
one transaction, and a database migrated by newer code is refused.

The store is also the SQLite ``LedgerStore`` (ledger_store.py): plans, accounts, audited
credit entries, API charges with their hourly rollup, and closed periods.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from creditmeter.collector.account_spans import (
    AccountSpans,
    backfill_rows,
    first_bucket_us,
    merged_ranges,
    span_rows,
)
from creditmeter.collector.capacity import Capacity
from creditmeter.collector.clock import WallClock, wall_clock_us
from creditmeter.collector.errors import (
    AgentMismatch,
    AgentRevoked,
    ChargeConflict,
    EnrollmentError,
    LedgerError,
    NoDatabase,
    NotQuarantined,
    PeriodClosed,
    RollupOverflow,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreError,
    UnknownAccount,
    UnknownAgent,
    UnknownPlan,
)
from creditmeter.collector.ledger_store import (
    DAYS_SET_SQL,
    Account,
    ApiCharge,
    ApiRollup,
    DeviceRollup,
    Dimension,
    EntryKind,
    GpuRollup,
    LedgerEntry,
    LineKind,
    ModelUsage,
    Plan,
    PlanChange,
    RollupPart,
    Segment,
    SignedStatement,
    Statement,
    StatementLine,
    UsageEvent,
    UsageGroup,
    busy_rollup_parts,
    check_not_closed,
    check_prices_unchanged,
    check_repeat,
    day_sums_sql,
    group_columns,
    grouping_order,
    price_version,
    rollup_source_sql,
    usage_events,
)
from creditmeter.collector.periods import iso_text
from creditmeter.collector.prices import PriceVersion, canonical_text, exact_micro_text
from creditmeter.collector.rollup import (
    DAY_BUSY_COLUMNS,
    DAY_RECORD_COLUMNS,
    DAY_US,
    HOUR_US,
    MONTH_DAYS,
    MONTHLY_SUM_COLUMNS,
    DeviceRollupKey,
    GpuSums,
    Rollup,
    RollupKey,
    RollupSums,
    account_sums,
    device_hourly_sums,
    device_month_day_sums,
    gpu_usage_sums,
)
from creditmeter.collector.rows import ROW_COLUMNS, SEQ, RecordRow
from creditmeter.collector.store import (
    NO_HEAD,
    NOT_HELD,
    SELECT_AGENT_STATUS,
    AgentInfo,
    AgentKey,
    AgentStatus,
    ChainHead,
    KeyChange,
    QuarantineEntry,
    StoredRecord,
    UsageTotal,
    advanced_capacity,
    agent_keys,
    canonical_public_key_hex,
    check_agent_id,
    check_reenrollment,
    check_replacement,
    first_new_index,
    held_back,
    new_keys,
)
from creditmeter.collector.verifier import CheckedRecords, VerifiedBatch
from creditmeter.collector.writer_turn import WriterTurn
from creditmeter.files import create_private

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]
    # Work SQL cannot do (reading record bytes), after the statements, in their transaction.
    backfill: Callable[[sqlite3.Connection], None] | None = None


ROLLUP_OVERFLOW = "rollup sum beyond 64 bits:"
# Rewrites the oldest schema_version row as it is: a real page write, no change.
_PROBE_WRITE = (
    "UPDATE schema_version SET applied_at_us = applied_at_us "
    "WHERE version = (SELECT MIN(version) FROM schema_version)"
)


def _in_64_bits(table: str, *columns: str) -> str:
    """A trigger that aborts an update leaving a rollup sum that is no longer an integer."""
    not_integer = " OR ".join(f"typeof(NEW.{column}) != 'integer'" for column in columns)
    return (
        f"CREATE TRIGGER {table}_in_64_bits BEFORE UPDATE ON {table} WHEN {not_integer} "
        f"BEGIN SELECT RAISE(ABORT, '{ROLLUP_OVERFLOW} {table}'); END"
    )


# The calendar month (UTC) of a rollup's hour, in µs: rollup.month_start_us in SQL.
MONTH_OF_HOUR_SQL = (
    "CAST(strftime('%s', hour_start_us / 1000000, 'unixepoch', 'start of month') AS INTEGER)"
    " * 1000000"
)

# The day of the month (1-31, UTC) of a rollup's hour.
DAY_OF_HOUR_SQL = "CAST(strftime('%d', hour_start_us / 1000000, 'unixepoch') AS INTEGER)"
# Per-day sums of device-hours (what the day columns of the monthly rollups hold).
DAY_SUMS_SQL = day_sums_sql()

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
            # were extracted from them for queries (until migration 5 dropped them).
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
    Migration(
        3,
        "hourly rollups per device for reports by host and GPU; rollups by account for balances",
        (
            # Balances read one account's hours: without this they would scan every account.
            "CREATE INDEX rollups_hourly_by_account ON rollups_hourly (account, hour_start_us)",
            """CREATE TABLE rollups_device_hourly (
                hour_start_us INTEGER NOT NULL,
                host TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                account TEXT NOT NULL,
                model TEXT NOT NULL,
                busy_us INTEGER NOT NULL,
                wall_us INTEGER NOT NULL,
                record_count INTEGER NOT NULL,
                PRIMARY KEY (hour_start_us, host, gpu_uuid, account, model)
            ) WITHOUT ROWID""",
            """INSERT INTO rollups_device_hourly
                SELECT start_us - start_us % 3600000000, host, gpu_uuid, account, model,
                       SUM(busy_us), SUM(wall_us), COUNT(*)
                FROM records GROUP BY 1, 2, 3, 4, 5""",
        ),
    ),
    Migration(
        4,
        "the credit ledger: plans, accounts, credit entries, API charges, closed periods",
        (
            """CREATE TABLE plans (
                name TEXT PRIMARY KEY NOT NULL,
                grant_micro INTEGER NOT NULL,
                created_at_us INTEGER NOT NULL,
                created_by TEXT NOT NULL
            )""",
            """CREATE TABLE accounts (
                name TEXT PRIMARY KEY NOT NULL,
                anchor_day INTEGER NOT NULL,
                first_period_start_us INTEGER NOT NULL,
                created_at_us INTEGER NOT NULL,
                created_by TEXT NOT NULL
            )""",
            # Several changes may name the same period: the last one made wins, and all of
            # them stay for the audit trail.
            """CREATE TABLE plan_changes (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                account TEXT NOT NULL,
                effective_us INTEGER NOT NULL,
                plan TEXT NOT NULL,
                created_at_us INTEGER NOT NULL,
                created_by TEXT NOT NULL
            )""",
            "CREATE INDEX plan_changes_by_account ON plan_changes (account, effective_us)",
            """CREATE TABLE ledger_entries (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                account TEXT NOT NULL,
                kind TEXT NOT NULL,
                amount_micro INTEGER NOT NULL,
                effective_us INTEGER NOT NULL,
                expires_us INTEGER,
                reason TEXT NOT NULL,
                created_by TEXT NOT NULL,
                created_at_us INTEGER NOT NULL
            )""",
            "CREATE INDEX ledger_entries_by_account ON ledger_entries (account, id)",
            """CREATE TABLE api_charges (
                request_id TEXT PRIMARY KEY NOT NULL,
                account TEXT NOT NULL,
                model TEXT NOT NULL,
                count INTEGER NOT NULL,
                time_us INTEGER NOT NULL,
                received_at_us INTEGER NOT NULL
            ) WITHOUT ROWID""",
            """CREATE TABLE api_rollups_hourly (
                hour_start_us INTEGER NOT NULL,
                account TEXT NOT NULL,
                model TEXT NOT NULL,
                requests INTEGER NOT NULL,
                charge_count INTEGER NOT NULL,
                PRIMARY KEY (hour_start_us, account, model)
            ) WITHOUT ROWID""",
            "CREATE INDEX api_rollups_hourly_by_account "
            "ON api_rollups_hourly (account, hour_start_us)",
            """CREATE TABLE statements (
                account TEXT NOT NULL,
                start_us INTEGER NOT NULL,
                end_us INTEGER NOT NULL,
                plan TEXT NOT NULL,
                plan_grant_micro INTEGER NOT NULL,
                closed_at_us INTEGER NOT NULL,
                closed_by TEXT NOT NULL,
                PRIMARY KEY (account, start_us)
            ) WITHOUT ROWID""",
            """CREATE TABLE statement_lines (
                account TEXT NOT NULL,
                start_us INTEGER NOT NULL,
                kind TEXT NOT NULL,
                model TEXT NOT NULL,
                quantity INTEGER NOT NULL,
                credits_micro INTEGER NOT NULL,
                default_price INTEGER NOT NULL,
                PRIMARY KEY (account, start_us, kind, model)
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        5,
        "records keep only the evidence and its key; segment signatures in their own table",
        (
            # The bytes are the one copy of a record's fields: reports read the rollups,
            # the audit and exports parse the bytes, and 19 extracted columns cost a third
            # of the ingest time (rows.py). WITHOUT ROWID: one B-tree keyed by (agent, seq)
            # instead of a table plus its primary-key index.
            """CREATE TABLE segments (
                agent_id TEXT NOT NULL,
                last_seq INTEGER NOT NULL,
                signature BLOB NOT NULL,
                received_at_us INTEGER NOT NULL,
                PRIMARY KEY (agent_id, last_seq)
            ) WITHOUT ROWID""",
            """INSERT INTO segments
                SELECT agent_id, seq, signature, received_at_us FROM records
                WHERE signature IS NOT NULL""",
            """CREATE TABLE records_v5 (
                agent_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                start_us INTEGER NOT NULL,
                record BLOB NOT NULL,
                PRIMARY KEY (agent_id, seq)
            ) WITHOUT ROWID""",
            "INSERT INTO records_v5 SELECT agent_id, seq, start_us, record FROM records",
            "DROP TABLE records",
            "ALTER TABLE records_v5 RENAME TO records",
        ),
    ),
    Migration(
        6,
        "per GPU and hour: device busy, attributed and unattributed time, gaps by reason",
        (
            # Amounts by kind (rollup.py): the GPUs' books from their device records and
            # the gaps of their process records. Records stored before agents wrote device
            # records have gaps all the same, but this migration cannot read them out of
            # the bytes: `creditmeter-collector audit` names any hour that differs.
            """CREATE TABLE rollups_gpu_hourly (
                hour_start_us INTEGER NOT NULL,
                host TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                kind TEXT NOT NULL,
                amount_us INTEGER NOT NULL,
                PRIMARY KEY (hour_start_us, host, gpu_uuid, kind)
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        7,
        "quarantine: signed, chained records whose fields broke the checks, kept unbilled",
        (
            """CREATE TABLE quarantine (
                agent_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                field TEXT NOT NULL,
                problem TEXT NOT NULL,
                quarantined_at_us INTEGER NOT NULL,
                released_at_us INTEGER,
                released_by TEXT,
                PRIMARY KEY (agent_id, seq)
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        8,
        "rollup sums stay 64-bit integers: an update that would overflow aborts",
        (
            # SQLite turns an integer sum that overflows into a float (1.09e19) without a
            # word; every later read of that rollup would then fail. The verifier bounds
            # each record, so only a flood from a compromised agent could get here.
            _in_64_bits("rollups_hourly", "busy_us", "wall_us", "record_count"),
            _in_64_bits("rollups_device_hourly", "busy_us", "wall_us", "record_count"),
            _in_64_bits("rollups_gpu_hourly", "amount_us"),
        ),
    ),
    Migration(
        9,
        "ledger entries carry an idempotency key: a retried top-up, grant or adjustment is a no-op",
        (
            "ALTER TABLE ledger_entries ADD COLUMN idempotency_key TEXT",
            """CREATE UNIQUE INDEX ledger_entries_by_key ON ledger_entries (idempotency_key)
               WHERE idempotency_key IS NOT NULL""",
        ),
    ),
    Migration(
        10,
        "agents carry their GPU budgets: no GPU's records claim more busy time than elapsed",
        ("ALTER TABLE agents ADD COLUMN capacity TEXT NOT NULL DEFAULT ''",),
    ),
    Migration(
        11,
        "the price book lives in the store, in versions; statement lines name the version",
        (
            """CREATE TABLE price_versions (
                effective_us INTEGER PRIMARY KEY,
                prices TEXT NOT NULL,
                loaded_at_us INTEGER NOT NULL,
                loaded_by TEXT NOT NULL
            )""",
            """CREATE TABLE statement_lines_v11 (
                account TEXT NOT NULL,
                start_us INTEGER NOT NULL,
                kind TEXT NOT NULL,
                model TEXT NOT NULL,
                quantity INTEGER NOT NULL,
                credits_micro INTEGER NOT NULL,
                default_price INTEGER NOT NULL,
                price_from_us INTEGER NOT NULL,
                PRIMARY KEY (account, start_us, kind, model, price_from_us)
            ) WITHOUT ROWID""",
            """INSERT INTO statement_lines_v11 SELECT account, start_us, kind, model, quantity,
               credits_micro, default_price, 0 FROM statement_lines""",
            "DROP TABLE statement_lines",
            "ALTER TABLE statement_lines_v11 RENAME TO statement_lines",
        ),
    ),
    Migration(
        12,
        "segments keep where a span signature starts; closed periods keep a signed statement",
        (
            "ALTER TABLE segments ADD COLUMN first_seq INTEGER",
            """CREATE TABLE statement_documents (
                account TEXT NOT NULL,
                start_us INTEGER NOT NULL,
                document BLOB NOT NULL,
                signature BLOB NOT NULL,
                public_key_hex TEXT NOT NULL,
                PRIMARY KEY (account, start_us)
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        13,
        "agents keep every public key they signed with: rotations and replacements",
        (
            "ALTER TABLE agents ADD COLUMN key_after_seq INTEGER NOT NULL DEFAULT 0",
            """CREATE TABLE agent_keys (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                agent_id TEXT NOT NULL,
                after_seq INTEGER NOT NULL,
                public_key_hex TEXT NOT NULL,
                how TEXT NOT NULL,
                at_us INTEGER NOT NULL,
                added_by TEXT NOT NULL,
                reason TEXT NOT NULL
            )""",
            "CREATE INDEX agent_keys_by_agent ON agent_keys (agent_id, after_seq, id)",
            """INSERT INTO agent_keys (agent_id, after_seq, public_key_hex, how, at_us, added_by,
                                       reason)
               SELECT agent_id, 0, public_key_hex, 'enrolled', enrolled_at_us, '', ''
               FROM agents""",
        ),
    ),
    Migration(
        14,
        "hourly rollups per GPU and model (the device rollups summed over accounts), for "
        "reports by host or GPU",
        (
            """CREATE TABLE rollups_gpu_usage_hourly (
                hour_start_us INTEGER NOT NULL,
                host TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                model TEXT NOT NULL,
                busy_us INTEGER NOT NULL,
                wall_us INTEGER NOT NULL,
                record_count INTEGER NOT NULL,
                PRIMARY KEY (hour_start_us, host, gpu_uuid, model)
            ) WITHOUT ROWID""",
            """INSERT INTO rollups_gpu_usage_hourly
                SELECT hour_start_us, host, gpu_uuid, model, SUM(busy_us), SUM(wall_us),
                       SUM(record_count)
                FROM rollups_device_hourly GROUP BY 1, 2, 3, 4""",
            _in_64_bits("rollups_gpu_usage_hourly", "busy_us", "wall_us", "record_count"),
        ),
    ),
    Migration(
        15,
        "the device rollups per calendar month, for month reports by account and host or GPU",
        (
            """CREATE TABLE rollups_device_monthly (
                month_start_us INTEGER NOT NULL,
                host TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                account TEXT NOT NULL,
                model TEXT NOT NULL,
                busy_us INTEGER NOT NULL,
                wall_us INTEGER NOT NULL,
                record_count INTEGER NOT NULL,
                PRIMARY KEY (month_start_us, host, gpu_uuid, account, model)
            ) WITHOUT ROWID""",
            f"""INSERT INTO rollups_device_monthly
                SELECT {MONTH_OF_HOUR_SQL}, host, gpu_uuid, account, model, SUM(busy_us),
                       SUM(wall_us), SUM(record_count)
                FROM rollups_device_hourly GROUP BY 1, 2, 3, 4, 5""",
            _in_64_bits("rollups_device_monthly", "busy_us", "wall_us", "record_count"),
        ),
    ),
    Migration(
        16,
        "the monthly device rollups' busy µs and records per day, for reports over days",
        # No overflow trigger of their own: each day's sums are part of the month's, which
        # have one, and none is negative (the verifier refuses negative busy time).
        (
            *(
                f"ALTER TABLE rollups_device_monthly ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
                for column in (*DAY_BUSY_COLUMNS, *DAY_RECORD_COLUMNS)
            ),
            f"""UPDATE rollups_device_monthly AS m SET {DAYS_SET_SQL}
                FROM (SELECT {MONTH_OF_HOUR_SQL} AS month_start_us, host, gpu_uuid, account,
                             model, {DAY_SUMS_SQL}
                      FROM (SELECT *, {DAY_OF_HOUR_SQL} AS day FROM rollups_device_hourly)
                      GROUP BY 1, 2, 3, 4, 5) AS s
                WHERE m.month_start_us = s.month_start_us AND m.host = s.host
                  AND m.gpu_uuid = s.gpu_uuid AND m.account = s.account AND m.model = s.model""",
        ),
    ),
    Migration(
        17,
        "where each account's records lie: per account, 10-minute bucket and agent, a span of seqs",
        (
            """CREATE TABLE account_spans (
                bucket_us INTEGER NOT NULL,
                agent_id TEXT NOT NULL,
                account TEXT NOT NULL,
                first_seq INTEGER NOT NULL,
                last_seq INTEGER NOT NULL,
                PRIMARY KEY (bucket_us, agent_id, account)
            ) WITHOUT ROWID""",
        ),
        backfill=lambda conn: _backfill_account_spans(conn),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_INSERT_COLUMNS = ", ".join(ROW_COLUMNS)
_INSERT_VALUES = ", ".join("?" * len(ROW_COLUMNS))
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
# The batch's signature, when it arrived, and the seq its span starts at (NULL: a head
# signature, over the record that ends the segment only).
_INSERT_SEGMENT = """INSERT INTO segments (agent_id, last_seq, signature, received_at_us, first_seq)
    VALUES (?, ?, ?, ?, ?)"""
_UPSERT_ROLLUP = """
    INSERT INTO rollups_hourly (hour_start_us, account, model, busy_us, wall_us, record_count)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (hour_start_us, account, model) DO UPDATE SET
        busy_us = busy_us + excluded.busy_us,
        wall_us = wall_us + excluded.wall_us,
        record_count = record_count + excluded.record_count"""
_UPSERT_ACCOUNT_SPAN = """
    INSERT INTO account_spans (bucket_us, agent_id, account, first_seq, last_seq)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (bucket_us, agent_id, account) DO UPDATE SET
        first_seq = MIN(first_seq, excluded.first_seq),
        last_seq = MAX(last_seq, excluded.last_seq)"""
_UPSERT_DEVICE_ROLLUP = """
    INSERT INTO rollups_device_hourly
        (hour_start_us, host, gpu_uuid, account, model, busy_us, wall_us, record_count)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (hour_start_us, host, gpu_uuid, account, model) DO UPDATE SET
        busy_us = busy_us + excluded.busy_us,
        wall_us = wall_us + excluded.wall_us,
        record_count = record_count + excluded.record_count"""
_UPSERT_GPU_USAGE = """
    INSERT INTO rollups_gpu_usage_hourly
        (hour_start_us, host, gpu_uuid, model, busy_us, wall_us, record_count)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (hour_start_us, host, gpu_uuid, model) DO UPDATE SET
        busy_us = busy_us + excluded.busy_us,
        wall_us = wall_us + excluded.wall_us,
        record_count = record_count + excluded.record_count"""


def _upsert_device_month_day(day: int) -> str:
    """The upsert of monthly device rollups from one day's device-hours (0: the 1st): the
    month's sums and that day's two columns."""
    busy, records = DAY_BUSY_COLUMNS[day], DAY_RECORD_COLUMNS[day]
    added = ("busy_us", "wall_us", "record_count", busy, records)
    return f"""
    INSERT INTO rollups_device_monthly
        (month_start_us, host, gpu_uuid, account, model, {", ".join(added)})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (month_start_us, host, gpu_uuid, account, model) DO UPDATE SET
        {", ".join(f"{c} = {c} + excluded.{c}" for c in added)}"""


_UPSERT_DEVICE_MONTH_DAY = tuple(_upsert_device_month_day(day) for day in range(MONTH_DAYS))
_UPSERT_GPU_ROLLUP = """
    INSERT INTO rollups_gpu_hourly (hour_start_us, host, gpu_uuid, kind, amount_us)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (hour_start_us, host, gpu_uuid, kind) DO UPDATE SET
        amount_us = amount_us + excluded.amount_us"""
_UPSERT_API_ROLLUP = """
    INSERT INTO api_rollups_hourly (hour_start_us, account, model, requests, charge_count)
    VALUES (?, ?, ?, ?, 1)
    ON CONFLICT (hour_start_us, account, model) DO UPDATE SET
        requests = requests + excluded.requests,
        charge_count = charge_count + 1"""
_MIN_US, _MAX_US = -(2**63), 2**63 - 1  # unbounded ends of a time range
_SELECT_AGENT = """
    SELECT agent_id, public_key_hex, enrolled_at_us, revoked_at_us, head_seq, head_hash
    FROM agents"""
_SELECT_RECORDS = """
    SELECT r.agent_id, r.seq, r.start_us, r.record, s.signature, s.first_seq
    FROM records r LEFT JOIN segments s ON s.agent_id = r.agent_id AND s.last_seq = r.seq
    ORDER BY r.agent_id, r.seq"""

_SELECT_ORPHAN_SEGMENTS = """
    SELECT s.agent_id, s.last_seq
    FROM segments s LEFT JOIN records r ON r.agent_id = s.agent_id AND r.seq = s.last_seq
    WHERE r.seq IS NULL ORDER BY s.agent_id, s.last_seq"""
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
            raise NoDatabase(f"no database at {path}")
        try:
            create_private(path)  # records and accounts: not for every local user
        except OSError as exc:
            raise StoreError(f"opening {path}: {exc.strerror or exc}") from exc
        self._conn: sqlite3.Connection | None = self._connect()
        try:
            with _translated(f"opening {path}"):
                _migrate(self._conn, migrations, migrate, clock_us)
        except BaseException:
            self._conn.close()
            raise
        self._turn = WriterTurn(path, busy_timeout_s)
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
                return check_reenrollment(existing, key_hex)
            now_us = self._clock_us()
            conn.execute(
                "INSERT INTO agents (agent_id, public_key_hex, enrolled_at_us) VALUES (?, ?, ?)",
                (agent_id, key_hex, now_us),
            )
            _add_key(conn, agent_id, 0, key_hex, KeyChange.ENROLLED, now_us)
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

    def agent_status(self) -> list[AgentStatus]:
        with self._lock, _translated("reading agents"):
            rows = self._connection().execute(SELECT_AGENT_STATUS).fetchall()
        return [AgentStatus(a, bool(r), h, seen, start) for a, r, h, seen, start in rows]

    def replace_agent_key(
        self, agent_id: str, public_key_hex: str, *, by: str, reason: str
    ) -> AgentInfo:
        key_hex = canonical_public_key_hex(public_key_hex)
        with self._write(f"replacing the key of agent {agent_id!r}") as conn:
            after_seq = check_replacement(_agent(conn, agent_id), agent_id, key_hex)
            if after_seq is not None:
                now_us = self._clock_us()
                _add_key(conn, agent_id, after_seq, key_hex, KeyChange.REPLACED, now_us, by, reason)
            agent = _agent(conn, agent_id)
        assert agent is not None
        return agent

    def capacity(self, agent_id: str) -> Capacity:
        with self._lock, _translated(f"reading the GPU budgets of {agent_id!r}"):
            return _capacity(self._connection(), agent_id)

    # -- ingest --------------------------------------------------------------------------

    def ingest(self, agent_id: str, batch: VerifiedBatch) -> ChainHead:
        records = batch.records
        if records.agent_id != agent_id:
            raise AgentMismatch(
                f"batch is for agent {records.agent_id!r}", agent_id=agent_id, field="agent_id"
            )
        with self._write(f"storing records of agent {agent_id!r}") as conn:
            head, key_hex, key_after_seq = _locked_head(conn, agent_id)
            start = first_new_index(
                agent_id, head, records, lambda first, last: _records(conn, agent_id, first, last)
            )
            rows = records.rows
            if start == len(rows):
                return head  # all duplicates: acknowledge again, store nothing
            new_rows = rows[start:] if start else rows
            for seq, new_hex in new_keys(agent_id, batch, key_hex, key_after_seq):
                _add_key(conn, agent_id, seq, new_hex, KeyChange.ROTATED, self._clock_us())
            _insert_rows(conn, new_rows, self._chunk_sizes)
            new_head = ChainHead(new_rows[-1][SEQ], records.head_hash)
            conn.execute(
                _INSERT_SEGMENT,
                (
                    agent_id,
                    new_head.seq,
                    bytearray(batch.signature),
                    self._clock_us(),
                    batch.span_first_seq,
                ),
            )
            budgets = advanced_capacity(agent_id, records, _capacity(conn, agent_id))
            if budgets is not None:
                conn.execute(
                    "UPDATE agents SET capacity = ? WHERE agent_id = ?", (budgets, agent_id)
                )
            held = held_back(records, new_rows)
            if held:
                conn.executemany(
                    "INSERT INTO quarantine VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                    [(agent_id, q.seq, q.field, q.problem, self._clock_us()) for q in held],
                )
            if start == 0:
                _add_rollups(conn, records.sums, records.device_sums, records.gpu_sums)
            else:
                device_sums, gpu_sums = device_hourly_sums(new_rows, {q.seq for q in held})
                _add_rollups(conn, account_sums(device_sums), device_sums, gpu_sums)
            # The whole batch's spans, resent rows too: wider is harmless (account_spans.py).
            _add_account_spans(conn, agent_id, records.account_spans)
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
                self._turn.close()

    def probe_write(self) -> None:
        """One tiny write transaction (rewrites a schema_version row as it is): raises
        StoreError when the store takes no writes (disk full, read-only file), which a read
        alone would not notice."""
        with self._write("probing a write") as conn:
            conn.execute(_PROBE_WRITE)

    # -- quarantine ----------------------------------------------------------------------

    def quarantined(self) -> list[QuarantineEntry]:
        with self._lock, _translated("reading the quarantine"):
            return _quarantine(self._connection())

    def stored_record(self, agent_id: str, seq: int) -> bytes | None:
        with self._lock, _translated(f"reading record {agent_id!r} seq {seq}"):
            rows = _records(self._connection(), agent_id, seq, seq)
        return bytes(rows[0][1]) if rows else None

    def release(self, agent_id: str, seq: int, by: str, checked: CheckedRecords) -> QuarantineEntry:
        with self._write(f"releasing {agent_id!r} seq {seq} from quarantine") as conn:
            released = conn.execute(
                "UPDATE quarantine SET released_at_us = ?, released_by = ? "
                "WHERE agent_id = ? AND seq = ? AND released_at_us IS NULL",
                (self._clock_us(), by, agent_id, seq),
            ).rowcount
            if not released:
                raise NotQuarantined(
                    f"agent {agent_id!r} seq {seq} is not in quarantine (or was released)"
                )
            _add_rollups(conn, checked.sums, checked.device_sums, checked.gpu_sums)
            _add_account_spans(conn, agent_id, checked.account_spans)  # held at ingest too
            return next(e for e in _quarantine(conn) if (e.agent_id, e.seq) == (agent_id, seq))

    # -- the ledger (LedgerStore) --------------------------------------------------------

    def define_plan(self, plan: Plan) -> Plan:
        with self._write(f"defining plan {plan.name!r}") as conn:
            stored = _plan(conn, plan.name)
            if stored is None:
                conn.execute(
                    "INSERT INTO plans VALUES (?, ?, ?, ?)",
                    (plan.name, plan.grant_micro, plan.created_at_us, plan.created_by),
                )
                return plan
        if stored.grant_micro != plan.grant_micro:
            raise LedgerError(
                f"plan {plan.name!r} is already defined with a grant of "
                f"{exact_micro_text(stored.grant_micro)} credits; plans never change (define "
                "a new one)"
            )
        return stored

    def plans(self) -> list[Plan]:
        with self._lock, _translated("reading plans"):
            rows = self._connection().execute(_SELECT_PLAN + " ORDER BY name").fetchall()
        return [Plan(*row) for row in rows]

    def open_account(self, account: Account, plan: str) -> Account:
        with self._write(f"opening account {account.name!r}") as conn:
            if _plan(conn, plan) is None:
                raise UnknownPlan(f"no plan {plan!r} is defined")
            stored = _account(conn, account.name)
            if stored is None:
                conn.execute(
                    "INSERT INTO accounts VALUES (?, ?, ?, ?, ?)",
                    (
                        account.name,
                        account.anchor_day,
                        account.first_period_start_us,
                        account.created_at_us,
                        account.created_by,
                    ),
                )
                _insert_plan_change(
                    conn,
                    PlanChange(
                        account.name,
                        plan,
                        account.first_period_start_us,
                        account.created_at_us,
                        account.created_by,
                    ),
                )
                return account
            first_plan = _plan_changes(conn, account.name)[0].plan
        if (stored.anchor_day, stored.first_period_start_us, first_plan) != (
            account.anchor_day,
            account.first_period_start_us,
            plan,
        ):
            raise LedgerError(
                f"account {account.name!r} is already open (anchor day {stored.anchor_day}, "
                f"first period {iso_text(stored.first_period_start_us)}, plan {first_plan!r})"
            )
        return stored

    def account(self, name: str) -> Account | None:
        with self._lock, _translated(f"reading account {name!r}"):
            return _account(self._connection(), name)

    def accounts(self) -> list[Account]:
        with self._lock, _translated("reading accounts"):
            rows = self._connection().execute(_SELECT_ACCOUNT + " ORDER BY name").fetchall()
        return [Account(*row) for row in rows]

    def change_plan(self, change: PlanChange) -> None:
        with self._write(f"changing the plan of {change.account!r}") as conn:
            _check_open(conn, change.account, change.effective_us, "a plan change")
            if _plan(conn, change.plan) is None:
                raise UnknownPlan(f"no plan {change.plan!r} is defined")
            _insert_plan_change(conn, change)

    def plan_changes(self, account: str) -> list[PlanChange]:
        with self._lock, _translated(f"reading plan changes of {account!r}"):
            return _plan_changes(self._connection(), account)

    def add_entry(self, entry: LedgerEntry) -> LedgerEntry:
        with self._write(f"adding a {entry.kind.value} to {entry.account!r}") as conn:
            if entry.key is not None:  # writes are serialised: no other can come between
                stored = conn.execute(
                    _ENTRY_SELECT + " WHERE idempotency_key = ?", (entry.key,)
                ).fetchone()
                if stored is not None:
                    return check_repeat(_entry(stored), entry)
            _check_open(conn, entry.account, entry.effective_us, f"a {entry.kind.value}")
            cursor = conn.execute(
                """INSERT INTO ledger_entries (account, kind, amount_micro, effective_us,
                       expires_us, reason, created_by, created_at_us, idempotency_key)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    entry.account,
                    entry.kind.value,
                    entry.amount_micro,
                    entry.effective_us,
                    entry.expires_us,
                    entry.reason,
                    entry.created_by,
                    entry.created_at_us,
                    entry.key,
                ),
            )
            entry_id = cursor.lastrowid
        assert entry_id is not None
        return replace(entry, entry_id=entry_id)

    def entries(self, account: str) -> list[LedgerEntry]:
        with self._lock, _translated(f"reading entries of {account!r}"):
            rows = self._connection().execute(
                _ENTRY_SELECT + " WHERE account = ? ORDER BY id", (account,)
            )
            return [_entry(row) for row in rows.fetchall()]

    def record_charge(self, charge: ApiCharge, received_at_us: int) -> bool:
        content = (charge.account, charge.model, charge.count, charge.time_us)
        with self._write(f"storing API charge {charge.request_id!r}") as conn:
            stored = conn.execute(
                "SELECT account, model, count, time_us FROM api_charges WHERE request_id = ?",
                (charge.request_id,),
            ).fetchone()
            if stored is None:
                conn.execute(
                    "INSERT INTO api_charges VALUES (?, ?, ?, ?, ?, ?)",
                    (charge.request_id, *content, received_at_us),
                )
                hour_us = charge.time_us - charge.time_us % HOUR_US
                conn.execute(
                    _UPSERT_API_ROLLUP, (hour_us, charge.account, charge.model, charge.count)
                )
                return True
        if tuple(stored) != content:
            raise ChargeConflict(
                f"request id {charge.request_id!r} is already charged as account "
                f"{stored[0]!r} model {stored[1]!r} count {stored[2]} at "
                f"{iso_text(stored[3])}; the stored charge is kept"
            )
        return False

    def model_usage(self, account: str, from_us: int, to_us: int) -> dict[str, ModelUsage]:
        with self._lock, _translated(f"reading usage of {account!r}"):
            conn = self._connection()
            busy = conn.execute(
                """SELECT model, SUM(busy_us) FROM rollups_hourly
                   WHERE account = ? AND hour_start_us >= ? AND hour_start_us < ?
                   GROUP BY model""",
                (account, from_us, to_us),
            ).fetchall()
            requests = dict(
                conn.execute(
                    """SELECT model, SUM(requests) FROM api_rollups_hourly
                       WHERE account = ? AND hour_start_us >= ? AND hour_start_us < ?
                       GROUP BY model""",
                    (account, from_us, to_us),
                ).fetchall()
            )
        usage = {model: ModelUsage(busy_us, requests.pop(model, 0)) for model, busy_us in busy}
        usage.update((model, ModelUsage(0, count)) for model, count in requests.items())
        return usage

    def grouped_usage(
        self,
        from_us: int | None,
        to_us: int | None,
        dimensions: frozenset[Dimension],
        account: str | None = None,
    ) -> list[UsageGroup]:
        bounds = (_MIN_US if from_us is None else from_us, _MAX_US if to_us is None else to_us)
        with self._lock, _translated("reading usage"):
            conn = self._connection()
            busy = conn.execute(*_grouped_sql(dimensions, account, bounds, api=False))
            groups = [UsageGroup(*row) for row in busy.fetchall()]
            api = conn.execute(*_grouped_sql(dimensions, account, bounds, api=True))
            groups.extend(UsageGroup(*row) for row in api.fetchall())
        return groups

    def usage_events(
        self, from_us: int | None, to_us: int | None, account: str | None = None
    ) -> Iterator[UsageEvent]:
        bounds = (_MIN_US if from_us is None else from_us, _MAX_US if to_us is None else to_us)
        if account is None:
            yield from usage_events(
                self._read_rows(
                    f"""SELECT agent_id, seq, record FROM records r
                       WHERE start_us >= ? AND start_us < ? AND {NOT_HELD}
                       ORDER BY agent_id, seq""",
                    bounds,
                )
            )
            return
        yield from usage_events(self._account_rows(account, *bounds), account)

    def _account_rows(
        self, account: str, from_us: int, to_us: int
    ) -> Iterator[tuple[str, int, bytes]]:
        """The rows in [from_us, to_us) of the seq ranges the account's spans name, in one
        read transaction: its records, and others' stored between them."""
        with _translated(f"reading {self.path}"):
            conn = self._connect()
            try:
                conn.execute("BEGIN")
                spans = conn.execute(
                    """SELECT agent_id, first_seq, last_seq FROM account_spans
                       WHERE account = ? AND bucket_us >= ? AND bucket_us < ?""",
                    (account, first_bucket_us(from_us), to_us),
                ).fetchall()
                for agent_id, first, last in merged_ranges(spans):
                    yield from conn.execute(
                        f"""SELECT agent_id, seq, record FROM records r
                           WHERE agent_id = ? AND seq BETWEEN ? AND ?
                             AND start_us >= ? AND start_us < ? AND {NOT_HELD}
                           ORDER BY seq""",
                        (agent_id, first, last, from_us, to_us),
                    )
            finally:
                conn.close()

    def api_charges(self, from_us: int | None, to_us: int | None) -> Iterator[ApiCharge]:
        bounds = (_MIN_US if from_us is None else from_us, _MAX_US if to_us is None else to_us)
        for row in self._read_rows(
            """SELECT request_id, account, model, count, time_us FROM api_charges
               WHERE time_us >= ? AND time_us < ? ORDER BY request_id""",
            bounds,
        ):
            yield ApiCharge(*row)

    def price_versions(self) -> list[PriceVersion]:
        with self._lock, _translated("reading the price book"):
            rows = (
                self._connection()
                .execute(
                    """SELECT effective_us, prices, loaded_at_us, loaded_by FROM price_versions
                   ORDER BY effective_us"""
                )
                .fetchall()
            )
        return [price_version(*row) for row in rows]

    def add_price_version(
        self, version: PriceVersion, *, since_always: bool = False
    ) -> tuple[PriceVersion, bool]:
        when = iso_text(version.effective_us)
        with self._write(f"loading the prices effective {when}") as conn:
            row = conn.execute(
                """SELECT effective_us, prices, loaded_at_us, loaded_by FROM price_versions
                   WHERE effective_us = ?""",
                (version.effective_us,),
            ).fetchone()
            if row is not None:
                return price_version(*row), False
            if not since_always:
                closed_us = conn.execute("SELECT MAX(end_us) FROM statements").fetchone()[0]
                check_not_closed(version, closed_us)
            conn.execute(
                "INSERT INTO price_versions VALUES (?, ?, ?, ?)",
                (
                    version.effective_us,
                    canonical_text(version.book),
                    version.loaded_at_us,
                    version.loaded_by,
                ),
            )
        return version, True

    def close_period(self, statement: Statement, signed: SignedStatement | None = None) -> None:
        account = statement.account
        with self._write(f"closing a period of {account!r}") as conn:
            stored = _account(conn, account)
            if stored is None:
                raise UnknownAccount(f"no account {account!r} is open")
            closed_through_us = _closed_through_us(conn, stored)
            if statement.start_us != closed_through_us:
                raise PeriodClosed(
                    f"account {account!r}: the period starting {iso_text(statement.start_us)} "
                    + (
                        "is already closed"
                        if statement.start_us < closed_through_us
                        else f"cannot close before the one starting {iso_text(closed_through_us)}"
                    )
                )
            versions = conn.execute(
                "SELECT effective_us FROM price_versions WHERE effective_us < ? ORDER BY 1",
                (statement.end_us,),
            ).fetchall()
            check_prices_unchanged(statement, [row[0] for row in versions])
            conn.execute(
                "INSERT INTO statements VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    account,
                    statement.start_us,
                    statement.end_us,
                    statement.plan,
                    statement.plan_grant_micro,
                    statement.closed_at_us,
                    statement.closed_by,
                ),
            )
            conn.executemany(
                "INSERT INTO statement_lines VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        account,
                        statement.start_us,
                        line.kind.value,
                        line.model,
                        line.quantity,
                        line.credits_micro,
                        int(line.default_price),
                        line.price_from_us,
                    )
                    for line in statement.lines
                ],
            )
            if signed is not None:
                conn.execute(
                    "INSERT INTO statement_documents VALUES (?, ?, ?, ?, ?)",
                    (
                        account,
                        statement.start_us,
                        signed.document,
                        signed.signature,
                        signed.public_key_hex,
                    ),
                )

    def signed_statements(self, account: str) -> list[SignedStatement]:
        with self._lock, _translated(f"reading signed statements of {account!r}"):
            rows = (
                self._connection()
                .execute(
                    """SELECT start_us, document, signature, public_key_hex
                       FROM statement_documents WHERE account = ? ORDER BY start_us""",
                    (account,),
                )
                .fetchall()
            )
        return [
            SignedStatement(start, bytes(doc), bytes(sig), key) for start, doc, sig, key in rows
        ]

    def segments_between(self, agent_id: str, from_seq: int, to_seq: int) -> list[Segment]:
        with self._lock, _translated(f"reading segments of {agent_id!r}"):
            rows = (
                self._connection()
                .execute(
                    """SELECT first_seq, last_seq, signature FROM segments
                       WHERE agent_id = ? AND last_seq BETWEEN ? AND ? ORDER BY last_seq""",
                    (agent_id, from_seq, to_seq),
                )
                .fetchall()
            )
        return [Segment(first, last, bytes(signature)) for first, last, signature in rows]

    def records_between(self, agent_id: str, first: int, last: int) -> list[tuple[int, bytes]]:
        with self._lock, _translated(f"reading records of {agent_id!r}"):
            rows = _records(self._connection(), agent_id, first, last)
        return [(seq, bytes(record)) for seq, record in rows]

    def statements(self, account: str) -> list[Statement]:
        with self._lock, _translated(f"reading statements of {account!r}"):
            conn = self._connection()
            heads = conn.execute(
                """SELECT start_us, end_us, plan, plan_grant_micro, closed_at_us, closed_by
                   FROM statements WHERE account = ? ORDER BY start_us""",
                (account,),
            ).fetchall()
            lines: dict[int, list[StatementLine]] = {}
            for start_us, kind, model, quantity, credits, default, price_from_us in conn.execute(
                """SELECT start_us, kind, model, quantity, credits_micro, default_price,
                          price_from_us
                   FROM statement_lines WHERE account = ?
                   ORDER BY start_us, kind, model, price_from_us""",
                (account,),
            ):
                lines.setdefault(start_us, []).append(
                    StatementLine(
                        LineKind(kind), model, quantity, credits, bool(default), price_from_us
                    )
                )
        return [
            Statement(account, start, end, plan, grant, tuple(lines.get(start, ())), at, by)
            for start, end, plan, grant, at, by in heads
        ]

    def _read_rows(self, sql: str, parameters: tuple[int, int]) -> Iterator[tuple[Any, ...]]:
        """Streams a long read on its own connection and read transaction: one consistent
        view, and ingest is not held up meanwhile."""
        with _translated(f"reading {self.path}"):
            conn = self._connect()
            try:
                conn.execute("BEGIN")
                yield from conn.execute(sql, parameters)
            finally:
                conn.close()

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
                conn.execute(f"PRAGMA threads = {_SORTER_HELPERS}")
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
        single-file equivalent of locking the agent's row. Processes writing the same file
        (ingest workers) take turns first (writer_turn.py)."""
        with self._lock, _translated(action), self._turn:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


# Helper threads SQLite's sorter may start for a large sort (GROUP BY, ORDER BY, index
# builds; none on the ingest path): a report over 15 days grouped by account and host sorts
# 1.5 M device-hours, 1.6 s alone and 1.0 s with one helper on 2 cores (more made it no
# faster there).
_SORTER_HELPERS = 1 if (os.cpu_count() or 1) > 1 else 0


class SQLiteSnapshot:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def agents(self) -> list[AgentInfo]:
        with _translated("reading agents"):
            rows = self._conn.execute(_SELECT_AGENT + " ORDER BY agent_id").fetchall()
            keys = _keys(self._conn, None)
        return [_agent_info(row, keys.get(row[0], [])) for row in rows]

    def records(self) -> Iterator[StoredRecord]:
        with _translated("reading records"):
            for row in self._conn.execute(_SELECT_RECORDS):
                yield StoredRecord(*row)

    def orphan_segments(self) -> list[tuple[str, int]]:
        with _translated("reading segments"):
            return self._conn.execute(_SELECT_ORPHAN_SEGMENTS).fetchall()

    def rollups(self) -> Iterator[Rollup]:
        with _translated("reading rollups"):
            cursor = self._conn.execute(
                """SELECT hour_start_us, account, model, busy_us, wall_us, record_count
                   FROM rollups_hourly ORDER BY hour_start_us, account, model"""
            )
            for row in cursor:
                yield Rollup(*row)

    def device_rollups(
        self, from_us: int | None = None, to_us: int | None = None
    ) -> Iterator[DeviceRollup]:
        with _translated("reading device rollups"):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, account, model, busy_us, wall_us,
                          record_count
                   FROM rollups_device_hourly WHERE hour_start_us >= ? AND hour_start_us < ?
                   ORDER BY 1, 2, 3, 4, 5""",
                _bounds(from_us, to_us),
            )
            for row in cursor:
                yield DeviceRollup(*row)

    def quarantine(self) -> list[QuarantineEntry]:
        with _translated("reading the quarantine"):
            return _quarantine(self._conn)

    def gpu_usage_rollups(self) -> Iterator[DeviceRollup]:
        with _translated("reading GPU usage rollups"):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, '', model, busy_us, wall_us,
                          record_count
                   FROM rollups_gpu_usage_hourly ORDER BY 1, 2, 3, 5"""
            )
            for row in cursor:
                yield DeviceRollup(*row)

    def device_monthly_rollups(self) -> Iterator[tuple[DeviceRollupKey, RollupSums]]:
        with _translated("reading monthly device rollups"):
            cursor = self._conn.execute(
                f"""SELECT month_start_us, host, gpu_uuid, account, model,
                          {", ".join(MONTHLY_SUM_COLUMNS)}
                   FROM rollups_device_monthly ORDER BY 1, 2, 3, 4, 5"""
            )
            for row in cursor:
                yield row[:5], list(row[5:])

    def device_totals(
        self, from_us: int | None = None, to_us: int | None = None
    ) -> Iterator[DeviceRollup]:
        with _translated("reading device rollups"):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, '', '', SUM(busy_us), SUM(wall_us),
                          SUM(record_count)
                   FROM rollups_gpu_usage_hourly
                   WHERE hour_start_us >= ? AND hour_start_us < ?
                   GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
                _bounds(from_us, to_us),
            )
            for row in cursor:
                yield DeviceRollup(*row)

    def gpu_rollups(
        self, from_us: int | None = None, to_us: int | None = None
    ) -> Iterator[GpuRollup]:
        with _translated("reading GPU rollups"):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, kind, amount_us
                   FROM rollups_gpu_hourly WHERE hour_start_us >= ? AND hour_start_us < ?
                   ORDER BY 1, 2, 3, 4""",
                _bounds(from_us, to_us),
            )
            for row in cursor:
                yield GpuRollup(*row)

    def api_rollups(self) -> Iterator[ApiRollup]:
        with _translated("reading API rollups"):
            cursor = self._conn.execute(
                """SELECT hour_start_us, account, model, requests, charge_count
                   FROM api_rollups_hourly ORDER BY 1, 2, 3"""
            )
            for row in cursor:
                yield ApiRollup(*row)

    def api_charges(self) -> Iterator[ApiCharge]:
        with _translated("reading API charges"):
            cursor = self._conn.execute(
                "SELECT request_id, account, model, count, time_us FROM api_charges "
                "ORDER BY request_id"
            )
            for row in cursor:
                yield ApiCharge(*row)


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
    except sqlite3.IntegrityError as exc:
        if ROLLUP_OVERFLOW in str(exc):
            raise RollupOverflow(f"{action}: {exc}") from exc
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
            if migration.backfill is not None:
                migration.backfill(conn)
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
    return None if row is None else _agent_info(row, _keys(conn, agent_id).get(agent_id, []))


def _agent_info(
    row: tuple[str, str, int, int | None, int, bytes], keys: list[AgentKey]
) -> AgentInfo:
    agent_id, key_hex, enrolled_at_us, revoked_at_us, head_seq, head_hash = row
    head = ChainHead(head_seq, head_hash) if head_seq else NO_HEAD
    return AgentInfo(agent_id, key_hex, enrolled_at_us, revoked_at_us, head, tuple(keys))


def _capacity(conn: sqlite3.Connection, agent_id: str) -> Capacity:
    row = conn.execute(
        "SELECT head_seq, capacity FROM agents WHERE agent_id = ?", (agent_id,)
    ).fetchone()
    return Capacity() if row is None else Capacity.decode(row[1], row[0])


def _bounds(from_us: int | None, to_us: int | None) -> tuple[int, int]:
    return (_MIN_US if from_us is None else from_us, _MAX_US if to_us is None else to_us)


def _locked_head(conn: sqlite3.Connection, agent_id: str) -> tuple[ChainHead, str, int]:
    """The agent's stored head, its key in force and where that key starts, read inside
    the write transaction."""
    row = conn.execute(
        """SELECT head_seq, head_hash, revoked_at_us, public_key_hex, key_after_seq
           FROM agents WHERE agent_id = ?""",
        (agent_id,),
    ).fetchone()
    if row is None:
        raise UnknownAgent("is not enrolled", agent_id=agent_id)
    head_seq, head_hash, revoked_at_us, key_hex, key_after_seq = row
    if revoked_at_us is not None:
        raise AgentRevoked(f"was revoked at {iso_text(revoked_at_us)}", agent_id=agent_id)
    return (ChainHead(head_seq, head_hash) if head_seq else NO_HEAD), key_hex, key_after_seq


def _add_key(
    conn: sqlite3.Connection,
    agent_id: str,
    after_seq: int,
    key_hex: str,
    how: KeyChange,
    at_us: int,
    by: str = "",
    reason: str = "",
) -> None:
    """Puts ``key_hex`` in force for the agent's records after ``after_seq``."""
    conn.execute(
        """INSERT INTO agent_keys (agent_id, after_seq, public_key_hex, how, at_us, added_by,
                                   reason) VALUES (?, ?, ?, ?, ?, ?, ?)""",
        (agent_id, after_seq, key_hex, how.value, at_us, by, reason),
    )
    conn.execute(
        "UPDATE agents SET public_key_hex = ?, key_after_seq = ? WHERE agent_id = ?",
        (key_hex, after_seq, agent_id),
    )


def _keys(conn: sqlite3.Connection, agent_id: str | None) -> dict[str, list[AgentKey]]:
    """Every key of one agent (or of all), in order, by agent."""
    where, parameters = ("WHERE agent_id = ?", (agent_id,)) if agent_id else ("", ())
    return agent_keys(
        conn.execute(
            f"""SELECT agent_id, after_seq, public_key_hex, how, at_us, added_by, reason
                FROM agent_keys {where} ORDER BY agent_id, after_seq, id""",
            parameters,
        )
    )


def _insert_rows(
    conn: sqlite3.Connection, rows: Sequence[RecordRow], chunk_sizes: Sequence[int]
) -> None:
    start = 0
    for size in chunk_sizes:  # largest first
        while len(rows) - start >= size:
            # list.extend copies a tuple's items in C: 0.06 µs a row, where
            # list(chain.from_iterable(...)) took 0.2 (measured at 1000 rows).
            params: list[object] = []
            extend = params.extend
            for row in rows[start : start + size]:
                extend(row)
            conn.execute(_CHUNK_SQL[size], params)
            start += size


def _add_rollups(
    conn: sqlite3.Connection,
    sums: dict[RollupKey, RollupSums],
    device_sums: dict[DeviceRollupKey, RollupSums],
    gpu_sums: GpuSums,
) -> None:
    """Adds a batch's sums to both hourly rollups. In no particular order: PostgreSQL
    upserts in key order so that its writers lock rows in one order, but SQLite's write lock
    already makes each transaction wait for the one before, and sorting the ~200 keys of a
    batch cost 0.15 µs a record (measured)."""
    conn.executemany(_UPSERT_ROLLUP, [(*key, *total) for key, total in sums.items()])
    conn.executemany(_UPSERT_DEVICE_ROLLUP, [(*key, *total) for key, total in device_sums.items()])
    usage = gpu_usage_sums(device_sums)
    conn.executemany(_UPSERT_GPU_USAGE, [(*key, *total) for key, total in usage.items()])
    for day, sums_of_day in device_month_day_sums(device_sums).items():
        conn.executemany(
            _UPSERT_DEVICE_MONTH_DAY[day],
            [(*key, *total, total[0], total[2]) for key, total in sums_of_day.items()],
        )
    if gpu_sums:
        conn.executemany(_UPSERT_GPU_ROLLUP, [(*key, us) for key, us in gpu_sums.items()])


def _add_account_spans(conn: sqlite3.Connection, agent_id: str, spans: AccountSpans) -> None:
    conn.executemany(_UPSERT_ACCOUNT_SPAN, span_rows(agent_id, spans))


def _backfill_account_spans(conn: sqlite3.Connection) -> None:
    """Migration 17: the spans of the records stored before it, read from their bytes."""
    stored = conn.execute(f"SELECT agent_id, seq, start_us, record FROM records r WHERE {NOT_HELD}")
    for chunk in backfill_rows(stored):
        conn.executemany(_UPSERT_ACCOUNT_SPAN, chunk)


def _quarantine(conn: sqlite3.Connection) -> list[QuarantineEntry]:
    rows = conn.execute("SELECT * FROM quarantine ORDER BY agent_id, seq").fetchall()
    return [QuarantineEntry(*row) for row in rows]


def _records(
    conn: sqlite3.Connection, agent_id: str, first: int, last: int
) -> list[tuple[int, bytes]]:
    return conn.execute(
        "SELECT seq, record FROM records WHERE agent_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
        (agent_id, first, last),
    ).fetchall()


# -- ledger helpers --------------------------------------------------------------------------

_SELECT_PLAN = "SELECT name, grant_micro, created_at_us, created_by FROM plans"
_SELECT_ACCOUNT = (
    "SELECT name, anchor_day, first_period_start_us, created_at_us, created_by FROM accounts"
)


def _plan(conn: sqlite3.Connection, name: str) -> Plan | None:
    row = conn.execute(_SELECT_PLAN + " WHERE name = ?", (name,)).fetchone()
    return None if row is None else Plan(*row)


def _account(conn: sqlite3.Connection, name: str) -> Account | None:
    row = conn.execute(_SELECT_ACCOUNT + " WHERE name = ?", (name,)).fetchone()
    return None if row is None else Account(*row)


def _plan_changes(conn: sqlite3.Connection, account: str) -> list[PlanChange]:
    rows = conn.execute(
        """SELECT account, plan, effective_us, created_at_us, created_by FROM plan_changes
           WHERE account = ? ORDER BY effective_us, id""",
        (account,),
    ).fetchall()
    return [PlanChange(*row) for row in rows]


def _insert_plan_change(conn: sqlite3.Connection, change: PlanChange) -> None:
    conn.execute(
        """INSERT INTO plan_changes (account, effective_us, plan, created_at_us, created_by)
           VALUES (?, ?, ?, ?, ?)""",
        (change.account, change.effective_us, change.plan, change.created_at_us, change.created_by),
    )


def _closed_through_us(conn: sqlite3.Connection, account: Account) -> int:
    """Where the account's closed periods end: the start of its first open period."""
    end_us = conn.execute(
        "SELECT MAX(end_us) FROM statements WHERE account = ?", (account.name,)
    ).fetchone()[0]
    return account.first_period_start_us if end_us is None else int(end_us)


def _check_open(conn: sqlite3.Connection, name: str, effective_us: int, what: str) -> None:
    """Raises UnknownAccount, or PeriodClosed when ``effective_us`` is in a closed period."""
    account = _account(conn, name)
    if account is None:
        raise UnknownAccount(f"no account {name!r} is open")
    closed_through_us = _closed_through_us(conn, account)
    if effective_us < closed_through_us:
        raise PeriodClosed(
            f"account {name!r}: {what} dated {iso_text(effective_us)} falls in a closed period "
            f"(closed up to {iso_text(closed_through_us)}); date it in the open period"
        )


def _grouped_sql(
    dimensions: frozenset[Dimension],
    account: str | None,
    bounds: tuple[int, int],
    *,
    api: bool,
) -> tuple[str, list[object]]:
    """A grouped rollup query whose rows are UsageGroup fields, from the smallest rollups
    that hold the grouping (busy_rollup_parts)."""
    day = f"hour_start_us - hour_start_us % {DAY_US}"
    columns = group_columns(dimensions, api=api, day_sql=day)
    grouped = grouping_order(columns)
    selected = [expression or "NULL" for expression in columns.values()]
    sums = "0, SUM(requests), SUM(charge_count)" if api else "SUM(busy_us), 0, SUM(record_count)"
    parts = (
        [RollupPart("api_rollups_hourly", "hour_start_us", *bounds)]
        if api
        else busy_rollup_parts(dimensions, account, bounds, (_MIN_US, _MAX_US))
    )
    source, parameters = rollup_source_sql(parts, account, "?")
    sql = f"SELECT {', '.join(selected)}, {sums} FROM {source} GROUP BY {', '.join(grouped)}"
    return sql, parameters


_ENTRY_SELECT = """SELECT account, kind, amount_micro, effective_us, expires_us, reason,
                          created_by, created_at_us, id, idempotency_key
                   FROM ledger_entries"""


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(row[0], EntryKind(row[1]), *row[2:])
