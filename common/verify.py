"""creditmeter-verify: checks a statement bundle without trusting its issuer.

    creditmeter-verify BUNDLE.json [--collector-key HEX]

A bundle (``creditmeter-collector statement export``) holds a closed period's statement as
the collector signed it, the account's summed usage records in full, and for every other
record of the segments that cover them only its hash. This checks, and prints OK or each
thing that disagrees (exit 0, 1; 2 when the bundle cannot be read):

* the statement's Ed25519 signature, under the collector key it names (or ``--collector-key``,
  the key the platform published: pin it, or a forger can sign with a key of its own);
* every segment's span signature under its agent's key, over the hashes of all its records:
  the account's own, hashed here from their bytes, and the others' as given;
* every own record's chain link (its prev_hash is the hash of the record before it), its
  agent, seq and account;
* every line: the busy µs and requests summed per model, kind (the period's own, or late
  from a closed period) and price version, and its credits at that version's prices,
  rounded half to even once per line; then the balance's arithmetic.

Deliberately standalone: the standard library and ``cryptography`` only, no import from the
rest of creditmeter (records are decoded from their protobuf wire bytes here), so that an
auditor can read all of it and run it anywhere. tests/ledger/test_statements.py holds it
to the collector's own formats.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

STATEMENT_CONTEXT = b"creditmeter.v1 statement\x00"
SPAN_CONTEXT = b"creditmeter.v1 span\x00"
BUNDLE_FORMAT = "creditmeter-bundle/1"
DOCUMENT_FORMAT = "creditmeter-statement/1"
MICRO = 1_000_000
BUILT_IN_MICRO = 1_000_000  # before any price version: 1 credit a busy second, a request
QUALITY_UNATTRIBUTED = 3  # usage.proto: a GPU's books, never an account's usage


class Unreadable(Exception):
    """The bundle is not JSON of the expected shape."""


# -- protobuf wire format: just the UsageRecord fields a statement sums -------------------------


@dataclass
class Record:
    agent_id: str = ""
    seq: int = 0
    prev_hash: bytes = b""
    start_us: int = 0
    account: str = ""
    model: str = ""
    busy_us: int = 0
    quality: int = 0


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a message: ints for varints, bytes for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _int64(value: int | bytes) -> int:
    assert isinstance(value, int)
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: int | bytes) -> str:
    assert isinstance(value, bytes)
    return value.decode()


def parse_record(data: bytes) -> Record:
    """Raises ValueError for bytes that are not a UsageRecord."""
    record = Record()
    try:
        for number, value in _fields(data):
            if number == 1:
                record.agent_id = _text(value)
            elif number == 2:
                record.seq = _int64(value)
            elif number == 3 and isinstance(value, bytes):
                record.prev_hash = value
            elif number == 5:
                record.start_us = _int64(value)
            elif number == 9 and isinstance(value, bytes):
                for inner, text in _fields(value):
                    if inner == 1:
                        record.account = _text(text)
                    elif inner == 2:
                        record.model = _text(text)
            elif number == 10:
                record.busy_us = _int64(value)
            elif number == 17:
                record.quality = _int64(value)
    except (AssertionError, UnicodeDecodeError) as exc:
        raise ValueError(f"a field has the wrong type ({exc!r})") from exc
    return record


# -- prices ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Book:
    busy_micro: dict[str, int]
    request_micro: dict[str, int]
    default_busy_micro: int = BUILT_IN_MICRO
    default_request_micro: int = BUILT_IN_MICRO


class Prices:
    """The statement's price versions: the one in force at a moment is the latest that
    started at or before it."""

    def __init__(self, versions: Sequence[dict[str, Any]]) -> None:
        ordered = sorted(versions, key=lambda v: int(v["effective_us"]))
        self._starts = [int(v["effective_us"]) for v in ordered]
        self._books = [_book(v["book"]) for v in ordered]

    def at(self, time_us: int) -> tuple[int, Book]:
        index = bisect.bisect_right(self._starts, time_us)
        if index == 0:
            return 0, Book({}, {})
        return self._starts[index - 1], self._books[index - 1]


def _book(fields: dict[str, Any]) -> Book:
    return Book(
        {str(k): int(v) for k, v in fields["busy_second_micro"].items()},
        {str(k): int(v) for k, v in fields["request_micro"].items()},
        int(fields["default_busy_second_micro"]),
        int(fields["default_request_micro"]),
    )


def busy_credits_micro(busy_us: int, micro_per_second: int) -> int:
    """round_half_even(busy_us × price / 10⁶), in integers."""
    quotient, remainder = divmod(busy_us * micro_per_second, MICRO)
    if remainder * 2 > MICRO or (remainder * 2 == MICRO and quotient % 2):
        quotient += 1
    return quotient


# -- the checks --------------------------------------------------------------------------------


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    records: dict[tuple[str, int], Record] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        self.problems.append(text)


def verify(bundle: dict[str, Any], collector_key_hex: str | None = None) -> tuple[str, Report]:
    """Checks a parsed bundle; returns the statement's summary line and what disagrees.
    Raises Unreadable for a bundle of the wrong shape."""
    try:
        return _verify(bundle, collector_key_hex)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Unreadable(f"the bundle is not a statement bundle ({exc!r})") from exc


def _verify(bundle: dict[str, Any], collector_key_hex: str | None) -> tuple[str, Report]:
    if bundle.get("format") != BUNDLE_FORMAT:
        raise Unreadable(f"format is {bundle.get('format')!r}, not {BUNDLE_FORMAT!r}")
    report = Report()
    statement = bundle["statement"]
    document_bytes = statement["document"].encode()
    document = json.loads(document_bytes)
    if document.get("format") != DOCUMENT_FORMAT:
        raise Unreadable(f"statement format is {document.get('format')!r}")
    _check_statement_signature(report, statement, document, document_bytes, collector_key_hex)
    _check_segments(report, bundle, document)
    _check_lines(report, document)
    _check_balance(report, document)
    summary = (
        f"statement of {document['account']} for {_iso(document['period_start_us'])} .. "
        f"{_iso(document['period_end_us'])}: {len(document['lines'])} lines, "
        f"{len(report.records)} records from {len(document['usage'])} agents, "
        f"{len(document['api_charges'])} API charges, "
        f"{_credits(document['balance']['charged_micro'])} credits charged; "
        f"signed by collector key {statement['collector_public_key_hex']}"
    )
    return summary, report


def _check_statement_signature(
    report: Report,
    statement: dict[str, Any],
    document: dict[str, Any],
    document_bytes: bytes,
    pinned_hex: str | None,
) -> None:
    key_hex = statement["collector_public_key_hex"]
    if key_hex != document["collector_public_key_hex"]:
        report.problem("statement: the bundle's collector key is not the one the statement names")
    if pinned_hex is not None and key_hex != pinned_hex.strip().lower():
        report.problem(f"statement: signed by collector key {key_hex}, not the pinned key")
    if not _verifies(key_hex, statement["signature_hex"], STATEMENT_CONTEXT + document_bytes):
        report.problem("statement: its signature does not verify under the collector key")


def _check_segments(report: Report, bundle: dict[str, Any], document: dict[str, Any]) -> None:
    account = document["account"]
    claimed = {
        agent["agent_id"]: {s for first, last in agent["seqs"] for s in range(first, last + 1)}
        for agent in document["usage"]
    }
    keys = {agent["agent_id"]: agent["keys"] for agent in document["usage"]}
    if bundle["agent_public_keys"] != keys:
        report.problem("agents: the bundle's agent keys are not the ones the statement names")
    listed = [
        (agent["agent_id"], first, last, signature)
        for agent in document["usage"]
        for first, last, signature in agent["segments"]
    ]
    given = [
        (s["agent_id"], s["first_seq"], s["last_seq"], s["signature_hex"])
        for s in bundle["segments"]
    ]
    if sorted(given, key=repr) != sorted(listed, key=repr):
        report.problem("segments: the bundle's segments are not the ones the statement lists")
    for segment in bundle["segments"]:
        _check_segment(report, segment, keys, claimed, account)
    for agent_id, seqs in sorted(claimed.items()):
        missing = sorted(s for s in seqs if (agent_id, s) not in report.records)
        if missing:
            report.problem(
                f"agent {agent_id}: summed records {_ranges_text(missing)} are not in the bundle"
            )


def _check_segment(
    report: Report,
    segment: dict[str, Any],
    keys: dict[str, list[list[Any]]],
    claimed: dict[str, set[int]],
    account: str,
) -> None:
    agent_id, first, last = segment["agent_id"], segment["first_seq"], segment["last_seq"]
    where = f"agent {agent_id} segment {first}..{last}"
    if first is None:
        report.problem(
            f"agent {agent_id} segment ending at seq {last}: signed by its head only (an agent "
            "from before span signatures); its records cannot be checked without other "
            "tenants' records"
        )
        return
    leaves: list[bytes] = []
    previous: bytes | None = None
    for index, leaf in enumerate(segment["records"]):
        seq = first + index
        if leaf["seq"] != seq:
            report.problem(f"{where}: entry {index} is seq {leaf['seq']}, expected {seq}")
            return
        if "record_b64" in leaf:
            data = base64.b64decode(leaf["record_b64"], validate=True)
            digest = hashlib.sha256(data).digest()
            _check_own(report, where, agent_id, seq, data, previous, claimed, account)
        else:
            digest = bytes.fromhex(leaf["hash_hex"])
            if len(digest) != 32:
                report.problem(f"{where}: the hash of seq {seq} is not 32 bytes")
        leaves.append(digest)
        previous = digest
    if len(leaves) != last - first + 1:
        report.problem(f"{where}: holds {len(leaves)} records, not {last - first + 1}")
    message = SPAN_CONTEXT + hashlib.sha256(b"".join(leaves)).digest()
    key_hex = _segment_key(keys.get(agent_id, []), first, last)
    if not _verifies(key_hex, segment["signature_hex"], message):
        report.problem(f"{where}: the span signature does not verify under the agent's key")


def _segment_key(keys: list[list[Any]], first: int, last: int) -> str:
    """The agent key that signs a segment: the one in force at its first record (the last
    whose after_seq is below it), then each key rotation inside it."""
    found = ""
    for after_seq, key_hex, _how in keys:
        if after_seq < first:
            found = key_hex
    for after_seq, key_hex, how in keys:
        if how == "rotated" and first <= after_seq <= last:
            found = key_hex
    return found


def _check_own(
    report: Report,
    where: str,
    agent_id: str,
    seq: int,
    data: bytes,
    previous: bytes | None,
    claimed: dict[str, set[int]],
    account: str,
) -> None:
    try:
        record = parse_record(data)
    except ValueError as exc:
        report.problem(f"{where}: seq {seq} is not a usage record ({exc})")
        return
    if (record.agent_id, record.seq) != (agent_id, seq):
        report.problem(f"{where}: seq {seq} holds agent {record.agent_id} seq {record.seq}")
    if previous is not None and record.prev_hash != previous:
        report.problem(f"{where}: seq {seq}'s prev_hash is not the hash of seq {seq - 1}")
    if seq not in claimed.get(agent_id, set()):
        report.problem(f"{where}: seq {seq} is given in full but the statement does not sum it")
        return
    if record.account != account or record.quality == QUALITY_UNATTRIBUTED:
        report.problem(f"{where}: seq {seq} is not {account}'s usage")
    earlier = report.records.get((agent_id, seq))
    if earlier is not None and earlier != record:
        report.problem(f"{where}: seq {seq} differs from its copy in another segment")
    report.records[(agent_id, seq)] = record


def _check_lines(report: Report, document: dict[str, Any]) -> None:
    prices = Prices(document["prices"])
    start_us, end_us = document["period_start_us"], document["period_end_us"]
    sums: dict[tuple[str, str, int], int] = {}
    books: dict[int, Book] = {}

    def add(kind: str, model: str, time_us: int, quantity: int) -> None:
        if time_us >= end_us:
            report.problem(f"{kind} of {model} at {_iso(time_us)} is after the period")
            return
        late = "late_" if time_us < start_us else ""
        version, book = prices.at(time_us)
        books[version] = book
        key = (late + kind, model, version)
        sums[key] = sums.get(key, 0) + quantity

    for record in report.records.values():
        add("usage", record.model, record.start_us, record.busy_us)
    for charge in document["api_charges"]:
        add("api", charge["model"], charge["time_us"], charge["count"])
    expected = {}
    for (kind, model, version), quantity in sums.items():
        book = books[version]
        table, default = (
            (book.busy_micro, book.default_busy_micro)
            if kind.endswith("usage")
            else (book.request_micro, book.default_request_micro)
        )
        price = table.get(model, default)
        credits = (
            busy_credits_micro(quantity, price) if kind.endswith("usage") else quantity * price
        )
        expected[(kind, model, version)] = (quantity, credits, model not in table)
    stated = {
        (line["kind"], line["model"], line["price_from_us"]): (
            line["quantity"],
            line["credits_micro"],
            line["default_price"],
        )
        for line in document["lines"]
    }
    for key in sorted(set(expected) | set(stated)):
        if expected.get(key) != stated.get(key):
            report.problem(
                f"line {key[0]} {key[1]} (prices from {_iso(key[2])}): the statement says "
                f"{_line_text(stated.get(key))}, the records and charges give "
                f"{_line_text(expected.get(key))}"
            )


def _check_balance(report: Report, document: dict[str, Any]) -> None:
    balance = document["balance"]
    charged = sum(line["credits_micro"] for line in document["lines"])
    adjustments = sum(e["amount_micro"] for e in document["entries"] if e["kind"] == "adjustment")
    wanted = {
        "charged_micro": charged,
        "adjustments_micro": adjustments,
        "used_micro": charged - adjustments,
        "remaining_micro": document["plan_grant_micro"]
        + balance["lot_credits_micro"]
        - (charged - adjustments),
    }
    for name, value in wanted.items():
        if balance[name] != value:
            report.problem(
                f"balance: {name.removesuffix('_micro')} is {_credits(balance[name])}, "
                f"the lines and entries give {_credits(value)}"
            )


# -- helpers -----------------------------------------------------------------------------------


def _verifies(key_hex: str, signature_hex: str, message: bytes) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (ValueError, InvalidSignature):
        return False
    return True


def _iso(time_us: int) -> str:
    return datetime.fromtimestamp(time_us / MICRO, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _credits(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def _line_text(line: tuple[int, int, bool] | None) -> str:
    if line is None:
        return "no line"
    quantity, credits, default = line
    return f"{quantity} for {_credits(credits)} credits" + (" (default price)" if default else "")


def _ranges_text(seqs: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and runs[-1][1] == seq - 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    return ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="creditmeter-verify",
        description="Check a creditmeter statement bundle: signatures, chain links, lines.",
    )
    parser.add_argument("bundle", help="the bundle file (statement export)")
    parser.add_argument(
        "--collector-key", metavar="HEX", help="the collector public key the platform published"
    )
    args = parser.parse_args(argv)
    try:
        with open(args.bundle, "rb") as source:
            bundle = json.load(source)
        summary, report = verify(bundle, args.collector_key)
    except (OSError, ValueError, Unreadable, binascii.Error) as exc:
        print(f"creditmeter-verify: {args.bundle}: {exc}", file=sys.stderr)
        return 2
    if report.problems:
        print(f"FAILED: {len(report.problems)} problem(s) in the {summary}")
        for problem in report.problems:
            print(f"  {problem}")
        return 1
    print(f"OK: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
