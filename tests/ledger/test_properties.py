"""Property tests: credits per account are additive and depend on nothing but the records.

Generated record streams go through the real verifier and the real store's ingest (SQLite
and PostgreSQL), shuffled, spread over several agents, cut into batches and partly resent
(retries and duplicates); the credits the ledger and the report show must equal the hand
computation from the records alone: per (account, model), round_half_even(Σ busy µs × rate).

Every example needs an empty store: SQLite gets a new file, PostgreSQL one schema per test,
emptied between examples (a new schema and its migrations would cost ~0.1 s an example).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditmeter.collector.access import ApiAccess
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import ApiCharge, Dimension
from creditmeter.collector.pg_store import PostgresStore
from creditmeter.collector.prices import MICRO, PriceBook, PriceSchedule
from creditmeter.collector.query import ledger_handlers
from creditmeter.collector.report import Period, build_report
from creditmeter.collector.server import create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import query_pb2, query_pb2_grpc
from tests.collector.backends import BACKENDS
from tests.collector.records import AgentChain, labelled

from .conftest import DAY_US, HOUR_US, JULY_1_US, JUNE_1_US, LedgerTestStore

ACCOUNTS = ("acme", "globex", "")
MODELS = ("sdxl", "llama", "whisper")
RATES_MICRO = (0, 1, 333_333, 500_000, 1_000_000, 2_500_000)
START_US = JUNE_1_US + 9 * DAY_US

Record = tuple[str, str, int, int]  # account, model, busy_us, hour offset

records_st = st.tuples(
    st.sampled_from(ACCOUNTS),
    st.sampled_from(MODELS),
    st.integers(0, 12_000_000),
    st.integers(0, 47),
)
rates_st = st.fixed_dictionaries({model: st.sampled_from(RATES_MICRO) for model in MODELS})
# The fixture below hands each example an emptied store: that it is function-scoped is meant.
PER_EXAMPLE = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

EmptyStore = Callable[[], AbstractContextManager[LedgerTestStore]]


def _clock() -> int:
    return JULY_1_US  # the collector's clock: after every record


@pytest.fixture(params=BACKENDS)
def empty_store(request: pytest.FixtureRequest) -> Iterator[EmptyStore]:
    """Opens an empty store for each example, on the parametrized backend."""
    if request.param == "sqlite":
        yield _empty_sqlite_store
        return
    url = request.getfixturevalue("postgres_url")
    store = PostgresStore(url, clock_us=_clock)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            tables = _tables_children_first(conn)
            yield lambda: _emptied(store, conn, tables)
    finally:
        store.close()


@contextmanager
def _empty_sqlite_store() -> Iterator[LedgerTestStore]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "c.db", clock_us=_clock)
        try:
            yield cast(LedgerTestStore, store)
        finally:
            store.close()


def _tables_children_first(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """The store's tables, each before the tables its foreign keys refer to."""
    tables = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename <> 'schema_version'"
    ).fetchall()
    references = conn.execute(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint "
        "WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
    ).fetchall()
    order: TopologicalSorter[str] = TopologicalSorter({str(name): () for (name,) in tables})
    for child, parent in references:
        order.add(str(parent), str(child))  # the parent is emptied after the child
    return list(order.static_order())


@contextmanager
def _emptied(
    store: PostgresStore, conn: psycopg.Connection[tuple[object, ...]], tables: list[str]
) -> Iterator[LedgerTestStore]:
    """The store, emptied. DELETE, not TRUNCATE: ten times faster on tables this small."""
    with conn.transaction():
        for table in tables:
            conn.execute(f"DELETE FROM {table}")
    yield cast(LedgerTestStore, store)


def expected_credits(stream: Sequence[Record], rates: dict[str, int]) -> dict[str, int]:
    """By hand: Σ busy per (account, model), times the rate, rounded half-even once."""
    busy: dict[tuple[str, str], int] = defaultdict(int)
    for account, model, busy_us, _ in stream:
        busy[account, model] += busy_us
    credits: dict[str, int] = defaultdict(int)
    for (account, model), total_us in busy.items():
        exact = Decimal(total_us * rates[model]) / MICRO
        credits[account] += int(exact.quantize(Decimal(1), rounding="ROUND_HALF_EVEN"))
    return dict(credits)


def stored_credits(
    store: LedgerTestStore,
    stream: Sequence[Record],
    rates: dict[str, int],
    agents: int,
    assignment: Sequence[int],
    cuts: Sequence[int],
    resends: Sequence[bool],
) -> tuple[dict[str, int], dict[str, int]]:
    """Feeds ``stream`` through real ingest into an empty ``store``; returns credits per
    account from the ledger (opened accounts) and from the report (every account, ""
    included)."""
    verifier = Verifier(clock_us=_clock)
    chains = [AgentChain(f"agent-{n}") for n in range(agents)]
    for chain in chains:
        store.enroll_agent(chain.agent_id, chain.public_key_hex)
    for index, chain in enumerate(chains):
        mine = [r for r, a in zip(stream, assignment, strict=True) if a == index]
        _feed(store, verifier, chain, mine, cuts, resends)
    prices = PriceBook(busy_second_micro=dict(rates), default_busy_second_micro=0)
    ledger = Ledger(store, prices, _clock)
    ledger.define_plan("p", by="t", credits=Decimal(1))
    by_ledger = {}
    for account in ACCOUNTS[:-1]:
        ledger.open_account(account, "p", by="t", anchor_day=1, since_us=JUNE_1_US)
        by_ledger[account] = ledger.balance(account, START_US).charged_micro
    report = build_report(store, Period(), (Dimension.ACCOUNT,), prices)
    by_report = {
        ("" if row.keys[0] == "unattributed" else row.keys[0]): row.credits_micro
        for row in report.rows
    }
    return by_ledger, by_report


def _feed(
    store: LedgerTestStore,
    verifier: Verifier,
    chain: AgentChain,
    records: Sequence[Record],
    cuts: Sequence[int],
    resends: Sequence[bool],
) -> None:
    """Sends ``records`` in batches of sizes taken from ``cuts``; after a batch, a resend
    of everything so far (as an agent that lost its acks does) when ``resends`` says so."""
    key = chain.key.public_key()
    position = 0
    turn = 0
    while position < len(records):
        size = max(1, cuts[turn % len(cuts)])
        first_seq = len(chain.records) + 1
        for account, model, busy_us, hour in records[position : position + size]:
            chain.append(labelled(account, model, busy_us, START_US + hour * HOUR_US))
        store.ingest(
            chain.agent_id, verifier.verify(chain.batch(first_seq, len(chain.records)), key)
        )
        if resends[turn % len(resends)]:
            store.ingest(chain.agent_id, verifier.verify(chain.batch(1, len(chain.records)), key))
        position += size
        turn += 1


@settings(PER_EXAMPLE, max_examples=25)
@given(
    stream=st.lists(records_st, min_size=1, max_size=30),
    rates=rates_st,
    data=st.data(),
)
def test_credits_do_not_depend_on_order_batching_retries_or_duplicates(
    empty_store: EmptyStore, stream: list[Record], rates: dict[str, int], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(stream))
    agents = data.draw(st.integers(1, 3))
    assignment = data.draw(
        st.lists(st.integers(0, agents - 1), min_size=len(stream), max_size=len(stream))
    )
    cuts = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=5))
    resends = data.draw(st.lists(st.booleans(), min_size=1, max_size=5))

    expected = expected_credits(stream, rates)
    with empty_store() as store:
        by_ledger, by_report = stored_credits(
            store, shuffled, rates, agents, assignment, cuts, resends
        )
    for account in ACCOUNTS[:-1]:
        assert by_ledger[account] == expected.get(account, 0)
    assert by_report == {a: c for a, c in expected.items() if c or a in by_report}


@settings(PER_EXAMPLE, max_examples=15)
@given(
    first=st.lists(records_st, min_size=1, max_size=15),
    second=st.lists(records_st, min_size=1, max_size=15),
    rates=st.fixed_dictionaries(
        {model: st.sampled_from((0, 1_000_000, 2_000_000, 3_000_000)) for model in MODELS}
    ),
)
def test_credits_are_additive(
    empty_store: EmptyStore, first: list[Record], second: list[Record], rates: dict[str, int]
) -> None:
    """At whole-credit rates nothing is rounded: the credits of two streams together are the
    sum of their credits apart, account by account."""
    ones = [0] * 40

    def credits(stream: list[Record]) -> dict[str, int]:
        with empty_store() as store:
            return stored_credits(store, stream, rates, 1, ones[: len(stream)], [5], [False])[0]

    apart_a, apart_b, together = credits(first), credits(second), credits(first + second)
    for account in ACCOUNTS[:-1]:
        assert together[account] == apart_a[account] + apart_b[account]


# -- the price book: every path gives the same credits ---------------------------------------

API_MODELS = ("gpt-4o", "claude")
API_TOKEN = "property-token-0123456789"
Version = tuple[int, dict[str, int]]  # (hour offset from START_US, µcredits per model)
Charge = tuple[str, str, int, int]  # account, API model, count, hour offset

# Few hours, so that records, charges and price changes share hours often.
HOURS = 8
hour_records_st = st.tuples(
    st.sampled_from(ACCOUNTS),
    st.sampled_from(MODELS),
    st.integers(0, 12_000_000),
    st.integers(0, HOURS - 1),
)
versions_st = st.lists(
    st.tuples(
        st.integers(-1, HOURS - 1),
        st.fixed_dictionaries(
            {model: st.sampled_from(RATES_MICRO) for model in (*MODELS, *API_MODELS)}
        ),
    ),
    max_size=4,
    unique_by=lambda version: version[0],
)
charges_st = st.lists(
    st.tuples(
        st.sampled_from(ACCOUNTS[:-1]),
        st.sampled_from(API_MODELS),
        st.integers(1, 50),
        st.integers(0, HOURS - 1),
    ),
    max_size=8,
)


def _book(rates: dict[str, int]) -> PriceBook:
    return PriceBook(
        busy_second_micro={m: rates[m] for m in MODELS},
        request_micro={m: rates[m] for m in API_MODELS},
    )


def expected_by_version(
    stream: Sequence[Record], charges: Sequence[Charge], versions: Sequence[Version]
) -> dict[str, int]:
    """By hand: each record and charge priced by the version in force at its hour, busy µs
    rounded once per (account, model, version); the built-in prices before the first."""
    built_in = {m: MICRO for m in (*MODELS, *API_MODELS)}

    def version_at(hour: int) -> int | None:
        return max((start for start, _ in versions if start <= hour), default=None)

    rates = dict(versions)
    busy: dict[tuple[str, str, int | None], int] = defaultdict(int)
    for account, model, busy_us, hour in stream:
        busy[account, model, version_at(hour)] += busy_us
    credits: dict[str, int] = defaultdict(int)
    for (account, model, version), total_us in busy.items():
        rate = built_in[model] if version is None else rates[version][model]
        exact = Decimal(total_us * rate) / MICRO
        credits[account] += int(exact.quantize(Decimal(1), rounding="ROUND_HALF_EVEN"))
    for account, model, count, hour in charges:
        version = version_at(hour)
        credits[account] += count * (built_in if version is None else rates[version])[model]
    return {account: credits[account] for account in ("acme", "globex")}


def credits_by_path(store: LedgerTestStore) -> dict[str, dict[str, int]]:
    """Every account's June credits as each reader sees them: the ledger's balance, the
    report, the Query API over a real server, and the statement of the closed period."""
    accounts = ("acme", "globex")
    balance = {
        a: Ledger(store, clock_us=_clock).balance(a, START_US).charged_micro for a in accounts
    }
    schedule = PriceSchedule(store.price_versions())
    report = build_report(store, Period(JUNE_1_US, JULY_1_US), (Dimension.ACCOUNT,), schedule)
    by_report = {row.keys[0]: row.credits_micro for row in report.rows}
    ledger = Ledger(store, clock_us=_clock)  # a restart: a new ledger reads the book again
    server, port = create_server(
        "127.0.0.1:0",
        store,
        api_auth=ApiAccess.admins({"platform": API_TOKEN}),
        extra_handlers=ledger_handlers(ledger, store),
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            query: Any = query_pb2_grpc.QueryStub(channel)  # type: ignore[no-untyped-call]
            by_api = {
                a: query.GetBalance(
                    query_pb2.GetBalanceRequest(account=a, at_unix_us=START_US),
                    metadata=(("authorization", f"Bearer {API_TOKEN}"),),
                    timeout=10,
                ).charged_micro
                for a in accounts
            }
    finally:
        server.stop(grace_s=0)
    by_statement = {
        a: Ledger(store, clock_us=_clock).close_periods(a, JULY_1_US, by="t")[0].charged_micro
        for a in ("acme", "globex")
    }
    return {
        "balance": balance,
        "report": {a: by_report.get(a, 0) for a in ("acme", "globex")},
        "query api": by_api,
        "statement": by_statement,
    }


@settings(PER_EXAMPLE, max_examples=20)
@given(
    stream=st.lists(hour_records_st, max_size=20),
    charges=charges_st,
    versions=versions_st,
    data=st.data(),
)
def test_every_reader_gives_the_same_credits_under_any_order_of_price_loads(
    empty_store: EmptyStore,
    stream: list[Record],
    charges: list[Charge],
    versions: list[Version],
    data: st.DataObject,
) -> None:
    """Usage and charges, and price versions loaded in any order, each maybe twice (a
    retry), some before the usage arrives and some after: balance, report, Query API and
    statement all give the hand computation's credits."""
    retries = data.draw(st.lists(st.sampled_from(versions), max_size=2)) if versions else []
    loads = data.draw(st.permutations(versions + retries))
    split = data.draw(st.integers(0, len(loads)))
    expected = expected_by_version(stream, charges, versions)
    with empty_store() as store:
        ledger = Ledger(store, clock_us=_clock)
        ledger.define_plan("p", by="t", credits=Decimal(1))
        for account in ("acme", "globex"):
            ledger.open_account(account, "p", by="t", anchor_day=1, since_us=JUNE_1_US)
        for hour, rates in loads[:split]:
            ledger.set_prices(_book(rates), START_US + hour * HOUR_US, by="t", backdate=True)
        chain = AgentChain("agent-1")
        store.enroll_agent(chain.agent_id, chain.public_key_hex)
        _feed(store, Verifier(clock_us=_clock), chain, stream, [3], [True])
        for index, (account, model, count, hour) in enumerate(charges):
            time_us = START_US + hour * HOUR_US + 1
            ledger.record_charge(ApiCharge(f"req-{index}", account, model, count, time_us))
        for hour, rates in loads[split:]:
            ledger.set_prices(_book(rates), START_US + hour * HOUR_US, by="t", backdate=True)
        seen = credits_by_path(store)
    for path, credits in seen.items():
        assert credits == expected, path
