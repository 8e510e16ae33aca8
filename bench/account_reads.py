"""One account's usage events, read through its spans (collector/account_spans.py), against
the scan of every record they replaced: what a customer's job page, ``report --per-job
--account`` and each statement ``period close`` signs cost.

    python -m bench.account_reads [--quick]

Records are the ingest benchmark's (bench/records.py: 8 GPUs an agent, each serving one of
200 accounts at a time for about 100 s), verified and stored through the real Verifier and
SQLiteStore. Baseline: every record of the range decoded and filtered by account, as the
readers did before. Both must return the same events; the bench fails otherwise.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

from bench.common import Result, median, repeat, timed
from bench.records import ACCOUNTS, T0_US, WINDOW_US, Chain
from creditmeter import chain
from creditmeter.collector.ledger_store import UsageEvent
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier

AGENTS = 8
BATCH = 1000
FULL_RECORDS = 400_000
QUICK_RECORDS = 80_000


def run(quick: bool = False) -> tuple[list[Result], str]:
    """The ``./dev bench account_reads`` entry: (results, one-line detail)."""
    records = QUICK_RECORDS if quick else FULL_RECORDS
    with tempfile.TemporaryDirectory(prefix="cm-account-reads-") as tmp:
        return measure(Path(tmp) / "collector.db", records, repeats=3 if quick else 7)


def measure(path: Path, records: int, repeats: int) -> tuple[list[Result], str]:
    store = SQLiteStore(path)
    try:
        stored_s = timed(lambda: fill(store, records))
        windows = records // AGENTS // 8
        span = (T0_US, T0_US + (windows + 1) * WINDOW_US)
        accounts = ACCOUNTS[::40]  # five of the 200
        for account in accounts:
            if list(store.usage_events(*span, account)) != scanned(store, span, account):
                raise AssertionError(f"{account}: the spans' read differs from the scan")
        read_s = median(
            [timed(partial(read, store, span, a)) for a in accounts for _ in range(repeats)]
        )
        scan_s = median(repeat(lambda: timed(lambda: scanned(store, span, accounts[0])), 3))
        own = len(list(store.usage_events(*span, accounts[0])))
    finally:
        store.close()
    results = [
        Result(
            "account reads",
            f"one account's usage events of {records:,} records ({own:,} its own)",
            read_s * 1000,
            "ms",
            "every record decoded and filtered",
            scan_s * 1000,
        )
    ]
    detail = (
        f"{records:,} records of {AGENTS} agents stored in {stored_s:.1f} s; one account: "
        f"{read_s * 1000:.1f} ms through its spans, {scan_s * 1000:.0f} ms by the scan "
        f"({scan_s / read_s:.0f}×)"
    )
    return results, detail


def fill(store: SQLiteStore, records: int) -> None:
    verifier = Verifier(clock_us=lambda: T0_US + 400 * 86_400_000_000)
    agents = [Chain(f"agent-{n}") for n in range(AGENTS)]
    for agent in agents:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    public = {a.agent_id: chain.load_public_key_hex(a.public_key_hex) for a in agents}
    for _ in range(records // BATCH // AGENTS):
        for agent in agents:
            batch = agent.batch(BATCH)
            store.ingest(agent.agent_id, verifier.verify(batch, public[agent.agent_id]))


def read(store: SQLiteStore, span: tuple[int, int], account: str) -> int:
    return sum(1 for _ in store.usage_events(*span, account))


def scanned(store: SQLiteStore, span: tuple[int, int], account: str) -> list[UsageEvent]:
    return [e for e in store.usage_events(*span) if e.account == account]


if __name__ == "__main__":
    import sys

    start = time.monotonic()
    found, line = run("--quick" in sys.argv[1:])
    print(line)
    for r in found:
        print(r)
    print(f"({time.monotonic() - start:.0f} s)")
