"""The device utilization series: the period grid, its holes, nothing read twice, and a
series that holds no idle period (polarsignals/gpu-metrics-agent#37)."""

from __future__ import annotations

from creditmeter.agent.apportion import Period
from creditmeter.agent.gpu import DeviceSample
from creditmeter.agent.sampling import (
    DRY_AFTER_US,
    SHORTEST_PERIOD_US,
    DeviceSeries,
    Quiet,
    SeriesRead,
)

P = 166_667
T0 = 1_750_000_000_000_000


def samples(*utils: int, start: int = T0, period: int = P) -> list[DeviceSample]:
    return [DeviceSample(start + (i + 1) * period, u) for i, u in enumerate(utils)]


def test_each_period_is_its_own_busy_time_exactly() -> None:
    read = DeviceSeries().read(T0, samples(0, 50, 100))
    assert read.periods == [
        Period(T0, T0 + P, 0),
        Period(T0 + P, T0 + 2 * P, 50 * P),
        Period(T0 + 2 * P, T0 + 3 * P, 100 * P),
    ]
    assert read.cursor_us == T0 + 3 * P
    assert read.lost == []


def test_the_period_is_learnt_from_the_grid_not_assumed() -> None:
    series = DeviceSeries()
    series.read(T0, samples(10, 10, 10, period=1_000_000))
    assert series.period_us == 1_000_000
    series.read(T0, samples(10, 10, period=500_000))
    assert series.period_us == 500_000  # the shortest step seen


def test_a_hole_in_the_ring_is_lost_time_and_no_period_stretches_over_it() -> None:
    series = DeviceSeries(P)
    ring = [DeviceSample(T0 + P, 40), DeviceSample(T0 + 10 * P, 60)]
    read = series.read(T0, ring)
    assert read.lost == [(T0 + P, T0 + 9 * P)]
    assert read.periods[-1] == Period(T0 + 9 * P, T0 + 10 * P, 60 * P)


def test_samples_at_or_before_the_cursor_are_never_read_again() -> None:
    series = DeviceSeries(P)
    read = series.read(T0 + 2 * P, samples(70, 70, 70))
    assert [p.end_us for p in read.periods] == [T0 + 3 * P]
    assert DeviceSeries(P).read(T0 + 9 * P, samples(70)).periods == []


def test_a_lone_sample_waits_for_the_next_read_while_the_period_is_unknown() -> None:
    """A series that holds no idle period answers one sample after a hole: taken as
    covering all the time since the cursor, it once billed the idle time before it at its
    percent (+60 % on `sdxl` at 1 s under `dry_when_idle`)."""
    series = DeviceSeries()
    stamp = T0 + 30_000_000
    held = series.read(T0, [DeviceSample(stamp, 97)], now_us=stamp + 500_000)
    assert held.held and held.periods == [] and held.cursor_us == T0  # asked again next poll
    read = series.read(T0, [DeviceSample(stamp, 97), DeviceSample(stamp + 1_000_000, 97)])
    assert series.period_us == 1_000_000
    assert read.lost == [(T0, stamp - 1_000_000)]
    assert read.periods[0] == Period(stamp - 1_000_000, stamp, 97 * 1_000_000)


def test_an_old_lone_sample_of_unknown_period_covers_the_shortest_there_is() -> None:
    stamp = T0 + 30_000_000
    read = DeviceSeries().read(T0, [DeviceSample(stamp, 97)], now_us=stamp + 2_000_000)
    assert read.periods == [Period(stamp - SHORTEST_PERIOD_US, stamp, 97 * SHORTEST_PERIOD_US)]
    assert read.lost == [(T0, stamp - SHORTEST_PERIOD_US)]  # a gap, never billed


def dry_read(cursor_us: int, *stamps_and_utils: tuple[int, int]) -> SeriesRead:
    return DeviceSeries(P).read(cursor_us, [DeviceSample(t, u) for t, u in stamps_and_utils])


def never(*_: int) -> bool:
    return False


def test_holes_of_a_dry_series_are_idle_where_nothing_was_dropped() -> None:
    quiet = Quiet()
    assert not quiet.nothing_new(T0, T0 + DRY_AFTER_US, P)  # not yet: a sample may be late
    assert quiet.nothing_new(T0, T0 + DRY_AFTER_US + 1, P)  # dry from here on
    read = dry_read(T0, (T0 + 20 * P, 50), (T0 + 30 * P, 60))
    quiet.idle_in(read, T0, P, reaches=lambda us: True, claimed=never)
    assert read.lost == []
    assert read.periods == [
        Period(T0, T0 + 19 * P, 0),
        Period(T0 + 19 * P, T0 + 20 * P, 50 * P),
        Period(T0 + 20 * P, T0 + 29 * P, 0),
        Period(T0 + 29 * P, T0 + 30 * P, 60 * P),
    ]


def test_where_the_ring_no_longer_reaches_the_cursor_only_what_was_shown_empty_is_idle() -> None:
    quiet = Quiet(dry=True)
    quiet.nothing_new(T0, T0 + 10 * P + P // 2, P)  # nothing held through T0 + 9.5 P
    read = dry_read(T0, (T0 + 20 * P, 50))
    quiet.idle_in(read, T0, P, reaches=lambda us: False, claimed=never)
    assert read.periods[0] == Period(T0, T0 + 9 * P, 0)  # on the sample's grid
    assert read.lost == [(T0 + 9 * P, T0 + 19 * P)]  # may have been dropped: a gap


def test_holes_stay_gaps_unless_the_series_is_dry_and_no_evidence_claims_them() -> None:
    for quiet, claimed in ((Quiet(), never), (Quiet(dry=True), lambda s, e: True)):
        read = dry_read(T0, (T0 + P, 40), (T0 + 10 * P, 60))
        quiet.idle_in(read, T0, P, reaches=lambda us: True, claimed=claimed)
        assert read.lost == [(T0 + P, T0 + 9 * P)]
