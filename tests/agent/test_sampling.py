"""Reading one poll's NVML samples: the grid, the two readings, the driver's quirks."""

from __future__ import annotations

from creditmeter.agent.gpu import DeviceSample, UtilSample
from creditmeter.agent.sampling import Busy, Reading, SampleInterpreter

P = 200_000  # µs: a 0.2 s sample period
T0 = 1_700_000_000_000_000  # µs since the epoch


def periods(*utils: int, start: int = T0) -> list[DeviceSample]:
    """Device samples for consecutive periods after ``start``."""
    return [DeviceSample(start + (i + 1) * P, u) for i, u in enumerate(utils)]


def sample(pid: int, k: int, sm: int, start: int = T0) -> UtilSample:
    """A process sample stamped at the end of period k (1-based) after ``start``."""
    return UtilSample(pid, start + k * P, sm, 0, 0, 0)


def test_per_period_samples_each_cover_their_period() -> None:
    interp = SampleInterpreter()
    result = interp.interpret(T0, periods(50, 100, 0), [sample(7, 1, 50), sample(7, 2, 100)], {7})
    assert interp.reading is Reading.PER_PERIOD
    assert interp.period_us == P
    assert result.cursor_us == T0 + 3 * P
    assert result.busy == [
        Busy(7, T0, T0 + P, P * 50),
        Busy(7, T0 + P, T0 + 2 * P, P * 100),
    ]
    assert sum(b.pct_us for b in result.busy) // 100 == 300_000  # 0.1 s + 0.2 s


def test_per_query_sample_covers_the_whole_span_once_recognised() -> None:
    # Busy 100 % in periods 1-3 of 4, idle in 4: a per-query driver stamps one sample at the
    # end of period 4 with the mean, 75 %. The device was idle in period 4: impossible for a
    # per-period driver, so the reading is known and the sample covers all four periods.
    interp = SampleInterpreter()
    result = interp.interpret(T0, periods(100, 100, 100, 0), [sample(7, 4, 75)], {7})
    assert interp.reading is Reading.PER_QUERY
    assert result.busy == [Busy(7, T0, T0 + 4 * P, 4 * P * 75)]
    assert result.busy[0].pct_us // 100 == 3 * P


def test_per_query_recognised_by_a_busy_period_without_samples() -> None:
    interp = SampleInterpreter()
    interp.interpret(T0, periods(80, 40), [sample(7, 2, 60)], {7})
    assert interp.reading is Reading.PER_QUERY


def test_per_query_recognised_when_samples_fall_short_of_the_device() -> None:
    # Only the last of 5 periods busy (90 %): per query averages to 18 %, far below 90.
    interp = SampleInterpreter()
    interp.interpret(T0, periods(0, 0, 0, 0, 90), [sample(7, 5, 18)], {7})
    assert interp.reading is Reading.PER_QUERY


def test_a_lone_last_period_sample_matching_the_device_stays_unknown_and_reads_per_period() -> None:
    interp = SampleInterpreter()
    result = interp.interpret(T0, periods(0, 0, 90), [sample(7, 3, 90)], {7})
    assert interp.reading is Reading.UNKNOWN
    assert result.busy == [Busy(7, T0 + 2 * P, T0 + 3 * P, P * 90)]


def test_time_slicing_processes_do_not_look_like_per_query() -> None:
    # Two processes at 50 % each fill the device: union 100 = sum, per-period consistent.
    interp = SampleInterpreter()
    interp.interpret(T0, periods(0, 100), [sample(7, 2, 50), sample(8, 2, 50)], {7, 8})
    assert interp.reading is Reading.UNKNOWN


def test_a_settled_reading_is_kept_and_contradictions_counted() -> None:
    interp = SampleInterpreter(P, Reading.PER_QUERY)
    interp.interpret(T0, periods(50, 50), [sample(7, 1, 50), sample(7, 2, 50)], {7})
    assert interp.reading is Reading.PER_QUERY
    assert interp.contradictions == 1


def test_ring_overflow_is_a_lost_span_not_busy_time() -> None:
    interp = SampleInterpreter(P)
    late = T0 + 10 * P  # the ring only holds periods after this
    result = interp.interpret(T0, periods(100, start=late), [sample(7, 1, 100, start=late)], {7})
    assert result.lost == [(T0, late)]
    assert result.busy == [Busy(7, late, late + P, P * 100)]


def test_driver_quirks_are_discarded_and_counted() -> None:
    interp = SampleInterpreter(P)
    quirks = [
        sample(7, 1, 150),  # util over 100
        UtilSample(7, T0, 40, 0, 0, 0),  # at the cursor: already read
        UtilSample(7, T0 - P, 40, 0, 0, 0),  # before the cursor
        sample(99, 1, 40),  # a pid not on the device
        sample(7, 3, 40),  # after the newest period the device reported
    ]
    result = interp.interpret(T0, periods(0, 60), [*quirks, sample(7, 2, 60)], {7})
    assert result.busy == [Busy(7, T0 + P, T0 + 2 * P, P * 60)]
    assert result.discarded == {
        "util_over_100": 1,
        "stale_timestamp": 2,
        "pid_not_on_device": 1,
        "after_last_period": 1,
    }


def test_no_new_period_consumes_nothing() -> None:
    interp = SampleInterpreter(P)
    result = interp.interpret(T0, [DeviceSample(T0, 50)], [sample(7, 0, 50)], {7})
    assert result.cursor_us == T0
    assert result.busy == []


def test_the_period_is_learnt_from_the_device_grid_not_assumed() -> None:
    interp = SampleInterpreter()
    interp.interpret(
        T0, [DeviceSample(T0 + 1_000_000, 0), DeviceSample(T0 + 2_000_000, 0)], [], set()
    )
    assert interp.period_us == 1_000_000
    interp.interpret(
        T0 + 2_000_000,
        [DeviceSample(T0 + 2_166_667, 0), DeviceSample(T0 + 2_333_334, 0)],
        [],
        set(),
    )
    assert interp.period_us == 166_667


def test_a_hole_between_periods_is_lost_time_and_no_period_stretches_over_it() -> None:
    # Periods 1-2, then nothing until period 10 (a forward clock step, or a driver hiccup):
    # the sample at period 10 covers one period, not the eight before it.
    interp = SampleInterpreter(P)
    series = [*periods(100, 100), DeviceSample(T0 + 10 * P, 100)]
    samples = [sample(7, 1, 100), sample(7, 2, 100), sample(7, 10, 100)]
    result = interp.interpret(T0, series, samples, {7})
    assert result.lost == [(T0 + 2 * P, T0 + 9 * P)]
    assert sum(b.pct_us for b in result.busy) == 3 * P * 100


def test_per_query_coverage_excludes_the_hole() -> None:
    interp = SampleInterpreter(P, Reading.PER_QUERY)
    late = T0 + 5 * P
    result = interp.interpret(T0, periods(50, 50, start=late), [sample(7, 2, 50, start=late)], {7})
    assert result.lost == [(T0, late)]
    assert result.busy[0].pct_us == 2 * P * 50
