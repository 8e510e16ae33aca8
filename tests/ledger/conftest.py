"""Fixtures for the ledger's tests: a real store on a clock the test sets, and a feeder that
sends signed records through the real verifier and the store's ingest.

``backend`` is parametrized over both stores (tests/collector/backends.py): every test that
uses a store (``store``, ``ledger``, ``feeder``, ``acme``, …) runs on SQLite and on
PostgreSQL, each in a database of its own; tests without a store run once. A fixture
parameter rather than each module's ``pytestmark`` (as in tests/collector): these modules
mix tests with and without a store, and a test added later cannot forget PostgreSQL.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol, cast

import pytest

from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import LedgerStore
from creditmeter.collector.prices import PriceBook, parse_prices
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2
from tests.collector.backends import (
    BACKENDS,
    Backend,
    chosen_backend,
    postgres_server,  # noqa: F401  (a fixture: pytest finds it by name)
    postgres_url,  # noqa: F401  (a fixture)
)
from tests.collector.records import T0_US, WINDOW_US, AgentChain

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000
JUNE_1_US = 1_748_736_000_000_000  # 2025-06-01T00:00:00Z
JULY_1_US = JUNE_1_US + 30 * DAY_US
AUGUST_1_US = JULY_1_US + 31 * DAY_US
NOW_US = T0_US + DAY_US  # 2025-06-16T15:06:40Z, inside June
PRICES = {
    "self_hosted": {"sdxl": 1, "llama-3-70b": "2.5"},
    "api": {"gpt-4o": 4},
}


class LedgerTestStore(Store, LedgerStore, Protocol):
    """Both stores are both: ingest for the feeder, the ledger for the tests."""


@dataclass
class Clock:
    now_us: int = NOW_US

    def __call__(self) -> int:
        return self.now_us


@dataclass
class Feeder:
    """Plays one agent: sends records (7.5 busy s of sdxl for acme unless told otherwise)."""

    store: LedgerTestStore
    verifier: Verifier
    agent: AgentChain

    def send(
        self,
        count: int = 1,
        *,
        account: str = "acme",
        model: str = "sdxl",
        busy_us: int = 7_500_000,
        start_us: int | None = None,
        host: str | None = None,
        gpu_uuid: str | None = None,
    ) -> None:
        windows = itertools.count()

        def mutate(rec: usage_pb2.UsageRecord) -> None:
            rec.attribution.account = account
            rec.attribution.model = model
            rec.busy_us = busy_us
            if start_us is not None:  # consecutive windows: a GPU is busy one second a second
                rec.start_unix_us = start_us + next(windows) * WINDOW_US
                rec.end_unix_us = rec.start_unix_us + WINDOW_US
            if host is not None:
                rec.host = host
            if gpu_uuid is not None:
                rec.gpu.uuid = gpu_uuid

        batch = self.agent.extend(count, mutate)
        self.store.ingest(
            self.agent.agent_id, self.verifier.verify(batch, self.agent.key.public_key())
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "collector.db"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, db_path: Path, clock: Clock) -> Iterator[Backend]:
    chosen = chosen_backend(request, db_path, clock)
    yield chosen
    chosen.close()  # every store the test opened: no connections outlive the schema


@pytest.fixture
def store(backend: Backend) -> Iterator[LedgerTestStore]:
    opened = cast(LedgerTestStore, backend.open())
    yield opened
    opened.close()


@pytest.fixture
def prices() -> PriceBook:
    return parse_prices(dict(PRICES), "test prices")


@pytest.fixture
def ledger(store: LedgerTestStore, prices: PriceBook, clock: Clock) -> Ledger:
    return Ledger(store, prices, clock)


@pytest.fixture
def feeder(store: LedgerTestStore, clock: Clock) -> Feeder:
    agent = AgentChain("agent-1")
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    return Feeder(store, Verifier(clock_us=clock), agent)


@pytest.fixture
def acme(ledger: Ledger) -> str:
    """acme on the 10-hour plan (36,000 credits), periods from the 1st, since June."""
    ledger.define_plan("pro", by="ops", hours=Decimal(10))
    ledger.open_account("acme", "pro", by="ops", anchor_day=1, since_us=JUNE_1_US)
    return "acme"
