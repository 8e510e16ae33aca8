"""Exports in billing systems' usage-event shapes (Stripe meter events, Lago events, OpenMeter
CloudEvents): deterministic ids, so re-exporting never bills twice downstream; exact credits;
unattributed usage billed to nobody. Through the command line, on a real database of each
store."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from creditmeter.collector.billing_export import MAX_ID_CHARS, stable_id
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import ApiCharge
from creditmeter.collector.main import main
from creditmeter.collector.prices import load_prices
from tests.collector.backends import Backend

from .conftest import DAY_US, JUNE_1_US, Feeder, LedgerTestStore

JUNE_10_US = JUNE_1_US + 9 * DAY_US


@pytest.fixture
def files(tmp_path: Path, store: LedgerTestStore) -> tuple[Path, Path]:
    """The prices (loaded into the store's price book) and the customers file."""
    prices = tmp_path / "prices.toml"
    prices.write_text('[self_hosted]\n"llama-3-70b" = 2.5\n[api]\n"gpt-4o" = 4\n')
    Ledger(store).set_prices(load_prices(prices), JUNE_1_US, by="ops", backdate=True)
    customers = tmp_path / "customers.toml"
    customers.write_text('[customers]\nacme = "cus_NciAYcXfLnqBoz"\n')
    return prices, customers


@pytest.fixture
def usage(feeder: Feeder, ledger: Ledger, acme: str) -> None:
    feeder.send(2, model="llama-3-70b", busy_us=7_500_000, start_us=JUNE_10_US)
    feeder.send(1, account="", busy_us=1_000_000, start_us=JUNE_10_US + 60 * 1_000_000)
    ledger.record_charge(ApiCharge("req-9", "acme", "gpt-4o", 2, JUNE_10_US + 1))


def export(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, object]]:
    assert main(["export", *argv]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("exported ")
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.usefixtures("usage")
def test_stripe_meter_events(
    capsys: pytest.CaptureFixture[str], backend: Backend, files: tuple[Path, Path]
) -> None:
    _, customers = files
    argv = ["--db", backend.url, "--format", "stripe"]
    events = export(capsys, *argv, "--customers", str(customers), "--event-name", "gpu_credits")
    assert events == [
        {
            "event_name": "gpu_credits",
            "identifier": "u:agent-1:1",
            "timestamp": JUNE_10_US // 1_000_000,
            "payload": {"stripe_customer_id": "cus_NciAYcXfLnqBoz", "value": "18.75"},
        },
        {
            "event_name": "gpu_credits",
            "identifier": "u:agent-1:2",
            "timestamp": JUNE_10_US // 1_000_000 + 10,
            "payload": {"stripe_customer_id": "cus_NciAYcXfLnqBoz", "value": "18.75"},
        },
        {
            "event_name": "gpu_credits",
            "identifier": "a:req-9",
            "timestamp": JUNE_10_US // 1_000_000,
            "payload": {"stripe_customer_id": "cus_NciAYcXfLnqBoz", "value": "8"},
        },
    ]  # the unattributed record (agent-1:3) is billed to nobody
    again = export(capsys, *argv, "--customers", str(customers), "--event-name", "gpu_credits")
    assert again == events  # the same identifiers: Stripe drops the repeat


@pytest.mark.usefixtures("usage")
def test_lago_events_and_openmeter(
    capsys: pytest.CaptureFixture[str], backend: Backend, files: tuple[Path, Path]
) -> None:
    argv = ["--db", backend.url]
    lago = export(capsys, *argv, "--format", "lago")
    assert lago[0] == {
        "event": {
            "transaction_id": "u:agent-1:1",
            "external_subscription_id": "acme",  # no --customers: the account itself
            "code": "creditmeter_credits",
            "timestamp": JUNE_10_US // 1_000_000,
            "properties": {
                "credits": "18.75",
                "model": "llama-3-70b",
                "kind": "gpu",
                "quantity": "7.5",
            },
        }
    }
    assert [e["event"]["transaction_id"] for e in lago] == ["u:agent-1:1", "u:agent-1:2", "a:req-9"]  # type: ignore[index]
    total = sum(Decimal(e["event"]["properties"]["credits"]) for e in lago)  # type: ignore[index]
    assert total == Decimal("45.5")  # 2 × 7.5 s × 2.5 + 2 × 4: exact
    assert export(capsys, *argv, "--format", "openmeter") == export(capsys, *argv)


def test_ids_fit_stripe_and_stay_deterministic() -> None:
    long = "u:" + "a" * 120 + ":7"
    hashed = stable_id(long)
    assert len(hashed) <= MAX_ID_CHARS and hashed == stable_id(long) and hashed.startswith("h:")
    assert stable_id("u:agent-1:1") == "u:agent-1:1"


def test_a_bad_customer_file_is_one_line(
    capsys: pytest.CaptureFixture[str], backend: Backend, tmp_path: Path
) -> None:
    bad = tmp_path / "customers.toml"
    bad.write_text("[customers]\nacme = 3\n")
    code = main(["export", "--db", backend.url, "--format", "stripe", "--customers", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs a [customers] table" in err
