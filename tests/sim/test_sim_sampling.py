"""Per-process and device samples, read through the real pynvml against the fake library.

Expected values are computed by hand in the comments: period k ends at k seconds (1 s
periods, phase 0) and the wall clock starts at W0. The driver was loaded before the
scenario's t=0, so the ring holds idle periods from before it: queries ask for what came
after W0 unless they say otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import pynvml
import pytest
from sim_helpers import ONE_GPU, W0_US, S, Sim

from creditmeter.simnvml.clock import UPTIME_AT_T0_US


def _util(handle: object, cursor_us: int = W0_US) -> list[tuple[int, int, int, int]]:
    samples = pynvml.nvmlDeviceGetProcessUtilization(handle, cursor_us)
    return [(s.pid, s.timeStamp - W0_US, s.smUtil, s.memUtil) for s in samples]


def _device(handle: object, cursor_us: int = W0_US) -> list[tuple[int, int]]:
    value_type, samples = pynvml.nvmlDeviceGetSamples(
        handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, cursor_us
    )
    assert value_type == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    return [(s.timeStamp - W0_US, s.sampleValue.uiVal) for s in samples]


PROCESS_A = """
[[process]]
pid = 100
gpu = 0
start_s = 0.5
exit_s = 30
busy = [[1.0, 3.5, 100], [5.0, 6.0, 50]]
"""


def test_per_period_reading_gives_one_sample_per_busy_period(sim: Callable[[str], Sim]) -> None:
    s = sim(ONE_GPU + PROCESS_A)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(7)
    # [1,2) and [2,3) full; [3,4) half busy; [5,6) at 50 %. memUtil = round(0.4 × sm).
    assert _util(h) == [
        (100, 2 * S, 100, 40),
        (100, 3 * S, 100, 40),
        (100, 4 * S, 50, 20),
        (100, 6 * S, 50, 20),
    ]
    # Only periods stamped after the cursor.
    assert _util(h, W0_US + 3 * S) == [(100, 4 * S, 50, 20), (100, 6 * S, 50, 20)]


def test_per_query_reading_averages_every_period_since_the_cursor(
    sim: Callable[[str], Sim],
) -> None:
    s = sim(
        ONE_GPU.replace("phase_us = 0", 'phase_us = 0\nsample_reading = "per_query"') + PROCESS_A
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(7)
    # Periods 1..7 hold 0, 100, 100, 50, 0, 50, 0 %: mean 300/7 = 42.86 → 43, mem 17,
    # stamped with the latest period's end (7 s).
    assert _util(h) == [(100, 7 * S, 43, 17)]
    # Since the end of period 3: 50, 0, 50, 0 → 25.
    assert _util(h, W0_US + 3 * S) == [(100, 7 * S, 25, 10)]
    # Nothing ran in period 7 alone, so a cursor at 6 s finds no active process.
    with pytest.raises(pynvml.NVMLError_NotFound):
        _util(h, W0_US + 6 * S)


def test_per_query_lists_each_active_process(sim: Callable[[str], Sim]) -> None:
    s = sim(
        ONE_GPU.replace("phase_us = 0", 'phase_us = 0\nsample_reading = "per_query"')
        + PROCESS_A
        + """
[[process]]
pid = 200
gpu = 0
busy = [[2.0, 2.5, 10]]
"""
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(4)
    # pid 100: 0, 100, 100, 50 asked for; while pid 200's 10 % contends for [2, 2.5) each
    # gets its share of the capped device: 100/110 and 10/110. Means over 4 periods:
    # pid 100 (0 + 100 + 95.45 + 50) / 4 → 61; pid 200 0.45 / 4 → 0.11 → ... 1.14 % → 1.
    assert _util(h) == [(100, 4 * S, 61, 24), (200, 4 * S, 1, 0)]


def test_sm_util_is_rounded_to_whole_percent_half_up(sim: Callable[[str], Sim]) -> None:
    s = sim(
        ONE_GPU
        + """
[[process]]
pid = 300
gpu = 0
busy = [
  [1.0, 1.005, 100],   # 0.5 %  → 1
  [2.0, 2.0049, 100],  # 0.49 % → 0: no sample
  [3.0, 3.0149, 100],  # 1.49 % → 1
  [4.0, 4.015, 100],   # 1.5 %  → 2
  [5.0, 6.0, 33],      # 33 %
  [6.0, 6.5, 33],      # 16.5 % → 17
]
"""
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(7)
    assert [(t // S, sm) for _, t, sm, _ in _util(h)] == [(2, 1), (4, 1), (5, 2), (6, 33), (7, 17)]


def test_idle_device_gives_not_found_but_device_samples_keep_zeros(
    sim: Callable[[str], Sim],
) -> None:
    s = sim(ONE_GPU + "[[process]]\npid = 400\ngpu = 0\n")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotFound):  # no period has ended yet
        _device(h)
    s.clock.advance(3.5)
    with pytest.raises(pynvml.NVMLError_NotFound):
        _util(h)
    assert _device(h) == [(1 * S, 0), (2 * S, 0), (3 * S, 0)]
    with pytest.raises(pynvml.NVMLError_NotFound):  # nothing ended after 3 s yet
        _device(h, W0_US + 3 * S)


def test_device_samples_cap_time_slicing_at_100(sim: Callable[[str], Sim]) -> None:
    s = sim(
        ONE_GPU
        + """
[[process]]
pid = 501
gpu = 0
busy = [[1.0, 3.0, 70]]
[[process]]
pid = 502
gpu = 0
busy = [[2.0, 4.0, 60]]
"""
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(4)
    # [2,3): 70 + 60 contexts time-slice: the device is 100 % busy, and each process's own
    # samples show the share it got: 70/130 and 60/130 of the period.
    assert _device(h) == [(1 * S, 0), (2 * S, 70), (3 * S, 100), (4 * S, 60)]
    assert _util(h) == [
        (501, 2 * S, 70, 28),
        (501, 3 * S, 54, 22),
        (502, 3 * S, 46, 18),
        (502, 4 * S, 60, 24),
    ]
    rates = pynvml.nvmlDeviceGetUtilizationRates(h)
    assert (rates.gpu, rates.memory) == (60, 24)  # the latest period, [3,4)


def test_concurrent_kernels_under_mps_each_show_their_own_time(sim: Callable[[str], Sim]) -> None:
    s = sim(
        "[driver]\nmps = true\n"
        + ONE_GPU
        + """
[[process]]
pid = 501
gpu = 0
busy = [[1.0, 3.0, 70]]
[[process]]
pid = 502
gpu = 0
busy = [[2.0, 4.0, 60]]
"""
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(4)
    assert _device(h) == [(1 * S, 0), (2 * S, 70), (3 * S, 100), (4 * S, 60)]
    assert [(pid, stamp, sm) for pid, stamp, sm, _ in _util(h)] == [
        (501, 2 * S, 70),
        (501, 3 * S, 70),  # overlapping: together past 100 %
        (502, 3 * S, 60),
        (502, 4 * S, 60),
    ]
    # The truth shares the device second: 70/130 and 60/130 of [2, 3).
    truth = {t.key.pid: t.busy_us for t in s.host.truth().values()}
    assert truth[501] + truth[502] == 2_300_000


def test_ring_buffer_drops_periods_a_slow_poller_did_not_read(
    sim: Callable[[str], Sim],
) -> None:
    s = sim(
        ONE_GPU.replace("phase_us = 0", "phase_us = 0\nring_periods = 5")
        + "[[process]]\npid = 600\ngpu = 0\nbusy = [[0.0, 20.0, 100]]\n"
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(10)
    # Only the last five periods (ending 6..10 s) are left; 1..5 are gone.
    assert [t // S for _, t, _, _ in _util(h, W0_US + 2 * S)] == [6, 7, 8, 9, 10]
    assert [t // S for t, _ in _device(h)] == [6, 7, 8, 9, 10]


def test_phase_offset_moves_the_period_grid(sim: Callable[[str], Sim]) -> None:
    s = sim(
        ONE_GPU.replace("phase_us = 0", "phase_us = 250_000")
        + "[[process]]\npid = 700\ngpu = 0\nbusy = [[0.0, 1.0, 100]]\n"
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(2.3)
    # Periods end at 0.25, 1.25, 2.25 s: busy 0.25 s, 0.75 s, 0 of them.
    assert _util(h) == [(700, 250_000, 25, 10), (700, 1_250_000, 75, 30)]
    assert _device(h) == [(250_000, 25), (1_250_000, 75), (2_250_000, 0)]


def test_a_period_ending_between_the_two_calls_gives_insufficient_size(
    sim: Callable[[str], Sim],
) -> None:
    s = sim(ONE_GPU + "[[process]]\npid = 800\ngpu = 0\nbusy = [[0.0, 20.0, 100]]\n")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(3)
    calls: list[str] = []

    def clock_runs_between_calls(name: str) -> None:
        if name == "nvmlDeviceGetProcessUtilization":
            calls.append(name)
            if len(calls) == 2:  # pynvml's second call, after sizing its buffer for one
                s.clock.advance(1)

    s.lib.before_call = clock_runs_between_calls
    with pytest.raises(pynvml.NVMLError_InsufficientSize):
        _util(h, W0_US + 2 * S)
    assert _util(h, W0_US + 2 * S) == [(800, 3 * S, 100, 40), (800, 4 * S, 100, 40)]


def test_garbage_samples_fault_adds_impossible_samples(sim: Callable[[str], Sim]) -> None:
    s = sim(ONE_GPU + PROCESS_A)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(7)
    s.host.inject("garbage_samples", gpu=0)
    cursor = W0_US + 5 * S
    samples = pynvml.nvmlDeviceGetProcessUtilization(h, cursor)
    got = [(x.pid, x.timeStamp, x.smUtil) for x in samples]
    assert got == [
        (100, W0_US + 6 * S, 50),  # the real one
        (100, W0_US + 7 * S, 173),  # smUtil > 100
        (100, cursor, 5),  # stamped at the cursor, not after it
        (4_194_303, W0_US + 7 * S, 10),  # a pid with no context on the device
    ]
    s.host.clear("garbage_samples", gpu=0)
    assert len(pynvml.nvmlDeviceGetProcessUtilization(h, cursor)) == 1


def test_size_query_success_fault_makes_pynvml_raise_base_error(
    sim: Callable[[str], Sim],
) -> None:
    s = sim(ONE_GPU + PROCESS_A)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(7)
    s.host.inject("size_query_success", gpu=0, duration_s=1)
    with pytest.raises(pynvml.NVMLError) as raised:
        _util(h)
    assert type(raised.value) is pynvml.NVMLError
    assert raised.value.value == pynvml.NVML_SUCCESS
    s.clock.advance(1)  # the fault lasted one second
    assert len(_util(h)) == 4


def test_wall_jump_moves_driver_stamps_but_not_monotonic(sim: Callable[[str], Sim]) -> None:
    s = sim(ONE_GPU + "[[process]]\npid = 900\ngpu = 0\nbusy = [[0.0, 20.0, 100]]\n")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(5.5)
    cursor = W0_US + 5 * S
    s.clock.jump_wall(-30)
    assert s.clock.monotonic() == 5.5
    assert s.clock.wall() == (W0_US + 5.5 * S - 30 * S) / S
    s.clock.advance(3)
    # Periods ending at 6, 7, 8 s are stamped 30 s earlier: all before the cursor.
    with pytest.raises(pynvml.NVMLError_NotFound):
        _util(h, cursor)
    assert [t // S for _, t, _, _ in _util(h, 0)] == [1, 2, 3, 4, 5, -24, -23, -22]


def test_scheduled_wall_jump_applies_from_its_start(sim: Callable[[str], Sim]) -> None:
    s = sim(
        ONE_GPU
        + "[[process]]\npid = 901\ngpu = 0\nbusy = [[0.0, 9.0, 100]]\n"
        + '[[fault]]\nkind = "wall_jump"\nstart_s = 2.0\njump_s = 100\n'
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(3)
    # The period ending at 2.0 s, the very instant of the step, was stamped before it.
    assert [t for t, _ in _device(h)] == [1 * S, 2 * S, 103 * S]
    assert s.clock.wall() == (W0_US + 103 * S) / S


def test_a_boot_stamping_driver_stamps_the_series_from_boot_whatever_the_wall_does(
    sim: Callable[[str], Sim],
) -> None:
    """polarsignals/gpu-metrics-agent#36: nvmlDeviceGetSamples in µs since boot (the host
    was up UPTIME_AT_T0_US at t=0); the per-process samples stay on the wall clock."""
    s = sim(
        ONE_GPU
        + "[gpu.driver]\nseries_boot_stamps = true\n"
        + "[[process]]\npid = 902\ngpu = 0\nbusy = [[1.0, 3.0, 100]]\n"
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(2)
    s.clock.jump_wall(-30)
    s.clock.advance(2)
    boot = _device(h, UPTIME_AT_T0_US)  # stamps less W0, as the helper reads them
    assert [(t + W0_US - UPTIME_AT_T0_US, util) for t, util in boot] == [
        (1 * S, 0),
        (2 * S, 100),
        (3 * S, 100),
        (4 * S, 0),
    ]
    assert len(_device(h, UPTIME_AT_T0_US + 3 * S)) == 1  # the cursor is on the same clock
    assert [t for _, t, _, _ in _util(h, 0)] == [2 * S, 3 * S - 30 * S]


def test_a_series_that_runs_dry_holds_no_idle_period(sim: Callable[[str], Sim]) -> None:
    """polarsignals/gpu-metrics-agent#37: NOT_FOUND while the GPU idles, samples again with
    work, and none for the idle periods between."""
    s = sim(
        ONE_GPU
        + "[gpu.driver]\nseries_dry_when_idle = true\n"
        + "[[process]]\npid = 903\ngpu = 0\nbusy = [[1.0, 2.0, 100], [5.0, 6.0, 50]]\n"
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(1.5)
    with pytest.raises(pynvml.NVMLError_NotFound):
        _device(h)
    s.clock.advance(5.5)
    assert _device(h) == [(2 * S, 100), (6 * S, 50)]
