"""Usage and API charges as the usage events of billing systems: Stripe meter events, Lago
events and OpenMeter's CloudEvents (``export --format stripe|lago|openmeter``), NDJSON.

Each stored usage record with busy time, and each API charge, is one event whose value is
its credits, exact (busy seconds × the model's rate, unrounded; the systems sum them). Every
event carries a deterministic id, the same on every export of the same range, which is what
each system deduplicates by, so re-exporting does not bill twice downstream:

- Stripe (``POST /v1/billing/meter_events``): ``identifier``; Stripe enforces its uniqueness
  over a rolling 24 hours only, and takes events up to 35 days old, so send a range again
  only within a day of the first time.
- Lago (``POST /api/v1/events``): ``transaction_id``, unique per ``external_subscription_id``.
- OpenMeter: CloudEvents, deduplicated by ``id`` and ``source`` (export.py).

Ids: ``u:<agent_id>:<seq>`` for usage, ``a:<request id>`` for API charges (the prefixes keep
the two apart), replaced by ``h:`` and the SHA-256 of that text where it would be longer than
Stripe's 100 characters. The customer (Stripe) or subscription (Lago) is the account, or what
``--customers FILE`` maps it to (``[customers]`` table: ``acme = "cus_123"``). Usage no account
owns (``unattributed``) is billed to nobody and not exported.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from creditmeter.collector.errors import ConfigError
from creditmeter.collector.ledger_store import LedgerStore
from creditmeter.collector.prices import (
    PriceBook,
    PriceSchedule,
    as_schedule,
    exact_busy_credits_text,
    exact_micro_text,
)

MAX_ID_CHARS = 100  # Stripe's limit on ``identifier``
DEFAULT_EVENT_NAME = "creditmeter_credits"


@dataclass(frozen=True, slots=True)
class Billable:
    """One event's worth: who, when, what, how many credits (exact decimal text)."""

    event_id: str
    account: str
    time_us: int
    model: str
    kind: str  # "gpu" (busy seconds) or "api" (requests)
    quantity: str  # busy seconds, or requests
    credits: str


def billables(
    store: LedgerStore, prices: PriceBook | PriceSchedule, from_us: int | None, to_us: int | None
) -> Iterator[Billable]:
    """Usage records with busy time and an account, then API charges, of [from_us, to_us)."""
    prices = as_schedule(prices)
    for r in store.usage_events(from_us, to_us):
        if not r.account:
            continue  # unattributed: billed to nobody
        price = prices.at(r.start_us).busy_second_price(r.model)
        yield Billable(
            stable_id(f"u:{r.agent_id}:{r.seq}"),
            r.account,
            r.start_us,
            r.model,
            "gpu",
            exact_micro_text(r.busy_us),
            exact_busy_credits_text(r.busy_us, price.micro),
        )
    for c in store.api_charges(from_us, to_us):
        price = prices.at(c.time_us).request_price(c.model)
        yield Billable(
            stable_id(f"a:{c.request_id}"),
            c.account,
            c.time_us,
            c.model,
            "api",
            str(c.count),
            exact_micro_text(c.count * price.micro),
        )


def stable_id(natural: str) -> str:
    if len(natural) <= MAX_ID_CHARS:
        return natural
    return "h:" + hashlib.sha256(natural.encode()).hexdigest()


def stripe_event(b: Billable, customers: Mapping[str, str], event_name: str) -> dict[str, object]:
    return {
        "event_name": event_name,
        "identifier": b.event_id,
        "timestamp": b.time_us // 1_000_000,
        "payload": {"stripe_customer_id": customers.get(b.account, b.account), "value": b.credits},
    }


def lago_event(b: Billable, customers: Mapping[str, str], code: str) -> dict[str, object]:
    return {
        "event": {
            "transaction_id": b.event_id,
            "external_subscription_id": customers.get(b.account, b.account),
            "code": code,
            "timestamp": b.time_us // 1_000_000,
            "properties": {
                "credits": b.credits,
                "model": b.model,
                "kind": b.kind,
                "quantity": b.quantity,
            },
        }
    }


def read_customers(path: Path) -> dict[str, str]:
    """account -> customer (Stripe) or subscription (Lago) id, from a TOML file's
    ``[customers]`` table. Raises ConfigError naming the file and the problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--customers {path}: {exc}") from None
    table = data.get("customers")
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in table.items()
    ):
        raise ConfigError(f'--customers {path}: needs a [customers] table of account = "id"')
    return dict(table)
