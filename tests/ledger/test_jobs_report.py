"""Credits per job and typical credits per task (``report --per-job``, ``report --typical``):
the seed's quick-reference table ("SDXL ~5-10 credits, FLUX ~20-40, upscale ~60") from
measurement, on a real database of each store."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import pytest

from creditmeter.collector.jobs_report import job_credits, job_rows, nearest_rank, render, typical
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import UsageEvent
from creditmeter.collector.main import main
from creditmeter.collector.prices import PriceBook, PriceSchedule, PriceVersion
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2
from tests.collector.backends import Backend
from tests.collector.records import AgentChain

from .conftest import JUNE_1_US, Clock, LedgerTestStore

S = 1_000_000
T0 = JUNE_1_US + 3_600 * S
SDXL_S = [5.5, 6.0, 7.25, 8.0, 9.5, 10.0, 6.5, 7.0, 7.5, 9.0]  # one generation each
FLUX_S = [20.0, 25.0, 40.0]


def event(job_id: str, model: str, busy_us: int, start_us: int = T0) -> UsageEvent:
    return UsageEvent(
        "a", 1, start_us, start_us + 10 * S, "h", "GPU-1", "acme", model, job_id, busy_us
    )


def test_a_job_is_the_sum_of_its_records_priced_once() -> None:
    prices = PriceSchedule(
        [PriceVersion(0, PriceBook(busy_second_micro={"flux": 2_000_000}), 0, "t")]
    )
    events = [
        event("j1", "flux", 3_333_333, T0),
        event("j1", "flux", 3_333_333, T0 + 10 * S),  # its second window
        event("j2", "sdxl", 7_500_000, T0 + 5 * S),
        event("", "sdxl", 9_000_000),  # no job declared: not a job
    ]
    (j1, j2) = job_credits(events, prices)
    assert (j1.job_id, j1.busy_us, j1.records, j1.end_us) == ("j1", 6_666_666, 2, T0 + 20 * S)
    assert (j1.credits_micro, j1.default_price) == (13_333_332, False)
    assert (j2.job_id, j2.credits_micro, j2.default_price) == ("j2", 7_500_000, True)


@pytest.mark.parametrize(
    ("values", "median", "p90"),
    [([7], 7, 7), ([1, 2], 1, 2), (list(range(1, 11)), 5, 9), (list(range(1, 101)), 50, 90)],
)
def test_percentiles_are_credits_a_job_really_cost(
    values: list[int], median: int, p90: int
) -> None:
    assert (nearest_rank(values, 50), nearest_rank(values, 90)) == (median, p90)


def test_typical_credits_per_model() -> None:
    events = [event(f"s{i}", "sdxl", round(s * S)) for i, s in enumerate(SDXL_S)]
    events += [event(f"f{i}", "flux", round(s * S)) for i, s in enumerate(FLUX_S)]
    rows = typical(job_credits(events, PriceSchedule()))
    assert [(t.model, t.jobs, t.median_micro, t.p90_micro) for t in rows] == [
        ("flux", 3, 25 * S, 40 * S),
        ("sdxl", 10, 7_250_000, 9_500_000),
    ]


# -- the command line, over the records an agent sent ---------------------------------------------


def send_jobs(store: LedgerTestStore, clock: Clock) -> None:
    agent = AgentChain("agent-jobs")
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    jobs = [("acme", "sdxl", f"s{i}", s) for i, s in enumerate(SDXL_S)]
    jobs += [("globex", "flux", f"f{i}", s) for i, s in enumerate(FLUX_S)]
    jobs += [("evil\x1b[2J", "sdxl", "x", 1.0)]  # refused by the label law: quarantined

    def window(i: int) -> object:
        account, model, job_id, busy_s = jobs[i]

        def mutate(rec: usage_pb2.UsageRecord) -> None:
            rec.start_unix_us = T0 + i * 60 * S
            rec.end_unix_us = rec.start_unix_us + 60 * S
            rec.busy_us = round(busy_s * S)
            rec.attribution.account, rec.attribution.model = account, model
            rec.attribution.job_id = job_id

        return mutate

    for i in range(len(jobs)):
        batch = agent.extend(1, window(i))  # type: ignore[arg-type]
        checked = Verifier(clock_us=clock).verify(batch, agent.key.public_key())
        store.ingest(agent.agent_id, checked)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.fixture
def prices(store: LedgerTestStore) -> list[str]:
    """sdxl and flux in the price book at 1 credit (not the default): no row is flagged."""
    book = PriceBook(busy_second_micro={"sdxl": 1_000_000, "flux": 1_000_000})
    Ledger(store).set_prices(book, 0, by="ops", backdate=True)
    return []


def test_report_per_job_and_typical(
    capsys: pytest.CaptureFixture[str],
    backend: Backend,
    store: LedgerTestStore,
    clock: Clock,
    prices: list[str],
) -> None:
    send_jobs(store, clock)
    db = ["--db", backend.url]
    rows = json.loads(run(capsys, "report", *db, *prices, "--per-job", "--format", "json"))
    # The hostile record broke the label law: held in quarantine, in no report.
    assert len(rows) == len(SDXL_S) + len(FLUX_S)
    assert rows[0] == {
        "account": "acme",
        "model": "sdxl",
        "job": "s0",
        "start": "2025-06-01T01:00:00Z",
        "busy_seconds": "5.500000",
        "credits": "5.500000",
        "records": "1",
    }
    only = json.loads(
        run(capsys, "report", *db, *prices, "--per-job", "--account", "globex", "--format", "json")
    )
    assert [r["job"] for r in only] == ["f0", "f1", "f2"]

    typical_out = run(capsys, "report", *db, *prices, "--typical")
    lines = typical_out.splitlines()
    assert lines[0].split() == ["MODEL", "JOBS", "MEDIAN_CREDITS", "P90_CREDITS"]
    assert lines[1].split() == ["flux", "3", "25.000000", "40.000000"]
    assert lines[2].split() == ["sdxl", "10", "7.250000", "9.500000"]


def test_labels_stored_before_the_law_print_as_text() -> None:
    """Records stored before the label law may hold control characters: no escape sequence,
    no forged line, no formula reaches a terminal or a spreadsheet."""
    hostile = replace(event("x\nTOTAL 0", "=HYPERLINK(1)", S), account="evil\x1b[2J")
    header, rows, labels = job_rows(job_credits([hostile], PriceSchedule()))
    table = render(header, rows, labels, "table")
    assert "\x1b" not in table and "\nTOTAL" not in table
    (cells,) = list(csv.reader(io.StringIO(render(header, rows, labels, "csv"))))[1:]
    assert cells[1] == "'=HYPERLINK(1)" and "\n" not in cells[2] and "\x1b" not in cells[0]
