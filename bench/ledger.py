"""Ledger reads at scale: one account's balance and the month's report, over a month of
usage records from 1,000 GPUs (10 million records by default), on SQLite.

    python -m bench.ledger [--records 10000000] [--keep PATH]

The records go in by one INSERT … SELECT over a recursive counter inside SQLite (not through
gRPC or the verifier: that is the ingest benchmark's business), with realistic row sizes;
the rollups are then built from them by the same GROUP BY the migrations backfill with.
The store is then opened as the collector opens it and read through the real Ledger and
report code. Baseline: a full scan of the records table (SUM of busy_us), what the reads
would cost without rollups.

Bars (issue 4): balance < 50 ms, report by account and model < 5 s.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from bench.common import Result, median, repeat, timed
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import Dimension
from creditmeter.collector.prices import PriceBook
from creditmeter.collector.report import Period, build_report
from creditmeter.collector.sqlite_store import (
    DAY_OF_HOUR_SQL,
    DAY_SUMS_SQL,
    MONTH_OF_HOUR_SQL,
    SQLiteStore,
)

MONTH_START_US = 1_780_272_000_000_000  # 2026-06-01T00:00:00Z
MONTH_US = 30 * 86_400_000_000
DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000
GPUS = 1000
GPUS_PER_HOST = 8
ACCOUNTS = 200
MODELS = ("sdxl", "flux-dev", "flux-schnell", "esrgan-4x", "llama-3-70b", "whisper-large")
RECORD_BYTES = 200  # a typical serialized UsageRecord
FULL_RECORDS = 10_000_000
QUICK_RECORDS = 1_000_000


def run(quick: bool = False, records: int | None = None) -> tuple[list[Result], str]:
    """The ``./dev bench ledger`` entry: (results, one-line detail)."""
    count = records or (QUICK_RECORDS if quick else FULL_RECORDS)
    with tempfile.TemporaryDirectory(prefix="cm-ledger-") as tmp:
        return measure(Path(tmp) / "collector.db", count)


def measure(path: Path, count: int) -> tuple[list[Result], str]:
    generated_s = timed(lambda: generate(path, count))
    now_us = [MONTH_START_US + MONTH_US // 2]  # mid-month for the balance; later, after it
    store = SQLiteStore(path, migrate=False, clock_us=lambda: now_us[0])
    try:
        ledger = Ledger(store, PriceBook(busy_second_micro={"llama-3-70b": 2_500_000}))
        ledger.define_plan("pro", by="bench", hours=Decimal(10))
        for n in range(ACCOUNTS):
            ledger.open_account(
                _account(n), "pro", by="bench", anchor_day=1, since_us=MONTH_START_US
            )
        month = Period(MONTH_START_US, MONTH_START_US + MONTH_US)
        scan_s = median(repeat(lambda: timed(lambda: _full_scan(path)), 3))
        balance_s = median(repeat(lambda: timed(lambda: ledger.balance(_account(7))), 21))
        by_account_s = median(
            repeat(lambda: timed(lambda: build_report(store, month, prices=ledger.prices)), 5)
        )
        by_host_s = median(
            repeat(
                lambda: timed(lambda: build_report(store, month, (Dimension.HOST,), ledger.prices)),
                3,
            )
        )
        by_gpu_s = median(
            repeat(
                lambda: timed(lambda: build_report(store, month, (Dimension.GPU,), ledger.prices)),
                3,
            )
        )
        by_account_host_s = median(
            repeat(
                lambda: timed(
                    lambda: build_report(
                        store, month, (Dimension.ACCOUNT, Dimension.HOST), ledger.prices
                    )
                ),
                3,
            )
        )
        by_account_gpu_s = median(
            repeat(
                lambda: timed(
                    lambda: build_report(
                        store, month, (Dimension.ACCOUNT, Dimension.GPU), ledger.prices
                    )
                ),
                3,
            )
        )
        # Windows that are no calendar month, read with the month over: 29 days (the month
        # less its first and last 12 hours), 15 days in the middle (all hours, before the
        # day columns), and the worst case now: the month less its first and last hour, so
        # that 2 × 23 hours at its edges are read as hours beside its days.
        now_us[0] = MONTH_START_US + MONTH_US + DAY_US
        by_account_host = (Dimension.ACCOUNT, Dimension.HOST)
        unaligned = Period(MONTH_START_US + DAY_US // 2, MONTH_START_US + MONTH_US - DAY_US // 2)
        unaligned_s = median(
            repeat(
                lambda: timed(
                    lambda: build_report(store, unaligned, by_account_host, ledger.prices)
                ),
                3,
            )
        )
        middle = Period(MONTH_START_US + 7 * DAY_US, MONTH_START_US + 22 * DAY_US)
        middle_s = median(
            repeat(
                lambda: timed(lambda: build_report(store, middle, by_account_host, ledger.prices)),
                3,
            )
        )
        edges = Period(MONTH_START_US + HOUR_US, MONTH_START_US + MONTH_US - HOUR_US)
        edges_s = median(
            repeat(
                lambda: timed(lambda: build_report(store, edges, by_account_host, ledger.prices)),
                3,
            )
        )
        report = build_report(store, month, prices=ledger.prices)
    finally:
        store.close()
    baseline = "full scan of records"
    results = [
        Result(
            "ledger SQLite",
            f"one account's balance, {count:,} records",
            balance_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< 50 ms",
            balance_s < 0.050,
        ),
        Result(
            "ledger SQLite",
            f"month report by account and model, {count:,} records",
            by_account_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< 5 s",
            by_account_s < 5.0,
        ),
        Result(
            "ledger SQLite",
            f"month report by host, {count:,} records",
            by_host_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< full scan",
            by_host_s < scan_s,
        ),
        Result(
            "ledger SQLite",
            f"month report by GPU, {count:,} records",
            by_gpu_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< full scan",
            by_gpu_s < scan_s,
        ),
        Result(
            "ledger SQLite",
            f"month report by account and host, {count:,} records",
            by_account_host_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< full scan",
            by_account_host_s < scan_s,
        ),
        Result(
            "ledger SQLite",
            f"month report by account and GPU, {count:,} records",
            by_account_gpu_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< full scan",
            by_account_gpu_s < scan_s,
        ),
        Result(
            "ledger SQLite",
            f"29 days (no calendar month) by account and host, {count:,} records",
            unaligned_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< full scan",
            unaligned_s < scan_s,
        ),
        Result(
            "ledger SQLite",
            f"15 days mid-month by account and host, {count:,} records",
            middle_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< full scan",
            middle_s < scan_s,
        ),
        Result(
            "ledger SQLite",
            f"a month less its first and last hour, by account and host, {count:,} records",
            edges_s * 1000,
            "ms",
            baseline,
            scan_s * 1000,
            "< full scan",
            edges_s < scan_s,
        ),
    ]
    detail = (
        f"{count:,} records generated in {generated_s:.0f} s; balance {balance_s * 1000:.1f} ms, "
        f"report by account,model {by_account_s * 1000:.0f} ms ({len(report.rows)} rows), "
        f"by host {by_host_s * 1000:.0f} ms, by GPU {by_gpu_s * 1000:.0f} ms, by account and "
        f"host {by_account_host_s * 1000:.0f} ms, by account and GPU "
        f"{by_account_gpu_s * 1000:.0f} ms, 29 days by account and host "
        f"{unaligned_s * 1000:.0f} ms, 15 days mid-month {middle_s * 1000:.0f} ms, month less an "
        f"hour each end {edges_s * 1000:.0f} ms; full scan "
        f"{scan_s * 1000:.0f} ms "
        f"(balance {balance_s / scan_s:.4f}×, report {by_account_s / scan_s:.3f}× of it)"
    )
    return results, detail


def generate(path: Path, count: int) -> None:
    """``count`` records spread evenly over the month on GPUS GPUs, and their rollups."""
    SQLiteStore(path).close()  # the schema, as the collector makes it
    per_gpu = max(1, count // GPUS)
    step_us = MONTH_US // per_gpu
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Generation only: durability does not matter, speed does.
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1000000")  # KiB: 1 GiB for the GROUP BYs
        conn.execute("BEGIN")
        model_case = " ".join(f"WHEN {i} THEN '{m}'" for i, m in enumerate(MODELS))
        # i = k·GPUS + gpu: the k-th window of each GPU, in time order. Each GPU serves one
        # model, to one customer for 4 windows (~17 min at 10 M records) then the next;
        # 1 GPU in 97 runs unattributed work.
        # The fields live in a scratch table the rollups are summed from; the records
        # table gets what the collector stores (record bytes stand in as zeroes).
        conn.execute(
            f"""
            CREATE TEMP TABLE fields AS
            WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?)
            SELECT 'agent-' || (gpu / {GPUS_PER_HOST}) AS agent_id,
                   k * {GPUS_PER_HOST} + gpu % {GPUS_PER_HOST} + 1 AS seq,
                   {MONTH_START_US} + k * {step_us} + gpu AS start_us,
                   'host-' || (gpu / {GPUS_PER_HOST}) AS host, 'GPU-' || gpu AS gpu_uuid,
                   CASE WHEN gpu % 97 = 0 THEN ''
                        ELSE 'account-' || printf('%03d', (k / 4 * 7 + gpu * 13) % {ACCOUNTS})
                   END AS account,
                   CASE gpu % {len(MODELS)} {model_case} END AS model,
                   (i * 2654435761) % {step_us} AS busy_us, {step_us} AS wall_us
            FROM (SELECT i, i / {GPUS} AS k, i % {GPUS} AS gpu FROM n)
            """,
            (per_gpu * GPUS,),
        )
        conn.execute(
            f"""INSERT INTO records (agent_id, seq, start_us, record)
                SELECT agent_id, seq, start_us, zeroblob({RECORD_BYTES}) FROM fields
                ORDER BY agent_id, seq"""
        )
        conn.execute(
            """INSERT INTO rollups_hourly
                SELECT start_us - start_us % 3600000000, account, model,
                       SUM(busy_us), SUM(wall_us), COUNT(*)
                FROM fields GROUP BY 1, 2, 3"""
        )
        conn.execute(
            """INSERT INTO rollups_device_hourly
                SELECT start_us - start_us % 3600000000, host, gpu_uuid, account, model,
                       SUM(busy_us), SUM(wall_us), COUNT(*)
                FROM fields GROUP BY 1, 2, 3, 4, 5"""
        )
        conn.execute(
            """INSERT INTO rollups_gpu_usage_hourly
                SELECT start_us - start_us % 3600000000, host, gpu_uuid, model,
                       SUM(busy_us), SUM(wall_us), COUNT(*)
                FROM fields GROUP BY 1, 2, 3, 4"""
        )
        conn.execute(
            f"""INSERT INTO rollups_device_monthly
                SELECT {MONTH_OF_HOUR_SQL}, host, gpu_uuid, account, model, SUM(busy_us),
                       SUM(wall_us), SUM(record_count), {DAY_SUMS_SQL}
                FROM (SELECT *, {DAY_OF_HOUR_SQL} AS day FROM rollups_device_hourly)
                GROUP BY 1, 2, 3, 4, 5"""
        )
        conn.execute(
            """INSERT INTO agents (agent_id, public_key_hex, enrolled_at_us, head_seq)
                SELECT agent_id, '', 0, MAX(seq) FROM records GROUP BY agent_id"""
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _full_scan(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("SELECT COUNT(*), SUM(length(record)) FROM records").fetchone()
    finally:
        conn.close()


def _account(n: int) -> str:
    return f"account-{n:03d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--records", type=int, default=FULL_RECORDS)
    parser.add_argument("--keep", type=Path, help="build the database here and keep it")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.keep is not None:
        args.keep.unlink(missing_ok=True)
        results, detail = measure(args.keep, args.records)
    else:
        results, detail = run(records=args.records)
    for result in results:
        ratio = f" ({result.ratio:.4f}× {result.baseline})" if result.ratio is not None else ""
        bar = "" if result.ok is None else (" ok" if result.ok else " MISSED " + result.target)
        print(f"{result.metric}: {result.value:.1f} {result.unit}{ratio}{bar}")
    print(detail)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
