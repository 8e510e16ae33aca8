"""Reports: periods, exact seconds and credits, and the three formats."""

from __future__ import annotations

import json
import re

import pytest

from creditmeter.collector.errors import ConfigError
from creditmeter.collector.prices import busy_credits_micro
from creditmeter.collector.report import (
    Period,
    build_report,
    csv_cell,
    parse_hour_us,
    parse_period,
    render_csv,
    render_json,
    render_table,
    seconds_text,
)
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2

from .records import AgentChain

JUNE_1_US = 1_748_736_000_000_000  # 2025-06-01T00:00:00Z
HOUR0_US = 1_749_999_600_000_000  # 2025-06-15T15:00:00Z: the test records' first hour
HOUR1_US = HOUR0_US + 3_600_000_000


@pytest.fixture
def usage_store(store: SQLiteStore, agent: AgentChain, verifier: Verifier) -> SQLiteStore:
    """acme/llama-3-70b: 320 records of 7.123456 busy s in hour 0 (2279.505920 s);
    unattributed/bert: 5 records of 1 busy s in hour 1."""

    def unattributed_bert(rec: usage_pb2.UsageRecord) -> None:
        rec.attribution.account = ""
        rec.attribution.model = "bert"
        rec.busy_us = 1_000_000

    key = agent.key.public_key()
    store.ingest(agent.agent_id, verifier.verify(agent.extend(320), key))
    store.ingest(agent.agent_id, verifier.verify(agent.extend(5, unattributed_bert), key))
    return store


@pytest.mark.parametrize(
    ("text", "time_us"),
    [
        ("2025-06-01", JUNE_1_US),
        ("2025-06-01T14:00", JUNE_1_US + 14 * 3_600_000_000),
        ("2025-06-01T14:00:00Z", JUNE_1_US + 14 * 3_600_000_000),
        ("2025-06-01T16:00+02:00", JUNE_1_US + 14 * 3_600_000_000),
        ("2025-06-01 03:00", JUNE_1_US + 3 * 3_600_000_000),
    ],
)
def test_bounds_are_iso_dates_or_datetimes_in_utc(text: str, time_us: int) -> None:
    assert parse_hour_us("--from", text) == time_us


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("2025-06-01T14:30", "not on a whole hour"),
        ("2025-06-01T14:00+05:30", "not on a whole hour"),
        ("June 1st", "not an ISO date"),
        ("2025-13-01", "not an ISO date"),
    ],
)
def test_bad_bounds_are_named(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"--to '{text}' is {problem}")):
        parse_hour_us("--to", text)


def test_a_period_must_not_be_empty() -> None:
    assert parse_period(None, None) == Period(None, None)
    with pytest.raises(ConfigError, match="--from 2025-06-02 is not before --to 2025-06-01"):
        parse_period("2025-06-02", "2025-06-01")


def test_seconds_are_exact() -> None:
    assert seconds_text(12_345_678) == "12.345678"
    assert seconds_text(5) == "0.000005"
    assert seconds_text(0) == "0.000000"
    assert seconds_text(2**62) == "4611686018427.387904"


def test_credits_are_busy_seconds_times_the_rate_to_the_micro_credit() -> None:
    assert busy_credits_micro(2_279_505_920, 1_000_000) == 2_279_505_920
    assert busy_credits_micro(1_234_567, 500_000) == 617_284  # 617283.5, half-even


def test_json_report(usage_store: SQLiteStore) -> None:
    document = json.loads(render_json(build_report(usage_store, Period())))
    assert document == {
        "from": None,
        "to": None,
        "group_by": ["account", "model"],
        "prices": "built-in defaults",
        "rows": [
            {
                "account": "acme",
                "model": "llama-3-70b",
                "busy_seconds": "2279.505920",
                "requests": 0,
                "credits": "2279.505920",
                "records": 320,
                "default_price": True,
            },
            {
                "account": "unattributed",
                "model": "bert",
                "busy_seconds": "5.000000",
                "requests": 0,
                "credits": "5.000000",
                "records": 5,
                "default_price": True,
            },
        ],
        "totals": {
            "busy_seconds": "2284.505920",
            "requests": 0,
            "credits": "2284.505920",
            "records": 325,
        },
    }


def test_a_period_selects_hours(usage_store: SQLiteStore) -> None:
    report = build_report(usage_store, Period(HOUR1_US, None))
    document = json.loads(render_json(report))
    assert document["from"] == "2025-06-15T16:00:00Z"
    assert [row["model"] for row in document["rows"]] == ["bert"]
    assert document["totals"]["busy_seconds"] == "5.000000"


def test_csv_report(usage_store: SQLiteStore) -> None:
    assert render_csv(build_report(usage_store, Period())) == (
        "account,model,busy_seconds,requests,credits,records,default_price\n"
        "acme,llama-3-70b,2279.505920,0,2279.505920,320,true\n"
        "unattributed,bert,5.000000,0,5.000000,5,true\n"
    )


def test_table_report(usage_store: SQLiteStore) -> None:
    period = Period(HOUR0_US, HOUR1_US + 3_600_000_000)
    assert render_table(build_report(usage_store, period)) == (
        "period: 2025-06-15T15:00:00Z .. 2025-06-15T17:00:00Z (UTC, hours starting in "
        "[from, to)); prices: built-in defaults\n"
        "ACCOUNT       MODEL        BUSY_SECONDS  REQUESTS       CREDITS  RECORDS\n"
        "acme          llama-3-70b   2279.505920         0  2279.505920*      320\n"
        "unattributed  bert             5.000000         0     5.000000*        5\n"
        "TOTAL                       2284.505920         0  2284.505920       325\n"
        "* includes models billed at the default price (not in the price list)\n"
    )


def test_an_empty_report(store: SQLiteStore) -> None:
    report = build_report(store, Period())
    assert json.loads(render_json(report))["totals"] == {
        "busy_seconds": "0.000000",
        "requests": 0,
        "credits": "0.000000",
        "records": 0,
    }
    assert render_csv(report) == (
        "account,model,busy_seconds,requests,credits,records,default_price\n"
    )


def test_csv_cells_cannot_become_formulas_or_forge_lines(
    store: SQLiteStore, agent: AgentChain, verifier: Verifier
) -> None:
    def formula(rec: usage_pb2.UsageRecord) -> None:
        rec.attribution.account = '=HYPERLINK("http://evil.example","x")'  # lawful text
        rec.attribution.model = "@SUM(A1)"

    store.ingest(agent.agent_id, verifier.verify(agent.extend(1, formula), agent.key.public_key()))
    assert (
        render_csv(build_report(store, Period()))
        .splitlines()[1]
        .startswith('"\'=HYPERLINK(""http://evil.example"",""x"")",\'@SUM(A1),')
    )
    # Stored before the label law, a label may still hold control characters.
    assert csv_cell("acme\nTOTAL,0") == "acme\\nTOTAL,0"
    assert csv_cell("-1+1") == "'-1+1" and csv_cell("acme") == "acme"
