"""Signed statements: what closing a period commits to, and the bundle that proves it.

Closing a period (``Ledger.close_periods`` with a signer) writes one **statement document**
per account and period: canonical JSON holding the lines, the plan, the period's credit
entries, the balance, every price version up to the period's end, and the evidence, signed
with the collector's own Ed25519 key (``creditmeter.v1 statement`` context). The evidence
names exactly what was summed:

* per agent, the seq ranges of the account's records summed, the agent's public key, and
  the signed segments (batch signatures) that cover them;
* the account's API charges summed, in full (they are the account's own).

``statement export`` turns a statement into a **bundle** (``bundle``): the signed document,
the account's summed records in full, and for every other record of the covering segments
only its hash, so that a customer checks every signature, chain link and line
(``creditmeter.verify``, which needs neither this package nor a database) without seeing
another tenant's usage.

Which records a statement sums is decided as the lines are: the account's records with busy
time (quarantined ones excepted) starting in the period, plus the late ones of closed periods
that no earlier statement summed. Both are read from the records themselves and must add up
to the lines the rollups gave; when they do not (a record stored between the two reads),
the close is computed again, and refused if they still disagree.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from creditmeter import chain
from creditmeter.collector.errors import EvidenceMismatch, LedgerError, NoStatement
from creditmeter.collector.ledger_store import (
    Account,
    ApiCharge,
    LedgerEntry,
    LedgerStore,
    LineKind,
    Segment,
    SignedStatement,
    Statement,
    StatementLine,
)
from creditmeter.collector.periods import BillingPeriod, iso_text
from creditmeter.collector.prices import PriceSchedule, PriceVersion, canonical_text
from creditmeter.collector.verifier import Limits

STATEMENT_CONTEXT = b"creditmeter.v1 statement\x00"
DOCUMENT_FORMAT = "creditmeter-statement/1"
BUNDLE_FORMAT = "creditmeter-bundle/1"
# A segment covering a seq ends at most one batch after it.
_MAX_SPAN = Limits().max_batch_records

Sums = dict[tuple[str, str, int], int]  # (line kind, model, price_from_us) -> quantity


# -- the collector's key ---------------------------------------------------------------------


class Signer(Protocol):
    """What closing a period signs its statements with."""

    @property
    def public_key_hex(self) -> str: ...

    def sign(self, start_us: int, document: bytes) -> SignedStatement: ...


@dataclass(frozen=True)
class StatementSigner:
    """Signs statement documents with the collector's Ed25519 key."""

    key: Ed25519PrivateKey

    @property
    def public_key_hex(self) -> str:
        return chain.public_key_hex(self.key)

    def sign(self, start_us: int, document: bytes) -> SignedStatement:
        signature = self.key.sign(STATEMENT_CONTEXT + document)
        return SignedStatement(start_us, document, signature, self.public_key_hex)


def load_signer(path: Path) -> tuple[StatementSigner, bool]:
    """The signer whose key is in ``path``, created (mode 0600) if the file does not exist.
    Returns it and whether it was created. Raises chain.BadKey for a file that holds no
    Ed25519 key, OSError when the file cannot be read or written."""
    try:
        return StatementSigner(chain.load_private_key_pem(path.read_bytes())), False
    except FileNotFoundError:
        pass
    key = chain.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: two closes racing to create it never both write; the loser reads the winner's.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        return StatementSigner(chain.load_private_key_pem(path.read_bytes())), False
    with os.fdopen(fd, "wb") as out:
        out.write(chain.private_key_pem(key))
        out.flush()
        os.fsync(out.fileno())
    return StatementSigner(key), True


# -- evidence ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What a statement sums: per agent the seqs of the account's records, and its charges."""

    seqs: dict[str, list[int]]
    charges: list[ApiCharge]


def gather_evidence(
    store: LedgerStore,
    account: Account,
    period: BillingPeriod,
    schedule: PriceSchedule,
    lines: Sequence[StatementLine],
    before: Sequence[Statement],
    signed_before: Sequence[SignedStatement],
) -> Evidence:
    """The records and charges behind ``lines``; raises EvidenceMismatch unless they add up
    to them exactly. Late ones are looked for only when the lines have late quantities."""
    late_busy = any(line.kind is LineKind.LATE_USAGE for line in lines)
    late_api = any(line.kind is LineKind.LATE_API for line in lines)
    summed = _summed_before(before, signed_before)
    seqs: dict[str, list[int]] = {}
    sums: Sums = {}
    first_us = period.start_us if not late_busy else account.first_period_start_us
    for event in store.usage_events(first_us, period.end_us, account.name):
        if summed.has_record(event.agent_id, event.seq):
            continue
        if event.start_us < period.start_us and summed.covers(event.start_us):
            continue
        seqs.setdefault(event.agent_id, []).append(event.seq)
        _add(sums, period, schedule, LineKind.USAGE, event.model, event.start_us, event.busy_us)
    charges = []
    first_us = period.start_us if not late_api else account.first_period_start_us
    for charge in store.api_charges(first_us, period.end_us):
        if charge.account != account.name or charge.request_id in summed.request_ids:
            continue
        if charge.time_us < period.start_us and summed.covers(charge.time_us):
            continue
        charges.append(charge)
        _add(sums, period, schedule, LineKind.API, charge.model, charge.time_us, charge.count)
    expected = {(line.kind.value, line.model, line.price_from_us): line.quantity for line in lines}
    if sums != expected:
        raise EvidenceMismatch(
            f"account {account.name!r}, period {iso_text(period.start_us)}: the records and "
            f"charges sum to {_sums_text(sums)}, the lines say {_sums_text(expected)}"
        )
    return Evidence({agent: sorted(s) for agent, s in seqs.items()}, charges)


def _add(
    sums: Sums,
    period: BillingPeriod,
    schedule: PriceSchedule,
    kind: LineKind,
    model: str,
    time_us: int,
    quantity: int,
) -> None:
    if time_us < period.start_us:
        kind = LineKind.LATE_USAGE if kind is LineKind.USAGE else LineKind.LATE_API
    key = (kind.value, model, schedule.version_at(time_us)[0])
    sums[key] = sums.get(key, 0) + quantity


def _sums_text(sums: Sums) -> str:
    return ", ".join(f"{k}/{m}/{v}: {q}" for (k, m, v), q in sorted(sums.items())) or "nothing"


@dataclass
class _Summed:
    """What earlier statements of the account summed: their evidence where signed, and the
    periods of those closed before statements were signed (everything in them counts as
    summed: they kept no list)."""

    seqs: dict[str, set[int]]
    request_ids: set[str]
    unsigned: list[tuple[int, int]]

    def has_record(self, agent_id: str, seq: int) -> bool:
        return seq in self.seqs.get(agent_id, ())

    def covers(self, time_us: int) -> bool:
        return any(start <= time_us < end for start, end in self.unsigned)


def _summed_before(before: Sequence[Statement], signed: Sequence[SignedStatement]) -> _Summed:
    by_start = {s.start_us: s for s in signed}
    summed = _Summed({}, set(), [])
    for statement in before:
        one = by_start.get(statement.start_us)
        if one is None:
            summed.unsigned.append((statement.start_us, statement.end_us))
            continue
        document = json.loads(one.document)
        for agent in document["usage"]:
            seqs = summed.seqs.setdefault(agent["agent_id"], set())
            for first, last in agent["seqs"]:
                seqs.update(range(first, last + 1))
        summed.request_ids.update(c["request_id"] for c in document["api_charges"])
    return summed


# -- the document ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalanceFigures:
    """The period's balance as the ledger computed it (ledger.Balance's numbers)."""

    lot_credits_micro: int
    adjustments_micro: int
    charged_micro: int
    used_micro: int
    remaining_micro: int


def statement_document(
    statement: Statement,
    balance: BalanceFigures,
    entries: Iterable[LedgerEntry],
    versions: Sequence[PriceVersion],
    evidence: Evidence,
    store: LedgerStore,
    collector_public_key_hex: str,
) -> bytes:
    """The canonical JSON bytes a statement's signature covers."""
    period = BillingPeriod(statement.start_us, statement.end_us)
    document = {
        "format": DOCUMENT_FORMAT,
        "account": statement.account,
        "period_start_us": statement.start_us,
        "period_end_us": statement.end_us,
        "plan": statement.plan,
        "plan_grant_micro": statement.plan_grant_micro,
        "lines": [_line(line) for line in statement.lines],
        "entries": [_entry(e) for e in entries if period.contains(e.effective_us)],
        "balance": {
            "lot_credits_micro": balance.lot_credits_micro,
            "adjustments_micro": balance.adjustments_micro,
            "charged_micro": balance.charged_micro,
            "used_micro": balance.used_micro,
            "remaining_micro": balance.remaining_micro,
        },
        "prices": [
            {"effective_us": v.effective_us, "book": json.loads(canonical_text(v.book))}
            for v in versions
            if v.effective_us < statement.end_us
        ],
        "usage": [
            _agent_evidence(store, agent_id, seqs)
            for agent_id, seqs in sorted(evidence.seqs.items())
        ],
        "api_charges": [
            {"request_id": c.request_id, "model": c.model, "count": c.count, "time_us": c.time_us}
            for c in sorted(evidence.charges, key=lambda c: c.request_id)
        ],
        "closed_at_us": statement.closed_at_us,
        "closed_by": statement.closed_by,
        "collector_public_key_hex": collector_public_key_hex,
    }
    return canonical_json(document)


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _line(line: StatementLine) -> dict[str, object]:
    return {
        "kind": line.kind.value,
        "model": line.model,
        "quantity": line.quantity,
        "credits_micro": line.credits_micro,
        "default_price": line.default_price,
        "price_from_us": line.price_from_us,
    }


def _entry(entry: LedgerEntry) -> dict[str, object]:
    return {
        "kind": entry.kind.value,
        "amount_micro": entry.amount_micro,
        "effective_us": entry.effective_us,
        "expires_us": entry.expires_us,
        "reason": entry.reason,
    }


def _agent_evidence(store: LedgerStore, agent_id: str, seqs: list[int]) -> dict[str, object]:
    agent = store.get_agent(agent_id)
    if agent is None:  # records are stored only for enrolled agents, never removed
        raise LedgerError(f"records of agent {agent_id!r}, which is not enrolled")
    keys = [[k.after_seq, k.public_key_hex, k.change.value] for k in agent.keys] or [
        [0, agent.public_key_hex, "enrolled"]
    ]
    return {
        "agent_id": agent_id,
        "public_key_hex": agent.public_key_hex,
        # Every key, by the records it signs (after_seq, key, how): a segment is verified
        # with the key in force at its first record, then each rotation inside it.
        "keys": keys,
        "seqs": seq_ranges(seqs),
        "segments": [
            [s.first_seq, s.last_seq, s.signature.hex()] for s in covering(store, agent_id, seqs)
        ],
    }


def seq_ranges(seqs: Sequence[int]) -> list[list[int]]:
    """Sorted seqs as [first, last] runs: [1, 2, 3, 7] -> [[1, 3], [7, 7]]."""
    ranges: list[list[int]] = []
    for seq in seqs:
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def covering(store: LedgerStore, agent_id: str, seqs: Sequence[int]) -> list[Segment]:
    """Stored segments, earliest first, whose signatures cover the sorted ``seqs``: for each
    seq not covered by the segment chosen last, the first segment ending at or after it
    that starts at or before it (a head signature's start is unknown: it covers)."""
    if not seqs:
        return []
    segments = store.segments_between(agent_id, seqs[0], seqs[-1] + _MAX_SPAN)
    chosen: list[Segment] = []
    index = 0
    for seq in seqs:
        # The last chosen segment started at or before an earlier seq: it covers this one
        # too if it reaches it.
        if chosen and seq <= chosen[-1].last_seq:
            continue
        while index < len(segments) and not (
            segments[index].last_seq >= seq and (segments[index].first_seq or 0) <= seq
        ):
            index += 1
        if index == len(segments):
            raise LedgerError(f"agent {agent_id!r} seq {seq}: no stored signature covers it")
        chosen.append(segments[index])
    return chosen


# -- the bundle --------------------------------------------------------------------------------


def bundle(store: LedgerStore, account: str, start_us: int) -> dict[str, object]:
    """The verification bundle of the account's statement for the period starting
    ``start_us``. Raises NoStatement when it has none."""
    signed = {s.start_us: s for s in store.signed_statements(account)}.get(start_us)
    if signed is None:
        raise NoStatement(
            f"account {account!r} has no signed statement for the period starting "
            f"{iso_text(start_us)}: it is open, or was closed before statements were signed"
        )
    document = json.loads(signed.document)
    segments = []
    for agent in document["usage"]:
        own = {seq for first, last in agent["seqs"] for seq in range(first, last + 1)}
        for first_seq, last_seq, signature_hex in agent["segments"]:
            first = first_seq if first_seq is not None else min(s for s in own if s <= last_seq)
            records = store.records_between(agent["agent_id"], first, last_seq)
            segments.append(
                {
                    "agent_id": agent["agent_id"],
                    "first_seq": first_seq,
                    "last_seq": last_seq,
                    "signature_hex": signature_hex,
                    "records": [_leaf(seq, data, seq in own) for seq, data in records],
                }
            )
    return {
        "format": BUNDLE_FORMAT,
        "statement": {
            "document": signed.document.decode(),
            "signature_hex": signed.signature.hex(),
            "collector_public_key_hex": signed.public_key_hex,
        },
        "agent_public_keys": {a["agent_id"]: a["keys"] for a in document["usage"]},
        "segments": segments,
    }


def _leaf(seq: int, data: bytes, own: bool) -> dict[str, object]:
    if own:
        return {"seq": seq, "record_b64": base64.b64encode(data).decode()}
    return {"seq": seq, "hash_hex": chain.record_hash(data).hex()}
