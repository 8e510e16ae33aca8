"""An idle GPU still writes an empty device record every IDLE_RECORD_S. Idle alone is never
billed and used to write nothing, so the collector could not tell an idle host from one
whose agent was down or cut off: both sent nothing, and its agents page showed both as
last seen long ago. An empty record starts where the GPU's previous device record ended
(give or take the driver's sample period settled across a close, as any device record):
metered, and idle, all along."""

from __future__ import annotations

import pytest

from bench.harness import drive, metered
from creditmeter.agent.meter import IDLE_RECORD_S
from creditmeter.agent.records import draft
from creditmeter.agent.usage import DeviceBooks, WindowUsage
from creditmeter.simnvml import Scenario
from creditmeter.simnvml.clock import DEFAULT_START_WALL_S
from creditmeter.v1 import usage_pb2

IDLE = DeviceBooks(0, 0, (), ())
IDLE_US = int(IDLE_RECORD_S * 1e6)
PERIOD_US = 166_667  # the H100's device sample period
# One GPU, a model loaded at 1 s that runs one job from 700 s to 760 s, then waits again.
LOADED_MODEL = """
[host]
seed = 5
[[gpu]]
product = "H100"
[[process]]
pid = 31
gpu = 0
start_s = 1.0
busy = [[700.0, 760.0, 90]]
"""


def device_records(scenario: str, until_s: float, **options: float) -> list[WindowUsage]:
    with metered(Scenario.from_toml(scenario), **options) as (run, meter):
        drive(run, meter, until_s)
    return [u for u in run.usages if u.books is not None]


def test_an_idle_gpu_writes_empty_books_that_tile_its_idle_time() -> None:
    records = device_records(LOADED_MODEL, 690.0)
    assert [r.books for r in records] == [IDLE, IDLE]
    for r in records:
        assert IDLE_US <= r.end_us - r.start_us < IDLE_US + PERIOD_US
    assert records[0].end_us - PERIOD_US < records[1].start_us <= records[0].end_us


def test_idle_books_come_again_after_busy_ones_from_where_those_ended() -> None:
    records = device_records(LOADED_MODEL, 1500.0)
    busy = [r for r in records if r.books != IDLE]
    assert sum(r.books.device_busy_us for r in busy) == pytest.approx(54e6, abs=1e4)
    idle = [i for i, r in enumerate(records) if r.books == IDLE]
    assert len(idle) == 4  # at 300 and 600 s, then 300 s after the job's last books, twice
    for i in idle[1:]:
        assert records[i - 1].end_us - PERIOD_US < records[i].start_us <= records[i - 1].end_us
        assert IDLE_US <= records[i].end_us - records[i].start_us < IDLE_US + PERIOD_US


def test_idle_records_can_be_turned_off() -> None:
    assert device_records(LOADED_MODEL, 690.0, idle_record_s=0.0) == []


def test_an_idle_record_is_a_device_record_the_collector_tells_as_one() -> None:
    """Its books are all zeros and present all the same: a device record is told by them."""
    (record,) = device_records(LOADED_MODEL, 310.0)
    wire = usage_pb2.UsageRecord.FromString(draft(record, "h").SerializeToString())
    assert wire.HasField("device") and wire.quality == usage_pb2.QUALITY_UNATTRIBUTED
    assert wire.device.device_busy_us == 0 and wire.busy_us == 0


NO_SOURCE = """
[driver]
device_series = false
utilization_info = false
legacy_process_utilization = false
"""
FAILING = """
[[fault]]
kind = "process_samples_fail"
gpu = 0
start_s = 250.0
end_s = 650.0
"""


def test_empty_books_of_a_device_nothing_measures_are_not_written_as_idle() -> None:
    """Neither a device series nor a per-process source: its books are empty because
    nothing reads the device, and its process's time is a gap instead."""
    assert device_records(LOADED_MODEL + NO_SOURCE, 690.0) == []


def test_no_idle_books_are_written_while_polls_fail() -> None:
    """Only once a poll reads again. Here only the per-process calls fail: the device series,
    read all along, showed the GPU idle, so the books written then are idle books."""
    records = device_records(LOADED_MODEL + FAILING, 690.0)
    assert [r.books for r in records] == [IDLE]
    assert records[0].end_us / 1e6 - DEFAULT_START_WALL_S >= 650
