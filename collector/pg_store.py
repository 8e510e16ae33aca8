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

Rollups (per account and model, and per device for reports by host and GPU) are upserted
in the same transaction, in the same statement that moves the head and stores the batch's
segment (``_advance``, the last before the commit), device rows first, each table in key
order, everywhere, so two writers never wait for each other's rows in opposite orders (no
deadlock). Each transaction takes exactly one agent lock, first, and only rollup locks
after it (the records and segment it inserts are keyed by that agent: no other writer can
hold them). The rollup key carries a ``shard`` (crc32 of the agent id mod
``ROLLUP_SHARDS``): an upserted rollup row stays locked until commit, WAL flush included,
so if every agent of a large account shared one row per hour, all collectors would commit
that account's batches one after another. Readers sum shards.

The ledger (``LedgerStore``) decides inside its transactions, as ingest does:
  * an account's row is its lock. Closing a period locks it ``FOR UPDATE``; adding an entry
    or a plan change locks it ``FOR SHARE`` (they may run beside each other, never beside a
    close), then reads where the closed periods end. A close therefore waits for entries in
    flight, and an entry waiting for a close reads (READ COMMITTED: a snapshot per
    statement, taken after the lock was granted) the period that close froze, and is
    refused; two closes of one period run one after the other and the second is refused.
    No deadlock: the account row is the first lock of each of these transactions, and what
    they lock after it (key-share locks of their foreign keys on plans) nothing updates.
  * an API charge is one statement (``_RECORD_CHARGE``): the request id's unique index
    decides whether it is new, the charge and its hourly rollup commit together, and a retry
    of a charge still in flight at another collector waits for it. API rollups are sharded
    by request id, for the same reason as the record rollups.

Records: a row of ``records`` is the evidence and its key: (agent_id, seq), start_us for
exports by time range, and the record's bytes exactly as received (rows.py). Every other
field lives in the bytes only: reports read the rollups, the audit and exports parse the
bytes. The batch's head signature is one row of ``segments``, keyed by the agent and the
seq of the last record it covers.

Bulk path: after the agent's row is locked, ``first_new_index`` has already told which
records are new (and compared every resent one with the stored bytes), so the new rows are
written with one binary ``COPY`` straight into ``records``; the primary key (agent_id, seq)
is the dedup key, claimed in the commit. A staging table plus ``INSERT … SELECT … ON
CONFLICT DO NOTHING`` writes every row twice to settle a question the row lock has already
settled (bench/pg_ingest.py measures both). A unique violation in the COPY, or of the
segment, means rows above the stored head exist: StoreCorrupt. The segment's row and the
batch's account spans are written by the statement that moves the head (``_ADVANCE``), so
an ingest is eight round trips (BEGIN, lock, COPY's two, the GPUs' books, their usage with
the month's, advance, COMMIT); one more for a batch across midnight, one for a GPU budget
claimed, one when resent records are compared.
Measured and left out: psycopg's pipeline mode (more CPU than the round trips it saves on a
local network) and INSERTs instead of COPY for small batches (cheaper below about three
rows only).

Connections: a small psycopg_pool pool (``_Pool``), each connection lent to one thread for
one transaction; writes from several gRPC streams of one collector run in parallel and share
PostgreSQL's WAL flushes (group commit). A connection that broke (database restarted,
failover, network) fails the request it serves with StoreError (UNAVAILABLE, the agent
retries) and is discarded, its idle siblings checked; the next request connects afresh. A
commit whose acknowledgement was lost may have committed: the agent's retry is then
acknowledged as a duplicate.

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
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg.types.string import BytesBinaryDumper
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

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
    ConfigError,
    EnrollmentError,
    InsaneField,
    LedgerError,
    NoDatabase,
    NotQuarantined,
    PeriodClosed,
    RollupOverflow,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreCorrupt,
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

log = logging.getLogger(__name__)

Connection = psycopg.Connection[TupleRow]
Cursor = psycopg.Cursor[TupleRow]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]
    # Work SQL cannot do (reading record bytes), after the statements, in their transaction.
    backfill: Callable[[Connection], None] | None = None


# The month (UTC) of a rollup's hour, in µs (rollup.month_start_us), and its day (1-31).
_MONTH_OF_HOUR_SQL = (
    "EXTRACT(EPOCH FROM date_trunc('month', to_timestamp(hour_start_us / 1000000) "
    "AT TIME ZONE 'UTC'))::bigint * 1000000"
)
_DAY_OF_HOUR_SQL = "EXTRACT(DAY FROM to_timestamp(hour_start_us / 1000000) AT TIME ZONE 'UTC')::int"
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
            # were extracted from them for queries, and migration 5 drops them. No FOREIGN
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
    Migration(
        3,
        "hourly rollups per device (sharded by agent) for reports by host and GPU, backfilled "
        "from the records; rollups by account for balances",
        (
            # Balances read one account's hours: without this they would scan every account.
            "CREATE INDEX rollups_hourly_by_account ON rollups_hourly (account, hour_start_us)",
            # Sharded like rollups_hourly: several agents may report one host name (several
            # agents on one machine), and would then queue on one row per hour.
            """CREATE TABLE rollups_device_hourly (
                hour_start_us BIGINT NOT NULL,
                host TEXT COLLATE "C" NOT NULL,
                gpu_uuid TEXT COLLATE "C" NOT NULL,
                account TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                shard SMALLINT NOT NULL DEFAULT 0,
                busy_us BIGINT NOT NULL,
                wall_us BIGINT NOT NULL,
                record_count BIGINT NOT NULL,
                PRIMARY KEY (hour_start_us, host, gpu_uuid, account, model, shard)
            )""",
            # Runs inside the migration transaction, which collectors starting meanwhile
            # wait for (one pass over records: minutes on a large database).
            """INSERT INTO rollups_device_hourly
                SELECT start_us - start_us % 3600000000, host, gpu_uuid, account, model, 0,
                       SUM(busy_us), SUM(wall_us), COUNT(*)
                FROM records GROUP BY 1, 2, 3, 4, 5""",
        ),
    ),
    Migration(
        4,
        "the credit ledger: plans, accounts, credit entries, API charges, closed periods",
        (
            """CREATE TABLE plans (
                name TEXT COLLATE "C" PRIMARY KEY,
                grant_micro BIGINT NOT NULL,
                created_at_us BIGINT NOT NULL,
                created_by TEXT NOT NULL
            )""",
            # The row every write of an account's credits locks (see the module docstring).
            """CREATE TABLE accounts (
                name TEXT COLLATE "C" PRIMARY KEY,
                anchor_day BIGINT NOT NULL,
                first_period_start_us BIGINT NOT NULL,
                created_at_us BIGINT NOT NULL,
                created_by TEXT NOT NULL
            )""",
            # Several changes may name the same period: the last one made wins, and all of
            # them stay for the audit trail.
            """CREATE TABLE plan_changes (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                account TEXT COLLATE "C" NOT NULL REFERENCES accounts,
                effective_us BIGINT NOT NULL,
                plan TEXT COLLATE "C" NOT NULL REFERENCES plans,
                created_at_us BIGINT NOT NULL,
                created_by TEXT NOT NULL
            )""",
            "CREATE INDEX plan_changes_by_account ON plan_changes (account, effective_us, id)",
            """CREATE TABLE ledger_entries (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                account TEXT COLLATE "C" NOT NULL REFERENCES accounts,
                kind TEXT NOT NULL,
                amount_micro BIGINT NOT NULL,
                effective_us BIGINT NOT NULL,
                expires_us BIGINT,
                reason TEXT NOT NULL,
                created_by TEXT NOT NULL,
                created_at_us BIGINT NOT NULL
            )""",
            "CREATE INDEX ledger_entries_by_account ON ledger_entries (account, id)",
            # No foreign key to accounts: the gateway may charge an account not opened yet
            # (reported, never charged to a balance, as unattributed usage is).
            """CREATE TABLE api_charges (
                request_id TEXT COLLATE "C" PRIMARY KEY,
                account TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                count BIGINT NOT NULL,
                time_us BIGINT NOT NULL,
                received_at_us BIGINT NOT NULL
            )""",
            # Sharded by request id, as rollups_hourly by agent: a gateway charging one
            # account and model from many threads would otherwise queue on one row an hour.
            """CREATE TABLE api_rollups_hourly (
                hour_start_us BIGINT NOT NULL,
                account TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                shard SMALLINT NOT NULL DEFAULT 0,
                requests BIGINT NOT NULL,
                charge_count BIGINT NOT NULL,
                PRIMARY KEY (hour_start_us, account, model, shard)
            )""",
            "CREATE INDEX api_rollups_hourly_by_account "
            "ON api_rollups_hourly (account, hour_start_us)",
            """CREATE TABLE statements (
                account TEXT COLLATE "C" NOT NULL REFERENCES accounts,
                start_us BIGINT NOT NULL,
                end_us BIGINT NOT NULL,
                plan TEXT COLLATE "C" NOT NULL REFERENCES plans,
                plan_grant_micro BIGINT NOT NULL,
                closed_at_us BIGINT NOT NULL,
                closed_by TEXT NOT NULL,
                PRIMARY KEY (account, start_us)
            )""",
            """CREATE TABLE statement_lines (
                account TEXT COLLATE "C" NOT NULL,
                start_us BIGINT NOT NULL,
                kind TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                quantity BIGINT NOT NULL,
                credits_micro BIGINT NOT NULL,
                default_price BOOLEAN NOT NULL,
                PRIMARY KEY (account, start_us, kind, model),
                FOREIGN KEY (account, start_us) REFERENCES statements
            )""",
        ),
    ),
    Migration(
        5,
        "records keep only the evidence and its key; segment signatures in their own table",
        (
            # A batch's head signature covers its last record: one row per batch, not a
            # mostly-NULL column of every record. received_at_us is when the batch was
            # stored. Keyed like records (no FOREIGN KEY, for the same reason).
            """CREATE TABLE segments (
                agent_id TEXT COLLATE "C" NOT NULL,
                last_seq BIGINT NOT NULL,
                signature BYTEA NOT NULL,
                received_at_us BIGINT NOT NULL,
                PRIMARY KEY (agent_id, last_seq)
            )""",
            """INSERT INTO segments (agent_id, last_seq, signature, received_at_us)
                SELECT agent_id, seq, signature, received_at_us FROM records
                WHERE signature IS NOT NULL""",
            # The bytes are the one copy of every other field (see rows.py): reports read
            # the rollups (migrations 2 and 3 built them from these columns, ingest keeps
            # them), the audit and exports parse the bytes. Extracted copies could disagree
            # with the bytes they came from, and binding them is the ingest's cost (23
            # values a record instead of 4). DROP COLUMN only marks the columns dropped, so
            # this step is quick; existing rows keep their space until they are rewritten
            # (VACUUM FULL reclaims it).
            """ALTER TABLE records
                DROP COLUMN hash,
                DROP COLUMN signature,
                DROP COLUMN end_us,
                DROP COLUMN host,
                DROP COLUMN gpu_uuid,
                DROP COLUMN gpu_index,
                DROP COLUMN gpu_parent_uuid,
                DROP COLUMN pid,
                DROP COLUMN create_time_us,
                DROP COLUMN process_name,
                DROP COLUMN account,
                DROP COLUMN model,
                DROP COLUMN job_id,
                DROP COLUMN attribution_source,
                DROP COLUMN busy_us,
                DROP COLUMN wall_us,
                DROP COLUMN energy_mj,
                DROP COLUMN gap_us,
                DROP COLUMN source,
                DROP COLUMN received_at_us""",
        ),
    ),
    Migration(
        6,
        "per GPU and hour: device busy, attributed and unattributed time, gaps by reason",
        (
            # Amounts by kind (rollup.py). A GPU belongs to one agent, so its rows have one
            # writer at a time: no shards. Records stored before this migration keep their
            # gaps in their bytes only: `audit` names any hour that differs.
            """CREATE TABLE rollups_gpu_hourly (
                hour_start_us BIGINT NOT NULL,
                host TEXT COLLATE "C" NOT NULL,
                gpu_uuid TEXT COLLATE "C" NOT NULL,
                kind TEXT COLLATE "C" NOT NULL,
                amount_us BIGINT NOT NULL,
                PRIMARY KEY (hour_start_us, host, gpu_uuid, kind)
            )""",
        ),
    ),
    Migration(
        7,
        "quarantine: signed, chained records whose fields broke the checks, kept unbilled",
        (
            """CREATE TABLE quarantine (
                agent_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                field TEXT NOT NULL,
                problem TEXT NOT NULL,
                quarantined_at_us BIGINT NOT NULL,
                released_at_us BIGINT,
                released_by TEXT,
                PRIMARY KEY (agent_id, seq)
            )""",
        ),
    ),
    Migration(
        8,
        "ledger entries carry an idempotency key: a retried top-up, grant or adjustment is a no-op",
        (
            "ALTER TABLE ledger_entries ADD COLUMN idempotency_key TEXT",
            """CREATE UNIQUE INDEX ledger_entries_by_key ON ledger_entries (idempotency_key)
               WHERE idempotency_key IS NOT NULL""",
        ),
    ),
    Migration(
        9,
        "agents carry their GPU budgets: no GPU's records claim more busy time than elapsed",
        ("ALTER TABLE agents ADD COLUMN capacity TEXT NOT NULL DEFAULT ''",),
    ),
    Migration(
        10,
        "the price book lives in the store, in versions; statement lines name the version",
        (
            """CREATE TABLE price_versions (
                effective_us BIGINT PRIMARY KEY,
                prices TEXT NOT NULL,
                loaded_at_us BIGINT NOT NULL,
                loaded_by TEXT NOT NULL
            )""",
            "ALTER TABLE statement_lines ADD COLUMN price_from_us BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE statement_lines DROP CONSTRAINT statement_lines_pkey",
            """ALTER TABLE statement_lines
               ADD PRIMARY KEY (account, start_us, kind, model, price_from_us)""",
        ),
    ),
    Migration(
        11,
        "segments keep where a span signature starts; closed periods keep a signed statement",
        (
            "ALTER TABLE segments ADD COLUMN first_seq BIGINT",
            """CREATE TABLE statement_documents (
                account TEXT COLLATE "C" NOT NULL,
                start_us BIGINT NOT NULL,
                document BYTEA NOT NULL,
                signature BYTEA NOT NULL,
                public_key_hex TEXT NOT NULL,
                PRIMARY KEY (account, start_us)
            )""",
        ),
    ),
    Migration(
        12,
        "agents keep every public key they signed with: rotations and replacements",
        (
            "ALTER TABLE agents ADD COLUMN key_after_seq BIGINT NOT NULL DEFAULT 0",
            """CREATE TABLE agent_keys (
                id BIGSERIAL PRIMARY KEY,
                agent_id TEXT COLLATE "C" NOT NULL,
                after_seq BIGINT NOT NULL,
                public_key_hex TEXT NOT NULL,
                how TEXT NOT NULL,
                at_us BIGINT NOT NULL,
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
        13,
        "hourly rollups per GPU and model (the device rollups summed over accounts), for "
        "reports by host or GPU",
        (
            """CREATE TABLE rollups_gpu_usage_hourly (
                hour_start_us BIGINT NOT NULL,
                host TEXT COLLATE "C" NOT NULL,
                gpu_uuid TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                shard SMALLINT NOT NULL DEFAULT 0,
                busy_us BIGINT NOT NULL,
                wall_us BIGINT NOT NULL,
                record_count BIGINT NOT NULL,
                PRIMARY KEY (hour_start_us, host, gpu_uuid, model, shard)
            )""",
            """INSERT INTO rollups_gpu_usage_hourly
                SELECT hour_start_us, host, gpu_uuid, model, shard, SUM(busy_us),
                       SUM(wall_us), SUM(record_count)
                FROM rollups_device_hourly GROUP BY 1, 2, 3, 4, 5""",
        ),
    ),
    Migration(
        14,
        "the device rollups per calendar month, for month reports by account and host or GPU",
        (
            """CREATE TABLE rollups_device_monthly (
                month_start_us BIGINT NOT NULL,
                host TEXT COLLATE "C" NOT NULL,
                gpu_uuid TEXT COLLATE "C" NOT NULL,
                account TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                shard SMALLINT NOT NULL DEFAULT 0,
                busy_us BIGINT NOT NULL,
                wall_us BIGINT NOT NULL,
                record_count BIGINT NOT NULL,
                PRIMARY KEY (month_start_us, host, gpu_uuid, account, model, shard)
            )""",
            f"""INSERT INTO rollups_device_monthly
                SELECT {_MONTH_OF_HOUR_SQL}, host, gpu_uuid, account, model, shard,
                       SUM(busy_us), SUM(wall_us), SUM(record_count)
                FROM rollups_device_hourly GROUP BY 1, 2, 3, 4, 5, 6""",
        ),
    ),
    Migration(
        15,
        "the monthly device rollups' busy µs and records per day, for reports over days",
        (
            "ALTER TABLE rollups_device_monthly "
            + ", ".join(
                f"ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0"
                for column in (*DAY_BUSY_COLUMNS, *DAY_RECORD_COLUMNS)
            ),
            f"""UPDATE rollups_device_monthly AS m SET {DAYS_SET_SQL}
                FROM (SELECT month_start_us, host, gpu_uuid, account, model, shard,
                             {day_sums_sql("::bigint")}
                      FROM (SELECT *, {_MONTH_OF_HOUR_SQL} AS month_start_us,
                                   {_DAY_OF_HOUR_SQL} AS day
                            FROM rollups_device_hourly) AS h
                      GROUP BY 1, 2, 3, 4, 5, 6) AS s
                WHERE m.month_start_us = s.month_start_us AND m.host = s.host
                  AND m.gpu_uuid = s.gpu_uuid AND m.account = s.account AND m.model = s.model
                  AND m.shard = s.shard""",
        ),
    ),
    Migration(
        16,
        "where each account's records lie: per account, 10-minute bucket and agent, a span of seqs",
        (
            """CREATE TABLE account_spans (
                bucket_us BIGINT NOT NULL,
                agent_id TEXT COLLATE "C" NOT NULL,
                account TEXT COLLATE "C" NOT NULL,
                first_seq BIGINT NOT NULL,
                last_seq BIGINT NOT NULL,
                PRIMARY KEY (bucket_us, agent_id, account)
            )""",
        ),
        backfill=lambda conn: _backfill_account_spans(conn),
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

# The binary COPY of records: the rows as the verifier made them (public for
# bench/pg_ingest.py's raw COPY of the same rows).
RECORD_COPY_COLUMNS = ROW_COLUMNS
_COPY_RECORDS = f"COPY records ({', '.join(RECORD_COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
RECORD_COPY_TYPES: Final = (
    "text",  # agent_id
    "int8",  # seq
    "int8",  # start_us
    "bytea",  # record
)
assert len(RECORD_COPY_TYPES) == len(RECORD_COPY_COLUMNS)
# The head moves, the batch's segment is stored and its rollups are added in one statement,
# one round trip. The agents row is the one the transaction locked first, so the UPDATE
# never waits; the segment's key is the locked agent's, so no other writer can hold it (a
# duplicate means a segment above the stored head: StoreCorrupt), and neither needs an
# order. Rollup rows are locked in one order everywhere, so writers cannot deadlock: first
# the device rollups, then the hourly ones, each in the order the caller sorted them (unnest
# yields rows in array order and the INSERT takes them in that order). The device upsert
# comes first because the hourly INSERT's WHERE reads its result: PostgreSQL must finish it
# (an InitPlan, run once before the first hourly row) before it inserts any hourly row.
# Data-modifying CTEs that nothing reads (head, segment) run to completion but in no
# documented order, so the rollups' order is forced this way, not assumed.
_DEVICE_ROLLUPS_CTE = """
    device AS (
        INSERT INTO rollups_device_hourly (hour_start_us, host, gpu_uuid, account, model, shard,
                                           busy_us, wall_us, record_count)
        SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[],
                             %s::smallint[], %s::bigint[], %s::bigint[], %s::bigint[])
        ON CONFLICT (hour_start_us, host, gpu_uuid, account, model, shard) DO UPDATE SET
            busy_us = rollups_device_hourly.busy_us + excluded.busy_us,
            wall_us = rollups_device_hourly.wall_us + excluded.wall_us,
            record_count = rollups_device_hourly.record_count + excluded.record_count
        RETURNING 1
    )"""
_HOURLY_ROLLUPS = """
    INSERT INTO rollups_hourly
        (hour_start_us, account, model, shard, busy_us, wall_us, record_count)
    SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::smallint[], %s::bigint[],
                         %s::bigint[], %s::bigint[])
    WHERE (SELECT count(*) FROM device) >= 0
    ON CONFLICT (hour_start_us, account, model, shard) DO UPDATE SET
        busy_us = rollups_hourly.busy_us + excluded.busy_us,
        wall_us = rollups_hourly.wall_us + excluded.wall_us,
        record_count = rollups_hourly.record_count + excluded.record_count"""
# A batch's account spans (one agent's rows: only the stream holding the agent's row locked
# writes them, so their order is free); rows as arrays, keys unique within a batch and a chunk.
_UPSERT_ACCOUNT_SPANS = """
    INSERT INTO account_spans (bucket_us, agent_id, account, first_seq, last_seq)
    SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::bigint[], %s::bigint[])
    ON CONFLICT (bucket_us, agent_id, account) DO UPDATE SET
        first_seq = LEAST(account_spans.first_seq, excluded.first_seq),
        last_seq = GREATEST(account_spans.last_seq, excluded.last_seq)"""
# The batch's spans ride along: a statement of their own cost PostgreSQL ingest 8 %.
_ADVANCE = f"""
    WITH {_DEVICE_ROLLUPS_CTE},
    head AS (UPDATE agents SET head_seq = %s, head_hash = %s WHERE agent_id = %s),
    segment AS (
        INSERT INTO segments (agent_id, last_seq, signature, received_at_us, first_seq)
        VALUES (%s, %s, %s, %s, %s)
    ),
    spans AS ({_UPSERT_ACCOUNT_SPANS}
    ){_HOURLY_ROLLUPS}"""
# A record released from quarantine: its sums join the rollups, the head stays.
_ADD_ROLLUPS = f"WITH {_DEVICE_ROLLUPS_CTE}{_HOURLY_ROLLUPS}"
# A GPU's books and gaps, in key order (one writer per GPU, but the same order everywhere).
_UPSERT_GPU_ROLLUPS = """
    INSERT INTO rollups_gpu_hourly (hour_start_us, host, gpu_uuid, kind, amount_us)
    SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::bigint[])
    ON CONFLICT (hour_start_us, host, gpu_uuid, kind) DO UPDATE SET
        amount_us = rollups_gpu_hourly.amount_us + excluded.amount_us"""
_UPSERT_GPU_USAGE = """
    WITH usage AS (
        INSERT INTO rollups_gpu_usage_hourly
            (hour_start_us, host, gpu_uuid, model, shard, busy_us, wall_us, record_count)
        SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::smallint[],
                             %s::bigint[], %s::bigint[], %s::bigint[])
        ON CONFLICT (hour_start_us, host, gpu_uuid, model, shard) DO UPDATE SET
            busy_us = rollups_gpu_usage_hourly.busy_us + excluded.busy_us,
            wall_us = rollups_gpu_usage_hourly.wall_us + excluded.wall_us,
            record_count = rollups_gpu_usage_hourly.record_count + excluded.record_count
        RETURNING 1
    )"""


def _upsert_month_day(day: int, after_usage: bool) -> str:
    """The upsert of monthly device rollups from one day's device-hours (0: the 1st): the
    month's sums and that day's two columns only (sending and setting all 62 day columns
    halved small-batch ingest). After the GPU-usage upsert, in the same statement, when
    ``after_usage``: its WHERE reads that upsert's result, so that one finishes first."""
    added = ("busy_us", "wall_us", "record_count", DAY_BUSY_COLUMNS[day], DAY_RECORD_COLUMNS[day])
    return f"""{_UPSERT_GPU_USAGE if after_usage else ""}
    INSERT INTO rollups_device_monthly
        (month_start_us, host, gpu_uuid, account, model, shard, {", ".join(added)})
    SELECT m, h, g, a, mo, s, b, w, c, b, c
    FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[], %s::smallint[],
                %s::bigint[], %s::bigint[], %s::bigint[]) AS t(m, h, g, a, mo, s, b, w, c)
    {"WHERE (SELECT count(*) FROM usage) >= 0" if after_usage else ""}
    ON CONFLICT (month_start_us, host, gpu_uuid, account, model, shard) DO UPDATE SET
        {", ".join(f"{c} = rollups_device_monthly.{c} + excluded.{c}" for c in added)}"""


# A batch's per-GPU-and-model sums, in key order, after the GPU books and before the device
# and hourly rollups (_ADVANCE): every writer locks rollup rows in that order. Then, in the
# same statement, the monthly rollups of the batch's first day; a batch across midnight
# (UTC) adds its other day in a statement of its own.
_UPSERT_GPU_USAGE_AND_MONTH_DAY = tuple(_upsert_month_day(d, True) for d in range(MONTH_DAYS))
_UPSERT_MONTH_DAY = tuple(_upsert_month_day(d, False) for d in range(MONTH_DAYS))
_SELECT_QUARANTINE = "SELECT * FROM quarantine ORDER BY agent_id, seq"
_SELECT_AGENT = """
    SELECT agent_id, public_key_hex, enrolled_at_us, revoked_at_us, head_seq, head_hash
    FROM agents"""
# Every record, with the signature of the segment it ends (NULL inside a segment).
_SELECT_RECORDS = """
    SELECT r.agent_id, r.seq, r.start_us, r.record, s.signature, s.first_seq
    FROM records r LEFT JOIN segments s ON s.agent_id = r.agent_id AND s.last_seq = r.seq
    ORDER BY r.agent_id, r.seq"""
_SELECT_ORPHAN_SEGMENTS = """
    SELECT s.agent_id, s.last_seq
    FROM segments s LEFT JOIN records r ON r.agent_id = s.agent_id AND r.seq = s.last_seq
    WHERE r.seq IS NULL ORDER BY s.agent_id, s.last_seq"""
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
        # Migrated on a connection of its own, made here: an unreachable database or a
        # schema of another version fails the open at once, with the reason.
        with _translated(f"opening {self.where}", self.where), self._connect() as conn:
            _migrate(conn, migrations, create=create, migrate=migrate, clock_us=clock_us)
        self._pool = _Pool(self._conninfo, self._configure, pool_size, lock_timeout_s, self.where)

    # -- agents --------------------------------------------------------------------------

    def enroll_agent(self, agent_id: str, public_key_hex: str) -> AgentInfo:
        check_agent_id(agent_id)
        key_hex = canonical_public_key_hex(public_key_hex)
        with self._transaction(f"enrolling agent {agent_id!r}") as cur:
            # ON CONFLICT: two enrolments of one id at once cannot both insert.
            now_us = self._clock_us()
            cur.execute(
                """INSERT INTO agents (agent_id, public_key_hex, enrolled_at_us)
                   VALUES (%s, %s, %s) ON CONFLICT (agent_id) DO NOTHING""",
                (agent_id, key_hex, now_us),
            )
            inserted = cur.rowcount == 1
            if inserted:
                _add_key(cur, agent_id, 0, key_hex, KeyChange.ENROLLED, now_us)
            agent = _agent(cur, agent_id)
        assert agent is not None
        return agent if inserted else check_reenrollment(agent, key_hex)

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

    def agent_status(self) -> list[AgentStatus]:
        with self._statement("reading agents") as cur:
            cur.execute(SELECT_AGENT_STATUS)
            rows = cur.fetchall()
        return [AgentStatus(a, bool(r), h, seen, start) for a, r, h, seen, start in rows]

    def replace_agent_key(
        self, agent_id: str, public_key_hex: str, *, by: str, reason: str
    ) -> AgentInfo:
        key_hex = canonical_public_key_hex(public_key_hex)
        with self._transaction(f"replacing the key of agent {agent_id!r}") as cur:
            # The row lock: no batch of the agent is stored meanwhile, so the head read is
            # where the replacement starts.
            cur.execute("SELECT 1 FROM agents WHERE agent_id = %s FOR UPDATE", (agent_id,))
            after_seq = check_replacement(_agent(cur, agent_id), agent_id, key_hex)
            if after_seq is not None:
                now_us = self._clock_us()
                _add_key(cur, agent_id, after_seq, key_hex, KeyChange.REPLACED, now_us, by, reason)
            agent = _agent(cur, agent_id)
        assert agent is not None
        return agent

    def capacity(self, agent_id: str) -> Capacity:
        with self._statement(f"reading the GPU budgets of {agent_id!r}") as cur:
            return _capacity(cur, agent_id)

    # -- ingest --------------------------------------------------------------------------

    def ingest(self, agent_id: str, batch: VerifiedBatch) -> ChainHead:
        records = batch.records
        if records.agent_id != agent_id:
            raise AgentMismatch(
                f"batch is for agent {records.agent_id!r}", agent_id=agent_id, field="agent_id"
            )
        with self._transaction(f"storing records of agent {agent_id!r}") as cur:
            head, key_hex, key_after_seq = _locked_head(cur, agent_id)
            start = first_new_index(
                agent_id, head, records, lambda first, last: _records(cur, agent_id, first, last)
            )
            rows = records.rows
            if start == len(rows):
                return head  # all duplicates: acknowledge again, store nothing
            new_rows = rows[start:] if start else rows
            for seq, new_hex in new_keys(agent_id, batch, key_hex, key_after_seq):
                _add_key(cur, agent_id, seq, new_hex, KeyChange.ROTATED, self._clock_us())
            new_head = ChainHead(new_rows[-1][SEQ], records.head_hash)
            budgets = advanced_capacity(agent_id, records, _capacity(cur, agent_id))
            if budgets is not None:
                cur.execute(
                    "UPDATE agents SET capacity = %s WHERE agent_id = %s", (budgets, agent_id)
                )
            held = held_back(records, new_rows)
            if start == 0:  # all new: the verifier summed while it had the fields at hand
                sums, device_sums = records.sums, records.device_sums
                gpu_sums = records.gpu_sums
            else:
                device_sums, gpu_sums = device_hourly_sums(new_rows, {q.seq for q in held})
                sums = account_sums(device_sums)
            with _refused_rows(agent_id, head):
                _copy_records(cur, new_rows)
                if held:
                    cur.executemany(
                        "INSERT INTO quarantine VALUES (%s, %s, %s, %s, %s, NULL, NULL)",
                        [(agent_id, q.seq, q.field, q.problem, self._clock_us()) for q in held],
                    )
                _add_gpu_rollups(cur, gpu_sums)
                _add_gpu_usage(cur, self._shard(agent_id), device_sums)
                _advance(
                    cur,
                    agent_id,
                    new_head,
                    (batch.signature, self._clock_us(), batch.span_first_seq),
                    self._shard(agent_id),
                    sums,
                    device_sums,
                    # The whole batch's spans: wider is harmless (account_spans.py).
                    records.account_spans,
                )
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

    # -- the ledger (LedgerStore) --------------------------------------------------------

    def define_plan(self, plan: Plan) -> Plan:
        with self._transaction(f"defining plan {plan.name!r}") as cur:
            # ON CONFLICT: of two definitions at once, the second waits for the first's
            # commit, then reads its plan below.
            cur.execute(
                "INSERT INTO plans VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                (plan.name, plan.grant_micro, plan.created_at_us, plan.created_by),
            )
            if cur.rowcount == 1:
                return plan
            stored = _plan(cur, plan.name)
        assert stored is not None  # plans are never deleted
        if stored.grant_micro != plan.grant_micro:
            raise LedgerError(
                f"plan {plan.name!r} is already defined with a grant of "
                f"{exact_micro_text(stored.grant_micro)} credits; plans never change (define "
                "a new one)"
            )
        return stored

    def price_versions(self) -> list[PriceVersion]:
        with self._statement("reading the price book") as cur:
            cur.execute(_SELECT_PRICES + " ORDER BY effective_us")
            return [price_version(*row) for row in cur.fetchall()]

    def add_price_version(
        self, version: PriceVersion, *, since_always: bool = False
    ) -> tuple[PriceVersion, bool]:
        when = iso_text(version.effective_us)
        with self._transaction(f"loading the prices effective {when}") as cur:
            # No period closes while this transaction runs: what is checked stays true.
            cur.execute("LOCK TABLE statements IN SHARE MODE")
            cur.execute(
                """INSERT INTO price_versions VALUES (%s, %s, %s, %s)
                   ON CONFLICT (effective_us) DO NOTHING""",
                (
                    version.effective_us,
                    canonical_text(version.book),
                    version.loaded_at_us,
                    version.loaded_by,
                ),
            )
            if cur.rowcount == 0:
                cur.execute(_SELECT_PRICES + " WHERE effective_us = %s", (version.effective_us,))
                row = cur.fetchone()
                assert row is not None  # versions are never deleted
                return price_version(*row), False
            if not since_always:
                cur.execute("SELECT MAX(end_us) FROM statements")
                closed = cur.fetchone()
                check_not_closed(version, None if closed is None else closed[0])
        return version, True

    def plans(self) -> list[Plan]:
        with self._statement("reading plans") as cur:
            return [Plan(*row) for row in cur.execute(_SELECT_PLAN + " ORDER BY name")]

    def open_account(self, account: Account, plan: str) -> Account:
        with self._transaction(f"opening account {account.name!r}") as cur:
            if _plan(cur, plan) is None:
                raise UnknownPlan(f"no plan {plan!r} is defined")
            cur.execute(
                "INSERT INTO accounts VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                (
                    account.name,
                    account.anchor_day,
                    account.first_period_start_us,
                    account.created_at_us,
                    account.created_by,
                ),
            )
            if cur.rowcount == 1:
                _insert_plan_change(
                    cur,
                    PlanChange(
                        account.name,
                        plan,
                        account.first_period_start_us,
                        account.created_at_us,
                        account.created_by,
                    ),
                )
                return account
            stored = _account(cur, account.name)
            first_plan = _plan_changes(cur, account.name)[0].plan
        assert stored is not None  # accounts are never deleted
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
        with self._statement(f"reading account {name!r}") as cur:
            return _account(cur, name)

    def accounts(self) -> list[Account]:
        with self._statement("reading accounts") as cur:
            return [Account(*row) for row in cur.execute(_SELECT_ACCOUNT + " ORDER BY name")]

    def change_plan(self, change: PlanChange) -> None:
        with self._transaction(f"changing the plan of {change.account!r}") as cur:
            _check_open(cur, change.account, change.effective_us, "a plan change")
            if _plan(cur, change.plan) is None:
                raise UnknownPlan(f"no plan {change.plan!r} is defined")
            _insert_plan_change(cur, change)

    def plan_changes(self, account: str) -> list[PlanChange]:
        with self._statement(f"reading plan changes of {account!r}") as cur:
            return _plan_changes(cur, account)

    def add_entry(self, entry: LedgerEntry) -> LedgerEntry:
        with self._transaction(f"adding a {entry.kind.value} to {entry.account!r}") as cur:
            if entry.key is not None:
                stored = cur.execute(
                    _ENTRY_SELECT + " WHERE idempotency_key = %s", (entry.key,)
                ).fetchone()
                if stored is not None:
                    return check_repeat(_entry(stored), entry)
            _check_open(cur, entry.account, entry.effective_us, f"a {entry.kind.value}")
            # The key's unique index decides between two collectors adding it at once:
            # ON CONFLICT waits for the other transaction, then inserts nothing if it
            # committed, and the stored entry is read back (READ COMMITTED sees it).
            row = cur.execute(
                """INSERT INTO ledger_entries (account, kind, amount_micro, effective_us,
                       expires_us, reason, created_by, created_at_us, idempotency_key)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL
                   DO NOTHING RETURNING id""",
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
            ).fetchone()
            if row is None:
                stored = cur.execute(
                    _ENTRY_SELECT + " WHERE idempotency_key = %s", (entry.key,)
                ).fetchone()
                assert stored is not None  # the conflict that stopped the insert
                return check_repeat(_entry(stored), entry)
        return replace(entry, entry_id=row[0])

    def entries(self, account: str) -> list[LedgerEntry]:
        with self._statement(f"reading entries of {account!r}") as cur:
            cur.execute(_ENTRY_SELECT + " WHERE account = %s ORDER BY id", (account,))
            return [_entry(row) for row in cur]

    def record_charge(self, charge: ApiCharge, received_at_us: int) -> bool:
        """One statement, so its own transaction: the charge and its rollup commit together.
        The request id's unique index decides: a charge with the same id in flight elsewhere
        makes ON CONFLICT wait for that transaction, then do nothing if it committed (and
        insert if it rolled back); the stored charge is then compared in a later statement,
        which sees it (READ COMMITTED)."""
        hour_us = charge.time_us - charge.time_us % HOUR_US
        with self._statement(f"storing API charge {charge.request_id!r}") as cur:
            cur.execute(
                _RECORD_CHARGE,
                (
                    charge.request_id,
                    charge.account,
                    charge.model,
                    charge.count,
                    charge.time_us,
                    received_at_us,
                    hour_us,
                    self._shard(charge.request_id),
                ),
            )
            if cur.rowcount == 1:
                return True
            stored = cur.execute(
                "SELECT account, model, count, time_us FROM api_charges WHERE request_id = %s",
                (charge.request_id,),
            ).fetchone()
        assert stored is not None  # charges are never deleted
        if tuple(stored) != (charge.account, charge.model, charge.count, charge.time_us):
            raise ChargeConflict(
                f"request id {charge.request_id!r} is already charged as account "
                f"{stored[0]!r} model {stored[1]!r} count {stored[2]} at "
                f"{iso_text(stored[3])}; the stored charge is kept"
            )
        return False

    def model_usage(self, account: str, from_us: int, to_us: int) -> dict[str, ModelUsage]:
        # One statement: busy time and requests from one snapshot.
        with self._statement(f"reading usage of {account!r}") as cur:
            cur.execute(
                """SELECT model, SUM(busy_us)::bigint, 0::bigint FROM rollups_hourly
                   WHERE account = %(account)s
                     AND hour_start_us >= %(from_us)s AND hour_start_us < %(to_us)s
                   GROUP BY model
                   UNION ALL
                   SELECT model, 0::bigint, SUM(requests)::bigint FROM api_rollups_hourly
                   WHERE account = %(account)s
                     AND hour_start_us >= %(from_us)s AND hour_start_us < %(to_us)s
                   GROUP BY model""",
                {"account": account, "from_us": from_us, "to_us": to_us},
            )
            rows = cur.fetchall()
        usage: dict[str, ModelUsage] = {}
        for model, busy_us, requests in rows:
            sofar = usage.get(model, ModelUsage())
            usage[model] = ModelUsage(sofar.busy_us + busy_us, sofar.requests + requests)
        return usage

    def grouped_usage(
        self,
        from_us: int | None,
        to_us: int | None,
        dimensions: frozenset[Dimension],
        account: str | None = None,
    ) -> list[UsageGroup]:
        bounds = (_MIN_US if from_us is None else from_us, _MAX_US if to_us is None else to_us)
        busy_sql, busy_parameters = _grouped_sql(dimensions, account, bounds, api=False)
        api_sql, api_parameters = _grouped_sql(dimensions, account, bounds, api=True)
        # One statement: busy rows and request rows from one snapshot.
        with self._statement("reading usage") as cur:
            cur.execute(f"{busy_sql} UNION ALL {api_sql}", (*busy_parameters, *api_parameters))
            return [UsageGroup(*row) for row in cur]

    def probe_write(self) -> None:
        """One tiny write transaction (rewrites a schema_version row as it is): raises
        StoreError when the database takes no writes (disk full, read-only standby)."""
        with self._transaction("probing a write") as cur:
            cur.execute(
                "UPDATE schema_version SET applied_at_us = applied_at_us "
                "WHERE version = (SELECT MIN(version) FROM schema_version)"
            )

    # -- quarantine ----------------------------------------------------------------------

    def quarantined(self) -> list[QuarantineEntry]:
        with self._statement("reading the quarantine") as cur:
            cur.execute(_SELECT_QUARANTINE)
            return [QuarantineEntry(*row) for row in cur]

    def stored_record(self, agent_id: str, seq: int) -> bytes | None:
        with self._statement(f"reading record {agent_id!r} seq {seq}") as cur:
            rows = _records(cur, agent_id, seq, seq)
        return bytes(rows[0][1]) if rows else None

    def release(self, agent_id: str, seq: int, by: str, checked: CheckedRecords) -> QuarantineEntry:
        with self._transaction(f"releasing {agent_id!r} seq {seq} from quarantine") as cur:
            cur.execute(
                "UPDATE quarantine SET released_at_us = %s, released_by = %s "
                "WHERE agent_id = %s AND seq = %s AND released_at_us IS NULL RETURNING *",
                (self._clock_us(), by, agent_id, seq),
            )
            row = cur.fetchone()
            if row is None:
                raise NotQuarantined(
                    f"agent {agent_id!r} seq {seq} is not in quarantine (or was released)"
                )
            _add_gpu_rollups(cur, checked.gpu_sums)
            _add_gpu_usage(cur, self._shard(agent_id), checked.device_sums)
            _add_rollups(cur, self._shard(agent_id), checked.sums, checked.device_sums)
            _add_account_spans(cur, agent_id, checked.account_spans)  # held at ingest too
        return QuarantineEntry(*row)

    def usage_events(
        self, from_us: int | None, to_us: int | None, account: str | None = None
    ) -> Iterator[UsageEvent]:
        """Read from the record bytes (the only copy of their fields): every record in the
        range is fetched (of one account: in the seq ranges of its spans), those without busy
        time are left out here."""
        bounds = (_MIN_US if from_us is None else from_us, _MAX_US if to_us is None else to_us)
        if account is not None:
            yield from usage_events(self._account_rows(account, *bounds), account)
            return
        yield from usage_events(
            self._read_rows(
                f"""SELECT agent_id, seq, record FROM records r
                   WHERE start_us >= %s AND start_us < %s AND {NOT_HELD}
                   ORDER BY agent_id, seq""",
                bounds,
            )
        )

    def api_charges(self, from_us: int | None, to_us: int | None) -> Iterator[ApiCharge]:
        bounds = (_MIN_US if from_us is None else from_us, _MAX_US if to_us is None else to_us)
        for row in self._read_rows(
            """SELECT request_id, account, model, count, time_us FROM api_charges
               WHERE time_us >= %s AND time_us < %s ORDER BY request_id""",
            bounds,
        ):
            yield ApiCharge(*row)

    def close_period(self, statement: Statement, signed: SignedStatement | None = None) -> None:
        account = statement.account
        with self._transaction(f"closing a period of {account!r}") as cur:
            # FOR UPDATE: waits for entries and plan changes being added (they hold the row
            # FOR SHARE) and for another close of the account; each then sees this one.
            closed_through_us = _closed_through_us(cur, _locked_account(cur, account, _CLOSING))
            if statement.start_us != closed_through_us:
                raise PeriodClosed(
                    f"account {account!r}: the period starting {iso_text(statement.start_us)} "
                    + (
                        "is already closed"
                        if statement.start_us < closed_through_us
                        else f"cannot close before the one starting {iso_text(closed_through_us)}"
                    )
                )
            # After the insert: it waits for a price load holding the statements table, and
            # this query then sees what that load stored.
            _insert_statement(cur, statement)
            cur.execute(
                "SELECT effective_us FROM price_versions WHERE effective_us < %s ORDER BY 1",
                (statement.end_us,),
            )
            check_prices_unchanged(statement, [row[0] for row in cur.fetchall()])
            if signed is not None:
                cur.execute(
                    "INSERT INTO statement_documents VALUES (%s, %s, %s, %s, %s)",
                    (
                        account,
                        statement.start_us,
                        signed.document,
                        signed.signature,
                        signed.public_key_hex,
                    ),
                )

    def signed_statements(self, account: str) -> list[SignedStatement]:
        with self._statement(f"reading signed statements of {account!r}") as cur:
            cur.execute(
                """SELECT start_us, document, signature, public_key_hex
                   FROM statement_documents WHERE account = %s ORDER BY start_us""",
                (account,),
            )
            rows = cur.fetchall()
        return [
            SignedStatement(start, bytes(doc), bytes(sig), key) for start, doc, sig, key in rows
        ]

    def segments_between(self, agent_id: str, from_seq: int, to_seq: int) -> list[Segment]:
        with self._statement(f"reading segments of {agent_id!r}") as cur:
            cur.execute(
                """SELECT first_seq, last_seq, signature FROM segments
                   WHERE agent_id = %s AND last_seq BETWEEN %s AND %s ORDER BY last_seq""",
                (agent_id, from_seq, to_seq),
            )
            rows = cur.fetchall()
        return [Segment(first, last, bytes(signature)) for first, last, signature in rows]

    def records_between(self, agent_id: str, first: int, last: int) -> list[tuple[int, bytes]]:
        with self._statement(f"reading records of {agent_id!r}") as cur:
            rows = _records(cur, agent_id, first, last)
        return [(seq, bytes(record)) for seq, record in rows]

    def statements(self, account: str) -> list[Statement]:
        # One statement (a join): heads and lines from one snapshot.
        with self._statement(f"reading statements of {account!r}") as cur:
            cur.execute(
                """SELECT s.start_us, s.end_us, s.plan, s.plan_grant_micro, s.closed_at_us,
                          s.closed_by, l.kind, l.model, l.quantity, l.credits_micro,
                          l.default_price, l.price_from_us
                   FROM statements s LEFT JOIN statement_lines l
                        ON l.account = s.account AND l.start_us = s.start_us
                   WHERE s.account = %s
                   ORDER BY s.start_us, l.kind, l.model, l.price_from_us""",
                (account,),
            )
            rows = cur.fetchall()
        heads: dict[int, tuple[Any, ...]] = {}
        lines: dict[int, list[StatementLine]] = {}
        for row in rows:
            start_us, kind = row[0], row[6]
            heads[start_us] = row[:6]
            lines.setdefault(start_us, [])
            if kind is not None:  # a period without charges has no lines
                lines[start_us].append(StatementLine(LineKind(kind), *row[7:]))
        return [
            Statement(account, start, end, plan, grant, tuple(lines[start]), at, by)
            for start, end, plan, grant, at, by in heads.values()
        ]

    def _read_rows(self, sql: str, parameters: tuple[int, int]) -> Iterator[TupleRow]:
        """Streams a long read (an export) on a connection of its own, in one REPEATABLE
        READ transaction: one consistent view, no pool connection held, ingest goes on."""
        with _translated(f"reading {self.where}", self.where):
            conn = self._connect()
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                with conn.cursor(name="export") as cur:
                    cur.itersize = _AUDIT_FETCH_ROWS
                    cur.execute(sql, parameters)
                    yield from cur
            finally:
                conn.close()

    def _account_rows(self, account: str, from_us: int, to_us: int) -> Iterator[TupleRow]:
        """The rows in [from_us, to_us) of the seq ranges the account's spans name, in one
        REPEATABLE READ transaction: its records, and others' stored between them."""
        with _translated(f"reading {self.where}", self.where):
            conn = self._connect()
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                spans = conn.execute(
                    """SELECT agent_id, first_seq, last_seq FROM account_spans
                       WHERE account = %s AND bucket_us >= %s AND bucket_us < %s""",
                    (account, first_bucket_us(from_us), to_us),
                ).fetchall()
                for agent_id, first, last in merged_ranges(spans):
                    with conn.cursor(name="account_rows") as cur:
                        cur.itersize = _AUDIT_FETCH_ROWS
                        cur.execute(
                            f"""SELECT agent_id, seq, record FROM records r
                               WHERE agent_id = %s AND seq BETWEEN %s AND %s
                                 AND start_us >= %s AND start_us < %s AND {NOT_HELD}
                               ORDER BY seq""",
                            (agent_id, first, last, from_us, to_us),
                        )
                        yield from cur
            finally:
                conn.close()

    # -- plumbing ------------------------------------------------------------------------

    def _shard(self, key: str) -> int:
        """The rollup shard of an agent id (ingest) or a request id (API charges). crc32,
        not hash(): the same key must map to the same shard in every process."""
        return zlib.crc32(key.encode()) % self._rollup_shards

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

    def _configure(self, conn: Connection) -> None:
        """Each new pooled connection: the binary dumper and the session's timeouts."""
        conn.adapters.register_dumper(bytearray, BytesBinaryDumper)
        self._prepare_session(conn)

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
            with self._conn.cursor() as cur:
                keys = _keys(cur, None)
        return [_agent_info(row, keys.get(row[0], [])) for row in rows]

    def records(self) -> Iterator[StoredRecord]:
        with (
            _translated("reading records", self._where),
            # A server-side cursor: the audit streams the records, never holds them all.
            self._conn.cursor(name="audit_records") as cur,
        ):
            cur.itersize = _AUDIT_FETCH_ROWS
            cur.execute(_SELECT_RECORDS)
            for row in cur:
                yield StoredRecord(*row)

    def orphan_segments(self) -> list[tuple[str, int]]:
        with _translated("reading segments", self._where):
            return [
                (agent_id, seq) for agent_id, seq in self._conn.execute(_SELECT_ORPHAN_SEGMENTS)
            ]

    def rollups(self) -> Iterator[Rollup]:
        with _translated("reading rollups", self._where):
            cursor = self._conn.execute(
                """SELECT hour_start_us, account, model, SUM(busy_us)::bigint,
                          SUM(wall_us)::bigint, SUM(record_count)::bigint
                   FROM rollups_hourly GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
            )
            for row in cursor:
                yield Rollup(*row)

    def device_rollups(
        self, from_us: int | None = None, to_us: int | None = None
    ) -> Iterator[DeviceRollup]:
        with _translated("reading device rollups", self._where):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, account, model, SUM(busy_us)::bigint,
                          SUM(wall_us)::bigint, SUM(record_count)::bigint
                   FROM rollups_device_hourly WHERE hour_start_us >= %s AND hour_start_us < %s
                   GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5""",
                _bounds(from_us, to_us),
            )
            for row in cursor:
                yield DeviceRollup(*row)

    def quarantine(self) -> list[QuarantineEntry]:
        with _translated("reading the quarantine", self._where):
            rows = self._conn.execute(_SELECT_QUARANTINE).fetchall()
        return [QuarantineEntry(*row) for row in rows]

    def gpu_usage_rollups(self) -> Iterator[DeviceRollup]:
        with _translated("reading GPU usage rollups", self._where):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, '', model, SUM(busy_us)::bigint,
                          SUM(wall_us)::bigint, SUM(record_count)::bigint
                   FROM rollups_gpu_usage_hourly GROUP BY 1, 2, 3, 5 ORDER BY 1, 2, 3, 5"""
            )
            for row in cursor:
                yield DeviceRollup(*row)

    def device_monthly_rollups(self) -> Iterator[tuple[DeviceRollupKey, RollupSums]]:
        sums = ", ".join(f"SUM({c})::bigint" for c in MONTHLY_SUM_COLUMNS)
        with _translated("reading monthly device rollups", self._where):
            cursor = self._conn.execute(
                f"""SELECT month_start_us, host, gpu_uuid, account, model, {sums}
                   FROM rollups_device_monthly GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5"""
            )
            for row in cursor:
                yield row[:5], list(row[5:])

    def device_totals(
        self, from_us: int | None = None, to_us: int | None = None
    ) -> Iterator[DeviceRollup]:
        with _translated("reading device rollups", self._where):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, '', '', SUM(busy_us)::bigint,
                          SUM(wall_us)::bigint, SUM(record_count)::bigint
                   FROM rollups_gpu_usage_hourly
                   WHERE hour_start_us >= %s AND hour_start_us < %s
                   GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
                _bounds(from_us, to_us),
            )
            for row in cursor:
                yield DeviceRollup(*row)

    def gpu_rollups(
        self, from_us: int | None = None, to_us: int | None = None
    ) -> Iterator[GpuRollup]:
        with _translated("reading GPU rollups", self._where):
            cursor = self._conn.execute(
                """SELECT hour_start_us, host, gpu_uuid, kind, amount_us
                   FROM rollups_gpu_hourly WHERE hour_start_us >= %s AND hour_start_us < %s
                   ORDER BY 1, 2, 3, 4""",
                _bounds(from_us, to_us),
            )
            for row in cursor:
                yield GpuRollup(*row)

    def api_rollups(self) -> Iterator[ApiRollup]:
        with _translated("reading API rollups", self._where):
            cursor = self._conn.execute(
                """SELECT hour_start_us, account, model, SUM(requests)::bigint,
                          SUM(charge_count)::bigint
                   FROM api_rollups_hourly GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
            )
            for row in cursor:
                yield ApiRollup(*row)

    def api_charges(self) -> Iterator[ApiCharge]:
        with (
            _translated("reading API charges", self._where),
            self._conn.cursor(name="audit_charges") as cur,
        ):
            cur.itersize = _AUDIT_FETCH_ROWS
            cur.execute(
                "SELECT request_id, account, model, count, time_us FROM api_charges "
                "ORDER BY request_id"
            )
            for row in cur:
                yield ApiCharge(*row)


class _Pool:
    """psycopg_pool's ConnectionPool (up to ``size`` connections, made on demand, a broken
    one or one returned inside a transaction discarded), with the store's errors: no
    connection free for ``wait_s`` is StoreBusy, a closed store StoreClosed."""

    def __init__(
        self,
        conninfo: str,
        configure: Callable[[Connection], None],
        size: int,
        wait_s: float,
        where: str,
    ) -> None:
        self._size = size
        self._wait_s = wait_s
        self._where = where
        # autocommit: transactions are explicit (conn.transaction()), and a lone read is
        # not left open as a transaction.
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            conninfo,
            kwargs={"autocommit": True},
            min_size=1,
            max_size=size,
            timeout=wait_s,
            configure=configure,
            name=where,
            open=True,
        )

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolClosed as exc:
            raise StoreClosed(f"store {self._where} is closed") from exc
        except PoolTimeout as exc:
            raise StoreBusy(
                f"no connection to {self._where} within {self._wait_s:.1f} s (all {self._size} "
                f"busy, or the database unreachable: {exc})"
            ) from exc
        except psycopg.OperationalError:
            # A connection was lost (the database restarted, failed over, or dropped us):
            # its idle siblings likely were too. Check them now, so that the request in hand
            # is the only one that fails.
            self._pool.check()
            raise

    def close(self) -> None:
        self._pool.close(timeout=self._wait_s)


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
            if migration.backfill is not None:
                migration.backfill(conn)
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
            raise NoDatabase(
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
    return None if row is None else _agent_info(row, _keys(cur, agent_id).get(agent_id, []))


def _agent_info(row: TupleRow, keys: list[AgentKey]) -> AgentInfo:
    agent_id, key_hex, enrolled_at_us, revoked_at_us, head_seq, head_hash = row
    head = ChainHead(head_seq, head_hash) if head_seq else NO_HEAD
    return AgentInfo(agent_id, key_hex, enrolled_at_us, revoked_at_us, head, tuple(keys))


def _capacity(cur: Cursor, agent_id: str) -> Capacity:
    row = cur.execute(
        "SELECT head_seq, capacity FROM agents WHERE agent_id = %s", (agent_id,)
    ).fetchone()
    return Capacity() if row is None else Capacity.decode(row[1], row[0])


def _bounds(from_us: int | None, to_us: int | None) -> tuple[int, int]:
    return (-(2**63) if from_us is None else from_us, 2**63 - 1 if to_us is None else to_us)


def _locked_head(cur: Cursor, agent_id: str) -> tuple[ChainHead, str, int]:
    """The agent's stored head, its key in force and where that key starts; its row stays
    locked until the transaction ends (see the module docstring)."""
    row = cur.execute(
        """SELECT head_seq, head_hash, revoked_at_us, public_key_hex, key_after_seq
           FROM agents WHERE agent_id = %s FOR UPDATE""",
        (agent_id,),
    ).fetchone()
    if row is None:
        raise UnknownAgent("is not enrolled", agent_id=agent_id)
    head_seq, head_hash, revoked_at_us, key_hex, key_after_seq = row
    if revoked_at_us is not None:
        raise AgentRevoked(f"was revoked at {iso_text(revoked_at_us)}", agent_id=agent_id)
    return (ChainHead(head_seq, head_hash) if head_seq else NO_HEAD), key_hex, key_after_seq


def _add_key(
    cur: Cursor,
    agent_id: str,
    after_seq: int,
    key_hex: str,
    how: KeyChange,
    at_us: int,
    by: str = "",
    reason: str = "",
) -> None:
    """Puts ``key_hex`` in force for the agent's records after ``after_seq``."""
    cur.execute(
        """INSERT INTO agent_keys (agent_id, after_seq, public_key_hex, how, at_us, added_by,
                                   reason) VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (agent_id, after_seq, key_hex, how.value, at_us, by, reason),
    )
    cur.execute(
        "UPDATE agents SET public_key_hex = %s, key_after_seq = %s WHERE agent_id = %s",
        (key_hex, after_seq, agent_id),
    )


def _keys(cur: Cursor, agent_id: str | None) -> dict[str, list[AgentKey]]:
    """Every key of one agent (or of all), in order, by agent."""
    where, parameters = ("WHERE agent_id = %s", (agent_id,)) if agent_id else ("", ())
    cur.execute(
        f"""SELECT agent_id, after_seq, public_key_hex, how, at_us, added_by, reason
            FROM agent_keys {where} ORDER BY agent_id, after_seq, id""",
        parameters,
    )
    return agent_keys(cur.fetchall())


def _records(cur: Cursor, agent_id: str, first: int, last: int) -> list[tuple[int, bytes]]:
    """The stored (seq, record bytes) of the agent's records first..last, in seq order."""
    cur.execute(
        "SELECT seq, record FROM records WHERE agent_id = %s AND seq BETWEEN %s AND %s "
        "ORDER BY seq",
        (agent_id, first, last),
    )
    return [(seq, record) for seq, record in cur]


@contextmanager
def _refused_rows(agent_id: str, head: ChainHead) -> Iterator[None]:
    """Raises StoreCorrupt when a record or segment above the head is already stored, and
    InsaneField when PostgreSQL refuses a value: a NUL character in a label the rollups'
    text columns cannot hold (host, GPU, account, model). The verifier refuses such labels
    first; should one get past it, UNAVAILABLE would have the agent retry it for ever."""
    try:
        yield
    except pg_errors.UniqueViolation as exc:
        table = exc.diag.table_name or "records"
        raise StoreCorrupt(
            f"{table} above the stored head (seq {head.seq}) are already stored",
            agent_id=agent_id,
        ) from exc
    except pg_errors.NumericValueOutOfRange as exc:  # a rollup sum beyond bigint
        raise RollupOverflow(
            f"a rollup sum would leave 64 bits: {_first_line(exc)}", agent_id=agent_id
        ) from exc
    except psycopg.DataError as exc:  # raised by psycopg itself, or by the server
        raise InsaneField(
            f"a value cannot be stored: {_first_line(exc)}", agent_id=agent_id
        ) from exc


def _add_account_spans(cur: Cursor, agent_id: str, spans: AccountSpans) -> None:
    """One agent's rows: only the stream that holds the agent's row locked writes them."""
    rows = sorted(span_rows(agent_id, spans))
    if rows:
        cur.execute(_UPSERT_ACCOUNT_SPANS, _columns(rows, 5))


def _backfill_account_spans(conn: Connection) -> None:
    """Migration 16: the spans of the records stored before it, read from their bytes."""
    with conn.cursor(name="account_spans_backfill") as read, conn.cursor() as write:
        read.itersize = _AUDIT_FETCH_ROWS
        read.execute(f"SELECT agent_id, seq, start_us, record FROM records r WHERE {NOT_HELD}")
        for chunk in backfill_rows(read):
            write.execute(_UPSERT_ACCOUNT_SPANS, _columns(sorted(chunk), 5))


def _copy_records(cur: Cursor, rows: Sequence[RecordRow]) -> None:
    with cur.copy(_COPY_RECORDS) as copy:
        copy.set_types(RECORD_COPY_TYPES)
        write = copy.write_row
        for row in rows:
            write(row)


def _advance(
    cur: Cursor,
    agent_id: str,
    head: ChainHead,
    segment: tuple[bytes, int, int | None],
    shard: int,
    sums: dict[RollupKey, RollupSums],
    device_sums: dict[DeviceRollupKey, RollupSums],
    spans: AccountSpans,
) -> None:
    """Moves the agent's head, stores the batch's ``segment`` (its signature and when it
    was received) under the head's seq, adds ``sums`` and ``device_sums`` to the rollups,
    each in key order (see ``_ADVANCE``), and ``spans`` to the account spans. This is the
    transaction's last statement: an upserted rollup row stays locked until the commit
    ends, and other agents of the same account and hour may be waiting for it."""
    signature, received_at_us, first_seq = segment
    cur.execute(
        _ADVANCE,
        (
            *_sharded_columns(device_sums, 5, shard),
            head.seq,
            head.hash,
            agent_id,
            agent_id,
            head.seq,
            signature,
            received_at_us,
            first_seq,
            *_columns(sorted(span_rows(agent_id, spans)), 5),
            *_sharded_columns(sums, 3, shard),
        ),
    )


def _add_rollups(
    cur: Cursor,
    shard: int,
    sums: dict[RollupKey, RollupSums],
    device_sums: dict[DeviceRollupKey, RollupSums],
) -> None:
    cur.execute(
        _ADD_ROLLUPS, (*_sharded_columns(device_sums, 5, shard), *_sharded_columns(sums, 3, shard))
    )


def _add_gpu_usage(cur: Cursor, shard: int, device_sums: dict[DeviceRollupKey, RollupSums]) -> None:
    """The per-GPU-and-model and the monthly sums of a batch's device sums, in key order."""
    usage = gpu_usage_sums(device_sums)
    if not usage:
        return
    for n, (day, month_sums) in enumerate(sorted(device_month_day_sums(device_sums).items())):
        months = _sharded_columns(month_sums, 5, shard)
        if n == 0:
            cur.execute(
                _UPSERT_GPU_USAGE_AND_MONTH_DAY[day], (*_sharded_columns(usage, 4, shard), *months)
            )
        else:  # a batch across midnight (UTC): its next day
            cur.execute(_UPSERT_MONTH_DAY[day], months)


def _add_gpu_rollups(cur: Cursor, gpu_sums: GpuSums) -> None:
    if gpu_sums:
        keys = sorted(gpu_sums)
        cur.execute(_UPSERT_GPU_ROLLUPS, (*_columns(keys, 4), [gpu_sums[k] for k in keys]))


def _sharded_columns(
    sums: Mapping[tuple[Any, ...], RollupSums], width: int, shard: int
) -> list[list[Any]]:
    """Rollup sums as the column arrays of an upsert, in key order (so that every writer
    locks rollup rows in one order): the ``width`` key columns, the shard, the three sums."""
    keys = sorted(sums)
    return [*_columns(keys, width), [shard] * len(keys), *_columns([sums[k] for k in keys], 3)]


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """``rows`` as ``width`` column lists: the arrays unnest turns back into rows."""
    return [[row[index] for row in rows] for index in range(width)]


# -- ledger helpers --------------------------------------------------------------------------

_MIN_US, _MAX_US = -(2**63), 2**63 - 1  # unbounded ends of a time range
_SELECT_PLAN = "SELECT name, grant_micro, created_at_us, created_by FROM plans"
_SELECT_PRICES = "SELECT effective_us, prices, loaded_at_us, loaded_by FROM price_versions"
_SELECT_ACCOUNT = (
    "SELECT name, anchor_day, first_period_start_us, created_at_us, created_by FROM accounts"
)
# Row locks on an account (see the module docstring): a close takes it exclusively, entries
# and plan changes shared, so that they run beside each other but never beside a close.
_CLOSING, _DATING = "FOR UPDATE", "FOR SHARE"
# The charge and its rollup in one statement; the outer INSERT inserts (or updates) one row
# exactly when the charge was new, which its row count tells.
_RECORD_CHARGE = """
    WITH charge AS (
        INSERT INTO api_charges (request_id, account, model, count, time_us, received_at_us)
        VALUES (%s, %s, %s, %s, %s, %s)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING account, model, count
    )
    INSERT INTO api_rollups_hourly (hour_start_us, account, model, shard, requests, charge_count)
    SELECT %s, account, model, %s, count, 1 FROM charge
    ON CONFLICT (hour_start_us, account, model, shard) DO UPDATE SET
        requests = api_rollups_hourly.requests + excluded.requests,
        charge_count = api_rollups_hourly.charge_count + 1"""


def _plan(cur: Cursor, name: str) -> Plan | None:
    row = cur.execute(_SELECT_PLAN + " WHERE name = %s", (name,)).fetchone()
    return None if row is None else Plan(*row)


def _account(cur: Cursor, name: str) -> Account | None:
    row = cur.execute(_SELECT_ACCOUNT + " WHERE name = %s", (name,)).fetchone()
    return None if row is None else Account(*row)


def _locked_account(cur: Cursor, name: str, lock: str) -> Account:
    """The account, its row locked (``_CLOSING`` or ``_DATING``) until the transaction
    ends. Raises UnknownAccount. Statements after this one see every close committed
    before the lock was granted (READ COMMITTED takes a snapshot per statement)."""
    row = cur.execute(_SELECT_ACCOUNT + f" WHERE name = %s {lock}", (name,)).fetchone()
    if row is None:
        raise UnknownAccount(f"no account {name!r} is open")
    return Account(*row)


def _plan_changes(cur: Cursor, account: str) -> list[PlanChange]:
    cur.execute(
        """SELECT account, plan, effective_us, created_at_us, created_by FROM plan_changes
           WHERE account = %s ORDER BY effective_us, id""",
        (account,),
    )
    return [PlanChange(*row) for row in cur]


def _insert_plan_change(cur: Cursor, change: PlanChange) -> None:
    cur.execute(
        """INSERT INTO plan_changes (account, effective_us, plan, created_at_us, created_by)
           VALUES (%s, %s, %s, %s, %s)""",
        (change.account, change.effective_us, change.plan, change.created_at_us, change.created_by),
    )


def _closed_through_us(cur: Cursor, account: Account) -> int:
    """Where the account's closed periods end: the start of its first open period."""
    row = cur.execute(
        "SELECT MAX(end_us) FROM statements WHERE account = %s", (account.name,)
    ).fetchone()
    end_us = None if row is None else row[0]
    return account.first_period_start_us if end_us is None else int(end_us)


def _check_open(cur: Cursor, name: str, effective_us: int, what: str) -> None:
    """Raises UnknownAccount, or PeriodClosed when ``effective_us`` is in a closed period.
    The account stays locked FOR SHARE: no close can commit before this transaction ends,
    so what is checked here still holds at its commit."""
    closed_through_us = _closed_through_us(cur, _locked_account(cur, name, _DATING))
    if effective_us < closed_through_us:
        raise PeriodClosed(
            f"account {name!r}: {what} dated {iso_text(effective_us)} falls in a closed period "
            f"(closed up to {iso_text(closed_through_us)}); date it in the open period"
        )


def _insert_statement(cur: Cursor, statement: Statement) -> None:
    cur.execute(
        "INSERT INTO statements VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            statement.account,
            statement.start_us,
            statement.end_us,
            statement.plan,
            statement.plan_grant_micro,
            statement.closed_at_us,
            statement.closed_by,
        ),
    )
    cur.executemany(
        "INSERT INTO statement_lines VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (
                statement.account,
                statement.start_us,
                line.kind.value,
                line.model,
                line.quantity,
                line.credits_micro,
                line.default_price,
                line.price_from_us,
            )
            for line in statement.lines
        ],
    )


def _grouped_sql(
    dimensions: frozenset[Dimension],
    account: str | None,
    bounds: tuple[int, int],
    *,
    api: bool,
) -> tuple[str, list[object]]:
    """A grouped rollup query whose rows are UsageGroup fields (shards summed), from the
    smallest rollups that hold the grouping (busy_rollup_parts). Typed NULLs and casts: the
    busy and API queries are joined by UNION ALL."""
    day = f"hour_start_us - hour_start_us %% {DAY_US}"  # %%: a literal % for psycopg
    columns = group_columns(dimensions, api=api, day_sql=day)
    null_types = {
        "account": "text",
        "model": "text",
        "day": "bigint",
        "host": "text",
        "gpu": "text",
    }
    grouped = grouping_order(columns)
    selected = [expression or f"NULL::{null_types[name]}" for name, expression in columns.items()]
    sums = (
        "0::bigint, SUM(requests)::bigint, SUM(charge_count)::bigint"
        if api
        else "SUM(busy_us)::bigint, 0::bigint, SUM(record_count)::bigint"
    )
    parts = (
        [RollupPart("api_rollups_hourly", "hour_start_us", *bounds)]
        if api
        else busy_rollup_parts(dimensions, account, bounds, (_MIN_US, _MAX_US))
    )
    source, parameters = rollup_source_sql(parts, account, "%s")
    sql = f"(SELECT {', '.join(selected)}, {sums} FROM {source} GROUP BY {', '.join(grouped)})"
    return sql, parameters


_ENTRY_SELECT = """SELECT account, kind, amount_micro, effective_us, expires_us, reason,
                          created_by, created_at_us, id, idempotency_key
                   FROM ledger_entries"""


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(row[0], EntryKind(row[1]), *row[2:])
