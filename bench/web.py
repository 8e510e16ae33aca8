"""Page and API render times of ``creditmeter-collector web`` over the ledger benchmark's
store (a month of 10 million records from 1,000 GPUs, 200 accounts), through real HTTP to
uvicorn, against a full scan of the records table measured in the same run.

    python -m bench.web [--records 10000000]

Measured: each page a tenant or billing staff opens, and the API's balance and usage, each
requested 40 times (after 3 unmeasured), median and 95th percentile. The jobs pages sum the
records themselves (there is no per-job rollup) and the stand-in record bytes of this store
do not parse, so they are not measured here (docs: what they cost).

Bar (issue 16): p95 page render < 300 ms.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import cast

import uvicorn

from bench.common import Result, median, repeat, timed
from bench.ledger import ACCOUNTS, FULL_RECORDS, QUICK_RECORDS, _account, _full_scan, generate
from creditmeter.collector.access import load_access
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.web.app import WebApp
from creditmeter.collector.web.serve import Server, listen
from creditmeter.collector.web.views import WebStore

TENANT = "tenant-token-0123456789"
STAFF = "staff-token-0123456789"
ROUNDS = 40
WARMUP = 3


def run(quick: bool = False, records: int | None = None) -> tuple[list[Result], str]:
    count = records or (QUICK_RECORDS if quick else FULL_RECORDS)
    with tempfile.TemporaryDirectory(prefix="cm-web-") as tmp:
        return measure(Path(tmp), count)


def measure(work: Path, count: int) -> tuple[list[Result], str]:
    path = work / "collector.db"
    generate(path, count)
    store = SQLiteStore(path, migrate=False)
    try:
        ledger = Ledger(store)
        ledger.define_plan("pro", by="bench", hours=Decimal(10))
        for n in range(ACCOUNTS):
            ledger.open_account(_account(n), "pro", by="bench", anchor_day=1, since_us=_june())
        tokens = work / "tokens"
        tokens.write_text(f"tenant {TENANT} reader {_account(7)}\nstaff {STAFF} reader\n")
        os.chmod(tokens, 0o600)
        app = WebApp(cast(WebStore, store), load_access(tokens, ()), clock_us=_mid_june)
        scan_s = median(repeat(lambda: timed(lambda: _full_scan(path)), 3))
        times = _serve_and_time(app)
    finally:
        store.close()
    results = []
    for name, samples in times.items():
        p95 = statistics.quantiles(samples, n=20)[18]
        page = not name.startswith("api ")
        results.append(
            Result(
                "web",
                f"{name} p95, {count:,} records",
                p95 * 1000,
                "ms",
                "full scan of records",
                scan_s * 1000,
                "< 300 ms" if page else "",
                (p95 < 0.300) if page else None,
            )
        )
    detail = "; ".join(
        f"{name} median {statistics.median(s) * 1000:.1f} ms p95 "
        f"{statistics.quantiles(s, n=20)[18] * 1000:.1f} ms"
        for name, s in times.items()
    )
    return results, f"{detail}; full scan {scan_s * 1000:.0f} ms"


def _june() -> int:
    from bench.ledger import MONTH_START_US

    return MONTH_START_US


def _mid_june() -> int:
    from bench.ledger import MONTH_START_US, MONTH_US

    return MONTH_START_US + MONTH_US // 2


def _serve_and_time(app: WebApp) -> dict[str, list[float]]:
    listener = listen("127.0.0.1", 0)
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = Server(uvicorn.Config(app.app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise SystemExit("the web server did not start")
        time.sleep(0.01)
    try:
        tenant, staff = _logged_in(base, TENANT), _logged_in(base, STAFF)
        account = urllib.parse.quote(_account(7))
        pages: dict[str, Callable[[], None]] = {
            "account page": lambda: _get(tenant, f"{base}/accounts/{account}"),
            "staff accounts page": lambda: _get(staff, f"{base}/staff/accounts"),
            "staff reconcile page": lambda: _get(staff, f"{base}/staff/reconcile"),
            "staff agents page": lambda: _get(staff, f"{base}/staff/agents"),
            "api balance": lambda: _api(f"{base}/api/v1/accounts/{account}/balance"),
            "api usage by day": lambda: _api(
                f"{base}/api/v1/accounts/{account}/usage?group_by=day,model"
            ),
        }
        times = {}
        for name, fetch in pages.items():
            for _ in range(WARMUP):
                fetch()
            times[name] = [timed(fetch) for _ in range(ROUNDS)]
        return times
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def _logged_in(base: str, token: str) -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    data = urllib.parse.urlencode({"token": token}).encode()
    with opener.open(f"{base}/login", data=data, timeout=60) as answer:
        assert answer.status == 200, answer.status
    return opener


def _get(opener: urllib.request.OpenerDirector, url: str) -> None:
    with opener.open(url, timeout=60) as answer:
        answer.read()
        assert answer.status == 200, (url, answer.status)


def _api(url: str) -> None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TENANT}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__)
    parser.add_argument("--records", type=int, default=FULL_RECORDS)
    args = parser.parse_args(argv)
    results, detail = run(records=args.records)
    for result in results:
        ratio = f" ({result.ratio:.3f}× {result.baseline})" if result.ratio is not None else ""
        verdict = "" if result.ok is None else (" ok" if result.ok else " MISSED")
        print(f"{result.metric}: {result.value:.1f} {result.unit}{ratio} {result.target}{verdict}")
    print(detail)
    return 0 if all(r.ok is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
