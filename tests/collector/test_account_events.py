"""One account's usage events, read through its spans (account_spans.py), are exactly those
a scan of every record would find for it: on SQLite and PostgreSQL alike, over records of
several accounts and agents interleaved across hours, late records starting in an earlier
hour, records without busy time, resent batches and quarantined records, held and
released.

The read used to decode every record of every account in the period: a customer's job
page, ``report --per-job --account`` and each statement ``period close`` signs."""

from __future__ import annotations

import random

import pytest

from creditmeter.collector import quarantine
from creditmeter.collector.ledger_store import LedgerStore, UsageEvent
from creditmeter.collector.pg_store import PostgresStore
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Limits, Verifier
from creditmeter.v1 import usage_pb2

from .backends import BACKENDS, Backend
from .conftest import NOW_US
from .records import T0_US, WINDOW_US, AgentChain, Mutator

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

HOUR_US = 3_600_000_000
ACCOUNTS = ("acme", "globex", "initech", "")
OVER_US = WINDOW_US + 3_000_000  # held: busier than its window beyond the 2 s tolerance


def record_of(rng: random.Random, seq: int, held: set[int]) -> Mutator:
    """Seq ``seq``: one of the accounts, mostly in time order, sometimes late (a final
    record starting up to two hours back), sometimes idle, now and then held."""
    account = rng.choice(ACCOUNTS)
    start_us = T0_US + seq * 40_000_000
    if rng.random() < 0.1:
        start_us -= rng.randrange(2 * HOUR_US)
    busy_us = 0 if rng.random() < 0.1 else rng.randrange(1, WINDOW_US)
    if rng.random() < 0.05:
        held.add(seq)
        busy_us = OVER_US

    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.attribution.account = account
        rec.start_unix_us = start_us
        rec.end_unix_us = start_us + WINDOW_US
        rec.busy_us = busy_us

    return mutate


def stored_chains(store: Store, verifier: Verifier) -> list[AgentChain]:
    """Three agents, 400 records each in batches of 1 to 60, a few batches sent twice."""
    rng = random.Random(20261207)
    agents = [AgentChain(agent_id=f"agent-{n}") for n in range(3)]
    for agent in agents:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    held: dict[str, set[int]] = {a.agent_id: set() for a in agents}
    while any(len(a.records) < 400 for a in agents):
        agent = rng.choice([a for a in agents if len(a.records) < 400])
        first = len(agent.records) + 1
        for seq in range(first, first + rng.randint(1, 60)):
            agent.append(record_of(rng, seq, held[agent.agent_id]))
        batch = agent.batch(first, len(agent.records))
        store.ingest(agent.agent_id, verifier.verify(batch, agent.key.public_key()))
        if rng.random() < 0.2:  # resent from earlier on, as after a lost ack
            again = agent.batch(max(1, first - 5), len(agent.records))
            store.ingest(agent.agent_id, verifier.verify(again, agent.key.public_key()))
    return agents


def ledger(store: Store) -> LedgerStore:
    assert isinstance(store, SQLiteStore | PostgresStore)
    return store


def scanned(store: LedgerStore, from_us: int, to_us: int, account: str) -> list[UsageEvent]:
    return [e for e in store.usage_events(from_us, to_us) if e.account == account]


def windows() -> list[tuple[int, int]]:
    """Whole runs, windows on hour edges and windows that cut hours."""
    rng = random.Random(7)
    end_us = T0_US + 401 * 40_000_000
    out = [(T0_US - 3 * HOUR_US, end_us), (T0_US + HOUR_US, T0_US + 3 * HOUR_US)]
    for _ in range(6):
        a, b = sorted(rng.randrange(T0_US - 2 * HOUR_US, end_us) for _ in range(2))
        out.append((a, b))
    return out


def test_one_accounts_events_are_what_a_scan_of_every_record_finds(
    store: Store, verifier: Verifier
) -> None:
    stored_chains(store, verifier)
    assert store.quarantined()  # some are held: read neither way
    for from_us, to_us in windows():
        for account in ACCOUNTS:
            expected = scanned(ledger(store), from_us, to_us, account)
            assert list(ledger(store).usage_events(from_us, to_us, account)) == expected
    whole = T0_US - 3 * HOUR_US, T0_US + 402 * 40_000_000
    assert all(scanned(ledger(store), *whole, a) for a in ACCOUNTS)
    assert list(ledger(store).usage_events(*whole, "nobody")) == []


def test_a_released_record_is_among_its_accounts_events(store: Store, verifier: Verifier) -> None:
    agents = stored_chains(store, verifier)
    lax = Verifier(Limits(busy_tolerance_us=5_000_000), clock_us=lambda: NOW_US)
    entry = store.quarantined()[0]
    quarantine.release(store, lax, entry.agent_id, entry.seq, "ops")
    record = next(a for a in agents if a.agent_id == entry.agent_id).record(entry.seq)
    account, start_us = record.attribution.account, record.start_unix_us
    events = list(ledger(store).usage_events(start_us, start_us + 1, account))
    assert [(e.agent_id, e.seq) for e in events] == [(entry.agent_id, entry.seq)]
    assert events == scanned(ledger(store), start_us, start_us + 1, account)


def test_a_store_from_before_the_spans_gets_them_when_it_migrates(
    store: Store, verifier: Verifier, backend: Backend
) -> None:
    """The migration fills the spans from the stored records' bytes (SQLite: a function of
    the migrating connection; PostgreSQL: a backfill step in the migration's transaction).
    Here the records are stored, the schema is set back to before the spans, and the next
    open migrates it: every read is as before."""
    stored_chains(store, verifier)
    whole = T0_US - 3 * HOUR_US, T0_US + 402 * 40_000_000
    before = {a: list(ledger(store).usage_events(*whole, a)) for a in ACCOUNTS}
    spans = backend.rows("SELECT bucket_us, agent_id, account FROM account_spans")
    migration = next(m for m in backend.migrations if "account_spans" in m.statements[0])
    backend.execute("DROP TABLE account_spans")
    backend.execute("DELETE FROM schema_version WHERE version >= ?", migration.version)
    migrated = ledger(backend.open())
    assert set(backend.rows("SELECT bucket_us, agent_id, account FROM account_spans")) == set(spans)
    for account in ACCOUNTS:
        assert list(migrated.usage_events(*whole, account)) == before[account]


@pytest.mark.parametrize("start_us", [-(2**63), -1, 2**63 - 1])
def test_a_record_starting_at_the_ends_of_64_bits_is_held_and_its_batch_stored(
    store: Store, agent: AgentChain, verifier: Verifier, start_us: int
) -> None:
    """A hostile agent's start time: the record is held, and its span must not leave 64
    bits (an overflow refused the whole batch, and so stopped the agent's chain for good)."""

    def extreme(rec: usage_pb2.UsageRecord) -> None:
        rec.start_unix_us = start_us
        rec.end_unix_us = start_us

    agent.extend(2)
    agent.append(extreme)
    agent.extend(2)
    head = store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 5), agent.key.public_key()))
    assert head.seq == 5
    assert [e.seq for e in store.quarantined()] == [3]
    whole = T0_US - HOUR_US, T0_US + HOUR_US
    assert [e.seq for e in ledger(store).usage_events(*whole, "acme")] == [1, 2, 4, 5]
    assert list(ledger(store).usage_events(None, None, "acme")) == scanned(
        ledger(store), -(2**63), 2**63 - 1, "acme"
    )
