"""How often the meter opens a new NVML session to look for lost GPUs, and what it costs.

Each look is an nvmlShutdown and nvmlInit over every GPU of the host: seconds on a large host
without persistence mode, and on some drivers a hang after hours of them (NVIDIA/go-nvml#152,
driver 570.x). A GPU that fell off the bus (Xid 79) does not come back by itself; it needs a
GPU reset. The meter used to look every reopen interval (5 s) for as long as it ran: 720
sessions an hour for one dead GPU. It now looks often right after a loss and then backs off
to LOST_SEARCH_MAX_S, and a GPU back from its reset is read back from its ring.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.harness import Run, drive, metered
from creditmeter.agent.listings import LOST_SEARCH_MAX_S
from creditmeter.agent.meter import Meter
from creditmeter.simnvml import Scenario
from creditmeter.v1 import usage_pb2
from tests.agent.test_lost_gpus import SHORT_RING_GPU

GAP_LOST = usage_pb2.GAP_REASON_GPU_LOST
POLL_S = 1.0
REOPEN_S = 5.0
RING_S = 20.0  # SHORT_RING_GPU: 100 periods of 0.2 s


def two_gpus(processes: str, faults: str) -> Scenario:
    return Scenario.from_toml(f"[host]\nseed = 31\n{SHORT_RING_GPU * 2}\n{processes}{faults}")


def process(pid: int, gpu: int, start_s: float, end_s: float) -> str:
    """A process at 50 % from a second after its start to 10 s before its exit."""
    return (
        f"\n[[process]]\npid = {pid}\ngpu = {gpu}\nstart_s = {start_s}\nexit_s = {end_s}\n"
        f"busy = [[{start_s + 1.0}, {end_s - 10.0}, 50]]\n"
    )


def fault(kind: str, gpu: int | None, start_s: float, end_s: float) -> str:
    on = f"gpu = {gpu}\n" if gpu is not None else ""
    return f'\n[[fault]]\nkind = "{kind}"\n{on}start_s = {start_s}\nend_s = {end_s}\n'


def sessions(calls: Counter[str]) -> int:
    """New NVML sessions tried, failed or not (pynvml's nvmlInit is nvmlInitWithFlags)."""
    return calls["nvmlInitWithFlags"] + calls["nvmlInit_v2"]


@contextmanager
def counted(scenario: Scenario) -> Iterator[tuple[Run, Meter, Counter[str]]]:
    """The meter on ``scenario``, with every NVML call the simulated library answered
    counted by symbol."""
    calls: Counter[str] = Counter()
    with metered(scenario) as (run, meter):
        run.lib.before_call = lambda name: calls.update([name])
        yield run, meter, calls


def test_a_gpu_gone_for_good_is_looked_for_ever_less_often() -> None:
    """GPU 1 falls off the bus at 21 s for good. Over 20 minutes the meter opened 240 NVML
    sessions looking for it; now at most the tries of the first minute and one a
    LOST_SEARCH_MAX_S after. GPU 0 beside it is billed exactly all along."""
    scenario = two_gpus(process(100, 0, 1.0, 1230.0), fault("gpu_lost", 1, 21.0, 1e6))
    with counted(scenario) as (run, meter, calls):
        drive(run, meter, 1221.0)
        run.usages.extend(meter.close_window())
        relistings = dict(meter.stats.relistings)
    # 26, 31, 41, 61, 101, 161, then every 60 s to 1221 (the periodic listing among them).
    assert sessions(calls) == 6 + 17
    assert relistings == {"lost": 6 + 17}
    ((key, busy),) = run.truth_us().items()
    assert run.measured_us()[key] == busy
    assert not any(u.gaps_us for u in run.process_usages())


def test_a_gpu_back_from_its_reset_is_found_before_its_ring_runs_over() -> None:
    """GPU 1 is lost from 21 s to 150 s (reset, ring cleared); a job starts on it at 155 s.
    The backoff had reached 60 s: the GPU is found at 161 s, and its ring (20 s) still holds
    the job's first seconds: billed exactly, with no gap.

    Two faults of a GPU found again showed here, whatever the search's pace. The job was
    taken to hold no context before it was first listed, as if the GPU had been polled all
    along: its first 2.5 s of busy time (156 s to 161 s) went unattributed. And it carried
    the ring's hole since the loss, a 49.8 s GPU_LOST gap, all from before it started."""
    scenario = two_gpus(
        process(100, 0, 1.0, 400.0) + process(300, 1, 155.0, 400.0),
        fault("gpu_lost", 1, 21.0, 150.0).replace("end_s", "ring_cleared = true\nend_s"),
    )
    found: list[float] = []
    with counted(scenario) as (run, meter, _calls):

        def watch() -> None:
            if not meter.lost_since_us() and not found and run.clock.monotonic() > 21.5:
                found.append(run.clock.monotonic())

        drive(run, meter, 420.0, each_poll=watch)
        run.usages.extend(meter.close_window())
    assert found and 150.0 <= found[0] <= 150.0 + LOST_SEARCH_MAX_S + POLL_S
    assert found[0] - 155.0 < RING_S - POLL_S  # so the ring still held the job's start
    truth = run.truth_us()
    measured = run.measured_us()
    for key, busy in truth.items():
        assert measured[key] == busy, key.pid
    assert not any(u.gaps_us for u in run.process_usages())


def test_a_new_loss_is_looked_for_at_once_whatever_the_backoff_reached() -> None:
    """GPU 1 has been gone since 21 s (looked for each 60 s by 600 s) when GPU 0 is lost
    from 600 s to 606 s. GPU 0 is looked for a reopen interval after its loss, as always:
    found by 611 s, its ring (kept) holding all it ran, billed exactly. Had the backoff
    gone on, it would have been found up to 60 s on, its ring (20 s) long overrun."""
    scenario = two_gpus(
        process(100, 0, 1.0, 700.0),
        fault("gpu_lost", 1, 21.0, 1e6) + fault("gpu_lost", 0, 600.0, 606.0),
    )
    back: list[float] = []
    with counted(scenario) as (run, meter, _calls):

        def watch() -> None:
            if not back and run.clock.monotonic() > 600.5 and len(meter.lost_since_us()) == 1:
                back.append(run.clock.monotonic())

        drive(run, meter, 720.0, each_poll=watch)
        run.usages.extend(meter.close_window())
    assert back and back[0] <= 606.0 + REOPEN_S + POLL_S
    ((key, busy),) = run.truth_us().items()
    assert run.measured_us()[key] == busy
    assert not any(u.gaps_us for u in run.process_usages())


def test_a_driver_that_stays_unusable_is_tried_ever_less_often() -> None:
    """nvmlInit fails from 299.5 s on, as after a driver upgrade without a reboot (library
    and driver versions differ until then). The relisting at 300 s finds no driver; it used
    to be tried again every reopen interval, 120 sessions in ten minutes; now each failure
    doubles the wait, up to LOST_SEARCH_MAX_S."""
    scenario = two_gpus(process(100, 0, 1.0, 1000.0), fault("driver_not_loaded", None, 299.5, 1e6))
    with counted(scenario) as (run, meter, calls):
        drive(run, meter, 900.0)
        errors = dict(meter.stats.nvml_errors)
        relistings = dict(meter.stats.relistings)
    # 300, 305, 315, 335, 375, 435, then every 60 s to 855.
    assert sessions(calls) == 6 + 7
    assert errors["DriverNotLoaded"] == 6 + 7
    assert relistings == {"periodic": 1, "retry": 6 + 7 - 1}


def test_a_driver_back_after_a_reload_is_read_back_and_logged_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """nvmlInit fails from 299.5 s to 312 s (a driver reloading). The relisting at 300 s
    and its retry at 305 s fail, the one at 315 s succeeds; the rings (20 s) still hold
    the time between: billed exactly, no gap. Each GPU's failed polls are logged once as
    they begin and once as they end (a warning per GPU per poll before)."""
    scenario = two_gpus(
        process(100, 0, 1.0, 400.0) + process(200, 1, 1.0, 400.0),
        fault("driver_not_loaded", None, 299.5, 312.0),
    )
    with caplog.at_level(logging.WARNING), counted(scenario) as (run, meter, calls):
        drive(run, meter, 420.0)
        run.usages.extend(meter.close_window())
    assert sessions(calls) == 3  # 300, 305, 315
    for key, busy in run.truth_us().items():
        assert run.measured_us()[key] == busy, key.pid
    assert not any(u.gaps_us for u in run.process_usages())
    messages = [r.getMessage() for r in caplog.records]
    for uuid in {key.gpu_uuid for key in run.truth_us()}:
        failed = [m for m in messages if m.startswith(f"{uuid}: poll failed")]
        back = [m for m in messages if m.startswith(f"{uuid}: polled again after")]
        assert len(failed) == 1 and len(back) == 1, (failed, back)
        assert back[0].endswith("after 15 failed polls")  # 301 s to 315 s
