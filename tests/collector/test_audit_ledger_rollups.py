"""The audit checks the rollups reports and balances read against their sources: the
per-device rollups against the record bytes, the API rollups against the stored API charges;
on SQLite and PostgreSQL alike."""

from __future__ import annotations

from typing import cast

import pytest

from creditmeter.collector.audit import audit
from creditmeter.collector.ledger_store import ApiCharge, LedgerStore
from creditmeter.collector.main import main
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier

from .backends import BACKENDS, Backend
from .conftest import NOW_US
from .records import BUSY_US, WALL_US, AgentChain

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

HOUR0_US = 1_749_999_600_000_000  # 2025-06-15T15:00Z: the hour the test records start in
HOUR1_US = HOUR0_US + 3_600_000_000
GPU = "GPU-8f3c2a1e-0000-4000-8000-000000000017"  # of every test record
DEVICE = f"device hour 2025-06-15T15:00Z host 'gpu-host-17' gpu '{GPU}' account 'acme' model "
DEVICE += "'llama-3-70b'"


@pytest.fixture
def filled(store: Store, agent: AgentChain, verifier: Verifier) -> Store:
    """agent-1 with 4 records (one device hour); API charges: acme gpt-4o 2 + 3 requests in
    hour 0, acme gpt-4o 1 request in hour 1."""
    store.ingest(agent.agent_id, verifier.verify(agent.extend(4), agent.key.public_key()))
    ledger = cast(LedgerStore, store)
    ledger.record_charge(ApiCharge("r-1", "acme", "gpt-4o", 2, HOUR0_US + 5), NOW_US)
    ledger.record_charge(ApiCharge("r-2", "acme", "gpt-4o", 3, HOUR0_US + 6), NOW_US)
    ledger.record_charge(ApiCharge("r-3", "acme", "gpt-4o", 1, HOUR1_US), NOW_US)
    return store


def findings(store: Store, verifier: Verifier) -> list[str]:
    return [str(finding) for finding in audit(store, verifier).findings]


def test_rollups_that_match_their_sources_pass(filled: Store, verifier: Verifier) -> None:
    result = audit(filled, verifier)
    assert (result.findings, result.record_count) == ([], 4)


def test_an_edited_device_rollup_is_found(
    filled: Store, verifier: Verifier, backend: Backend
) -> None:
    backend.execute("UPDATE rollups_device_hourly SET busy_us = busy_us + 1, record_count = 5")
    assert findings(filled, verifier) == [
        f"rollups: {DEVICE}: stored busy_us, wall_us, records [{4 * BUSY_US + 1}, "
        f"{4 * WALL_US}, 5], the records sum to [{4 * BUSY_US}, {4 * WALL_US}, 4]"
    ]


def test_a_missing_device_rollup_is_found(
    filled: Store, verifier: Verifier, backend: Backend
) -> None:
    backend.execute("DELETE FROM rollups_device_hourly")
    assert findings(filled, verifier) == [
        f"rollups: {DEVICE}: no rollup stored, the records sum to [{4 * BUSY_US}, {4 * WALL_US}, 4]"
    ]


def _month(busy_us: int, day_busy_us: int, records: int = 4) -> list[int]:
    """A monthly rollup's sums: the month's, then by day (the records are on the 15th)."""
    by_day = [0] * 31
    by_day[14] = day_busy_us
    counts = [0] * 31
    counts[14] = records
    return [busy_us, 4 * WALL_US, records, *by_day, *counts]


@pytest.mark.parametrize(
    ("column", "stored"),
    [
        ("busy_us", _month(4 * BUSY_US - 1, 4 * BUSY_US)),
        ("busy_d15", _month(4 * BUSY_US, 4 * BUSY_US - 1)),  # a day's busy: what reports read
    ],
)
def test_an_edited_monthly_device_rollup_is_found(
    filled: Store, verifier: Verifier, backend: Backend, column: str, stored: list[int]
) -> None:
    backend.execute(f"UPDATE rollups_device_monthly SET {column} = {column} - 1")
    month = DEVICE.replace("device hour 2025-06-15T15:00Z", "device month 2025-06")
    assert findings(filled, verifier) == [
        f"rollups: {month}: stored busy_us, wall_us, records, busy_us of days 1-31, records of "
        f"days 1-31 {stored}, the records sum to {_month(4 * BUSY_US, 4 * BUSY_US)}"
    ]


def test_an_edited_api_rollup_is_found(filled: Store, verifier: Verifier, backend: Backend) -> None:
    backend.execute("UPDATE api_rollups_hourly SET requests = 9 WHERE hour_start_us = ?", HOUR1_US)
    backend.execute(
        "INSERT INTO api_rollups_hourly (hour_start_us, account, model, requests, charge_count) "
        "VALUES (?, 'ghost', 'm', 7, 1)",
        HOUR0_US,
    )
    assert findings(filled, verifier) == [
        "rollups: API hour 2025-06-15T15:00Z account 'ghost' model 'm': stored requests, "
        "charges [7, 1], the charges sum to [0, 0]",
        "rollups: API hour 2025-06-15T16:00Z account 'acme' model 'gpt-4o': stored requests, "
        "charges [9, 1], the charges sum to [1, 1]",
    ]


def test_a_deleted_api_charge_is_found_by_its_rollup(
    filled: Store, verifier: Verifier, backend: Backend
) -> None:
    backend.execute("DELETE FROM api_charges WHERE request_id = 'r-2'")
    assert findings(filled, verifier) == [
        "rollups: API hour 2025-06-15T15:00Z account 'acme' model 'gpt-4o': stored requests, "
        "charges [5, 2], the charges sum to [2, 1]"
    ]


def test_an_api_rollup_missing_for_its_charges_is_found(
    filled: Store, verifier: Verifier, backend: Backend
) -> None:
    backend.execute("DELETE FROM api_rollups_hourly WHERE hour_start_us = ?", HOUR0_US)
    assert findings(filled, verifier) == [
        "rollups: API hour 2025-06-15T15:00Z account 'acme' model 'gpt-4o': no rollup stored, "
        "the charges sum to [5, 2]"
    ]


def test_audit_findings_are_printed_by_the_command(
    filled: Store, backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    backend.execute("DELETE FROM rollups_device_hourly")
    assert main(["audit", "--db", backend.url]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"rollups: {DEVICE}: no rollup stored")
    assert out[-1] == "audit: 1 agents, 4 records, 1 findings"
