"""``creditmeter-agent outbox check|repair``: records damaged on the agent's disk.

A record is fixed once written: its bytes, their SHA-256, the chain link to the record
before and the signature over each segment's end. A flipped bit in an unacknowledged record
(a failing disk, a bad RAM page) would be found only at delivery, where the collector
refuses it, and since a chain cannot skip a record the agent would deliver nothing ever
after. So the agent checks what is unacknowledged when it starts (``damage``), logs exactly
which records are damaged and why, and counts them in
``creditmeter_agent_outbox_damaged_records``.

``repair`` (the agent stopped: the outbox is locked while it runs) re-signs nothing. It
moves the first damaged record and every record after it into the outbox's
``damaged_records`` table, bytes unchanged, as evidence; ends the chain before them; and
appends, as new records of its own, one gap record per GPU they covered (reason
GAP_REASON_OUTBOX_DAMAGED, spanning their windows), so that the time is reported as missing
and never billed to a guess. Records after the damaged one are set aside too although
intact: they link to it, and the collector can only take a chain whole.

Run it only after the agent has reached the collector since the damage (it logs "stream to
the collector open, resuming after seq N"): its acknowledgements then say what the collector
holds, and nothing set aside is stored there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from creditmeter import chain
from creditmeter.agent.outbox import Outbox, StoredRow
from creditmeter.agent.records import is_device
from creditmeter.v1 import usage_pb2

EXIT_OK, EXIT_DAMAGED = 0, 1


KeyFor = Callable[[int], Ed25519PublicKey]  # seq of a segment end -> the key that signed it


@dataclass(frozen=True, slots=True)
class Damage:
    seq: int
    problem: str


def damage(outbox: Outbox, public_key: Ed25519PublicKey) -> list[Damage]:
    """The unacknowledged records that the collector would refuse, and why."""
    prev, rows = outbox.unacked()
    return _damage(prev, rows, _keys(outbox, public_key))


def _keys(outbox: Outbox, public_key: Ed25519PublicKey) -> KeyFor:
    """Which key signed a segment: ``public_key`` until the outbox's first key rotation,
    then the outbox's history says."""
    return outbox.public_key_for if outbox.rotated_to is not None else lambda _seq: public_key


def _damage(prev: bytes, rows: Sequence[StoredRow], key_for: KeyFor) -> list[Damage]:
    found = []
    for row in rows:
        problem = _problem(row, prev, key_for(row.seq))
        if problem is not None:
            found.append(Damage(row.seq, problem))
        prev = row.hash  # as stored: one damaged record does not condemn the next
    return found


def _problem(row: StoredRow, prev_hash: bytes, public_key: Ed25519PublicKey) -> str | None:
    if chain.record_hash(row.data) != row.hash:
        return "its bytes no longer match the hash stored with them"
    try:
        rec = usage_pb2.UsageRecord.FromString(row.data)
    except DecodeError:
        return "its bytes do not parse as a record"
    if rec.seq != row.seq:
        return f"its bytes say seq {rec.seq}"
    if rec.prev_hash != prev_hash:
        return "it does not link to the record before it"
    if row.signature is not None:
        try:
            chain.verify_head(public_key, row.hash, row.signature)
        except chain.ChainError:
            return "the signature over it does not verify under the agent's key"
    return None


def repair(outbox: Outbox, public_key: Ed25519PublicKey) -> tuple[list[Damage], int, int]:
    """Sets the damaged records and those after them aside and writes their gaps: (the
    damage found, records set aside, gap records written)."""
    prev, rows = outbox.unacked()  # read once: the check and the gaps use the same rows
    found = _damage(prev, rows, _keys(outbox, public_key))
    if not found:
        return found, 0, 0
    first = found[0].seq
    moved = [r for r in rows if r.seq >= first]
    before = [r for r in rows if r.seq == first - 1]
    gaps = gap_records(moved, before)
    count = outbox.set_aside(first, {d.seq: d.problem for d in found})
    if gaps:
        outbox.append(gaps, {})
    return found, count, len(gaps)


def gap_records(
    moved: Sequence[StoredRow], before: Sequence[StoredRow]
) -> list[usage_pb2.UsageRecord]:
    """One draft per GPU the set-aside records covered: their span, as a gap. Records too
    damaged to parse tell nothing of their GPU or time; then the record before stands in
    for the GPU, so that the chain still ends in a signed record."""
    spans: dict[str, tuple[usage_pb2.UsageRecord, int, int]] = {}
    for row in moved:
        rec = _parsed(row)
        if rec is None or rec.quality == usage_pb2.QUALITY_KEY_ROTATION:
            continue  # a rotation covers no GPU
        known = spans.get(rec.gpu.uuid)
        start, end = rec.start_unix_us, rec.end_unix_us
        if known is not None:
            start, end = min(start, known[1]), max(end, known[2])
        template = rec if known is None or is_device(known[0]) else known[0]
        spans[rec.gpu.uuid] = (template, start, end)
    if not spans:
        for row in before:
            rec = _parsed(row)
            if rec is not None:
                spans[rec.gpu.uuid] = (rec, rec.end_unix_us, rec.end_unix_us)
    return [_gap(template, start, end) for template, start, end in spans.values()]


def _parsed(row: StoredRow) -> usage_pb2.UsageRecord | None:
    try:
        return usage_pb2.UsageRecord.FromString(row.data)
    except DecodeError:
        return None


def _gap(template: usage_pb2.UsageRecord, start_us: int, end_us: int) -> usage_pb2.UsageRecord:
    record = usage_pb2.UsageRecord(
        host=template.host,
        start_unix_us=start_us,
        end_unix_us=end_us,
        source=template.source,
        quality=usage_pb2.QUALITY_UNSPECIFIED if is_device(template) else template.quality,
        evidence=template.evidence,
    )
    record.gpu.CopyFrom(template.gpu)
    if not is_device(template):
        record.process.CopyFrom(template.process)
    record.attribution.source = usage_pb2.ATTRIBUTION_SOURCE_NONE
    record.gaps.add(duration_us=end_us - start_us, reason=usage_pb2.GAP_REASON_OUTBOX_DAMAGED)
    return record


# -- the command (creditmeter-agent outbox check|repair, agent/main.py) ----------------------


def check_command(outbox: Outbox, public_key: Ed25519PublicKey) -> int:
    found = damage(outbox, public_key)
    waiting = outbox.depth()
    if not found:
        print(f"outbox {outbox.path}: {waiting} unacknowledged records, none damaged")
        return EXIT_OK
    for d in found:
        print(f"seq {d.seq}: {d.problem}")
    print(
        f"outbox {outbox.path}: {len(found)} of {waiting} unacknowledged records damaged; "
        "the collector would refuse them. Stop the agent and run: creditmeter-agent outbox repair",
        file=sys.stderr,
    )
    return EXIT_DAMAGED


def repair_command(outbox: Outbox, public_key: Ed25519PublicKey) -> int:
    found, moved, gaps = repair(outbox, public_key)
    if not found:
        print(f"outbox {outbox.path}: no damaged record; nothing changed")
        return EXIT_OK
    for d in found:
        print(f"seq {d.seq}: {d.problem}")
    print(
        f"outbox {outbox.path}: set {moved} records aside from seq {found[0].seq} on (kept in "
        f"its damaged_records table) and wrote {gaps} gap record(s) in their place, ending "
        f"at seq {outbox.last_seq}"
    )
    return EXIT_OK
