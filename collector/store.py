"""The collector's storage interface, and the chain decisions every store makes alike.

``Store`` is what the servicer, the CLI, the audit and the reports see; ``SQLiteStore``
(sqlite_store.py) implements it and a PostgreSQL store will. Several collectors may share
one PostgreSQL, so the decisions that depend on what is stored (is this a duplicate, a
conflict, a hole?) are made by ``first_new_index`` *inside* the store's ingest transaction,
after the store has locked the agent's row: two collectors receiving the same agent's batch
then serialize on that lock and the second one sees the first one's records as duplicates.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from creditmeter import chain
from creditmeter.collector.capacity import Capacity
from creditmeter.collector.errors import (
    BudgetMoved,
    ChainFork,
    ChainHole,
    EnrollmentError,
    KeyMoved,
    SeqConflict,
    StoreCorrupt,
)
from creditmeter.collector.rollup import Rollup
from creditmeter.collector.rows import RECORD, SEQ, RecordRow
from creditmeter.collector.verifier import CheckedRecords, KeyRing, Quarantine, VerifiedBatch

MAX_AGENT_ID_BYTES = 256


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record of an agent that is stored: what an Ack reports."""

    seq: int  # 0 when nothing is stored yet
    hash: bytes  # b"" when seq is 0


NO_HEAD = ChainHead(0, b"")


class KeyChange(enum.Enum):
    """How a public key became an agent's."""

    ENROLLED = "enrolled"  # creditmeter-collector enroll
    ROTATED = "rotated"  # a key rotation record in the chain, endorsed by the key before
    REPLACED = "replaced"  # an operator's decision (the old key was lost): audit notes it


@dataclass(frozen=True, slots=True)
class AgentKey:
    """One of an agent's public keys: it signs the batches of records after ``after_seq``
    (until the next key's)."""

    after_seq: int
    public_key_hex: str
    change: KeyChange
    at_us: int
    by: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AgentInfo:
    agent_id: str
    public_key_hex: str  # the key in force now (the last of ``keys``)
    enrolled_at_us: int
    revoked_at_us: int | None
    head: ChainHead
    keys: tuple[AgentKey, ...] = ()  # every key, in order; empty: only public_key_hex

    @property
    def revoked(self) -> bool:
        return self.revoked_at_us is not None

    @property
    def ring(self) -> KeyRing:
        """The keys as the verifier walks them."""
        if not self.keys:
            return KeyRing.single(self.public_key_hex)
        return KeyRing(tuple((key.after_seq, key.public_key_hex) for key in self.keys))


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as stored, for the audit: its row, and the signature of the segment it
    ends (None inside a segment)."""

    agent_id: str
    seq: int
    start_us: int
    record: bytes
    signature: bytes | None
    span_first_seq: int | None = None  # the signature is a span's from this seq on


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """An agent as the staff pages show it: its stored head, when its last batch arrived,
    and the start of its newest stored record (None: nothing stored)."""

    agent_id: str
    revoked: bool
    head_seq: int
    last_received_us: int | None
    head_start_us: int | None


# The newest segment of an agent arrived last: batches are stored in seq order.
SELECT_AGENT_STATUS = """
    SELECT a.agent_id, a.revoked_at_us IS NOT NULL, a.head_seq,
           (SELECT s.received_at_us FROM segments s WHERE s.agent_id = a.agent_id
            ORDER BY s.last_seq DESC LIMIT 1),
           (SELECT r.start_us FROM records r WHERE r.agent_id = a.agent_id AND r.seq = a.head_seq)
    FROM agents a ORDER BY a.agent_id"""


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Rollups summed over a period for one (account, model). account "" is unattributed."""

    account: str
    model: str
    busy_us: int
    wall_us: int
    record_count: int


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """A stored record kept out of billing: its field broke the verifier's checks when it
    arrived. ``released_at_us`` is set once an operator released it (and it passed)."""

    agent_id: str
    seq: int
    field: str
    problem: str
    quarantined_at_us: int
    released_at_us: int | None = None
    released_by: str | None = None


class Snapshot(Protocol):
    """A consistent read-only view of a store, for the audit (records and rollups must come
    from the same moment, or records committed in between would look like findings)."""

    def agents(self) -> list[AgentInfo]: ...

    def records(self) -> Iterator[StoredRecord]:
        """Every stored record, ordered by agent_id, then seq."""
        ...

    def orphan_segments(self) -> list[tuple[str, int]]:
        """(agent_id, last_seq) of every segment whose last record is not stored."""
        ...

    def rollups(self) -> Iterator[Rollup]: ...

    def quarantine(self) -> list[QuarantineEntry]:
        """Every quarantined record, released ones too, ordered by agent_id, then seq."""
        ...


class Store(Protocol):
    def enroll_agent(self, agent_id: str, public_key_hex: str) -> AgentInfo:
        """Enrolls an agent; enrolling it again with the same key changes nothing.

        Raises EnrollmentError for a malformed id or key, another key already enrolled
        under the id, or an id that was revoked.
        """
        ...

    def revoke_agent(self, agent_id: str) -> AgentInfo:
        """Revokes an agent (again: no change). Raises EnrollmentError for an unknown id."""
        ...

    def get_agent(self, agent_id: str) -> AgentInfo | None: ...

    def agent_status(self) -> list[AgentStatus]:
        """Every agent, by id (SELECT_AGENT_STATUS)."""
        ...

    def replace_agent_key(
        self, agent_id: str, public_key_hex: str, *, by: str, reason: str
    ) -> AgentInfo:
        """An operator's replacement of an agent's key whose private half was lost: the new
        key signs the records after the stored head. Raises EnrollmentError for an unknown
        or revoked agent, a malformed key, or the key already in force."""
        ...

    def capacity(self, agent_id: str) -> Capacity:
        """The agent's GPU budgets as stored (collector/capacity.py), to check its next
        batch against; an agent stored before budgets existed starts one at its head."""
        ...

    def ingest(self, agent_id: str, batch: VerifiedBatch) -> ChainHead:
        """Stores a verified batch in one transaction and returns the agent's new head.

        Records already stored are checked byte for byte and acknowledged again
        without being stored twice. Raises UnknownAgent / AgentRevoked, ChainConflict
        subclasses (nothing stored) or StoreError (nothing stored).
        """
        ...

    def usage(self, from_us: int | None, to_us: int | None) -> list[UsageTotal]:
        """Rollups of the hours starting in [from_us, to_us) (None: unbounded), summed per
        (account, model), ordered by account then model."""
        ...

    def snapshot(self) -> AbstractContextManager[Snapshot]: ...

    def quarantined(self) -> list[QuarantineEntry]:
        """Every quarantined record, released ones too, ordered by agent_id, then seq."""
        ...

    def probe_write(self) -> None:
        """A tiny write transaction that changes nothing; raises StoreError when the store
        takes no writes (disk full, read-only), which a read would not notice."""
        ...

    def stored_record(self, agent_id: str, seq: int) -> bytes | None: ...

    def release(self, agent_id: str, seq: int, by: str, checked: CheckedRecords) -> QuarantineEntry:
        """Releases a quarantined record that ``checked`` (its bytes, verified again) shows
        passes now: its sums join the rollups, in one transaction. Raises NotQuarantined
        unless it is in quarantine and not yet released."""
        ...

    def close(self) -> None: ...


# Reads the stored (seq, record bytes) of an agent's records first..last, in seq order.
StoredRecords = Callable[[int, int], Sequence[tuple[int, bytes]]]


# Records that count: not held in quarantine (released ones count again). SQL for both
# stores, on a query whose records table is aliased r.
NOT_HELD = (
    "NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.agent_id = r.agent_id "
    "AND q.seq = r.seq AND q.released_at_us IS NULL)"
)


def check_reenrollment(existing: AgentInfo, key_hex: str) -> AgentInfo:
    """An enrollment of an agent already enrolled: a repeat with its key changes nothing;
    raises EnrollmentError for a revoked agent or another key."""
    if existing.revoked:
        raise EnrollmentError(
            "was revoked; revocation is final, enroll the host under a new agent id",
            agent_id=existing.agent_id,
        )
    if existing.public_key_hex != key_hex:
        raise EnrollmentError(
            "is already enrolled with another public key: rotate keys on the agent host "
            "(creditmeter-agent rotate-key: the old key endorses the new one), or, if the old "
            "key is lost, replace it here (enroll ID KEY --replace --reason WHY)",
            agent_id=existing.agent_id,
        )
    return existing


def agent_keys(rows: Iterable[Sequence[Any]]) -> dict[str, list[AgentKey]]:
    """Rows (agent_id, after_seq, public_key_hex, how, at_us, added_by, reason), in order,
    as each agent's keys."""
    keys: dict[str, list[AgentKey]] = {}
    for agent, after_seq, key_hex, how, at_us, by, reason in rows:
        keys.setdefault(agent, []).append(
            AgentKey(after_seq, key_hex, KeyChange(how), at_us, by, reason)
        )
    return keys


def check_replacement(agent: AgentInfo | None, agent_id: str, key_hex: str) -> int | None:
    """The seq after which an operator's replacement key signs (the stored head), or None
    when that key is in force already (a repeat: nothing to do). Raises EnrollmentError for
    an unknown or revoked agent."""
    if agent is None:
        raise EnrollmentError("is not enrolled", agent_id=agent_id)
    if agent.revoked:
        raise EnrollmentError("was revoked; revocation is final", agent_id=agent_id)
    if agent.public_key_hex == key_hex:
        return None
    return agent.head.seq


def new_keys(
    agent_id: str, batch: VerifiedBatch, current_hex: str, after_seq: int
) -> list[tuple[int, str]]:
    """The key rotations of ``batch`` the store does not hold yet, as (seq, new key hex).
    Raises KeyMoved unless the batch was verified with the keys the store holds: each new
    rotation endorsed by the key in force before it, the batch signed by the key after them
    (a stream that verified with keys another stream has since rotated, or an operator's
    replacement since its Hello). Call inside the ingest transaction, the agent's row
    locked, with its key in force (``current_hex``) and where that key starts."""
    expected = current_hex
    added = []
    for seq, endorsed_by, new_hex in batch.key_steps:
        if seq <= after_seq:
            continue  # stored already: a resend
        if endorsed_by != expected:
            raise KeyMoved(
                f"seq {seq}: a rotation from a key no longer in force", agent_id=agent_id
            )
        added.append((seq, new_hex))
        expected = new_hex
    if batch.signing_key_hex and batch.signing_key_hex != expected:
        raise KeyMoved(
            "the batch was verified with a key that is no longer in force", agent_id=agent_id
        )
    return added


def advanced_capacity(agent_id: str, records: CheckedRecords, stored: Capacity) -> str | None:
    """The budgets to store after ``records`` (encoded), None when they claimed none.
    Raises BudgetMoved when ``stored`` is not what they were claimed from. Call inside the
    ingest transaction, with the agent's row locked."""
    if records.capacity is None:
        return None
    if stored.through_seq != records.capacity_base_seq:
        raise BudgetMoved(
            f"GPU budgets were counted through seq {stored.through_seq}, the batch was "
            f"checked against seq {records.capacity_base_seq}",
            agent_id=agent_id,
        )
    return records.capacity.encode()


def held_back(records: CheckedRecords, new_rows: Sequence[RecordRow]) -> list[Quarantine]:
    """The quarantined records among those a batch stores for the first time."""
    if not records.quarantined or not new_rows:
        return []
    first_new = new_rows[0][SEQ]
    return [q for q in records.quarantined if q.seq >= first_new]


def first_new_index(
    agent_id: str, head: ChainHead, records: CheckedRecords, stored_records: StoredRecords
) -> int:
    """Index of the first record of ``records`` that is not stored yet (len(rows) when
    none is). Call inside the ingest transaction, with the agent's row locked.

    Raises SeqConflict when a stored seq arrives with other bytes, ChainHole when the batch
    starts beyond head + 1, ChainFork when the first new record does not link to the head.
    """
    rows = records.rows
    first_seq, last_seq = records.first_seq, records.last_seq
    if first_seq > head.seq + 1:
        raise ChainHole(
            f"batch starts at seq {first_seq} but the collector holds up to seq {head.seq}: "
            f"seqs {head.seq + 1}..{first_seq - 1} never arrived",
            agent_id=agent_id,
            seq=first_seq,
        )
    index = 0
    if first_seq <= head.seq:
        last_duplicate = min(last_seq, head.seq)
        _check_duplicates(
            agent_id, records, last_duplicate, stored_records(first_seq, last_duplicate)
        )
        index = last_duplicate - first_seq + 1
    if index < len(rows):
        expected = head.hash if head.seq else chain.GENESIS_HASH
        claimed = records.first_prev_hash if index == 0 else records.hashes[index - 1]
        if claimed != expected:
            raise ChainFork(
                f"prev_hash does not match the stored head (seq {head.seq}): "
                "another chain is speaking for this agent",
                agent_id=agent_id,
                seq=head.seq + 1,
                field="prev_hash",
            )
    return index


def _check_duplicates(
    agent_id: str,
    records: CheckedRecords,
    last_duplicate: int,
    stored: Sequence[tuple[int, bytes]],
) -> None:
    """Every record up to ``last_duplicate`` must equal the stored one, byte for byte."""
    rows = records.rows
    first_seq = records.first_seq
    stored_seqs = [seq for seq, _ in stored]
    if stored_seqs != list(range(first_seq, last_duplicate + 1)):
        raise StoreCorrupt(
            f"stored chain lacks records between seq {first_seq} and {last_duplicate}, "
            "below its head",
            agent_id=agent_id,
        )
    for offset, (seq, stored_record) in enumerate(stored):
        if rows[offset][RECORD] != stored_record:
            raise SeqConflict(
                "already stored with different bytes (tampering, or two outboxes for one "
                "agent id); the stored record is kept",
                agent_id=agent_id,
                seq=seq,
            )


def check_agent_id(agent_id: str) -> None:
    """Raises EnrollmentError unless ``agent_id`` is a usable id: non-empty, at most 256
    bytes, no whitespace or control characters (it appears in logs and on command lines)."""
    if not agent_id:
        raise EnrollmentError("agent id is empty")
    if len(agent_id.encode()) > MAX_AGENT_ID_BYTES:
        raise EnrollmentError(f"agent id is longer than {MAX_AGENT_ID_BYTES} bytes")
    for char in agent_id:
        if char.isspace() or unicodedata.category(char).startswith("C"):
            raise EnrollmentError(
                f"agent id {agent_id!r} contains whitespace or a control character"
            )


def canonical_public_key_hex(public_key_hex: str) -> str:
    """The key as lower-case hex; raises EnrollmentError if it is not an Ed25519 key."""
    try:
        return chain.public_key_hex(chain.load_public_key_hex(public_key_hex))
    except chain.BadKey as exc:
        raise EnrollmentError(f"public key: {exc}") from exc
