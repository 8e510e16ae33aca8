"""Ground truth, hand-computed; and the exact scenario measured to the microsecond."""

from __future__ import annotations

from fractions import Fraction

import pynvml
import pytest
from sim_helpers import ONE_GPU, W0_US

from creditmeter.simnvml import ProcessKey, Scenario, SimHost, installed

W0_S = W0_US / 1_000_000
PROCESS = """
[[process]]
pid = 1
gpu = 0
start_s = 0.5
exit_s = 30
env = { CREDITMETER_MODEL = "sdxl" }
busy = [[1.0, 3.5, 100], [5.0, 6.0, 50], [6.0, 7.0, 20], [8.0, 8.000001, 33]]
"""


def _host() -> SimHost:
    return SimHost.manual(Scenario.from_toml(ONE_GPU + PROCESS))[0]


def test_truth_of_a_process() -> None:
    host = _host()
    (truth,) = host.truth(until_s=40).values()
    assert truth.key == ProcessKey(host.gpus[0].uuid, 1, W0_S + 0.5)
    assert truth.labels == {"CREDITMETER_MODEL": "sdxl"}
    # 2.5 s at 100 %, 1 s at 50 %, 1 s at 20 %, 1 µs at 33 %.
    assert truth.busy_us == 2_500_000 + 500_000 + 200_000 + Fraction(33, 100)
    assert truth.context_us == 29_500_000
    # Touching spans make one burst whatever their sm.
    assert [(b.start_us, b.end_us, b.busy_us) for b in truth.bursts] == [
        (1_000_000, 3_500_000, 2_500_000),
        (5_000_000, 7_000_000, 700_000),
        (8_000_000, 8_000_001, Fraction(33, 100)),
    ]
    assert (truth.bursts[0].start_wall_s, truth.bursts[0].end_wall_s) == (W0_S + 1, W0_S + 3.5)


def test_truth_up_to_a_time_clips_bursts() -> None:
    host = _host()
    (truth,) = host.truth(until_s=5.5).values()
    assert truth.busy_us == 2_500_000 + 250_000
    assert [(b.start_us, b.end_us) for b in truth.bursts] == [
        (1_000_000, 3_500_000),
        (5_000_000, 5_500_000),
    ]
    assert host.truth(until_s=0.25) == {}  # not started yet


def test_truth_defaults_to_now_and_windows() -> None:
    host, clock = SimHost.manual(Scenario.from_toml(ONE_GPU + PROCESS))
    clock.advance(4)
    (truth,) = host.truth().values()
    assert truth.busy_us == 2_500_000
    assert host.truth_between(W0_S + 2, W0_S + 5.5) == {truth.key: 1_500_000 + 250_000}
    assert host.wall_truth(until_s=10) == {truth.key: 9_500_000}
    assert host.truth_between(W0_S + 31, W0_S + 40) == {}  # it had exited


def test_exact_scenario_is_measured_to_the_microsecond() -> None:
    """Sum per-period samples polled once a second: the result equals the truth exactly."""
    host, clock = SimHost.manual(Scenario.load("exact"))
    measured: dict[tuple[str, int], int] = {}
    with installed(host):
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(2)]
        cursors = [0, 0]
        for _ in range(62):
            clock.advance(1)
            for i, h in enumerate(handles):
                try:
                    samples = pynvml.nvmlDeviceGetProcessUtilization(h, cursors[i])
                except pynvml.NVMLError_NotFound:
                    continue
                for s in samples:
                    key = (host.gpus[i].uuid, s.pid)
                    measured[key] = measured.get(key, 0) + s.smUtil * 200_000 // 100
                cursors[i] = max(s.timeStamp for s in samples)
        pynvml.nvmlShutdown()
    truth = {(k.gpu_uuid, k.pid): t.busy_us for k, t in host.truth().items()}
    uuid0, uuid1 = host.gpus[0].uuid, host.gpus[1].uuid
    hand = {(uuid0, 1101): 14_400_000, (uuid0, 1102): 7_500_000, (uuid1, 1201): 12_400_000}
    assert truth == hand
    assert measured == hand


QUIET_PROCESS = """
[[process]]
pid = 2
gpu = 0
start_s = 0.5
exit_s = 60
busy = [[10.0, 10.03, 100], [20.0, 30.0, 100], [40.2, 40.25, 100]]
"""


@pytest.mark.parametrize(
    "driver",
    [
        "not_found_below_pct = 5",  # on the device's 1 s grid
        "not_found_below_pct = 5\nprocess_period_us = 1_000_000\nprocess_phase_us = 500_000",
    ],
)
def test_busy_time_in_samples_below_the_quiet_threshold_is_never_shown(driver: str) -> None:
    # 30 ms in one 1 s sample is 3 %: below 5 %, shown to no query. 50 ms is 5 %: shown.
    text = ONE_GPU + f"[driver]\n{driver}\n" + QUIET_PROCESS
    host = SimHost.manual(Scenario.from_toml(text))[0]
    (unshown,) = host.unshown_us(until_s=60).values()
    assert unshown == 30_000
    (truth,) = host.truth(until_s=60).values()
    assert truth.busy_us == 30_000 + 10_000_000 + 50_000


def test_a_driver_without_a_quiet_threshold_shows_every_busy_sample() -> None:
    host = SimHost.manual(Scenario.from_toml(ONE_GPU + QUIET_PROCESS))[0]
    assert list(host.unshown_us(until_s=60).values()) == [0]
