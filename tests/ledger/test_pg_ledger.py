"""The PostgreSQL ledger's decisions under concurrency: several collectors (and the admin
commands) write one database, so request ids, closed periods and closing order are decided
inside transactions, by row locks and unique indexes. What every store guarantees is in the
other ledger tests, which run here too.

A transaction "in flight" is played by a raw connection that stops before its commit; the
store's call must then wait for it (seen in pg_blocking_pids, not assumed after a sleep) and
decide on what it committed or rolled back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest

from creditmeter.collector.audit import audit
from creditmeter.collector.errors import ChargeConflict, PeriodClosed
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import (
    ApiCharge,
    ApiRollup,
    DeviceRollup,
    Dimension,
    EntryKind,
    LedgerEntry,
    ModelUsage,
    Statement,
)
from creditmeter.collector.pg_store import PostgresStore
from creditmeter.collector.verifier import Verifier
from tests.collector.backends import PostgresBackend
from tests.collector.records import AgentChain

from .conftest import DAY_US, HOUR_US, JULY_1_US, JUNE_1_US, NOW_US, Clock, Feeder

pytestmark = pytest.mark.postgres

WAIT_S = 10.0  # how long a call may take to start waiting for a lock (normally milliseconds)
JUNE_10_US = JUNE_1_US + 9 * DAY_US
T = TypeVar("T")


@pytest.fixture
def backend(postgres_url: str, clock: Clock) -> Iterator[PostgresBackend]:
    """PostgreSQL only (overrides the conftest's fixture over both stores)."""
    chosen = PostgresBackend(postgres_url, clock_us=clock)
    yield chosen
    chosen.close()


@pytest.fixture
def verifier_clock(clock: Clock) -> Verifier:
    return Verifier(clock_us=clock)


@pytest.fixture
def in_flight(backend: PostgresBackend) -> Iterator[psycopg.Connection[Any]]:
    """A connection of its own, inside a transaction it leaves open: the other writer."""
    with psycopg.connect(backend.url) as conn:
        yield conn


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def waiting(
    pool: ThreadPoolExecutor,
    backend: PostgresBackend,
    holder: psycopg.Connection[Any],
    call: Callable[[], T],
) -> Future[T]:
    """Starts ``call`` in a thread and returns once it waits for a lock ``holder`` holds.
    Fails if it finished instead: then it did not wait for the transaction in flight."""
    future = pool.submit(call)
    deadline = time.monotonic() + WAIT_S
    while not blocked_by(backend, holder):
        assert not future.done(), f"did not wait for the transaction in flight: {future.result()}"
        assert time.monotonic() < deadline, "never started waiting for the lock"
        time.sleep(0.005)  # polling another backend's state
    return future


def blocked_by(backend: PostgresBackend, holder: psycopg.Connection[Any]) -> bool:
    rows = backend.rows(
        "SELECT count(*) FROM pg_stat_activity WHERE ? = ANY(pg_blocking_pids(pid))",
        holder.info.backend_pid,
    )
    return bool(rows[0][0])


def at_once(*calls: Callable[[], object]) -> list[object]:
    """Runs ``calls`` at the same moment (a barrier); each result or the exception raised."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait()
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(calls)) as executor:
        return [future.result() for future in [executor.submit(run, call) for call in calls]]


def june_statement(account: str) -> Statement:
    return Statement(account, JUNE_1_US, JULY_1_US, "pro", 36_000_000_000, (), NOW_US, "ops")


def adjustment(account: str, effective_us: int) -> LedgerEntry:
    return LedgerEntry(
        account, EntryKind.ADJUSTMENT, 5_000_000, effective_us, None, "x", "ops", NOW_US
    )


# -- API charges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "stored_count", "expected"),
    [
        ("commit", 2, False),  # the retry of a charge that committed meanwhile
        ("commit", 3, ChargeConflict),  # the id was taken meanwhile by other content
        ("rollback", 2, True),  # the first attempt failed: the retry stores it
    ],
)
def test_a_charge_waits_for_one_with_its_request_id_in_flight(
    store: PostgresStore,
    backend: PostgresBackend,
    in_flight: psycopg.Connection[Any],
    pool: ThreadPoolExecutor,
    outcome: str,
    stored_count: int,
    expected: object,
) -> None:
    charge = ApiCharge("req-1", "acme", "gpt-4o", 2, JUNE_10_US)
    in_flight.execute(
        "INSERT INTO api_charges VALUES ('req-1', 'acme', 'gpt-4o', %s, %s, 0)",
        (stored_count, JUNE_10_US),
    )
    retry = waiting(pool, backend, in_flight, lambda: store.record_charge(charge, NOW_US))
    in_flight.commit() if outcome == "commit" else in_flight.rollback()
    if expected is ChargeConflict:
        conflict = "already charged as account 'acme' model 'gpt-4o' count 3 at"
        with pytest.raises(ChargeConflict, match=conflict):
            retry.result(WAIT_S)
    else:
        assert retry.result(WAIT_S) is expected
    requests = backend.rows("SELECT COALESCE(SUM(requests), 0) FROM api_rollups_hourly")
    assert int(requests[0][0]) == (2 if expected is True else 0)  # the raw insert has none


def test_charges_of_one_request_id_sent_to_two_collectors_at_once_are_stored_once(
    backend: PostgresBackend, store: PostgresStore, verifier_clock: Verifier
) -> None:
    other = backend.open()
    for n in range(20):
        charge = ApiCharge(f"req-{n}", "acme", "gpt-4o", 3, JUNE_10_US + n)
        results = at_once(
            lambda c=charge: store.record_charge(c, NOW_US),
            lambda c=charge: other.record_charge(c, NOW_US),
        )
        assert sorted(results, key=str) == [False, True], results
    assert store.model_usage("acme", JUNE_1_US, JULY_1_US) == {"gpt-4o": ModelUsage(0, 60)}
    with store.snapshot() as snapshot:
        assert list(snapshot.api_rollups()) == [ApiRollup(JUNE_10_US, "acme", "gpt-4o", 60, 20)]
    assert audit(store, verifier_clock).findings == []


def test_a_top_up_sent_to_two_collectors_at_once_with_one_key_is_stored_once(
    backend: PostgresBackend, store: PostgresStore, ledger: Ledger, acme: str
) -> None:
    other = backend.open()
    for n in range(20):
        entry = LedgerEntry(
            acme, EntryKind.TOP_UP, 5_000_000, NOW_US, None, "PO", "ops", NOW_US, key=f"po-{n}"
        )
        results = at_once(lambda e=entry: store.add_entry(e), lambda e=entry: other.add_entry(e))
        assert sorted(r.repeated for r in results if isinstance(r, LedgerEntry)) == [
            False,
            True,
        ], results
    assert len(store.entries(acme)) == 20
    assert ledger.balance(acme).lot_credits_micro == 20 * 5_000_000


def test_api_rollups_are_sharded_by_request_id_and_summed(
    backend: PostgresBackend, clock: Clock
) -> None:
    store = backend.open(rollup_shards=4)
    for n in range(12):  # 12 ids: crc32 puts them in more than one of 4 shards
        assert store.record_charge(ApiCharge(f"r{n}", "acme", "m", n + 1, JUNE_10_US), NOW_US)
    assert int(backend.rows("SELECT COUNT(DISTINCT shard) FROM api_rollups_hourly")[0][0]) > 1
    assert store.model_usage("acme", JUNE_1_US, JULY_1_US) == {"m": ModelUsage(0, 78)}  # 1..12
    (group,) = store.grouped_usage(None, None, frozenset({Dimension.DAY}))
    assert (group.day_start_us, group.requests, group.record_count) == (JUNE_10_US, 78, 12)


# -- closed periods ----------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_an_entry_dated_in_a_period_being_closed_waits_and_is_refused_if_it_closed(
    store: PostgresStore,
    ledger: Ledger,
    acme: str,
    backend: PostgresBackend,
    in_flight: psycopg.Connection[Any],
    pool: ThreadPoolExecutor,
    outcome: str,
) -> None:
    """A close in flight (as close_period runs it: the account locked, the statement
    inserted); an entry dated in June must not commit beside it."""
    in_flight.execute("SELECT 1 FROM accounts WHERE name = 'acme' FOR UPDATE")
    in_flight.execute(
        "INSERT INTO statements VALUES ('acme', %s, %s, 'pro', 36000000000, %s, 'ops')",
        (JUNE_1_US, JULY_1_US, NOW_US),
    )
    entry = waiting(pool, backend, in_flight, lambda: store.add_entry(adjustment(acme, NOW_US)))
    in_flight.commit() if outcome == "commit" else in_flight.rollback()
    if outcome == "commit":
        with pytest.raises(PeriodClosed, match="falls in a closed period"):
            entry.result(WAIT_S)
        assert store.entries(acme) == []
    else:
        assert entry.result(WAIT_S).entry_id == 1
        assert [e.amount_micro for e in store.entries(acme)] == [5_000_000]


def test_a_close_waits_for_entries_in_flight_which_do_not_wait_for_each_other(
    store: PostgresStore,
    acme: str,
    backend: PostgresBackend,
    in_flight: psycopg.Connection[Any],
    pool: ThreadPoolExecutor,
) -> None:
    in_flight.execute("SELECT 1 FROM accounts WHERE name = 'acme' FOR SHARE")  # as add_entry
    store.add_entry(adjustment(acme, NOW_US))  # another entry meanwhile: no wait
    close = waiting(pool, backend, in_flight, lambda: store.close_period(june_statement(acme)))
    in_flight.commit()
    close.result(WAIT_S)
    assert [s.start_us for s in store.statements(acme)] == [JUNE_1_US]


def test_two_closes_of_one_period_at_once_close_it_once(
    backend: PostgresBackend, store: PostgresStore, ledger: Ledger
) -> None:
    other = backend.open()
    ledger.define_plan("pro", by="ops", hours=Decimal(10))
    for n in range(10):
        account = f"acct-{n}"
        ledger.open_account(account, "pro", by="ops", anchor_day=1, since_us=JUNE_1_US)
        results = at_once(
            lambda a=account: store.close_period(june_statement(a)),
            lambda a=account: other.close_period(june_statement(a)),
        )
        assert sorted(type(r).__name__ for r in results) == ["NoneType", "PeriodClosed"]
        assert "is already closed" in str(next(r for r in results if r is not None))
        assert len(store.statements(account)) == 1


def test_periods_close_in_order_only(store: PostgresStore, acme: str) -> None:
    july = Statement(acme, JULY_1_US, JULY_1_US + 31 * DAY_US, "pro", 1, (), NOW_US, "ops")
    with pytest.raises(PeriodClosed, match="cannot close before the one starting 2025-06-01"):
        store.close_period(july)
    store.close_period(june_statement(acme))
    store.close_period(july)
    with pytest.raises(PeriodClosed, match="is already closed"):
        store.close_period(june_statement(acme))


# -- device rollups ----------------------------------------------------------------------------


def test_device_rollups_of_agents_in_different_shards_are_summed(
    backend: PostgresBackend, clock: Clock
) -> None:
    """Several agents reporting one host (several agents on one machine) add to one device
    row each hour, in the shard of their agent; readers sum the shards."""
    store = backend.open(rollup_shards=4)
    for n in range(6):
        agent = AgentChain(f"agent-{n}")
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
        feeder = Feeder(store, Verifier(clock_us=clock), agent)
        feeder.send(2, start_us=JUNE_10_US, host="host-1", gpu_uuid="GPU-a")
    assert int(backend.rows("SELECT COUNT(DISTINCT shard) FROM rollups_device_hourly")[0][0]) > 1
    with store.snapshot() as snapshot:
        assert list(snapshot.device_rollups()) == [
            DeviceRollup(JUNE_10_US, "host-1", "GPU-a", "acme", "sdxl", 90_000_000, 120_000_000, 12)
        ]  # 12 records of 7.5 busy s in 10 s windows
    (group,) = store.grouped_usage(None, None, frozenset({Dimension.HOST, Dimension.GPU}))
    assert (group.host, group.gpu_uuid, group.busy_us, group.record_count) == (
        "host-1",
        "GPU-a",
        90_000_000,
        12,
    )
    assert audit(store, Verifier(clock_us=clock)).findings == []


def test_an_hour_is_a_whole_hour(store: PostgresStore) -> None:
    """The charge's hour is computed once (in Python) for the rollup and the audit alike."""
    store.record_charge(ApiCharge("r", "acme", "m", 1, JUNE_10_US + HOUR_US - 1), NOW_US)
    with store.snapshot() as snapshot:
        assert [r.hour_start_us for r in snapshot.api_rollups()] == [JUNE_10_US]
