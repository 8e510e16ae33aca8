"""The device utilization series: the period grid, its holes, nothing read twice."""

from __future__ import annotations

from creditmeter.agent.apportion import Period
from creditmeter.agent.gpu import DeviceSample
from creditmeter.agent.sampling import DeviceSeries

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
