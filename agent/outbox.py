"""The agent's durable outbox: usage records are numbered, chained, signed and fsynced here.

A record exists once ``append`` returns: its bytes are fixed from then on and sent unchanged
until the collector acknowledges them. The outbox is one SQLite file in WAL mode with
``synchronous=FULL`` (every commit is fsynced), held with an exclusive lock so that a second
agent process on the same file fails at open instead of forking the chain.

Schema (``PRAGMA application_id`` marks the file as ours, ``PRAGMA user_version`` = schema)::

    meta(id = 1, agent_id, last_seq, last_hash, acked_seq, acked_hash, pruned_through)
        the chain head survives pruning: last_hash is the next record's prev_hash
    records(seq PRIMARY KEY, data, hash, signature, created_unix_s)
        data: the serialized UsageRecord; signature: set on the last record of each segment
    meter_state(key PRIMARY KEY, value)
        opaque entries of the meter, written in the same commit as the records they explain

Caller contract (the meter's window closer)
-------------------------------------------
``append(drafts, state)`` writes every record and every state entry in one fsynced commit,
or writes nothing and raises; the caller advances its in-memory cursors only after it
returned. It raises two operational errors, and the caller treats both alike:

* ``OutboxFull``: more than ``max_records`` records would wait for the collector (it has
  been unreachable for a long time, or refuses our records).
* ``OutboxWriteError``: the disk refused the write (full, I/O error, read-only file system).

Then nothing of the call was written and records written before are intact. The caller keeps
metering, keeps the affected windows open and coalesces them in memory (a window grows
instead of many records piling up), logs the condition at ERROR (once per episode, not once
per window), exports it as a metric, and retries the append when its next window closes.
Nothing is dropped silently: the seconds stay in the open windows until an append succeeds.
If the agent is stopped meanwhile, the persisted ``state()`` still matches the last records
written, so the restarted meter resumes from there (and reports what the driver no longer
covers as a gap).

The shipper's side: ``batch_after`` / ``ack`` / ``wait_for_records`` (or an append listener).
Every method is thread-safe: the meter appends while the shipper reads and acknowledges.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from creditmeter import chain
from creditmeter.agent.errors import AgentError
from creditmeter.agent.gpu import Clock, SystemClock
from creditmeter.files import create_private
from creditmeter.v1 import usage_pb2

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
APPLICATION_ID: Final = 0x43524D4F  # "CRMO" in the SQLite header: a creditmeter outbox
# About a day of records of a busy 8-GPU host with the collector down, a few hundred MB.
DEFAULT_MAX_RECORDS: Final = 1_000_000
DEFAULT_MAX_SEGMENT: Final = 256

_SCHEMA: Final = """
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    agent_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL,
    acked_seq INTEGER NOT NULL,
    acked_hash BLOB NOT NULL,
    pruned_through INTEGER NOT NULL
);
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB,
    created_unix_s REAL NOT NULL
);
CREATE TABLE meter_state (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


# -- errors -----------------------------------------------------------------------------------


class OutboxError(AgentError):
    """Base of the outbox's errors."""


class OutboxOpenError(OutboxError):
    """The outbox file cannot be used; the message names the path and the problem.

    Causes: the file is not a SQLite database or not an outbox (wrong path in the config),
    it belongs to another agent id (copied from another host, or the agent id changed), its
    schema is newer than this agent, another agent process has it open, or the directory is
    not writable.
    """


class OutboxFull(OutboxError):
    """``max_records`` records already wait for the collector; nothing was written.

    The collector has been unreachable for long, or refuses our records (see the shipper's
    last error). The caller keeps its windows open and retries later (module docstring).
    """

    def __init__(self, message: str, *, depth: int, max_records: int) -> None:
        super().__init__(message)
        self.depth = depth
        self.max_records = max_records


class OutboxWriteError(OutboxError):
    """The database refused a write (disk full, I/O error, read-only); nothing was written."""


class OutboxReadError(OutboxError):
    """Reading the outbox failed (I/O error), or it contradicts itself (damaged file)."""


class AckMismatch(OutboxError):
    """The collector's hash for one of our seqs differs from ours.

    The collector holds other bytes under our seq: the outbox was replaced (restored from an
    old backup, or another host used this agent id), or data was tampered with. Records are
    never rewritten to match; an operator must investigate.
    """


class AckBeyondHead(OutboxError):
    """The collector acknowledges a seq this outbox never wrote.

    The outbox was lost or replaced while the collector kept the agent's records; new
    records would reuse seqs the collector already holds. An operator must act (enroll the
    host under a new agent id).
    """


class RecordsGone(OutboxError):
    """Records the caller asked for were pruned after an earlier acknowledgement.

    Raised when the collector lost records it had acknowledged and this outbox no longer
    holds them: an unrecoverable gap at the collector.
    """


# -- values -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive records ending at a segment end, with that end's signature."""

    first_seq: int
    last_seq: int
    records: tuple[bytes, ...]  # serialized UsageRecords, exactly as written
    head_hash: bytes  # hash of the last record
    signature: bytes  # Ed25519 over head_hash (creditmeter.chain.sign_head)
    # Ed25519 over the digest of every record's hash (creditmeter.chain.sign_span): made
    # when the batch is read, as batches join segments differently after each ack.
    span_signature: bytes
    oldest_created_unix_s: float  # when the first record was appended (clock's wall time)


@dataclass(slots=True)
class _Head:
    """The meta row: where the chain ends and how far the collector has it."""

    last_seq: int
    last_hash: bytes
    acked_seq: int
    acked_hash: bytes
    pruned_through: int


AppendListener = Callable[[int], None]  # called with the new last_seq after each append


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A record as the outbox holds it."""

    seq: int
    data: bytes
    hash: bytes
    signature: bytes | None


# The agent's public keys after a key rotation: segments ending at or after from_seq were
# signed by public_key (raw 32 bytes). Created by the first rotation; empty or absent: one
# key signed everything.
_KEYS_TABLE: Final = """CREATE TABLE IF NOT EXISTS signing_keys (
    from_seq INTEGER PRIMARY KEY,
    public_key BLOB NOT NULL
)"""

# Evidence of records damaged before delivery: kept, never sent (outbox repair). Created
# when first needed; the agent never reads it, so the schema version stays.
_DAMAGED_TABLE: Final = """CREATE TABLE IF NOT EXISTS damaged_records (
    seq INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB,
    created_unix_s REAL NOT NULL,
    problem TEXT NOT NULL,
    set_aside_unix_s REAL NOT NULL
)"""


# -- the outbox -------------------------------------------------------------------------------


class Outbox:
    """Durable, bounded, hash-chained queue of one agent's usage records. Use ``open``."""

    def __init__(
        self,
        *,
        path: Path,
        conn: sqlite3.Connection,
        head: _Head,
        agent_id: str,
        signing_key: Ed25519PrivateKey,
        max_records: int,
        max_segment: int,
        keep_acked: int,
        clock: Clock,
    ) -> None:
        self._path = path
        self._conn = conn
        self._head = head
        self._agent_id = agent_id
        self._key = signing_key
        self._max_records = max_records
        self._max_segment = max_segment
        self._keep_acked = keep_acked
        self._clock = clock
        # One connection, one lock: SQLite serializes writers anyway, and appends are short.
        self._lock = threading.Lock()
        self._appended = threading.Condition(self._lock)
        self._listeners: list[AppendListener] = []
        self._closed = False
        self._keys = _key_history(conn)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        agent_id: str,
        signing_key: Ed25519PrivateKey,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_segment: int = DEFAULT_MAX_SEGMENT,
        keep_acked: int = 0,
        max_db_bytes: int | None = None,
        clock: Clock | None = None,
    ) -> Outbox:
        """Open or create the outbox at ``path`` for ``agent_id``.

        ``keep_acked`` acknowledged records are kept (not pruned) so that a collector which
        lost its newest data (restored from a backup) can be sent them again.
        ``max_db_bytes`` caps the file (SQLite ``max_page_count``): beyond it appends raise
        ``OutboxWriteError`` just as on a full disk. Raises ``OutboxOpenError``.
        """
        if not agent_id:
            raise ValueError("agent_id must not be empty")
        if max_records < 1 or max_segment < 1 or keep_acked < 0:
            raise ValueError(
                f"need max_records >= 1, max_segment >= 1, keep_acked >= 0; got "
                f"{max_records}, {max_segment}, {keep_acked}"
            )
        file = Path(path)
        _create_private(file)
        conn = _connect(file)
        try:
            head = _load_or_init(conn, file, agent_id)
            if max_db_bytes is not None:
                _cap_size(conn, max_db_bytes)
            _warn_if_signed_by_other_key(conn, file, head, signing_key, _key_history(conn))
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxOpenError(f"{file}: cannot open the outbox: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        log.info(
            "outbox %s open: last seq %d, acked seq %d, %d waiting",
            file,
            head.last_seq,
            head.acked_seq,
            head.last_seq - head.acked_seq,
        )
        return cls(
            path=file,
            conn=conn,
            head=head,
            agent_id=agent_id,
            signing_key=signing_key,
            max_records=max_records,
            max_segment=max_segment,
            keep_acked=keep_acked,
            clock=clock if clock is not None else SystemClock(),
        )

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database and wake every waiter. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()
            self._appended.notify_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key the agent's records are verified with (its signing key's)."""
        return self._key.public_key()

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return self._key

    def use_key(self, key: Ed25519PrivateKey) -> None:
        """Signs with ``key`` from now on: the key a committed rotation handed the chain to
        (a restart after a rotation the key file missed). Raises ValueError for another."""
        if chain.raw_public_key(key) != self.rotated_to:
            raise ValueError("not the key the outbox's last rotation names")
        with self._lock:
            self._key = key

    def public_key_for(self, seq: int) -> Ed25519PublicKey:
        """The key that signed the segment ending at ``seq`` (keys change at rotations)."""
        return Ed25519PublicKey.from_public_bytes(_key_for(self._keys, seq, self._key))

    @property
    def rotated_to(self) -> bytes | None:
        """The public key (raw) the last rotation handed the chain to; None if none."""
        return self._keys[-1][1] if self._keys else None

    def rotate(self, new_key: Ed25519PrivateKey, host: str) -> int:
        """Hands the chain to ``new_key``: appends a key rotation record endorsed by the
        current key (creditmeter.chain.rotation_message) and signs from then on with the new
        one, in one commit. Returns the rotation's seq. Records written before it keep their
        segment signatures (by the old key): batches ending before it go out with those
        alone, since this outbox no longer holds the old key."""
        new_raw = chain.raw_public_key(new_key)
        with self._lock:
            self._check_open()
            self._check_room(1)
            old_key = self._key
            created_unix_s = self._clock.wall()
            with self._write_transaction("write a key rotation"):
                head = self._read_head_in_txn()
                seq = head.last_seq + 1
                record = usage_pb2.UsageRecord(
                    host=host,
                    start_unix_us=int(created_unix_s * 1_000_000),
                    end_unix_us=int(created_unix_s * 1_000_000),
                    quality=usage_pb2.QUALITY_KEY_ROTATION,
                    key_rotation=usage_pb2.KeyRotation(
                        new_public_key=new_raw,
                        endorsement=chain.sign_rotation(
                            old_key, self._agent_id, seq, head.last_hash, new_raw
                        ),
                    ),
                )
                self._conn.execute(_KEYS_TABLE)
                self._conn.execute(
                    "INSERT OR IGNORE INTO signing_keys VALUES (0, ?)",
                    (chain.raw_public_key(old_key),),
                )
                self._conn.execute("INSERT INTO signing_keys VALUES (?, ?)", (seq, new_raw))
                self._key = new_key  # the rotation's own segment is the new key's
                try:
                    rows, last_hash = self._chain([record], head, created_unix_s)
                    self._write(rows, {}, seq, last_hash)
                except BaseException:
                    self._key = old_key
                    raise
            self._keys = _key_history(self._conn)
            self._head.last_seq = seq
            self._head.last_hash = last_hash
            self._appended.notify_all()
            listeners = list(self._listeners)
        self._notify(listeners, seq)
        return seq

    # -- the meter's side -------------------------------------------------------------------

    def append(
        self,
        drafts: Sequence[usage_pb2.UsageRecord],
        state: Mapping[str, bytes] | None = None,
    ) -> list[int]:
        """Number, chain, sign and durably write ``drafts`` and ``state`` in one commit.

        Drafts carry no agent_id, seq or prev_hash (they are not modified; copies are
        written). Returns the seqs given to them. Raises ``OutboxFull`` or
        ``OutboxWriteError`` having written nothing (see the module docstring).
        """
        records = [self._copy_draft(draft) for draft in drafts]
        with self._lock:
            self._check_open()
            self._check_room(len(records))
            created_unix_s = self._clock.wall()
            with self._write_transaction(f"write {len(records)} records"):
                head = self._read_head_in_txn()  # the file, not memory, decides the next seq
                rows, last_hash = self._chain(records, head, created_unix_s)
                self._write(rows, state or {}, head.last_seq + len(rows), last_hash)
            self._head.last_seq = head.last_seq + len(rows)
            self._head.last_hash = last_hash
            last_seq = self._head.last_seq
            self._appended.notify_all()
            listeners = list(self._listeners)
        self._notify(listeners, last_seq)
        return [row[0] for row in rows]

    def state(self) -> dict[str, bytes]:
        """The meter's persisted entries, as of the last successful append."""
        with self._lock:
            self._check_open()
            rows = self._read("SELECT key, value FROM meter_state", ())
        return {str(key): bytes(value) for key, value in rows}

    # -- the shipper's side -----------------------------------------------------------------

    def batch_after(self, acked_seq: int, max_records: int) -> Batch | None:
        """Records from ``acked_seq + 1`` through a segment end; None when there are none.

        As many whole segments as fit in ``max_records``, but at least one segment even if
        it is larger. Raises ``RecordsGone`` if records after ``acked_seq`` were pruned.
        """
        with self._lock:
            self._check_open()
            if acked_seq >= self._head.last_seq:
                return None
            if acked_seq < self._head.pruned_through:
                raise RecordsGone(
                    f"{self._path}: records {acked_seq + 1}..{self._head.pruned_through} "
                    "were pruned after the collector acknowledged them"
                )
            end_seq = self._segment_end(acked_seq, max_records)
            rows = self._read(
                "SELECT seq, data, hash, signature, created_unix_s FROM records"
                " WHERE seq > ? AND seq <= ? ORDER BY seq",
                (acked_seq, end_seq),
            )
        if len(rows) != end_seq - acked_seq or rows[-1][3] is None:
            raise OutboxReadError(
                f"{self._path}: records {acked_seq + 1}..{end_seq} are incomplete "
                f"({len(rows)} rows): the file is damaged"
            )
        return Batch(
            first_seq=acked_seq + 1,
            last_seq=end_seq,
            records=tuple(bytes(row[1]) for row in rows),
            head_hash=bytes(rows[-1][2]),
            signature=bytes(rows[-1][3]),
            span_signature=self._span_signature(end_seq, [bytes(row[2]) for row in rows]),
            oldest_created_unix_s=float(rows[0][4]),
        )

    def ack(self, seq: int, head_hash: bytes) -> int:
        """Persist that the collector committed every record through ``seq``; prune.

        ``head_hash`` is the collector's hash of record ``seq``; it must equal ours
        (``AckMismatch`` otherwise; nothing is changed). An ack at or below the acked seq
        changes nothing. Returns how many records became acknowledged.
        """
        with self._lock:
            self._check_open()
            self._verify_ack(seq, head_hash)
            if seq <= self._head.acked_seq:
                return 0
            pruned_through = max(self._head.pruned_through, seq - self._keep_acked)
            with self._write_transaction(f"record the ack of seq {seq}"):
                self._conn.execute(
                    "UPDATE meta SET acked_seq = ?, acked_hash = ?, pruned_through = ?",
                    (seq, head_hash, pruned_through),
                )
                self._conn.execute("DELETE FROM records WHERE seq <= ?", (pruned_through,))
            newly_acked = seq - self._head.acked_seq
            self._head.acked_seq = seq
            self._head.acked_hash = head_hash
            self._head.pruned_through = pruned_through
            return newly_acked

    def wait_for_records(self, after_seq: int, timeout_s: float) -> bool:
        """Block until a record after ``after_seq`` exists (True) or ``timeout_s`` passed."""
        with self._appended:
            self._appended.wait_for(
                lambda: self._closed or self._head.last_seq > after_seq, max(0.0, timeout_s)
            )
            return self._head.last_seq > after_seq

    def add_append_listener(self, listener: AppendListener) -> None:
        """Call ``listener(last_seq)`` after every successful append (outside the lock).

        For waiters that must also wake for other reasons than new records (the shipper).
        Listeners must be quick and must not call ``append``.
        """
        with self._lock:
            self._listeners.append(listener)

    def remove_append_listener(self, listener: AppendListener) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    # -- damage (creditmeter-agent outbox check / repair) -------------------------------------

    def unacked(self) -> tuple[bytes, list[StoredRow]]:
        """What the collector has not acknowledged: the hash the first record must link to,
        and the records as stored (seq, bytes, hash, signature or None), in seq order."""
        with self._lock:
            self._check_open()
            head = self._head
            rows = self._read(
                "SELECT seq, data, hash, signature FROM records WHERE seq > ? ORDER BY seq",
                (head.acked_seq,),
            )
        first_prev = head.acked_hash if head.acked_seq else chain.GENESIS_HASH
        return first_prev, [
            StoredRow(int(r[0]), bytes(r[1]), bytes(r[2]), None if r[3] is None else bytes(r[3]))
            for r in rows
        ]

    def set_aside(self, from_seq: int, problems: Mapping[int, str]) -> int:
        """Moves the unacknowledged records from ``from_seq`` on into ``damaged_records``
        (bytes, hash and signature unchanged, with ``problems[seq]`` or why they had to go)
        and ends the chain before them, so that the next append continues from the record
        before. Signs nothing. Returns how many records moved. Raises OutboxWriteError."""
        with self._lock:
            self._check_open()
            head = self._head
            if not head.acked_seq < from_seq <= head.last_seq:
                raise ValueError(
                    f"seq {from_seq} is not unacknowledged (acked {head.acked_seq}, "
                    f"last {head.last_seq})"
                )
            with self._write_transaction("set damaged records aside"):
                moved = self._move_aside(from_seq, problems)
                prev = self._read("SELECT hash FROM records WHERE seq = ?", (from_seq - 1,))
                last_hash = bytes(prev[0][0]) if prev else head.acked_hash or chain.GENESIS_HASH
                self._conn.execute(
                    "UPDATE meta SET last_seq = ?, last_hash = ?", (from_seq - 1, last_hash)
                )
                self._head = self._read_head_in_txn()
        return moved

    def _move_aside(self, from_seq: int, problems: Mapping[int, str]) -> int:
        self._conn.execute(_DAMAGED_TABLE)
        rows = self._read(
            "SELECT seq, data, hash, signature, created_unix_s FROM records WHERE seq >= ?",
            (from_seq,),
        )
        now_s = self._clock.wall()
        self._conn.executemany(
            "INSERT OR REPLACE INTO damaged_records VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (*row, problems.get(row[0], "follows a damaged record in the chain"), now_s)
                for row in rows
            ],
        )
        self._conn.execute("DELETE FROM records WHERE seq >= ?", (from_seq,))
        return len(rows)

    # -- observability ----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the newest record written (0 when none)."""
        with self._lock:
            return self._head.last_seq

    @property
    def acked_seq(self) -> int:
        """Every record through this seq is committed at the collector."""
        with self._lock:
            return self._head.acked_seq

    @property
    def acked_hash(self) -> bytes:
        """Hash of record ``acked_seq`` (empty when it is 0)."""
        with self._lock:
            return self._head.acked_hash

    @property
    def pruned_through(self) -> int:
        """Records through this seq are deleted; later ones can still be sent."""
        with self._lock:
            return self._head.pruned_through

    def depth(self) -> int:
        """Records written and not yet acknowledged."""
        with self._lock:
            return self._head.last_seq - self._head.acked_seq

    def oldest_unacked_age_s(self) -> float:
        """Seconds since the oldest unacknowledged record was written; 0.0 when none wait."""
        with self._lock:
            self._check_open()
            if self._head.last_seq == self._head.acked_seq:
                return 0.0
            rows = self._read(
                "SELECT created_unix_s FROM records WHERE seq = ?", (self._head.acked_seq + 1,)
            )
        if not rows:
            raise OutboxReadError(f"{self._path}: unacknowledged record is missing")
        return max(0.0, self._clock.wall() - float(rows[0][0]))

    # -- internals (callers hold self._lock) -------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"{self._path}: the outbox is closed")

    def _check_room(self, count: int) -> None:
        depth = self._head.last_seq - self._head.acked_seq
        if count and depth + count > self._max_records:
            raise OutboxFull(
                f"{self._path}: {depth} records wait for the collector; {count} more would "
                f"exceed max_records={self._max_records}",
                depth=depth,
                max_records=self._max_records,
            )

    def _copy_draft(self, draft: usage_pb2.UsageRecord) -> usage_pb2.UsageRecord:
        # The chain fields belong to the outbox: a caller that sets them has a bug.
        if draft.seq or draft.prev_hash or draft.agent_id not in ("", self._agent_id):
            raise ValueError("drafts must not carry seq, prev_hash or another agent_id")
        record = usage_pb2.UsageRecord()
        record.CopyFrom(draft)
        return record

    def _chain(
        self, records: list[usage_pb2.UsageRecord], head: _Head, created_unix_s: float
    ) -> tuple[list[tuple[int, bytes, bytes, bytes | None, float]], bytes]:
        """Serialize once, hash, link, and sign the last record of every segment."""
        rows: list[tuple[int, bytes, bytes, bytes | None, float]] = []
        prev_hash = head.last_hash
        for index, record in enumerate(records):
            record.agent_id = self._agent_id
            record.seq = head.last_seq + 1 + index
            record.prev_hash = prev_hash
            data = record.SerializeToString(deterministic=True)
            digest = chain.record_hash(data)
            segment_end = (index + 1) % self._max_segment == 0 or index == len(records) - 1
            signature = chain.sign_head(self._key, digest) if segment_end else None
            rows.append((record.seq, data, digest, signature, created_unix_s))
            prev_hash = digest
        return rows, prev_hash

    def _write(
        self,
        rows: list[tuple[int, bytes, bytes, bytes | None, float]],
        state: Mapping[str, bytes],
        last_seq: int,
        last_hash: bytes,
    ) -> None:
        self._conn.executemany(
            "INSERT INTO records (seq, data, hash, signature, created_unix_s)"
            " VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        self._conn.executemany(
            "INSERT INTO meter_state (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            list(state.items()),
        )
        self._conn.execute("UPDATE meta SET last_seq = ?, last_hash = ?", (last_seq, last_hash))

    @contextlib.contextmanager
    def _write_transaction(self, what: str) -> Iterator[None]:
        """One fsynced commit; on any failure nothing of it stays and memory follows the file."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            yield
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback_and_reload()
            raise OutboxWriteError(f"{self._path}: could not {what}: {exc}") from exc
        except BaseException:
            self._rollback_and_reload()
            raise

    def _rollback_and_reload(self) -> None:
        """After a failed write: undo what SQLite did not undo itself, then trust the file.

        A failed COMMIT (fsync error) may or may not have reached the disk; reloading the
        head keeps memory equal to whatever the file now says.
        """
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._head = self._read_head_in_txn()
        except (sqlite3.Error, OutboxReadError):
            log.exception("outbox %s: rollback after a failed write failed", self._path)

    def _read_head_in_txn(self) -> _Head:
        head = _read_head(self._conn)
        if head is None:
            raise OutboxReadError(f"{self._path}: the meta row is missing: the file is damaged")
        return head

    def _span_signature(self, end_seq: int, hashes: list[bytes]) -> bytes:
        """A span signature by the key in force at the batch's end; none (b"") when that was
        a key rotated away from: the segment's stored head signature then stands alone."""
        if _key_for(self._keys, end_seq, self._key) != chain.raw_public_key(self._key):
            return b""
        return chain.sign_span(self._key, hashes)

    def _segment_end(self, acked_seq: int, max_records: int) -> int:
        """The last seq of the batch after ``acked_seq``: a segment end."""
        rows = self._read(
            "SELECT MAX(seq) FROM records WHERE seq > ? AND seq <= ? AND signature IS NOT NULL",
            (acked_seq, acked_seq + max(1, max_records)),
        )
        if rows[0][0] is None:  # the first segment alone is larger than max_records
            rows = self._read(
                "SELECT MIN(seq) FROM records WHERE seq > ? AND signature IS NOT NULL",
                (acked_seq,),
            )
        if rows[0][0] is None:
            raise OutboxReadError(
                f"{self._path}: no signed record after seq {acked_seq}: the file is damaged"
            )
        return int(rows[0][0])

    def _verify_ack(self, seq: int, head_hash: bytes) -> None:
        if seq > self._head.last_seq:
            log.error(
                "outbox %s: the collector acknowledges seq %d but this outbox wrote only "
                "through %d: the outbox was lost or replaced",
                self._path,
                seq,
                self._head.last_seq,
            )
            raise AckBeyondHead(
                f"{self._path}: the collector holds seq {seq}, this outbox wrote only "
                f"through {self._head.last_seq}"
            )
        ours = self._hash_of(seq)
        if ours is not None and ours != head_hash:
            log.error(
                "outbox %s: the collector's hash of seq %d is %s, ours is %s: the collector "
                "holds different bytes for our record; records are left unchanged",
                self._path,
                seq,
                head_hash.hex() or "(empty)",
                ours.hex() or "(empty)",
            )
            raise AckMismatch(
                f"{self._path}: seq {seq}: collector hash {head_hash.hex() or '(empty)'} "
                f"!= outbox hash {ours.hex() or '(empty)'}"
            )

    def _hash_of(self, seq: int) -> bytes | None:
        """Our hash of record ``seq``, or None when it was pruned and is not the acked one."""
        if seq == 0:
            return b""  # what an Ack carries for "nothing stored"
        if seq == self._head.acked_seq:
            return self._head.acked_hash
        if seq <= self._head.pruned_through:
            return None
        rows = self._read("SELECT hash FROM records WHERE seq = ?", (seq,))
        if not rows:
            raise OutboxReadError(f"{self._path}: record {seq} is missing")
        return bytes(rows[0][0])

    def _read(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise OutboxReadError(f"{self._path}: read failed: {exc}") from exc

    def _notify(self, listeners: list[AppendListener], last_seq: int) -> None:
        for listener in listeners:
            try:
                listener(last_seq)
            except Exception:  # the records are committed: a listener's bug must not undo that
                log.exception("outbox append listener failed")


# -- opening ----------------------------------------------------------------------------------


def _create_private(path: Path) -> None:
    """Create the directory (0700) and the file (0600) unless they exist."""
    try:
        path.parent.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise OutboxOpenError(f"{path.parent}: cannot create the outbox directory: {exc}") from exc
    try:
        created = create_private(path)
    except OSError as exc:
        raise OutboxOpenError(f"{path}: cannot create the outbox: {exc}") from exc
    if not created:
        _check_existing(path)


def _check_existing(path: Path) -> None:
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise OutboxOpenError(f"{path}: not a regular file")
    if mode & 0o077:
        log.warning(
            "outbox %s has mode %s: other users may read or change usage records; chmod 600 it",
            path,
            oct(stat.S_IMODE(mode)),
        )


def _connect(path: Path) -> sqlite3.Connection:
    # timeout=0: the lock is never contended by ourselves, so "locked" means another process.
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    except sqlite3.Error as exc:
        raise OutboxOpenError(f"{path}: cannot open the outbox: {exc}") from exc
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        conn.close()
        raise OutboxOpenError(f"{path}: {_open_problem(exc)}") from exc
    if mode != "wal":
        conn.close()
        raise OutboxOpenError(f"{path}: SQLite cannot use WAL mode here (got {mode!r})")
    return conn


def _open_problem(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_NOTADB":
        return "not an outbox: the file is not a SQLite database (wrong path, or damaged)"
    if name == "SQLITE_BUSY":
        return "another process has the outbox open (a second agent on this host?)"
    return f"cannot open the outbox: {exc}"


def _load_or_init(conn: sqlite3.Connection, path: Path, agent_id: str) -> _Head:
    """Create the schema in a new file, or check that an existing file is this agent's."""
    try:
        # The first write takes the exclusive lock, held until close (locking_mode).
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise OutboxOpenError(f"{path}: {_open_problem(exc)}") from exc
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id == 0 and version == 0 and tables == 0:
            _init_schema(conn, agent_id)
        else:
            _check_schema(path, application_id, version)
        head = _read_head(conn)
        if head is None:
            raise OutboxOpenError(f"{path}: the outbox has no meta row: the file is damaged")
        stored_agent_id = conn.execute("SELECT agent_id FROM meta").fetchone()[0]
        if stored_agent_id != agent_id:
            raise OutboxOpenError(
                f"{path}: the outbox belongs to agent {stored_agent_id!r}, not {agent_id!r} "
                "(copied from another host, or the agent id changed); its records cannot be "
                "sent under another id"
            )
        _check_consistent(conn, path, head)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback_quietly(conn)
        raise OutboxOpenError(f"{path}: {_open_problem(exc)}") from exc
    except BaseException:
        _rollback_quietly(conn)
        raise
    return head


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # The open already failed; a failing rollback must not hide why.
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _init_schema(conn: sqlite3.Connection, agent_id: str) -> None:
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(
        "INSERT INTO meta (id, agent_id, last_seq, last_hash, acked_seq, acked_hash,"
        " pruned_through) VALUES (1, ?, 0, ?, 0, ?, 0)",
        (agent_id, chain.GENESIS_HASH, b""),
    )
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _check_schema(path: Path, application_id: int, version: int) -> None:
    if application_id != APPLICATION_ID:
        raise OutboxOpenError(
            f"{path}: not an outbox: a SQLite database of another application "
            f"(application_id {application_id:#x}); check the outbox path"
        )
    if version != SCHEMA_VERSION:
        raise OutboxOpenError(
            f"{path}: outbox schema version {version}, this agent understands "
            f"{SCHEMA_VERSION} (written by a newer agent?)"
        )


def _read_head(conn: sqlite3.Connection) -> _Head | None:
    row = conn.execute(
        "SELECT last_seq, last_hash, acked_seq, acked_hash, pruned_through FROM meta"
    ).fetchone()
    if row is None:
        return None
    return _Head(
        last_seq=int(row[0]),
        last_hash=bytes(row[1]),
        acked_seq=int(row[2]),
        acked_hash=bytes(row[3]),
        pruned_through=int(row[4]),
    )


def _check_consistent(conn: sqlite3.Connection, path: Path, head: _Head) -> None:
    """Cheap checks that the records agree with the head (not a full integrity check)."""
    if not head.pruned_through <= head.acked_seq <= head.last_seq:
        raise OutboxOpenError(
            f"{path}: the chain head is impossible (last seq {head.last_seq}, acked "
            f"{head.acked_seq}, pruned through {head.pruned_through}): the file is damaged"
        )
    if head.last_seq == head.pruned_through:
        return  # every record was acknowledged and pruned
    newest = conn.execute("SELECT seq, hash, signature FROM records ORDER BY seq DESC LIMIT 1")
    row = newest.fetchone()
    if row is None or row[0] != head.last_seq or bytes(row[1]) != head.last_hash or row[2] is None:
        raise OutboxOpenError(
            f"{path}: the records do not match the chain head (last seq {head.last_seq}, "
            f"acked {head.acked_seq}): the file is damaged"
        )


def _cap_size(conn: sqlite3.Connection, max_db_bytes: int) -> None:
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute(f"PRAGMA max_page_count = {max(1, max_db_bytes // page_size)}")


def _key_history(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
    """(from_seq, raw public key) of every key since the first rotation, in order."""
    try:
        rows = conn.execute("SELECT from_seq, public_key FROM signing_keys ORDER BY 1").fetchall()
    except sqlite3.OperationalError:  # no rotation yet: the table does not exist
        return []
    return [(int(seq), bytes(key)) for seq, key in rows]


def _key_for(history: Sequence[tuple[int, bytes]], seq: int, current: Ed25519PrivateKey) -> bytes:
    """The raw public key of the segment ending at ``seq``."""
    found = chain.raw_public_key(current)
    for from_seq, key in history:
        if from_seq <= seq:
            found = key
    return found


def _warn_if_signed_by_other_key(
    conn: sqlite3.Connection,
    path: Path,
    head: _Head,
    key: Ed25519PrivateKey,
    history: Sequence[tuple[int, bytes]],
) -> None:
    """Unacked records signed with a previous key would be refused by the collector."""
    if head.last_seq == head.acked_seq:
        return
    row = conn.execute(
        "SELECT seq, hash, signature FROM records WHERE seq > ? AND signature IS NOT NULL"
        " ORDER BY seq LIMIT 1",
        (head.acked_seq,),
    ).fetchone()
    if row is None:
        return
    try:
        public = Ed25519PublicKey.from_public_bytes(_key_for(history, int(row[0]), key))
        chain.verify_head(public, bytes(row[1]), bytes(row[2]))
    except chain.BadSignature:
        log.warning(
            "outbox %s: %d unacknowledged records were signed with another key than the "
            "agent's current one; the collector refuses them unless that key is enrolled",
            path,
            head.last_seq - head.acked_seq,
        )
