"""Re-verifies everything a store holds, from the stored record bytes alone.

For every agent: the chain runs from seq 1 without holes; each record's prev_hash is the
SHA-256 of the stored bytes of the record before; every record still passes the verifier's
checks; every segment's signature verifies under the agent's key over the hash of the
record that ends it, and the last record ends a segment; the start_us column still says
what the bytes say; the agent's head is its last record; and, per GPU, the busy time of
its process records between two of its device records is what the later one's books say
was attributed (conservation). Then the rollups reports and balances read must equal the
sums of their sources: the hourly, per-device and per-GPU rollups those of the record
bytes, and the hourly API rollups those of the stored API charges.
Anything else is a finding: a database edited behind the collector's back, a bug, or a
disk error. Audit works on one snapshot, so a running collector does not cause findings.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from creditmeter import chain
from creditmeter.collector.capacity import Capacity
from creditmeter.collector.errors import RejectedBatch
from creditmeter.collector.ledger_store import ApiCharge, LedgerSnapshot
from creditmeter.collector.periods import iso_text
from creditmeter.collector.rollup import (
    DeviceRollupKey,
    GpuRollupKey,
    GpuSums,
    GpuUsageKey,
    RollupKey,
    RollupSums,
    device_monthly_sums,
    gpu_usage_sums,
    hour_start_us,
    hour_text,
    is_device_record,
)
from creditmeter.collector.rows import SEQ, START_US
from creditmeter.collector.store import (
    AgentInfo,
    AgentKey,
    KeyChange,
    QuarantineEntry,
    Snapshot,
    Store,
    StoredRecord,
)
from creditmeter.collector.verifier import CheckedRecords, Verifier, public_key
from creditmeter.v1 import usage_pb2

_RECORD_SUMS = "busy_us, wall_us, records"
_MONTHLY_SUMS = "busy_us, wall_us, records, busy_us of days 1-31, records of days 1-31"
_HELD_NOT_STORED = "in quarantine, but no such record is stored"
_API_SUMS = "requests, charges"
ApiRollupKey = tuple[int, str, str]  # (hour_start_us, account, model)
# Rollup keys: (hour, account, model) of the hourly and API rollups, or a device rollup key.
Key = TypeVar("Key", RollupKey, DeviceRollupKey, GpuRollupKey)


@dataclass(frozen=True)
class Finding:
    agent_id: str | None  # None for findings about rollups
    seq: int | None
    problem: str

    def __str__(self) -> str:
        where = f"agent {self.agent_id!r}" if self.agent_id is not None else "rollups"
        if self.seq is not None:
            where += f" seq {self.seq}"
        return f"{where}: {self.problem}"


@dataclass
class AuditResult:
    agent_count: int = 0
    record_count: int = 0
    findings: list[Finding] = field(default_factory=list)
    # What an auditor should know but is no fault: keys an operator replaced (their old
    # key lost), which no signature of the old key vouches for.
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings


def audit(store: Store, verifier: Verifier) -> AuditResult:
    with store.snapshot() as snapshot:
        return audit_snapshot(snapshot, verifier)


def audit_snapshot(snapshot: Snapshot, verifier: Verifier) -> AuditResult:
    result = AuditResult()
    agents = {agent.agent_id: agent for agent in snapshot.agents()}
    result.agent_count = len(agents)
    expected = _ExpectedSums()
    audited: set[str] = set()
    held = {(e.agent_id, e.seq): e for e in snapshot.quarantine()}
    for agent_id, records in groupby(snapshot.records(), key=lambda record: record.agent_id):
        audited.add(agent_id)
        chain_audit = _ChainAudit(agent_id, agents.get(agent_id), verifier, result, expected)
        result.notes += _key_notes(agents.get(agent_id))
        chain_audit.held = {seq: e for (agent, seq), e in held.items() if agent == agent_id}
        chain_audit.run(records)
        for seq in chain_audit.held.keys() - chain_audit.seen:
            result.findings.append(Finding(agent_id, seq, _HELD_NOT_STORED))
        for seq in chain_audit.held:
            held.pop((agent_id, seq))
    for agent_id, seq in sorted(held):  # of agents with no record stored at all
        result.findings.append(Finding(agent_id, seq, _HELD_NOT_STORED))
    for agent_id, last_seq in snapshot.orphan_segments():
        result.findings.append(
            Finding(agent_id, last_seq, "a stored signature ends a segment whose records are gone")
        )
    for agent_id in agents.keys() - audited:
        if agents[agent_id].head.seq != 0:
            result.findings.append(
                Finding(
                    agent_id, None, f"head is seq {agents[agent_id].head.seq}, no record stored"
                )
            )
    result.findings.extend(
        _sum_findings(
            (
                ((r.hour_start_us, r.account, r.model), [r.busy_us, r.wall_us, r.record_count])
                for r in snapshot.rollups()
            ),
            expected.hourly,
            _hourly_where,
            _RECORD_SUMS,
            "records",
        )
    )
    # Both stores' snapshots are LedgerSnapshots; store.Snapshot leaves these reads out so
    # that a store may add its ledger after its ingest.
    if isinstance(snapshot, LedgerSnapshot):
        result.findings.extend(_ledger_rollup_findings(snapshot, expected.device))
        result.findings.extend(
            _sum_findings(
                (
                    ((r.hour_start_us, r.host, r.gpu_uuid, r.kind), [r.amount_us])
                    for r in snapshot.gpu_rollups()
                ),
                {key: [us] for key, us in expected.gpu.items()},
                _gpu_where,
                "[µs]",
                "records",
            )
        )
    return result


@dataclass
class _ExpectedSums:
    """What the record bytes say the rollups must hold."""

    hourly: dict[RollupKey, RollupSums] = field(default_factory=dict)
    device: dict[DeviceRollupKey, RollupSums] = field(default_factory=dict)
    gpu: GpuSums = field(default_factory=dict)


def _ledger_rollup_findings(
    snapshot: LedgerSnapshot, device: dict[DeviceRollupKey, RollupSums]
) -> Iterator[Finding]:
    """The per-device rollups against the record bytes, the API rollups against the stored
    API charges."""
    yield from _sum_findings(
        (
            (
                (r.hour_start_us, r.host, r.gpu_uuid, r.account, r.model),
                [r.busy_us, r.wall_us, r.record_count],
            )
            for r in snapshot.device_rollups()
        ),
        device,
        _device_where,
        _RECORD_SUMS,
        "records",
    )
    yield from _sum_findings(
        (
            (
                (r.hour_start_us, r.host, r.gpu_uuid, r.model),
                [r.busy_us, r.wall_us, r.record_count],
            )
            for r in snapshot.gpu_usage_rollups()
        ),
        gpu_usage_sums(device),
        _gpu_usage_where,
        _RECORD_SUMS,
        "records",
    )
    yield from _sum_findings(
        snapshot.device_monthly_rollups(),
        device_monthly_sums(device),
        _device_month_where,
        _MONTHLY_SUMS,
        "records",
    )
    yield from _sum_findings(
        (
            ((r.hour_start_us, r.account, r.model), [r.requests, r.charge_count])
            for r in snapshot.api_rollups()
        ),
        _api_sums(snapshot.api_charges()),
        _api_where,
        _API_SUMS,
        "charges",
    )


class _ChainAudit:
    """Walks one agent's stored records in seq order."""

    def __init__(
        self,
        agent_id: str,
        agent: AgentInfo | None,
        verifier: Verifier,
        result: AuditResult,
        expected: _ExpectedSums,
    ) -> None:
        self.agent_id = agent_id
        self.agent = agent
        self.verifier = verifier
        self.result = result
        self.expected = expected
        self.public_key = self._public_key()
        self.keys = agent.keys if agent is not None else ()
        # Conservation, per GPU: the busy µs of its process records since its last device
        # record, which the next device record's attributed µs must equal. None until the
        # GPU's first device record (records of older agents carry no books).
        self.since_books: dict[str, int | None] = {}
        self.held: dict[int, QuarantineEntry] = {}  # this agent's quarantine, by seq
        # The GPUs' budgets (capacity.py) over every stored record from the first, so that
        # records stored before ingest checked them are held to the same limit.
        self.capacity = Capacity()
        self.seen: set[int] = set()  # the seqs of ``held`` found stored
        # The latest records' hashes by seq: what a span signature ending here covers (a span
        # is one batch, at most max_batch_records long).
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=verifier.limits.max_batch_records)

    def run(self, records: Iterable[StoredRecord]) -> None:
        expected_seq = 1
        prev_hash = chain.GENESIS_HASH
        last: StoredRecord | None = None
        last_signed_seq = 0
        for record in records:
            self.result.record_count += 1
            actual_hash = chain.record_hash(record.record)
            if record.seq != expected_seq:
                self._find(
                    record.seq,
                    f"chain broken: follows seq {expected_seq - 1} "
                    f"(seqs {expected_seq}..{record.seq - 1} missing)"
                    if record.seq > expected_seq
                    else f"chain broken: seq out of order after {expected_seq - 1}",
                )
            self._check_bytes(record, prev_hash if record.seq == expected_seq else None)
            self.recent.append((record.seq, actual_hash))
            if record.signature is not None:
                self._check_signature(record, actual_hash)
                last_signed_seq = record.seq
            prev_hash = actual_hash
            expected_seq = record.seq + 1
            last = record
        if last is not None:
            self._check_end(last, prev_hash, last_signed_seq)

    def _check_bytes(self, record: StoredRecord, prev_hash: bytes | None) -> None:
        """The bytes pass the verifier, link to the record before, and agree with the
        start_us column; they feed the expected rollups."""
        try:
            checked = self.verifier.check_records(self.agent_id, [record.record], self.capacity)
        except RejectedBatch as exc:
            self._find(record.seq, f"stored bytes fail verification: {exc.problem}")
            return
        if checked.capacity is not None:
            self.capacity = checked.capacity
        self._check_rotations(checked)
        row = checked.rows[0]
        if row[SEQ] != record.seq:
            self._find(record.seq, f"stored bytes say seq {row[SEQ]}")
        if prev_hash is not None and checked.first_prev_hash != prev_hash:
            self._find(record.seq, "chain broken: prev_hash is not the hash of the record before")
        if row[START_US] != record.start_us:
            self._find(
                record.seq,
                f"column start_us holds {record.start_us}, the bytes say {row[START_US]}",
            )
        self._check_conservation(record)
        entry = self.held.get(record.seq)
        if entry is not None:
            self.seen.add(record.seq)
        if checked.quarantined:
            q = checked.quarantined[0]
            problem = f"field {q.field}: {q.problem}"
            if entry is None:
                self._find(record.seq, f"{problem}, and it is not in quarantine")
            elif entry.released_at_us is not None:
                self._find(record.seq, f"released from quarantine, yet {problem}")
        if entry is not None and entry.released_at_us is None:
            return  # held: billed nowhere, in no rollup
        _add(self.expected.hourly, checked.sums)
        _add(self.expected.device, checked.device_sums)
        for key, amount_us in checked.gpu_sums.items():
            self.expected.gpu[key] = self.expected.gpu.get(key, 0) + amount_us

    def _check_conservation(self, record: StoredRecord) -> None:
        rec = usage_pb2.UsageRecord.FromString(record.record)
        gpu = rec.gpu.uuid
        if any(g.reason == usage_pb2.GAP_REASON_OUTBOX_DAMAGED for g in rec.gaps):
            # Records set aside by `creditmeter-agent outbox repair` took their share of
            # the books with them: unknown until the GPU's next device record.
            self.since_books[gpu] = None
            return
        if not is_device_record(rec):
            if self.since_books.get(gpu) is not None:
                self.since_books[gpu] = (self.since_books[gpu] or 0) + rec.busy_us
            return
        carried = self.since_books.get(gpu)
        if carried is not None and carried != rec.device.attributed_busy_us:
            self._find(
                record.seq,
                f"GPU {gpu}: its process records since its last device record carry "
                f"{carried} busy µs, its books say {rec.device.attributed_busy_us}",
            )
        self.since_books[gpu] = 0

    def _check_signature(self, record: StoredRecord, actual_hash: bytes) -> None:
        if self.public_key is None:
            return
        signature = record.signature or b""
        first_seq = record.span_first_seq
        try:
            key = self._signing_key(record.seq if first_seq is None else first_seq, record.seq)
            if first_seq is None:
                chain.verify_head(key, actual_hash, signature)
            else:
                chain.verify_span(key, self._span(record), signature)
        except chain.ChainError:
            self._find(record.seq, "stored signature does not verify under the agent's key")

    def _signing_key(self, first_seq: int, last_seq: int) -> Ed25519PublicKey:
        """The key that signs a batch of first_seq..last_seq: the one in force at its
        start, then each rotation inside it. Raises chain.BadKey for a stored key that is
        not one."""
        if not self.keys:  # an agent row from before key histories: its one key
            assert self.public_key is not None
            return self.public_key
        key_hex = _key_at(self.keys, first_seq)
        for key in self.keys:
            if key.change is KeyChange.ROTATED and first_seq <= key.after_seq <= last_seq:
                key_hex = key.public_key_hex
        return public_key(key_hex)

    def _check_rotations(self, checked: CheckedRecords) -> None:
        """A rotation record is endorsed by the key in force before it, and the key it
        names is the agent's from there on."""
        for rotation in checked.rotations:
            new_hex = rotation.new_public_key.hex()
            if not any(
                k.change is KeyChange.ROTATED
                and k.after_seq == rotation.seq
                and k.public_key_hex == new_hex
                for k in self.keys
            ):
                self._find(rotation.seq, f"rotates to key {new_hex}, not among the agent's keys")
            if not self.keys:
                continue
            try:
                chain.verify_rotation(
                    public_key(_key_at(self.keys, rotation.seq)),
                    self.agent_id,
                    rotation.seq,
                    rotation.prev_hash,
                    rotation.new_public_key,
                    rotation.endorsement,
                )
            except chain.ChainError:
                self._find(rotation.seq, "key rotation not endorsed by the key in force before it")

    def _span(self, end: StoredRecord) -> list[bytes]:
        """The hashes of the records a span signature ending at ``end`` covers (fewer when
        some are missing: the signature then fails, and the gap has its own finding)."""
        first_seq = end.span_first_seq or 0
        return [digest for seq, digest in self.recent if first_seq <= seq <= end.seq]

    def _check_end(self, last: StoredRecord, last_hash: bytes, last_signed_seq: int) -> None:
        if last_signed_seq != last.seq:
            self._find(
                last.seq,
                f"no signature covers the records after seq {last_signed_seq}",
            )
        if self.agent is not None and (
            self.agent.head.seq != last.seq or self.agent.head.hash != last_hash
        ):
            self._find(
                None, f"stored head (seq {self.agent.head.seq}) is not the last record {last.seq}"
            )

    def _public_key(self) -> Ed25519PublicKey | None:
        if self.agent is None:
            self._find(None, "records stored for an agent that is not enrolled")
            return None
        try:
            return chain.load_public_key_hex(self.agent.public_key_hex)
        except chain.BadKey as exc:
            self._find(None, f"enrolled public key unusable: {exc}")
            return None

    def _find(self, seq: int | None, problem: str) -> None:
        self.result.findings.append(Finding(self.agent_id, seq, problem))


def _key_at(keys: Sequence[AgentKey], seq: int) -> str:
    """The key in force for a batch starting at ``seq`` (as verifier.KeyRing.at)."""
    found = keys[0].public_key_hex
    for key in keys:
        if key.after_seq < seq:
            found = key.public_key_hex
    return found


def _key_notes(agent: AgentInfo | None) -> list[str]:
    if agent is None:
        return []
    return [
        f"agent {agent.agent_id!r}: key replaced by {key.by} at {iso_text(key.at_us)} for the "
        f"records after seq {key.after_seq}, without the old key's endorsement: {key.reason}"
        for key in agent.keys
        if key.change is KeyChange.REPLACED
    ]


def _add(into: dict[Key, RollupSums], sums: dict[Key, RollupSums]) -> None:
    for key, part in sums.items():
        total = into.setdefault(key, [0] * len(part))
        for i, value in enumerate(part):
            total[i] += value


def _api_sums(charges: Iterable[ApiCharge]) -> dict[ApiRollupKey, list[int]]:
    """[requests, charges] per (hour, account, model), as the API rollups must hold."""
    sums: dict[ApiRollupKey, list[int]] = {}
    for charge in charges:
        total = sums.setdefault(
            (hour_start_us(charge.time_us), charge.account, charge.model), [0, 0]
        )
        total[0] += charge.count
        total[1] += 1
    return sums


def _sum_findings(
    stored: Iterable[tuple[Key, list[int]]],
    expected: dict[Key, list[int]],
    where: Callable[[Key], str],
    what: str,
    source: str,
) -> Iterator[Finding]:
    """A finding for every stored rollup whose sums (``what``) differ from what its
    ``source`` adds up to, and for every expected one that is not stored."""
    remaining = dict(expected)
    for key, have in stored:
        want = remaining.pop(key, [0] * len(have))
        if have != want:
            yield Finding(
                None, None, f"{where(key)}: stored {what} {have}, the {source} sum to {want}"
            )
    for key, want in sorted(remaining.items()):
        yield Finding(None, None, f"{where(key)}: no rollup stored, the {source} sum to {want}")


def _hourly_where(key: RollupKey) -> str:
    hour_us, account, model = key
    return f"hour {hour_text(hour_us)} account {account!r} model {model!r}"


def _gpu_usage_where(key: GpuUsageKey) -> str:
    hour_us, host, gpu_uuid, model = key
    return f"GPU usage hour {hour_text(hour_us)} host {host!r} gpu {gpu_uuid!r} model {model!r}"


def _device_where(key: DeviceRollupKey) -> str:
    hour_us, host, gpu_uuid, account, model = key
    return (
        f"device hour {hour_text(hour_us)} host {host!r} gpu {gpu_uuid!r} account {account!r} "
        f"model {model!r}"
    )


def _device_month_where(key: DeviceRollupKey) -> str:
    month_us, host, gpu_uuid, account, model = key
    return (
        f"device month {hour_text(month_us)[:7]} host {host!r} gpu {gpu_uuid!r} "
        f"account {account!r} model {model!r}"
    )


def _gpu_where(key: GpuRollupKey) -> str:
    hour_us, host, gpu_uuid, kind = key
    return f"GPU hour {hour_text(hour_us)} host {host!r} gpu {gpu_uuid!r} {kind}"


def _api_where(key: ApiRollupKey) -> str:
    hour_us, account, model = key
    return f"API hour {hour_text(hour_us)} account {account!r} model {model!r}"
