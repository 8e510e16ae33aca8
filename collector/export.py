"""Usage as CloudEvents (JSON lines), the shape OpenMeter ingests, for platforms that invoice
elsewhere.

One event per stored usage record with busy time and one per API charge; idle records
(busy 0) are not exported. Ids are stable, so exporting a range again yields the same
events and a consumer that deduplicates by (source, id), as OpenMeter does, counts each
once: ``<agent_id>:<seq>`` for usage, the gateway's request id for API charges (each under
its own ``source``, so the two can never collide)::

    {"specversion": "1.0", "id": "agent-1:42", "source": "creditmeter-collector/usage",
     "type": "com.creditmeter.gpu.busy", "subject": "acme",
     "time": "2025-06-15T15:06:40Z", "datacontenttype": "application/json",
     "data": {"model": "sdxl", "busy_seconds": "7.5", "credits": "7.5",
              "default_price": false, "host": "gpu-host-17", "gpu": "GPU-…",
              "job_id": "job-1", "end": "2025-06-15T15:06:50Z"}}

    {"specversion": "1.0", "id": "req-123", "source": "creditmeter-collector/api",
     "type": "com.creditmeter.api.request", "subject": "acme", "time": "…",
     "datacontenttype": "application/json",
     "data": {"model": "gpt-4o", "requests": 1, "credits": "4", "default_price": false}}

``subject`` is the account ("unattributed" for usage without one); ``time`` is the start of
the record's interval (or the request's time). Decimals are strings with no rounding:
``credits`` is busy seconds × the current rate exactly, so sums over events equal the
exact value; the ledger's own balances round once per (account, model, period) instead
(prices.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TextIO

from creditmeter.collector.ledger_store import LedgerStore
from creditmeter.collector.periods import iso_text
from creditmeter.collector.prices import (
    PriceBook,
    PriceSchedule,
    as_schedule,
    exact_busy_credits_text,
    exact_micro_text,
)
from creditmeter.collector.report import UNATTRIBUTED

DEFAULT_SOURCE = "creditmeter-collector"
USAGE_TYPE = "com.creditmeter.gpu.busy"
API_TYPE = "com.creditmeter.api.request"


def cloudevents(
    store: LedgerStore,
    prices: PriceBook | PriceSchedule,
    from_us: int | None,
    to_us: int | None,
    source: str = DEFAULT_SOURCE,
) -> Iterator[dict[str, object]]:
    """Usage events, then API charge events, of [from_us, to_us) (None: unbounded)."""
    prices = as_schedule(prices)
    for record in store.usage_events(from_us, to_us):
        price = prices.at(record.start_us).busy_second_price(record.model)
        yield _event(
            f"{record.agent_id}:{record.seq}",
            f"{source}/usage",
            USAGE_TYPE,
            record.account,
            record.start_us,
            {
                "model": record.model,
                "busy_seconds": exact_micro_text(record.busy_us),
                "credits": exact_busy_credits_text(record.busy_us, price.micro),
                "default_price": price.default,
                "host": record.host,
                "gpu": record.gpu_uuid,
                "job_id": record.job_id,
                "end": iso_text(record.end_us),
            },
        )
    for charge in store.api_charges(from_us, to_us):
        price = prices.at(charge.time_us).request_price(charge.model)
        yield _event(
            charge.request_id,
            f"{source}/api",
            API_TYPE,
            charge.account,
            charge.time_us,
            {
                "model": charge.model,
                "requests": charge.count,
                "credits": exact_micro_text(charge.count * price.micro),
                "default_price": price.default,
            },
        )


def write_json_lines(events: Iterator[dict[str, object]], out: TextIO) -> int:
    """Writes one compact JSON object a line; returns how many."""
    count = 0
    for event in events:
        out.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False))
        out.write("\n")
        count += 1
    return count


def _event(
    event_id: str,
    source: str,
    event_type: str,
    account: str,
    time_us: int,
    data: dict[str, object],
) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": event_type,
        "subject": account or UNATTRIBUTED,
        "time": iso_text(time_us),
        "datacontenttype": "application/json",
        "data": data,
    }
