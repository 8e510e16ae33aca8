"""Where one account's records lie: per account, agent and 10-minute bucket, the first and
last seq of the agent's records of that account starting in that bucket.

The stores keep a record's fields in its bytes only (rows.py), so "this account's records
in a period" used to mean decoding every record of every account in it: a customer's job
page, ``report --per-job --account`` and each statement ``period close`` signs each read
the whole period of the whole platform. The spans narrow that read to seq ranges of the
agents the account ran on, in the buckets it ran in; the ranges hold other accounts'
records too (an agent's records interleave its GPUs' processes), so readers still decode
and filter, but only there. Buckets are short because a span runs from an account's first
record in one to its last: an hour let two jobs of one account on two GPUs of a host 50
minutes apart read everything the host did between them (78 records read per record of
the account in the benchmark, against 8 with 10 minutes, its 8 GPUs interleaved).

A span is a superset, never a subset: it covers every record with busy time that is not
held (what ``usage_events`` reads: ingest adds a batch's, a release the record it releases,
the migration's backfill those stored before), so a reader that filters what the ranges
return finds exactly what a full scan would. Held records never reach a span: a hostile
agent's start time or label stays out of the index. Kept per batch, not per record: one
upsert per account and bucket a batch touches (a handful), where an index row per record
cost ingest what the slim record row saved (rows.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from creditmeter.v1 import usage_pb2

BUCKET_US = 600_000_000  # 10 minutes
# bucket_us -> account -> [first seq, last seq], of one agent's batch.
AccountSpans = dict[int, dict[str, list[int]]]


def span_rows(agent_id: str, spans: AccountSpans) -> list[tuple[int, str, str, int, int]]:
    """A batch's spans as (bucket_us, agent_id, account, first seq, last seq) rows."""
    return [
        (bucket_us, agent_id, account, first, last)
        for bucket_us, accounts in spans.items()
        for account, (first, last) in accounts.items()
    ]


def merged_ranges(spans: Iterable[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """(agent_id, first seq, last seq) spans as disjoint ranges, by agent and seq: each
    record in them is then read once."""
    out: list[tuple[str, int, int]] = []
    for agent_id, first, last in sorted(spans):
        if out and out[-1][0] == agent_id and first <= out[-1][2] + 1:
            out[-1] = (agent_id, out[-1][1], max(out[-1][2], last))
        else:
            out.append((agent_id, first, last))
    return out


def bucket_of(start_us: int) -> int:
    """The bucket a record starting at ``start_us`` is kept under (a record that is not
    held starts after 2020: its bucket stays within 64 bits)."""
    return start_us - start_us % BUCKET_US


def first_bucket_us(from_us: int) -> int:
    """The first bucket whose spans can hold a record starting at ``from_us`` or later (no
    lower than a 64-bit integer goes: an unbounded read's ``from_us`` is the lowest)."""
    return max(from_us - from_us % BUCKET_US, -(2**63))


def backfill_rows(
    records: Iterable[tuple[str, int, int, bytes]], max_spans: int = 200_000
) -> Iterator[list[tuple[int, str, str, int, int]]]:
    """The spans of stored (agent_id, seq, start_us, record) rows that are not held, in
    chunks of (bucket_us, agent_id, account, first seq, last seq) to upsert (at most
    ``max_spans`` a chunk keeps the memory bounded on a large store)."""
    spans: dict[tuple[int, str, str], list[int]] = {}
    rec = usage_pb2.UsageRecord()
    for agent_id, seq, start_us, record in records:
        rec.ParseFromString(bytes(record))
        if not rec.busy_us:
            continue  # never read through a span (usage_events)
        key = (bucket_of(start_us), agent_id, rec.attribution.account)
        span = spans.get(key)
        if span is None:
            if len(spans) == max_spans:
                yield [(*k, first, last) for k, (first, last) in spans.items()]
                spans = {}
            spans[key] = [seq, seq]
        else:
            span[0] = min(span[0], seq)
            span[1] = max(span[1], seq)
    if spans:
        yield [(*k, first, last) for k, (first, last) in spans.items()]
