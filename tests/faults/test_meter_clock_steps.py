"""The meter alone, on a manual clock: a wall clock stepped back further than a window is
long must still give every window an interval that ends at or after its start.

The end-to-end test (test_host_faults.py) found this: a window holding only the step's
CLOCK_STEP gap ended before it began, the collector refused the record as INVALID_ARGUMENT,
and since a chain cannot skip a record, the agent delivered nothing ever after.
"""

from __future__ import annotations

import pytest

from bench.harness import drive, metered, scenario_end_s
from creditmeter.agent.records import reportable
from creditmeter.simnvml import Scenario
from creditmeter.v1 import usage_pb2

WINDOW_S = 10.0


@pytest.mark.parametrize("step_back_s", [5.0, 30.0, 600.0])
def test_every_window_ends_at_or_after_its_start(step_back_s: float) -> None:
    scenario = Scenario.load("exact")
    with metered(scenario) as (run, meter):
        drive(run, meter, 15.1, window_s=WINDOW_S)
        run.clock.jump_wall(-step_back_s)
        drive(run, meter, scenario_end_s(scenario) + 5, window_s=WINDOW_S)
        run.usages.extend(meter.close_window())
    written = reportable(run.usages)
    backwards = [(u.key.pid, u.start_us, u.end_us) for u in written if u.end_us < u.start_us]
    assert backwards == []
    # The step is still a gap: what the records say is unchanged, only their labels are.
    assert usage_pb2.GAP_REASON_CLOCK_STEP in run.gaps_us()
