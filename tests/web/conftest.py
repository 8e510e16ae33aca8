"""One small world for the web tests, built through the real ledger, verifier and store and
served by a real ``creditmeter-collector web`` process: three tenants (one named like an
XSS attack), an unscoped reader and an admin, usage with jobs in the current and the
previous period, and the previous period closed with a signed statement."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from creditmeter import chain
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.periods import period_containing
from creditmeter.collector.prices import PriceBook
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.statements import StatementSigner
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2
from tests.collector.records import AgentChain, labelled
from tests.e2e.daemons import BIN, wait_for

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
XSS = "<script>alert('pwned')</script>"
TOKENS = {
    "acme": ("acme-web", "acme-token-0123456789", "reader acme"),
    "globex": ("globex-web", "globex-token-0123456789", "reader globex"),
    "xss": ("xss-web", "xss-token-0123456789ab", f"reader {XSS}"),
    "staff": ("billing", "staff-token-0123456789", "reader"),
    "admin": ("ops", "admin-token-0123456789", "admin"),
    "charger": ("gateway", "charger-token-0123456", "charger"),
}


@dataclass
class World:
    db_url: str
    base: str  # http://127.0.0.1:PORT
    collector_key_hex: str

    def token(self, who: str) -> str:
        return TOKENS[who][1]

    def get(self, path: str, who: str | None = None) -> tuple[int, Any]:
        """GET with ``who``'s bearer token: (status, parsed JSON)."""
        request = urllib.request.Request(self.base + path)
        if who is not None:
            request.add_header("Authorization", f"Bearer {self.token(who)}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def cli(self, *args: str) -> str:
        command = [str(BIN / "creditmeter-collector"), *args, "--db", self.db_url]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def build(path: Path) -> str:
    """The store; returns the collector's statement public key."""
    now_us = time.time_ns() // 1000
    this_month = period_containing(1, now_us)
    last_month = period_containing(1, this_month.start_us - 1)
    store = SQLiteStore(path)
    try:
        ledger = Ledger(store)
        ledger.set_prices(
            PriceBook(busy_second_micro={"sdxl": 1_000_000, "flux": 2_000_000}),
            last_month.start_us,
            by="ops",
            backdate=True,
        )
        ledger.define_plan("pro", by="ops", hours=Decimal(1))
        for name in ("acme", "globex", XSS):
            ledger.open_account(name, "pro", by="ops", anchor_day=1, since_us=last_month.start_us)
        agent = AgentChain("web-host")
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
        drafts = []
        for n, (account, model) in enumerate(
            [("acme", "sdxl"), ("acme", "flux"), ("globex", "sdxl"), (XSS, "flux")] * 3
        ):
            start = this_month.start_us + HOUR_US + n * 20_000_000
            drafts.append(labelled(account, model, 6_000_000 + n * 100_000, start, f"job-{n}"))
        for n in range(4):  # last month, for a closed period with a statement
            start = last_month.start_us + 2 * DAY_US + n * 20_000_000
            drafts.append(labelled("acme", "sdxl", 5_000_000, start, f"old-{n}"))
        drafts.sort(key=lambda m: _start_of(m))
        for mutate in drafts:
            agent.append(mutate)
        batch = agent.batch(1, len(agent.records))
        store.ingest(agent.agent_id, Verifier().verify(batch, agent.key.public_key()))
        ledger.top_up("acme", 1_000_000_000, by="ops", reason="card", expires_us=None, key="t1")
        signer = StatementSigner(chain.generate_key())
        ledger.close_periods("acme", this_month.start_us, by="ops", signer=signer)
        return signer.public_key_hex
    finally:
        store.close()


def _start_of(mutate: Callable[..., None]) -> int:
    rec = usage_pb2.UsageRecord()
    mutate(rec)
    return rec.start_unix_us


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("web")
    db = work / "collector.db"
    key_hex = build(db)
    tokens = work / "tokens"
    tokens.write_text("".join(f"{n} {t} {scope}\n" for n, t, scope in TOKENS.values()))
    os.chmod(tokens, 0o600)
    port_file = work / "web.port"
    log = (work / "web.log").open("wb")
    command = [
        str(BIN / "creditmeter-collector"),
        "web",
        "--db",
        f"sqlite://{db}",
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        str(port_file),
        "--set",
        f"api.token_file={tokens}",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("the web port", lambda: port_file.exists() and port_file.read_text().strip() != "")
        base = f"http://127.0.0.1:{port_file.read_text().strip()}"
        yield World(f"sqlite://{db}", base, key_hex)
    finally:
        process.terminate()
        code = process.wait(timeout=30)
        log.close()
        assert code == 0, (work / "web.log").read_text()[-3000:]
