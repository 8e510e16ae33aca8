"""Credits per job, and what a job of each model typically costs (``report --per-job``,
``report --typical``).

A job is what a worker declared (``with creditmeter.job(...)``, or ``CREDITMETER_JOB``): its
records carry the job id. Its busy time is the sum of its records' (a job may span several
windows, GPUs and hosts), priced at its model's busy-second price once, as an aggregate, by
the same rounding rule as every other reader (prices.busy_credits_micro); a job that runs
across a price change is priced once per version, each record by the version in force at
its start. Records without a
job id are no job and are left out; held (quarantined) records count nowhere.

``typical`` gives per model the median and 90th percentile of its jobs' credits, nearest-
rank: the p-th percentile of n sorted values is the value at rank ceil(p/100 × n), so both
are credits some job really cost, never an interpolation between two.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

from creditmeter.collector.ledger import micro_text
from creditmeter.collector.ledger_store import UsageEvent
from creditmeter.collector.periods import iso_text
from creditmeter.collector.prices import PriceBook, PriceSchedule, as_schedule
from creditmeter.collector.report import csv_cell, seconds_text
from creditmeter.labels import MAX_LABEL_BYTES, printable


@dataclass(frozen=True, slots=True)
class JobCredits:
    account: str
    model: str
    job_id: str
    start_us: int  # the first record's window start
    end_us: int  # the last record's window end
    busy_us: int
    records: int
    credits_micro: int
    default_price: bool


@dataclass(frozen=True, slots=True)
class Typical:
    model: str
    jobs: int
    median_micro: int
    p90_micro: int
    default_price: bool


def job_credits(
    events: Iterable[UsageEvent], prices: PriceBook | PriceSchedule
) -> list[JobCredits]:
    """One row per (account, model, job id), ordered by start, then by those."""
    prices = as_schedule(prices)
    jobs: dict[tuple[str, str, str], _Job] = {}
    for e in events:
        if not e.job_id:
            continue
        key = (e.account, e.model, e.job_id)
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = _Job(e.start_us, e.end_us)
        job.add(e, *prices.version_at(e.start_us))
    rows = [
        JobCredits(
            account,
            model,
            job_id,
            job.start_us,
            job.end_us,
            job.busy_us,
            job.records,
            *job.credits(model),
        )
        for (account, model, job_id), job in jobs.items()
    ]
    return sorted(rows, key=lambda j: (j.start_us, j.account, j.model, j.job_id))


class _Job:
    """One job's records as they are summed: its span, and its busy µs per price version."""

    def __init__(self, start_us: int, end_us: int) -> None:
        self.start_us, self.end_us = start_us, end_us
        self.busy_us = self.records = 0
        self._busy_by_version: dict[int, tuple[PriceBook, int]] = {}

    def add(self, event: UsageEvent, effective_us: int, book: PriceBook) -> None:
        self.start_us = min(self.start_us, event.start_us)
        self.end_us = max(self.end_us, event.end_us)
        self.busy_us += event.busy_us
        self.records += 1
        busy_us = self._busy_by_version.get(effective_us, (book, 0))[1]
        self._busy_by_version[effective_us] = (book, busy_us + event.busy_us)

    def credits(self, model: str) -> tuple[int, bool]:
        """µcredits (each version's busy µs rounded once) and whether a default applied."""
        parts = self._busy_by_version.values()
        return (
            sum(book.busy_credits_micro(model, busy_us) for book, busy_us in parts),
            any(book.busy_second_price(model).default for book, _ in parts),
        )


def typical(jobs: Iterable[JobCredits]) -> list[Typical]:
    """Per model, ordered by model: median and p90 of its jobs' credits (nearest rank)."""
    by_model: dict[str, list[int]] = {}
    default: dict[str, bool] = {}
    for job in jobs:
        by_model.setdefault(job.model, []).append(job.credits_micro)
        default[job.model] = job.default_price
    out = []
    for model in sorted(by_model):
        credits = sorted(by_model[model])
        out.append(
            Typical(
                model,
                len(credits),
                nearest_rank(credits, 50),
                nearest_rank(credits, 90),
                default[model],
            )
        )
    return out


def nearest_rank(sorted_values: list[int], percentile: int) -> int:
    """The ``percentile``-th of ``sorted_values`` (not empty), by nearest rank."""
    rank = max(1, -(-percentile * len(sorted_values) // 100))  # ceil, in integers
    return sorted_values[rank - 1]


# -- rendering: table (labels escaped), csv (cells a spreadsheet shows as text), json --------

Cells = tuple[str, ...]


def job_rows(jobs: Iterable[JobCredits]) -> tuple[Cells, list[Cells], int]:
    """(header, rows, how many leading columns are labels) of ``report --per-job``."""
    header: Cells = ("account", "model", "job", "start", "busy_seconds", "credits", "records")
    rows: list[Cells] = [
        (
            j.account,
            j.model,
            j.job_id,
            iso_text(j.start_us),
            seconds_text(j.busy_us),
            micro_text(j.credits_micro) + ("*" if j.default_price else ""),
            str(j.records),
        )
        for j in jobs
    ]
    return header, rows, 3


def typical_rows(rows: Iterable[Typical]) -> tuple[Cells, list[Cells], int]:
    """(header, rows, label columns) of ``report --typical``."""
    header: Cells = ("model", "jobs", "median_credits", "p90_credits")
    cells: list[Cells] = [
        (
            t.model,
            str(t.jobs),
            micro_text(t.median_micro) + ("*" if t.default_price else ""),
            micro_text(t.p90_micro) + ("*" if t.default_price else ""),
        )
        for t in rows
    ]
    return header, cells, 1


def render(header: Cells, rows: list[Cells], labels: int, form: str) -> str:
    if form == "json":
        return json.dumps([dict(zip(header, r, strict=True)) for r in rows], indent=2) + "\n"
    if form == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            writer.writerow([csv_cell(c) if i < labels else c for i, c in enumerate(r)])
        return out.getvalue()
    shown = [
        tuple(printable(c, limit=MAX_LABEL_BYTES) if i < labels else c for i, c in enumerate(r))
        for r in rows
    ]
    title = tuple(h.upper() for h in header)
    widths = [max(len(r[i]) for r in (title, *shown)) for i in range(len(header))]
    lines = [
        "  ".join(
            r[i].ljust(widths[i]) if i < labels else r[i].rjust(widths[i])
            for i in range(len(header))
        ).rstrip()
        for r in (title, *shown)
    ]
    if not rows:
        lines.append("(no jobs in the period)")
    if any(c.endswith("*") for r in rows for c in r[labels:]):
        lines.append("* at the default price (the model is not in the price list)")
    return "\n".join(lines) + "\n"
