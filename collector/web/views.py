"""What the web API answers and the pages show, as JSON values, from the same code the CLI
prints from: ``ledger.balance_document``, ``report.report_document``, ``jobs_report``,
``reconcile``. Nothing here computes a credit of its own: a number on a page is the number
``creditmeter-collector balance`` or ``report`` prints for the same account and period.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from creditmeter.collector.jobs_report import JobCredits, job_credits, typical
from creditmeter.collector.ledger import Balance, Ledger, balance_document, micro_text
from creditmeter.collector.ledger_store import Dimension, LedgerSnapshot, LedgerStore
from creditmeter.collector.periods import iso_text
from creditmeter.collector.reconcile import reconcile, reconcile_json
from creditmeter.collector.report import (
    Period,
    build_report,
    parse_time_us,
    report_document,
    seconds_text,
)
from creditmeter.collector.store import Store

DAY_US = 86_400_000_000


class WebStore(Store, LedgerStore, Protocol):
    """Both stores are both (the web reads records, rollups and the ledger)."""


@dataclass(frozen=True)
class BurnDown:
    """Credits used in the current period, day by day, against the plan's grant."""

    period_start_us: int
    period_end_us: int
    granted_micro: int  # plan grant + top-ups and grants usable in the period
    used_by_day_micro: list[tuple[str, int]]  # (day, credits used that day)
    used_micro: int  # so far (the balance's)
    projected_micro: int  # at the period's end, at the rate so far

    @property
    def curve(self) -> list[tuple[float, int]]:
        """(fraction of the period passed at each usage day's end, µcredits used by then)."""
        length_us = self.period_end_us - self.period_start_us
        out = []
        for day, total in self.cumulative:
            end_us = parse_time_us("day", day) + DAY_US
            out.append(((end_us - self.period_start_us) / length_us, total))
        return out

    @property
    def cumulative(self) -> list[tuple[str, int]]:
        total, out = 0, []
        for day, micro in self.used_by_day_micro:
            total += micro
            out.append((day, total))
        return out


def balance(ledger: Ledger, account: str) -> dict[str, object]:
    return balance_document(ledger.balance(account))


def usage(
    store: WebStore, ledger: Ledger, account: str, period: Period, group_by: Sequence[Dimension]
) -> dict[str, object]:
    report = build_report(store, period, group_by, ledger.prices, account)
    return report_document(report)


def burn_down(store: WebStore, ledger: Ledger, account: str, now_us: int) -> BurnDown:
    now: Balance = ledger.balance(account)
    period = Period(now.period.start_us, now.period.end_us)
    report = build_report(store, period, (Dimension.DAY,), ledger.prices, account)
    by_day = [(row.keys[0], row.credits_micro) for row in report.rows]
    elapsed_us = max(1, min(now_us, now.period.end_us) - now.period.start_us)
    length_us = now.period.end_us - now.period.start_us
    projected = now.used_micro * length_us // elapsed_us
    return BurnDown(
        now.period.start_us,
        now.period.end_us,
        now.granted_micro,
        by_day,
        now.used_micro,
        projected,
    )


def jobs(store: WebStore, ledger: Ledger, account: str, period: Period) -> list[JobCredits]:
    return job_credits(store.usage_events(period.from_us, period.to_us, account), ledger.prices)


def jobs_document(rows: Sequence[JobCredits]) -> list[dict[str, object]]:
    return [
        {
            "job": j.job_id,
            "model": j.model,
            "start": iso_text(j.start_us),
            "end": iso_text(j.end_us),
            "busy_seconds": seconds_text(j.busy_us),
            "credits": micro_text(j.credits_micro),
            "records": j.records,
            "default_price": j.default_price,
        }
        for j in rows
    ]


def typical_document(rows: Sequence[JobCredits]) -> list[dict[str, object]]:
    return [
        {
            "model": t.model,
            "jobs": t.jobs,
            "median_credits": micro_text(t.median_micro),
            "p90_credits": micro_text(t.p90_micro),
            "default_price": t.default_price,
        }
        for t in typical(rows)
    ]


def statements(store: WebStore, account: str) -> list[dict[str, object]]:
    signed = {s.start_us for s in store.signed_statements(account)}
    return [
        {
            "period_start": iso_text(s.start_us),
            "period_end": iso_text(s.end_us),
            "plan": s.plan,
            "credits": micro_text(s.charged_micro),
            "closed": iso_text(s.closed_at_us),
            "verifiable": s.start_us in signed,
        }
        for s in store.statements(account)
    ]


def accounts(
    ledger: Ledger, store: WebStore, offset: int = 0, limit: int | None = None
) -> list[dict[str, object]]:
    """Accounts by name with their balances now: ``limit`` of them from ``offset`` (a
    balance is computed per account, the CLI's ``balance``: pages show a page at a time)."""
    out: list[dict[str, object]] = []
    names = sorted(store.accounts(), key=lambda a: a.name)
    for account in names[offset : None if limit is None else offset + limit]:
        now = ledger.balance(account.name)
        out.append(
            {
                "account": account.name,
                "plan": now.plan,
                "granted": micro_text(now.granted_micro),
                "used": micro_text(now.used_micro),
                "remaining": micro_text(now.remaining_micro),
            }
        )
    return out


def reconciliation(store: WebStore, period: Period) -> list[dict[str, object]]:
    with store.snapshot() as snapshot:
        assert isinstance(snapshot, LedgerSnapshot)  # both stores' snapshots are
        bounds = (period.from_us, period.to_us)
        rows = reconcile(snapshot.device_totals(*bounds), snapshot.gpu_rollups(*bounds), period)
    return reconcile_json(rows)


def agents(store: WebStore, now_us: int) -> list[dict[str, object]]:
    """Per agent: its head, when its last batch arrived, how far that batch lagged behind
    the newest record it carried, and its records held in quarantine. The backlog still in
    an agent's outbox is the agent's to tell (creditmeter_agent_outbox_records)."""
    held: dict[str, int] = {}
    for entry in store.quarantined():
        held[entry.agent_id] = held.get(entry.agent_id, 0) + 1
    out = []
    for status in store.agent_status():
        lag_us = (
            None
            if status.last_received_us is None or status.head_start_us is None
            else status.last_received_us - status.head_start_us
        )
        out.append(
            {
                "agent": status.agent_id,
                "revoked": status.revoked,
                "head_seq": status.head_seq,
                "last_seen": None
                if status.last_received_us is None
                else iso_text(status.last_received_us),
                "seconds_since_seen": None
                if status.last_received_us is None
                else seconds_text(max(0, now_us - status.last_received_us)),
                "delivery_lag_seconds": None if lag_us is None else seconds_text(max(0, lag_us)),
                "quarantined": held.get(status.agent_id, 0),
            }
        )
    return out
