"""The price book (issue 14, item 1): versions in the store, each in force from a whole hour;
every reader prices usage and requests by the version in force at their time; a change
splits usage exactly at its hour; loads are idempotent by content, audited, and never
reach into a closed period. On both stores."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import cast

import pytest

from creditmeter.collector.errors import InvalidRequest, PeriodClosed, PriceConflict
from creditmeter.collector.export import cloudevents
from creditmeter.collector.jobs_report import job_credits
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import ApiCharge, LineKind, SignedStatement, Statement
from creditmeter.collector.prices import (
    BUILT_IN,
    PriceBook,
    PriceSchedule,
    PriceVersion,
    content_digest,
)
from creditmeter.collector.report import Period, build_report

from .conftest import DAY_US, HOUR_US, JULY_1_US, JUNE_1_US, NOW_US, Clock, Feeder, LedgerTestStore

CREDIT = 1_000_000
JUNE_10_US = JUNE_1_US + 9 * DAY_US
CHANGE_US = JUNE_10_US + 12 * HOUR_US  # sdxl goes from 1 to 3 credits a busy second
V1 = PriceBook(busy_second_micro={"sdxl": 1 * CREDIT}, request_micro={"gpt-4o": 4 * CREDIT})
V2 = PriceBook(busy_second_micro={"sdxl": 3 * CREDIT}, request_micro={"gpt-4o": 5 * CREDIT})


@pytest.fixture
def book(store: LedgerTestStore, clock: Clock) -> Ledger:
    """A ledger pricing from the store's book (as every command and the daemon do), with
    acme open since June on a 10-hour plan, V1 since June and V2 from CHANGE_US on."""
    ledger = Ledger(store, clock_us=clock)
    ledger.define_plan("pro", by="ops", hours=Decimal(10))
    ledger.open_account("acme", "pro", by="ops", anchor_day=1, since_us=JUNE_1_US)
    ledger.set_prices(V1, JUNE_1_US, by="ops", backdate=True)
    ledger.set_prices(V2, CHANGE_US, by="ops", backdate=True)
    return ledger


def test_a_schedule_prices_each_moment_by_the_version_in_force() -> None:
    schedule = PriceSchedule(
        [PriceVersion(CHANGE_US, V2, 0, "b"), PriceVersion(JUNE_1_US, V1, 0, "a")]
    )
    assert schedule.at(JUNE_1_US - 1) is BUILT_IN
    assert schedule.at(JUNE_1_US) is V1 and schedule.at(CHANGE_US - 1) is V1
    assert schedule.at(CHANGE_US) is V2
    spans = schedule.spans(JUNE_10_US, JULY_1_US)
    assert [(s.from_us, s.to_us, s.effective_us) for s in spans] == [
        (JUNE_10_US, CHANGE_US, JUNE_1_US),
        (CHANGE_US, JULY_1_US, CHANGE_US),
    ]
    assert [s.book for s in schedule.spans(None, None)] == [BUILT_IN, V1, V2]


def test_usage_straddling_a_change_is_split_at_its_hour_in_every_reader(
    book: Ledger, feeder: Feeder, store: LedgerTestStore
) -> None:
    feeder.send(2, start_us=CHANGE_US - 20_000_000, busy_us=4_000_000)  # last 20 s before
    feeder.send(1, start_us=CHANGE_US, busy_us=2_000_000)  # the first window after
    feeder.send(1, start_us=CHANGE_US - 5_000_000, busy_us=1_000_000)  # starts before: V1
    balance = book.balance("acme", JUNE_10_US)
    usage = [(ln.model, ln.quantity, ln.credits_micro, ln.price_from_us) for ln in balance.lines]
    assert usage == [
        ("sdxl", 9_000_000, 9 * CREDIT, JUNE_1_US),
        ("sdxl", 2_000_000, 6 * CREDIT, CHANGE_US),
    ]
    report = build_report(store, Period(JUNE_1_US, JULY_1_US), prices=book.prices)
    assert [(row.keys, row.credits_micro) for row in report.rows] == [
        (("acme", "sdxl"), 15 * CREDIT)
    ]
    events = list(cloudevents(store, book.prices, None, None))
    assert [e["data"]["credits"] for e in events] == ["4", "4", "6", "1"]  # type: ignore[index]
    (job,) = job_credits(store.usage_events(None, None), book.prices)
    assert job.credits_micro == 15 * CREDIT


def test_a_charge_is_priced_and_answered_at_its_time(book: Ledger) -> None:
    before = book.record_charge(ApiCharge("r-1", "acme", "gpt-4o", 2, CHANGE_US - 1))
    after = book.record_charge(ApiCharge("r-2", "acme", "gpt-4o", 2, CHANGE_US))
    assert (before.credits_micro, after.credits_micro) == (8 * CREDIT, 10 * CREDIT)
    assert book.balance("acme", JUNE_10_US).api_micro == 18 * CREDIT


def test_loads_are_idempotent_by_content_and_audited(book: Ledger, store: LedgerTestStore) -> None:
    again = book.set_prices(V2, CHANGE_US, by="someone-else", backdate=True)
    assert again.unchanged and again.version.loaded_by == "ops"
    with pytest.raises(PriceConflict, match=r"loaded by ops at .* with other prices"):
        book.set_prices(V1, CHANGE_US, by="ops", backdate=True)
    versions = store.price_versions()
    assert [(v.effective_us, v.digest, v.loaded_by, v.loaded_at_us) for v in versions] == [
        (JUNE_1_US, content_digest(V1), "ops", NOW_US),
        (CHANGE_US, content_digest(V2), "ops", NOW_US),
    ]
    later = book.set_prices(V1, NOW_US - NOW_US % HOUR_US + HOUR_US, by="ops")
    assert later.changes == ["sdxl: 3 -> 1 credits/busy s", "gpt-4o: 5 -> 4 credits/request"]


@pytest.mark.parametrize(
    ("effective_us", "problem"),
    [
        (CHANGE_US + 1, "on a whole UTC hour"),
        (NOW_US - NOW_US % HOUR_US - HOUR_US, "before the current hour"),
        (-HOUR_US, "on a whole UTC hour"),
    ],
)
def test_refused_effective_times(book: Ledger, effective_us: int, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        book.set_prices(V1, effective_us, by="ops")


def test_closed_periods_stay_frozen_and_late_usage_takes_its_own_version(
    book: Ledger, feeder: Feeder, clock: Clock, store: LedgerTestStore
) -> None:
    feeder.send(1, start_us=JUNE_10_US, busy_us=2_000_000)
    clock.now_us = JULY_1_US + 3 * DAY_US
    (closed,) = book.close_periods("acme", JULY_1_US, by="ops")
    assert closed.charged_micro == 2 * CREDIT
    with pytest.raises(PeriodClosed, match="would reprice closed periods"):
        book.set_prices(V1, CHANGE_US + HOUR_US, by="ops", backdate=True)
    seven = PriceBook(busy_second_micro={"sdxl": 7 * CREDIT})
    book.set_prices(seven, JULY_1_US, by="ops", backdate=True)
    # Late records of June, before and after June's change, arrive after the close.
    feeder.send(1, start_us=JUNE_10_US + HOUR_US, busy_us=1_000_000)
    feeder.send(1, start_us=CHANGE_US + HOUR_US, busy_us=1_000_000)
    assert store.statements("acme") == [closed]
    late = [
        (ln.quantity, ln.credits_micro, ln.price_from_us)
        for ln in book.balance("acme", JULY_1_US).lines
        if ln.kind is LineKind.LATE_USAGE
    ]
    assert late == [(1_000_000, 1 * CREDIT, JUNE_1_US), (1_000_000, 3 * CREDIT, CHANGE_US)]


class _PricesLoadedDuringClose:
    """The store as a close sees it while an operator backdates prices into the period at
    the same moment: the load commits just before the close's transaction."""

    def __init__(self, store: LedgerTestStore, load: Callable[[], object]) -> None:
        self._store = store
        self._load: Callable[[], object] | None = load

    def close_period(self, statement: Statement, signed: SignedStatement | None = None) -> None:
        if self._load is not None:
            self._load()
            self._load = None
        self._store.close_period(statement, signed)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_prices_loaded_while_a_period_closes_reprice_it_instead_of_being_missed(
    book: Ledger, feeder: Feeder, clock: Clock, store: LedgerTestStore
) -> None:
    feeder.send(1, start_us=JUNE_10_US + 14 * HOUR_US, busy_us=2_000_000)  # priced by V2
    clock.now_us = JULY_1_US + 3 * DAY_US
    five = PriceBook(busy_second_micro={"sdxl": 5 * CREDIT})
    operator = Ledger(store, clock_us=clock)
    racing = _PricesLoadedDuringClose(
        store, lambda: operator.set_prices(five, CHANGE_US + HOUR_US, by="ops", backdate=True)
    )
    closing = Ledger(cast(LedgerTestStore, racing), clock_us=clock)
    (closed,) = closing.close_periods("acme", JULY_1_US, by="ops")
    assert [(ln.credits_micro, ln.price_from_us) for ln in closed.lines] == [
        (10 * CREDIT, CHANGE_US + HOUR_US)
    ]
    assert store.statements("acme")[0].lines == closed.lines
