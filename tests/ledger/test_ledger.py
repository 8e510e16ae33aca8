"""Balances: the seed's numbers, prices, lots, adjustments, closing and late usage."""

from __future__ import annotations

from decimal import Decimal

import pytest

from creditmeter.collector.errors import (
    InvalidRequest,
    KeyReused,
    LedgerError,
    PeriodClosed,
    UnknownAccount,
    UnknownPlan,
)
from creditmeter.collector.ledger import Ledger, credits_micro
from creditmeter.collector.ledger_store import (
    ApiCharge,
    EntryKind,
    LedgerEntry,
    LineKind,
    StatementLine,
)
from creditmeter.collector.periods import BillingPeriod

from .conftest import (
    AUGUST_1_US,
    DAY_US,
    HOUR_US,
    JULY_1_US,
    JUNE_1_US,
    NOW_US,
    Clock,
    Feeder,
    LedgerTestStore,
)

CREDIT = 1_000_000  # µcredits


def test_plans_in_hours_grant_3600_credits_an_hour(ledger: Ledger) -> None:
    assert ledger.define_plan("basic", by="ops", hours=Decimal(5)).grant_micro == 18_000 * CREDIT
    assert ledger.define_plan("pro", by="ops", hours=Decimal(10)).grant_micro == 36_000 * CREDIT
    assert ledger.define_plan("c", by="ops", credits=Decimal("12.5")).grant_micro == 12_500_000


def test_a_plan_never_changes(ledger: Ledger) -> None:
    ledger.define_plan("basic", by="ops", hours=Decimal(5))
    ledger.define_plan("basic", by="someone", credits=Decimal(18_000))  # the same grant: fine
    with pytest.raises(LedgerError, match="already defined"):
        ledger.define_plan("basic", by="ops", hours=Decimal(6))
    with pytest.raises(InvalidRequest, match="hours or in credits"):
        ledger.define_plan("both", by="ops", hours=Decimal(1), credits=Decimal(1))
    with pytest.raises(InvalidRequest, match="more than 6 decimal places"):
        ledger.define_plan("tiny", by="ops", credits=Decimal("0.0000001"))


def test_a_fresh_account_has_its_plan_grant(ledger: Ledger, acme: str) -> None:
    balance = ledger.balance(acme)
    assert balance.period == BillingPeriod(JUNE_1_US, JULY_1_US)
    assert (balance.plan, balance.plan_grant_micro, balance.used_micro) == (
        "pro",
        36_000 * CREDIT,
        0,
    )
    assert balance.remaining_micro == 36_000 * CREDIT


def test_an_sdxl_job_of_7_5_busy_seconds_costs_7_5_credits(
    ledger: Ledger, acme: str, feeder: Feeder
) -> None:
    feeder.send(1, model="sdxl", busy_us=7_500_000)
    balance = ledger.balance(acme)
    assert balance.lines == (StatementLine(LineKind.USAGE, "sdxl", 7_500_000, 7_500_000, False),)
    assert balance.remaining_micro == 36_000 * CREDIT - 7_500_000


def test_an_api_request_at_price_4_costs_4_credits(ledger: Ledger, acme: str) -> None:
    receipt = ledger.record_charge(ApiCharge("req-1", acme, "gpt-4o", 1, NOW_US - HOUR_US))
    assert (receipt.new, receipt.credits_micro, receipt.default_price) == (True, 4 * CREDIT, False)
    assert ledger.balance(acme).lines == (
        StatementLine(LineKind.API, "gpt-4o", 1, 4 * CREDIT, False),
    )


def test_an_idle_process_costs_nothing(ledger: Ledger, acme: str, feeder: Feeder) -> None:
    feeder.send(30, model="sdxl", busy_us=0)  # 5 minutes holding a context, no kernel ran
    balance = ledger.balance(acme)
    assert (balance.lines, balance.used_micro) == ((), 0)


def test_rates_apply_to_busy_seconds_and_unknown_models_pay_the_default(
    ledger: Ledger, acme: str, feeder: Feeder
) -> None:
    feeder.send(2, model="llama-3-70b", busy_us=1_000_001)  # 2.000002 s at 2.5
    feeder.send(1, model="mystery", busy_us=3_000_000)  # not in the price list: 1.0
    assert ledger.balance(acme).lines == (
        StatementLine(LineKind.USAGE, "llama-3-70b", 2_000_002, 5_000_005, False),
        StatementLine(LineKind.USAGE, "mystery", 3_000_000, 3_000_000, True),
    )


def test_usage_of_other_accounts_and_unattributed_usage_is_not_charged(
    ledger: Ledger, acme: str, feeder: Feeder
) -> None:
    feeder.send(1, account="")
    feeder.send(1, account="globex")
    assert ledger.balance(acme).used_micro == 0
    with pytest.raises(UnknownAccount):
        ledger.balance("globex")


def test_top_ups_and_grants_are_used_after_the_plan_grant_soonest_expiry_first(
    ledger: Ledger, acme: str, feeder: Feeder, clock: Clock
) -> None:
    ledger.define_plan("tiny", by="ops", credits=Decimal(10))
    ledger.change_plan(acme, "tiny", by="ops")  # from June on: 10 credits a month
    top_up = ledger.top_up(acme, 20 * CREDIT, by="ops", reason="bought", expires_us=None)
    ledger.grant(acme, 5 * CREDIT, by="ops", reason="promo", expires_us=JULY_1_US + DAY_US)
    feeder.send(4, busy_us=7_500_000)  # 30 credits: 10 plan, 5 grant, 15 top-up
    june = ledger.balance(acme)
    assert (june.plan_grant_micro, june.lot_credits_micro, june.used_micro) == (
        10 * CREDIT,
        25 * CREDIT,
        30 * CREDIT,
    )
    assert june.remaining_micro == 5 * CREDIT
    july = ledger.balance(acme, JULY_1_US)  # the grant was used up; the top-up kept 5
    assert (july.plan_grant_micro, july.lot_credits_micro, july.remaining_micro) == (
        10 * CREDIT,
        5 * CREDIT,
        15 * CREDIT,
    )
    assert top_up.kind is EntryKind.TOP_UP and top_up.created_by == "ops"


def test_overage_is_a_negative_remaining_and_is_not_carried(
    ledger: Ledger, acme: str, feeder: Feeder
) -> None:
    ledger.define_plan("tiny", by="ops", credits=Decimal(10))
    ledger.change_plan(acme, "tiny", by="ops")
    feeder.send(2, busy_us=7_500_000)
    assert ledger.balance(acme).remaining_micro == -5 * CREDIT
    assert ledger.balance(acme, JULY_1_US).remaining_micro == 10 * CREDIT


def test_a_refund_is_an_audited_adjustment(ledger: Ledger, acme: str, feeder: Feeder) -> None:
    feeder.send(2, busy_us=7_500_000)
    entry = ledger.adjust(acme, 7_500_000, by="alice", reason="job 42 failed")
    balance = ledger.balance(acme)
    assert (balance.charged_micro, balance.adjustments_micro, balance.used_micro) == (
        15 * CREDIT,
        7_500_000,
        7_500_000,
    )
    assert (entry.created_by, entry.reason, entry.created_at_us, entry.amount_micro) == (
        "alice",
        "job 42 failed",
        NOW_US,
        7_500_000,
    )
    with pytest.raises(InvalidRequest, match="needs a reason"):
        ledger.adjust(acme, CREDIT, by="alice", reason=" ")
    with pytest.raises(UnknownAccount):
        ledger.adjust("nobody", CREDIT, by="alice", reason="x")


def test_closing_freezes_a_period_and_late_usage_lands_in_the_next(
    ledger: Ledger, acme: str, feeder: Feeder, clock: Clock, prices_changed: Ledger
) -> None:
    feeder.send(2, busy_us=7_500_000)  # June: 15 credits
    clock.now_us = JULY_1_US + 2 * DAY_US
    assert ledger.close_periods(acme, JULY_1_US, by="ops")[0].charged_micro == 15 * CREDIT
    assert ledger.close_periods(acme, JULY_1_US, by="ops") == []  # closed once
    feeder.send(1, busy_us=3_000_000, start_us=JUNE_1_US + 10 * DAY_US)  # late for June
    feeder.send(1, busy_us=1_000_000, start_us=JULY_1_US + HOUR_US)  # July's own

    june = ledger.balance(acme, JUNE_1_US)
    assert june.closed and june.used_micro == 15 * CREDIT  # not changed silently
    july = ledger.balance(acme)
    assert july.lines == (
        StatementLine(LineKind.USAGE, "sdxl", 1_000_000, 1_000_000, False),
        StatementLine(LineKind.LATE_USAGE, "sdxl", 3_000_000, 3_000_000, False),
    )
    # A new price list reprices only open periods.
    assert prices_changed.balance(acme, JUNE_1_US).used_micro == 15 * CREDIT
    assert prices_changed.balance(acme).used_micro == 8 * CREDIT

    clock.now_us = AUGUST_1_US + DAY_US
    (statement,) = ledger.close_periods(acme, AUGUST_1_US, by="ops")
    assert statement.charged_micro == 4 * CREDIT
    feeder.send(1, busy_us=2_000_000, start_us=JUNE_1_US + 11 * DAY_US)  # late again
    august = ledger.balance(acme)
    assert august.lines == (
        StatementLine(LineKind.LATE_USAGE, "sdxl", 2_000_000, 2_000_000, False),
    )


@pytest.fixture
def prices_changed(store: LedgerTestStore, clock: Clock) -> Ledger:
    from creditmeter.collector.prices import parse_prices

    return Ledger(store, parse_prices({"self_hosted": {"sdxl": 2}}, "new prices"), clock)


def test_closed_periods_refuse_entries_and_plan_changes(
    ledger: Ledger, acme: str, clock: Clock
) -> None:
    ledger.define_plan("basic", by="ops", hours=Decimal(5))
    clock.now_us = JULY_1_US + 2 * DAY_US
    ledger.close_periods(acme, clock.now_us, by="ops")
    with pytest.raises(PeriodClosed, match="falls in a closed period"):
        ledger.change_plan(acme, "basic", by="ops", from_us=JUNE_1_US + DAY_US)
    ledger.change_plan(acme, "basic", by="ops")  # the open period: fine


def test_a_plan_change_made_again_changes_nothing(ledger: Ledger, acme: str) -> None:
    ledger.define_plan("basic", by="ops", hours=Decimal(5))
    first = ledger.change_plan(acme, "basic", by="ops")
    again = ledger.change_plan(acme, "basic", by="ops")  # a retry
    assert (first.unchanged, again.unchanged) == (False, True)
    assert ledger.change_plan(acme, "basic", by="ops", from_us=JUNE_1_US + DAY_US).unchanged
    assert ledger.balance(acme).plan == "basic"


def test_a_period_that_has_not_ended_is_not_closed(ledger: Ledger, acme: str) -> None:
    assert ledger.close_periods(acme, JULY_1_US + DAY_US, by="ops") == []  # it is June 16


def test_check_credits_before_starting_work(ledger: Ledger, acme: str, feeder: Feeder) -> None:
    feeder.send(1, busy_us=7_500_000)
    check = ledger.check_credits(acme, 35_992_500_000)
    assert (check.remaining_micro, check.sufficient) == (35_992_500_000, True)
    assert not ledger.check_credits(acme, 35_992_500_001).sufficient
    with pytest.raises(InvalidRequest):
        ledger.check_credits(acme, -1)


def test_accounts_periods_follow_the_anchor_day(ledger: Ledger) -> None:
    ledger.define_plan("basic", by="ops", hours=Decimal(5))
    account = ledger.open_account("initech", "basic", by="ops", anchor_day=15, since_us=NOW_US)
    assert account.first_period_start_us == JUNE_1_US + 14 * DAY_US
    assert ledger.balance("initech").period == BillingPeriod(
        JUNE_1_US + 14 * DAY_US, JULY_1_US + 14 * DAY_US
    )
    with pytest.raises(UnknownPlan):
        ledger.open_account("x", "nope", by="ops")
    with pytest.raises(LedgerError, match="already open"):
        ledger.open_account("initech", "basic", by="ops", anchor_day=1, since_us=NOW_US)
    with pytest.raises(InvalidRequest, match="no period before"):
        ledger.balance("initech", JUNE_1_US)


@pytest.mark.parametrize(
    ("text", "micro"), [("1", CREDIT), ("0.000001", 1), ("-2.5", -2_500_000), ("1e3", 10**9)]
)
def test_credit_amounts_are_exact(text: str, micro: int) -> None:
    assert credits_micro(text, "amount") == micro


@pytest.mark.parametrize("text", ["0.0000001", "abc", "NaN", "inf", "1e30"])
def test_inexact_or_absurd_amounts_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match="amount"):
        credits_micro(text, "amount")


def test_a_late_api_charge_lands_in_the_next_open_period(
    ledger: Ledger, acme: str, clock: Clock
) -> None:
    ledger.record_charge(ApiCharge("r-1", acme, "gpt-4o", 1, JUNE_1_US + DAY_US))
    clock.now_us = JULY_1_US + 2 * DAY_US
    ledger.close_periods(acme, JULY_1_US, by="ops")
    ledger.record_charge(ApiCharge("r-2", acme, "gpt-4o", 2, JUNE_1_US + 2 * DAY_US))
    assert ledger.balance(acme, JUNE_1_US).api_micro == 4 * CREDIT  # frozen
    assert ledger.balance(acme).lines == (
        StatementLine(LineKind.LATE_API, "gpt-4o", 2, 8 * CREDIT, False),
    )


@pytest.mark.parametrize("hours", [Decimal(-5), Decimal(0)])
def test_a_plan_must_grant_something(ledger: Ledger, hours: Decimal) -> None:
    with pytest.raises(InvalidRequest, match="grant must be more than 0 credits"):
        ledger.define_plan("neg", by="ops", hours=hours)


def test_a_charge_no_balance_would_show_is_refused(ledger: Ledger, acme: str) -> None:
    """Silent money: a charge for an account never opened, or dated before its first
    period, would be stored and reported but billed in no balance."""
    with pytest.raises(UnknownAccount, match="no account 'nobody' is open"):
        ledger.record_charge(ApiCharge("req-1", "nobody", "gpt-4o", 1, NOW_US - HOUR_US))
    with pytest.raises(InvalidRequest, match="before account 'acme' has periods"):
        ledger.record_charge(ApiCharge("req-2", acme, "gpt-4o", 1, JUNE_1_US - HOUR_US))
    assert ledger.balance(acme).lines == ()


@pytest.mark.parametrize("kind", ["top_up", "grant", "adjust"])
def test_a_retried_money_move_with_its_key_moves_nothing(
    ledger: Ledger, acme: str, store: LedgerTestStore, clock: Clock, kind: str
) -> None:
    def move(amount_micro: int, reason: str = "PO 1234") -> LedgerEntry:
        if kind == "adjust":
            return ledger.adjust(acme, amount_micro, by="ops", reason=reason, key="po-1234")
        add = ledger.top_up if kind == "top_up" else ledger.grant
        return add(acme, amount_micro, by="ops", reason=reason, expires_us=None, key="po-1234")

    first = move(5_000 * CREDIT)
    before = ledger.balance(acme).remaining_micro
    clock.now_us += HOUR_US  # a retry an hour later, after a crash or a lost answer
    again = move(5_000 * CREDIT)
    assert (again.repeated, again.entry_id, again.created_at_us) == (
        True,
        first.entry_id,
        first.created_at_us,
    )
    assert ledger.balance(acme).remaining_micro == before
    assert len(store.entries(acme)) == 1
    for other in (lambda: move(6_000 * CREDIT), lambda: move(5_000 * CREDIT, reason="PO 99")):
        with pytest.raises(KeyReused, match="idempotency key 'po-1234' already made entry #"):
            other()
    assert store.entries(acme) == [first]  # the stored one is kept, unchanged
    with pytest.raises(InvalidRequest, match="idempotency key"):
        ledger.top_up(acme, CREDIT, by="ops", reason="x", expires_us=None, key="bad\x00key")


def test_a_key_names_one_change_across_accounts(ledger: Ledger, acme: str) -> None:
    ledger.open_account("globex", "pro", by="ops", anchor_day=1, since_us=JUNE_1_US)
    ledger.top_up(acme, CREDIT, by="ops", reason="x", expires_us=None, key="k-1")
    with pytest.raises(KeyReused):
        ledger.top_up("globex", CREDIT, by="ops", reason="x", expires_us=None, key="k-1")
