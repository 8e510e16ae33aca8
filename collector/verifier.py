"""Checks a RecordBatch before anything of it is stored.

Stateless and pure: a verdict needs only the batch, the agent's enrolled public key and the
wall clock (for "not in the far future"). Whether the batch fits the agent's *stored* chain
(duplicates, holes, forks) is decided by the store, inside its transaction.

This is the ingest hot path (target: >= 100,000 records/s verified and committed on two
cores, i.e. ~10 µs a record for everything), so ``check_records`` is written for speed:
each record is parsed once and hashed once, every field is read once into a local, all
checks of a healthy record are one chained boolean expression (only when it fails does the
slow ``_raise_insane_field`` work out which field to name), rows come out as plain tuples
laid out as the store's INSERT parameters (rows.py), and the batch's rollup sums are added
up on the way. One signature verification per batch covers all of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from creditmeter import chain
from creditmeter.collector.account_spans import BUCKET_US as SPAN_BUCKET_US
from creditmeter.collector.account_spans import AccountSpans, bucket_of
from creditmeter.collector.capacity import Budget, Capacity
from creditmeter.collector.clock import WallClock, wall_clock_us
from creditmeter.collector.errors import (
    AgentMismatch,
    BadBatchSignature,
    BatchTooLarge,
    BrokenChain,
    InsaneField,
    MalformedMessage,
    MalformedRecord,
)
from creditmeter.collector.rollup import (
    HOUR_US,
    DeviceRollupKey,
    GpuSums,
    RollupKey,
    RollupSums,
    account_sums,
    add_gaps,
    add_gpu_books,
)
from creditmeter.collector.rows import SEQ, RecordRow
from creditmeter.labels import RESERVED_ACCOUNTS, LabelProblem, label_error
from creditmeter.v1 import ingest_pb2, usage_pb2

MIN_START_US = 1_577_836_800_000_000  # 2020-01-01T00:00:00Z: nothing was metered before
INT64_MAX = 2**63 - 1  # SQLite and PostgreSQL integers are signed 64-bit

_KNOWN_SOURCES = frozenset(usage_pb2.MeasurementSource.values())
_KNOWN_ATTRIBUTION_SOURCES = frozenset(usage_pb2.AttributionSource.values())
# A gap must say why it is a gap: UNSPECIFIED would be an agent bug.
_KNOWN_GAP_REASONS = frozenset(usage_pb2.GapReason.values()) - {usage_pb2.GAP_REASON_UNSPECIFIED}
_KNOWN_UNATTRIBUTED_REASONS = frozenset(usage_pb2.UnattributedReason.values()) - {
    usage_pb2.UNATTRIBUTED_REASON_UNSPECIFIED
}
# Process records; a device record (QUALITY_UNATTRIBUTED) and a key rotation take their own.
_PROCESS_QUALITIES = frozenset(usage_pb2.Quality.values()) - {
    usage_pb2.QUALITY_UNATTRIBUTED,
    usage_pb2.QUALITY_KEY_ROTATION,
}
_KNOWN_EVIDENCE = frozenset(usage_pb2.EvidenceSource.values())
_KNOWN_LABEL_NAMES = frozenset(usage_pb2.LabelName.values()) - {usage_pb2.LABEL_NAME_UNSPECIFIED}
_KNOWN_LABEL_PROBLEMS = frozenset(usage_pb2.LabelProblem.values()) - {
    usage_pb2.LABEL_PROBLEM_UNSPECIFIED
}
# The fast path compares case-folded ASCII accounts of this length only: ASCII case folding
# keeps the length, and every reserved name has it (tests/common/test_labels.py).
_RESERVED_LEN = len("unattributed")
_DEVICE_RECORD = usage_pb2.QUALITY_UNATTRIBUTED
_KEY_ROTATION = usage_pb2.QUALITY_KEY_ROTATION


@dataclass(frozen=True)
class Limits:
    """What the verifier accepts. A record outside these is rejected, and since the chain
    cannot skip a record, that blocks its agent until an operator steps in: keep them wide
    enough that only a bug or an attack trips them."""

    max_record_bytes: int = 16 * 1024  # bytes; a record is ~200 bytes plus 10 per gap
    max_batch_records: int = 10_000
    max_label_bytes: int = 256  # bytes of UTF-8, for every string that lands in a column
    busy_tolerance_us: int = 2_000_000  # sample coverage may straddle a window edge
    max_future_us: int = 86_400_000_000  # how far past the collector's clock an end may lie
    min_start_us: int = MIN_START_US
    # Physical bounds, so that no record can carry more than a GPU could do: windows close
    # every 10 s by default and a restart resumes from minutes back; a week is far beyond
    # any honest record and keeps every rollup sum far from 64 bits.
    max_window_us: int = 7 * 86_400_000_000
    max_power_mw: int = 5_000_000  # 5 kW: more than any GPU draws (H100 SXM: 700 W)
    max_memory_bytes: int = 2**48  # 256 TiB


@dataclass(frozen=True, slots=True)
class Quarantine:
    """A record kept as evidence but never billed: signed and chained, yet ``field`` breaks
    the verifier's checks (``problem``), as an agent bug or a rule changed across versions
    can make it. Operators list and release them (creditmeter-collector quarantine)."""

    seq: int
    field: str
    problem: str


@dataclass(frozen=True, slots=True)
class Rotation:
    """A key rotation record that passed its checks: from ``seq`` on, batches are signed by
    ``new_public_key``, if the key in force before endorsed it (``Verifier.verify``)."""

    seq: int
    prev_hash: bytes
    new_public_key: bytes
    endorsement: bytes


@dataclass(frozen=True)
class KeyRing:
    """An agent's public keys by the records they sign: ``(after_seq, key hex)`` in
    after_seq order, the first after 0 (enrollment). A batch is verified from the key in
    force at its first record (the last whose after_seq is below it), through the key
    rotations inside it; an operator's replacement (a lost key) starts after the head it
    was made at."""

    entries: tuple[tuple[int, str], ...]

    @classmethod
    def single(cls, public_key_hex: str) -> KeyRing:
        return cls(((0, public_key_hex),))

    def at(self, seq: int) -> str:
        """The key hex in force for a batch starting at ``seq``."""
        found = self.entries[0][1]
        for after_seq, key_hex in self.entries:
            if after_seq < seq:
                found = key_hex
        return found

    @property
    def current(self) -> str:
        return self.entries[-1][1]


@dataclass(frozen=True, slots=True)
class CheckedRecords:
    """Consecutive records of one agent that passed every check that needs no key.

    ``rows`` are in seq order and ``hashes`` their records' SHA-256; ``first_prev_hash`` is
    what the first record claims to follow, which only the store can judge. ``sums`` and
    ``device_sums`` are what all the rows add to the hourly rollups per account and per
    device (see rollup.py), summed while the fields are at hand: a store whose batch is all
    new uses them as they are; ``gpu_sums`` what they add to the GPUs' books and gaps.
    """

    agent_id: str
    rows: list[RecordRow]
    hashes: list[bytes]
    first_prev_hash: bytes
    sums: dict[RollupKey, RollupSums]
    device_sums: dict[DeviceRollupKey, RollupSums]
    gpu_sums: GpuSums
    quarantined: tuple[Quarantine, ...] = ()
    # The agent's GPU budgets after these records, when they were claimed (capacity.py),
    # and the seq through which the budgets they were claimed from had counted.
    capacity: Capacity | None = None
    capacity_base_seq: int = 0
    rotations: tuple[Rotation, ...] = ()
    # Per 10-minute bucket and account, the first and last seq of the rows' records with busy
    # time (account_spans.py); a held one's are added when it is released.
    account_spans: AccountSpans = dataclass_field(default_factory=dict)

    @property
    def first_seq(self) -> int:
        return self.rows[0][SEQ]

    @property
    def last_seq(self) -> int:
        return self.rows[-1][SEQ]

    @property
    def head_hash(self) -> bytes:
        return self.hashes[-1]


@dataclass(frozen=True, slots=True)
class VerifiedBatch:
    """A batch whose records passed every check and whose signature verified: the span
    signature over all its record hashes when the agent sent one, else the head signature
    over ``records.head_hash``."""

    records: CheckedRecords
    signature: bytes
    spanned: bool = False  # ``signature`` is a span signature (creditmeter.chain.sign_span)
    # The key that verified ``signature``, and each rotation the batch made: (seq, the key
    # that endorsed it, the new key), hex. The store checks them against its own keys.
    signing_key_hex: str = ""
    key_steps: tuple[tuple[int, str, str], ...] = ()

    @property
    def agent_id(self) -> str:
        return self.records.agent_id

    @property
    def span_first_seq(self) -> int | None:
        """The seq a span signature starts at; None for a head signature."""
        return self.records.rows[0][SEQ] if self.spanned else None


class Verifier:
    def __init__(self, limits: Limits | None = None, clock_us: WallClock = wall_clock_us) -> None:
        self.limits = limits or Limits()
        self._clock_us = clock_us

    def verify(
        self,
        batch: ingest_pb2.RecordBatch,
        keys: Ed25519PublicKey | KeyRing,
        capacity: Capacity | None = None,
    ) -> VerifiedBatch:
        """Checks a batch as received; raises a RejectedBatch subclass naming the problem.

        A head signature is checked first: a forged batch costs one signature verification,
        not the parsing of all its records. A span signature needs every record's hash,
        which the checks compute anyway, so it is checked after them (a forged batch then
        costs its parsing, bounded by the batch limits, and stores nothing).
        """
        agent_id = batch.agent_id
        records = batch.records
        self._check_count(agent_id, len(records))
        ring = keys if isinstance(keys, KeyRing) else KeyRing.single(chain.public_key_hex(keys))
        if batch.span_signature:
            checked = self.check_records(agent_id, records, capacity)
            key_hex, steps = _walk_rotations(agent_id, ring.at(checked.first_seq), checked)
            try:
                chain.verify_span(public_key(key_hex), checked.hashes, batch.span_signature)
            except chain.ChainError as exc:
                raise _bad_signature(agent_id, "span_signature") from exc
            return VerifiedBatch(checked, bytes(batch.span_signature), True, key_hex, tuple(steps))
        # Which key applies depends on the first seq only once the agent has rotated.
        key_hex = (
            ring.current
            if len(ring.entries) == 1
            else ring.at(_first_seq(agent_id, records[0], self))
        )
        try:
            chain.verify_head(public_key(key_hex), chain.record_hash(records[-1]), batch.signature)
        except chain.ChainError as exc:
            raise _bad_signature(agent_id, "signature") from exc
        checked = self.check_records(agent_id, records, capacity)
        if checked.rotations:
            raise _bad_signature(agent_id, "span_signature", "a key rotation needs a span")
        return VerifiedBatch(checked, bytes(batch.signature), signing_key_hex=key_hex)

    def check_records(
        self, agent_id: str, records: Sequence[bytes], capacity: Capacity | None = None
    ) -> CheckedRecords:
        """Parses, sanity-checks and links consecutive records of ``agent_id``.

        Used for incoming batches (by ``verify``) and by the audit on stored records. With
        ``capacity`` (the agent's GPU budgets, collector/capacity.py), the process records
        after its ``through_seq`` also claim their busy time from their GPU's budget, and
        one claiming more than elapsed is quarantined; the budgets after the batch come
        back in ``CheckedRecords.capacity`` (the one given is not changed).
        """
        self._check_count(agent_id, len(records))
        limits = self.limits
        now_us = self._clock_us()
        latest_end_us = now_us + limits.max_future_us
        min_start_us = limits.min_start_us
        tolerance_us = limits.busy_tolerance_us
        max_record_bytes = limits.max_record_bytes
        max_label_bytes = limits.max_label_bytes
        max_window_us = limits.max_window_us
        max_power_mw = limits.max_power_mw
        max_memory_bytes = limits.max_memory_bytes
        # UTF-8 takes at most 4 bytes a character: shorter strings need no encoding to check.
        safe_label_chars = max_label_bytes // 4
        known_sources = _KNOWN_SOURCES
        known_attribution_sources = _KNOWN_ATTRIBUTION_SOURCES
        # One message object parsed into again and again: no allocation per record. Every
        # value taken from it is a new Python object, so nothing keeps pointing into it.
        rec = usage_pb2.UsageRecord()
        parse = rec.ParseFromString
        sha256 = hashlib.sha256

        # The first record is judged on its own (the store checks that it continues the
        # stored chain); every record then follows from the one before it.
        first = self._parse(agent_id, records[0], 0)
        first_prev_hash = first.prev_hash
        _check_first_link(agent_id, first.seq, first_prev_hash)
        expected_seq = first.seq
        prev_hash = first_prev_hash

        rows: list[RecordRow] = []
        append = rows.append
        hashes: list[bytes] = []
        append_hash = hashes.append
        # Per-device rollup sums, one dict update a record; the per-account sums are added
        # up from them after the loop (~100 device keys in a batch of 1000). Records of a
        # batch interleave GPUs, so runs of equal keys are short, and the run-length summing
        # this replaced called a function for almost every record: the loop now sums by
        # device in what it used to spend summing by account (45.4k instructions a record
        # against 46.4k, callgrind), and the store's own pass over the rows for the device
        # rollup (0.9 µs a record) is gone.
        device_sums: dict[DeviceRollupKey, RollupSums] = {}
        get_sums = device_sums.get
        gpu_sums: GpuSums = {}
        account_spans: AccountSpans = {}
        quarantined: list[Quarantine] = []
        rotations: list[Rotation] = []
        process_qualities = _PROCESS_QUALITIES
        known_evidence = _KNOWN_EVIDENCE
        # The hour a record starts in, worked out again only when a record leaves it: two
        # comparisons cost less than the modulo of a 51-bit integer.
        hour_us = next_hour_us = 0
        bucket_us = next_bucket_us = 0  # the same for the account spans' bucket
        spans_in_bucket: dict[str, list[int]] = {}
        budget = None
        counted_seq = 0
        if capacity is not None:
            budget = Budget(capacity.copy(), tolerance_us=tolerance_us)
            counted_seq = capacity.through_seq
        for data in records:
            if len(data) > max_record_bytes:
                raise _oversize_record(agent_id, len(rows), len(data), max_record_bytes)
            try:
                parse(data)
            except DecodeError as exc:
                raise _unparseable_record(agent_id, len(rows), exc) from exc
            seq = rec.seq
            if seq != expected_seq or rec.prev_hash != prev_hash:
                raise _broken_link(agent_id, len(rows), seq, expected_seq)

            gpu = rec.gpu
            attribution = rec.attribution
            start_us = rec.start_unix_us
            end_us = rec.end_unix_us
            busy_us = rec.busy_us
            wall_us = rec.wall_us
            host = rec.host
            gpu_uuid = gpu.uuid
            gpu_parent_uuid = gpu.parent_uuid
            process_name = rec.process.name
            account = attribution.account
            model = attribution.model
            job_id = attribution.job_id
            attribution_source = attribution.source
            source = rec.source
            energy_mj = rec.energy_mj
            peak_memory = rec.peak_memory_bytes
            gaps = rec.gaps
            if not hour_us <= start_us < next_hour_us:
                hour_us = start_us - start_us % HOUR_US
                next_hour_us = hour_us + HOUR_US
            quality = rec.quality
            is_device = quality == _DEVICE_RECORD
            is_rotation = quality == _KEY_ROTATION
            # Signed and chained, so its bytes are evidence: a record whose fields break the
            # checks is kept in quarantine (never billed) instead of refusing the batch,
            # which would stop the agent's chain for good. A record of another agent still
            # refuses the batch (AgentMismatch is not an InsaneField).
            try:
                if gaps:
                    _check_gaps(agent_id, len(rows), seq, gaps)
                refused = attribution.refused
                if refused:
                    _check_refused(agent_id, len(rows), seq, refused)
                if is_device:
                    self._check_device_record(agent_id, len(rows), rec, now_us)
                elif is_rotation:
                    self._check_rotation(agent_id, len(rows), rec, now_us)
                elif not (
                    rec.agent_id == agent_id
                    and min_start_us <= start_us <= end_us <= latest_end_us
                    and 0 <= busy_us <= end_us - start_us + tolerance_us
                    and end_us - start_us <= max_window_us
                    # Wall time is reported, never billed: bounded only to keep sums far
                    # from 64 bits (agents count a draining process's wall past its window).
                    and 0 <= wall_us <= max_window_us
                    # mJ × 10⁶ and mW × µs are both nJ
                    and energy_mj * 1_000_000 <= max_power_mw * (end_us - start_us + tolerance_us)
                    and peak_memory <= max_memory_bytes
                    and gpu_uuid
                    and source in known_sources
                    and attribution_source in known_attribution_sources
                    and rec.quality in process_qualities
                    and rec.evidence in known_evidence
                    and not rec.HasField("device")
                    and energy_mj <= INT64_MAX
                    # No string in a record can be longer than the record itself.
                    and (
                        len(data) <= max_label_bytes
                        or (
                            len(account) <= safe_label_chars
                            and len(model) <= safe_label_chars
                            and len(job_id) <= safe_label_chars
                            and len(process_name) <= safe_label_chars
                            and len(host) <= safe_label_chars
                            and len(gpu_uuid) <= safe_label_chars
                            and len(gpu_parent_uuid) <= safe_label_chars
                        )
                    )
                    # The label law (common/labels.py), which the agent applies too: printable
                    # (no NUL, which PostgreSQL's text cannot hold; no control, bidi or other
                    # format character), and the reserved account. One C pass over the labels
                    # joined; non-ASCII labels take the slow path for the NFC check.
                    and (
                        labels := account
                        + model
                        + job_id
                        + process_name
                        + host
                        + gpu_uuid
                        + gpu_parent_uuid
                    ).isprintable()
                    and labels.isascii()
                    and (
                        len(account) != _RESERVED_LEN or account.casefold() not in RESERVED_ACCOUNTS
                    )
                ):
                    # Raises unless only the quick label test was too strict.
                    self._raise_insane_field(agent_id, len(rows), rec, now_us)
                if budget is not None and seq > counted_seq and not (is_device or is_rotation):
                    problem = budget.claim(gpu_uuid, start_us, end_us, busy_us)
                    if problem is not None:
                        raise InsaneField(problem, agent_id=agent_id, seq=seq, field="busy_us")
            except InsaneField as exc:
                quarantined.append(Quarantine(seq, exc.field or "", exc.problem))
            else:
                if is_device:
                    add_gpu_books(gpu_sums, hour_us, rec)
                elif is_rotation:
                    key_rotation = rec.key_rotation
                    rotations.append(
                        Rotation(
                            seq,
                            rec.prev_hash,
                            key_rotation.new_public_key,
                            key_rotation.endorsement,
                        )
                    )
                else:
                    if gaps:
                        add_gaps(gpu_sums, hour_us, rec)
                    key = (hour_us, host, gpu_uuid, account, model)
                    total = get_sums(key)
                    if total is None:
                        device_sums[key] = [busy_us, wall_us, 1]
                    else:
                        total[0] += busy_us
                        total[1] += wall_us
                        total[2] += 1
                    if busy_us:  # what usage_events reads (account_spans.py)
                        if not bucket_us <= start_us < next_bucket_us:
                            bucket_us = bucket_of(start_us)
                            next_bucket_us = bucket_us + SPAN_BUCKET_US
                            spans_in_bucket = account_spans.setdefault(bucket_us, {})
                        # Keyed by the account alone: a str's hash is one C pass, a tuple's more.
                        span = spans_in_bucket.get(account)
                        if span is None:
                            spans_in_bucket[account] = [seq, seq]
                        else:
                            span[1] = seq  # rows come in seq order

            digest = sha256(data).digest()
            append((agent_id, seq, start_us, bytearray(data)))
            append_hash(digest)
            prev_hash = digest
            expected_seq = seq + 1
        return CheckedRecords(
            agent_id,
            rows,
            hashes,
            first_prev_hash,
            account_sums(device_sums),
            device_sums,
            gpu_sums,
            tuple(quarantined),
            _advanced(budget, expected_seq - 1),
            counted_seq,
            tuple(rotations),
            account_spans,
        )

    def _parse(self, agent_id: str, data: bytes, index: int) -> usage_pb2.UsageRecord:
        if len(data) > self.limits.max_record_bytes:
            raise _oversize_record(agent_id, index, len(data), self.limits.max_record_bytes)
        try:
            return usage_pb2.UsageRecord.FromString(data)
        except DecodeError as exc:
            raise _unparseable_record(agent_id, index, exc) from exc

    def _check_count(self, agent_id: str, count: int) -> None:
        if count == 0:
            raise MalformedMessage(
                "a batch must hold at least one record", agent_id=agent_id, field="records"
            )
        if count > self.limits.max_batch_records:
            raise BatchTooLarge(
                f"batch holds {count} records, more than the limit of "
                f"{self.limits.max_batch_records}",
                agent_id=agent_id,
                field="records",
            )

    def _check_rotation(
        self, agent_id: str, index: int, rec: usage_pb2.UsageRecord, now_us: int
    ) -> None:
        """A key rotation record carries the new key and its endorsement, at one moment,
        and nothing else: no GPU, process, account or usage."""
        seq = rec.seq
        _check_agent(rec, agent_id, index)
        rotation = rec.key_rotation
        problems = (
            ("key_rotation.new_public_key", len(rotation.new_public_key) != 32, "is not 32 bytes"),
            ("key_rotation.endorsement", len(rotation.endorsement) != 64, "is not 64 bytes"),
            (
                "start_unix_us",
                not self.limits.min_start_us
                <= rec.start_unix_us
                == rec.end_unix_us
                <= now_us + self.limits.max_future_us,
                "a rotation is one moment, after 2020 and not in the future",
            ),
            ("busy_us", rec.busy_us != 0 or rec.wall_us != 0, "a rotation carries no usage"),
            (
                "gpu",
                rec.HasField("gpu") or rec.HasField("process") or rec.HasField("device"),
                "a rotation names no GPU, process or books",
            ),
            ("attribution", rec.HasField("attribution"), "a rotation is nobody's usage"),
            ("gaps", bool(rec.gaps), "a rotation reports no gap"),
        )
        for field, bad, problem in problems:
            if bad:
                raise InsaneField(problem, agent_id=agent_id, seq=seq, field=field, index=index)

    def _check_device_record(
        self, agent_id: str, index: int, rec: usage_pb2.UsageRecord, now_us: int
    ) -> None:
        """A GPU's books: the fields every record has, then that the books add up."""
        self._raise_insane_field(agent_id, index, rec, now_us, device=True)
        problem = _device_record_problem(rec, self.limits.busy_tolerance_us)
        if problem is not None:
            field, text = problem
            raise InsaneField(text, agent_id=agent_id, seq=rec.seq, field=field, index=index)

    def _raise_insane_field(
        self,
        agent_id: str,
        index: int,
        rec: usage_pb2.UsageRecord,
        now_us: int,
        *,
        device: bool = False,
    ) -> None:
        """Names the first impossible field of a record the fast check refused.

        Returns only when every field is fine after all (a label longer than the quick
        character test allows but within the byte limit).
        """
        limits = self.limits
        seq = rec.seq

        def insane(field: str, problem: str) -> InsaneField:
            return InsaneField(problem, agent_id=agent_id, seq=seq, field=field, index=index)

        _check_agent(rec, agent_id, index)
        start_us, end_us = rec.start_unix_us, rec.end_unix_us
        if start_us < limits.min_start_us:
            raise insane("start_unix_us", f"{start_us} µs is before 2020 (agent clock unset?)")
        if end_us < start_us:
            raise insane("end_unix_us", f"end {end_us} µs is before start {start_us} µs")
        if end_us > now_us + limits.max_future_us:
            raise insane(
                "end_unix_us",
                f"end {end_us} µs is {(end_us - now_us) // 1_000_000} s ahead of the "
                "collector's clock (agent clock wrong?)",
            )
        window_us = end_us - start_us
        if rec.busy_us < 0:
            raise insane("busy_us", f"{rec.busy_us} is negative")
        if rec.busy_us > window_us + limits.busy_tolerance_us:
            raise insane(
                "busy_us",
                f"{rec.busy_us} µs busy in a window of {window_us} µs "
                f"(tolerance {limits.busy_tolerance_us} µs)",
            )
        if window_us > limits.max_window_us:
            raise insane(
                "end_unix_us",
                f"a window of {window_us} µs is longer than {limits.max_window_us} µs",
            )
        if rec.wall_us < 0:
            raise insane("wall_us", f"{rec.wall_us} is negative")
        if rec.wall_us > limits.max_window_us:
            raise insane("wall_us", f"{rec.wall_us} µs is longer than {limits.max_window_us} µs")
        max_energy_nj = limits.max_power_mw * (window_us + limits.busy_tolerance_us)
        if rec.energy_mj <= INT64_MAX and rec.energy_mj * 1_000_000 > max_energy_nj:
            raise insane(
                "energy_mj",
                f"{rec.energy_mj} mJ in {window_us} µs is more than "
                f"{limits.max_power_mw // 1000} W",
            )
        if rec.peak_memory_bytes > limits.max_memory_bytes:
            raise insane(
                "peak_memory_bytes",
                f"{rec.peak_memory_bytes} bytes is more than {limits.max_memory_bytes}",
            )
        if not rec.gpu.uuid:
            raise insane("gpu.uuid", "missing: the record does not say which GPU ran")
        if rec.source not in _KNOWN_SOURCES:
            raise insane("source", f"unknown MeasurementSource {rec.source}")
        if rec.attribution.source not in _KNOWN_ATTRIBUTION_SOURCES:
            raise insane(
                "attribution.source", f"unknown AttributionSource {rec.attribution.source}"
            )
        if rec.energy_mj > INT64_MAX:
            raise insane("energy_mj", f"{rec.energy_mj} does not fit a signed 64-bit integer")
        if not device and rec.quality not in _PROCESS_QUALITIES:
            raise insane("quality", f"unknown Quality {rec.quality}")
        if rec.evidence not in _KNOWN_EVIDENCE:
            raise insane("evidence", f"unknown EvidenceSource {rec.evidence}")
        if not device and rec.HasField("device"):
            raise insane("device", "device books on a process record (quality not UNATTRIBUTED)")
        labels = {
            "attribution.account": rec.attribution.account,
            "attribution.model": rec.attribution.model,
            "attribution.job_id": rec.attribution.job_id,
            "process.name": rec.process.name,
            "host": rec.host,
            "gpu.uuid": rec.gpu.uuid,
            "gpu.parent_uuid": rec.gpu.parent_uuid,
        }
        for field, text in labels.items():
            size = len(text.encode())  # bytes
            if size > limits.max_label_bytes:
                raise insane(field, f"{size} bytes long, more than {limits.max_label_bytes}")
            error = label_error(field, text)
            if error is not None and error.problem is not LabelProblem.TOO_LONG:
                # NUL among them: PostgreSQL's text cannot hold one, and every store must
                # refuse the same records.
                raise insane(field, str(error).removeprefix(f"{field}: "))


def _advanced(budget: Budget | None, last_seq: int) -> Capacity | None:
    if budget is None:
        return None
    budget.state.through_seq = max(budget.state.through_seq, last_seq)
    return budget.state


def _check_refused(
    agent_id: str, index: int, seq: int, refused: Sequence[usage_pb2.RefusedLabel]
) -> None:
    for r in refused:
        if r.label not in _KNOWN_LABEL_NAMES:
            problem = f"unspecified or unknown LabelName {r.label}"
            raise InsaneField(
                problem, agent_id=agent_id, seq=seq, field="attribution.refused.label", index=index
            )
        if r.problem not in _KNOWN_LABEL_PROBLEMS:
            problem = f"unspecified or unknown LabelProblem {r.problem}"
            raise InsaneField(
                problem,
                agent_id=agent_id,
                seq=seq,
                field="attribution.refused.problem",
                index=index,
            )


def _device_record_problem(rec: usage_pb2.UsageRecord, tolerance_us: int) -> tuple[str, str] | None:
    """(field, problem) of a device record that does not add up, or None."""
    if not rec.HasField("device"):
        return "device", "a device record (quality UNATTRIBUTED) has no device books"
    if rec.busy_us or rec.process.pid or rec.gaps:
        return "busy_us", "a device record bills nothing: busy_us, process and gaps stay empty"
    a = rec.attribution
    if a.account or a.model or a.job_id:
        return "attribution", "a device record names no account, model or job"
    books = rec.device
    parts = [books.attributed_busy_us]
    for u in books.unattributed:
        if u.reason not in _KNOWN_UNATTRIBUTED_REASONS:
            return "device.unattributed.reason", f"unspecified or unknown reason {u.reason}"
        parts.append(u.busy_us)
    if any(p < 0 for p in parts):
        return "device", "negative busy time in the books"
    gaps = _gaps_problem(books.gaps)
    if gaps is not None:
        return f"device.gaps.{gaps[0]}", gaps[1]
    if sum(parts) != books.device_busy_us:
        return "device.device_busy_us", (
            f"{books.device_busy_us} µs is not the attributed {books.attributed_busy_us} µs "
            f"plus the unattributed {sum(parts) - books.attributed_busy_us} µs"
        )
    window_us = rec.end_unix_us - rec.start_unix_us
    if books.device_busy_us > window_us + tolerance_us:
        return "device.device_busy_us", (
            f"{books.device_busy_us} µs busy in a window of {window_us} µs"
        )
    return None


def _oversize_record(agent_id: str, index: int, size: int, limit: int) -> MalformedRecord:
    return MalformedRecord(
        f"record is {size} bytes, more than the limit of {limit}", agent_id=agent_id, index=index
    )


def _unparseable_record(agent_id: str, index: int, exc: DecodeError) -> MalformedRecord:
    return MalformedRecord(
        f"does not parse as a UsageRecord ({exc})", agent_id=agent_id, index=index
    )


def _check_first_link(agent_id: str, seq: int, prev_hash: bytes) -> None:
    """The first record of a batch can only be judged on its own here: the store checks
    that it continues the stored chain."""
    if not 1 <= seq <= INT64_MAX:
        raise BrokenChain(
            f"seq must be between 1 and {INT64_MAX}",
            agent_id=agent_id,
            seq=seq,
            field="seq",
            index=0,
        )
    if seq == 1 and prev_hash != chain.GENESIS_HASH:
        raise BrokenChain(
            "the first record of a chain must have 32 zero bytes as prev_hash",
            agent_id=agent_id,
            seq=seq,
            field="prev_hash",
            index=0,
        )
    if len(prev_hash) != chain.HASH_SIZE:
        raise BrokenChain(
            f"prev_hash is {len(prev_hash)} bytes, not {chain.HASH_SIZE}",
            agent_id=agent_id,
            seq=seq,
            field="prev_hash",
            index=0,
        )


def _broken_link(agent_id: str, index: int, seq: int, expected_seq: int) -> BrokenChain:
    if seq != expected_seq:
        return BrokenChain(
            f"seq {seq} follows seq {expected_seq - 1} in the batch (expected {expected_seq})",
            agent_id=agent_id,
            seq=seq,
            field="seq",
            index=index,
        )
    return BrokenChain(
        f"prev_hash is not the hash of seq {seq - 1}: a record was altered or replaced",
        agent_id=agent_id,
        seq=seq,
        field="prev_hash",
        index=index,
    )


def _check_gaps(agent_id: str, index: int, seq: int, gaps: Sequence[usage_pb2.Gap]) -> None:
    problem = _gaps_problem(gaps)
    if problem is not None:
        field, text = problem
        raise InsaneField(text, agent_id=agent_id, seq=seq, field=f"gaps.{field}", index=index)


def _gaps_problem(gaps: Sequence[usage_pb2.Gap]) -> tuple[str, str] | None:
    """(the Gap field, the problem) of a negative gap, an unknown reason, or gaps summing
    past 64 bits; None when the gaps are sound."""
    for gap in gaps:
        if gap.duration_us < 0:
            return "duration_us", f"gap of {gap.duration_us} µs is negative"
        if gap.reason not in _KNOWN_GAP_REASONS:
            return "reason", f"unspecified or unknown reason {gap.reason}"
    if sum(gap.duration_us for gap in gaps) > INT64_MAX:
        return "duration_us", "gaps add up to more than a signed 64-bit integer holds"
    return None


def _check_agent(rec: usage_pb2.UsageRecord, agent_id: str, index: int) -> None:
    """A record of another agent refuses the whole batch (not a quarantine)."""
    if rec.agent_id != agent_id:
        raise AgentMismatch(
            f"record names agent {rec.agent_id!r}, the batch {agent_id!r}",
            agent_id=agent_id,
            seq=rec.seq,
            field="agent_id",
            index=index,
        )


def _bad_signature(agent_id: str, field: str, why: str = "") -> BadBatchSignature:
    which = {"span_signature": "span signature", "signature": "head signature"}.get(field, field)
    return BadBatchSignature(
        f"the {which} does not verify under the agent's enrolled key "
        f"({why or 'records altered after signing, or signed with another key'})",
        agent_id=agent_id,
        field=field,
    )


def public_key(key_hex: str) -> Ed25519PublicKey:
    """Memoized per process: keys come from the store or from endorsed rotations, which an
    agent may send many of, so the memo starts over once it holds _MAX_KEYS."""
    key = _KEYS.get(key_hex)
    if key is None:
        key = chain.load_public_key_hex(key_hex)
        if len(_KEYS) >= _MAX_KEYS:
            _KEYS.clear()
        _KEYS[key_hex] = key
    return key


_KEYS: dict[str, Ed25519PublicKey] = {}
_MAX_KEYS = 65_536


def _first_seq(agent_id: str, first: bytes, verifier: Verifier) -> int:
    """The seq of a batch's first record (the head path checks the signature first)."""
    if len(first) > verifier.limits.max_record_bytes:
        raise _oversize_record(agent_id, 0, len(first), verifier.limits.max_record_bytes)
    try:
        return int(usage_pb2.UsageRecord.FromString(first).seq)
    except DecodeError as exc:
        raise _unparseable_record(agent_id, 0, exc) from exc


def _walk_rotations(
    agent_id: str, key_hex: str, checked: CheckedRecords
) -> tuple[str, list[tuple[int, str, str]]]:
    """The key that must sign the batch after its rotations, each endorsed by the key in
    force before it; raises BadBatchSignature for an endorsement that does not verify."""
    steps = []
    for rotation in checked.rotations:
        try:
            chain.verify_rotation(
                public_key(key_hex),
                agent_id,
                rotation.seq,
                rotation.prev_hash,
                rotation.new_public_key,
                rotation.endorsement,
            )
        except chain.ChainError as exc:
            raise _bad_signature(
                agent_id, "key_rotation", f"seq {rotation.seq}: not endorsed by the key before it"
            ) from exc
        new_hex = rotation.new_public_key.hex()
        steps.append((rotation.seq, key_hex, new_hex))
        key_hex = new_hex
    return key_hex, steps
