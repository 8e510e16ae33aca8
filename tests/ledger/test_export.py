"""CloudEvents export: one stable event per busy record and per API charge."""

from __future__ import annotations

import io
import json

from creditmeter.collector.export import cloudevents, write_json_lines
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import ApiCharge
from creditmeter.collector.prices import PriceBook

from .conftest import DAY_US, JUNE_1_US, WINDOW_US, Feeder, LedgerTestStore


def exported(
    store: LedgerTestStore, prices: PriceBook, **bounds: int | None
) -> list[dict[str, object]]:
    out = io.StringIO()
    write_json_lines(
        cloudevents(store, prices, bounds.get("from_us"), bounds.get("to_us"), "cm-test"), out
    )
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_usage_and_api_charges_as_cloudevents(
    store: LedgerTestStore, feeder: Feeder, ledger: Ledger, prices: PriceBook, acme: str
) -> None:
    start_us = JUNE_1_US + 9 * DAY_US
    feeder.send(1, model="llama-3-70b", busy_us=7_500_000, start_us=start_us)
    feeder.send(1, busy_us=0, start_us=start_us)  # idle: not exported
    feeder.send(1, account="", busy_us=1_000_000, start_us=start_us)
    ledger.record_charge(ApiCharge("req-9", "acme", "gpt-4o", 2, start_us + 1))

    events = exported(store, prices)
    assert events[0] == {
        "specversion": "1.0",
        "id": "agent-1:1",
        "source": "cm-test/usage",
        "type": "com.creditmeter.gpu.busy",
        "subject": "acme",
        "time": "2025-06-10T00:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "model": "llama-3-70b",
            "busy_seconds": "7.5",
            "credits": "18.75",
            "default_price": False,
            "host": "gpu-host-17",
            "gpu": "GPU-8f3c2a1e-0000-4000-8000-000000000017",
            "job_id": "job-1",
            "end": "2025-06-10T00:00:10Z",
        },
    }
    assert [(e["id"], e["subject"]) for e in events[1:]] == [
        ("agent-1:3", "unattributed"),
        ("req-9", "acme"),
    ]
    assert events[2]["source"] == "cm-test/api"
    assert events[2]["data"] == {
        "model": "gpt-4o",
        "requests": 2,
        "credits": "8",
        "default_price": False,
    }
    assert exported(store, prices) == events  # stable: the same ids again
    assert exported(store, prices, from_us=start_us + WINDOW_US) == []
