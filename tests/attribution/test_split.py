"""Splitting a window's busy time among jobs: cases worked by hand, then properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditmeter.agent.split import Interval, JobPart, JobSpan, Parts, largest_remainders, split
from creditmeter.agent.usage import Slice

T = 1_700_000_000_000_000


def s(start: int, end: int, busy_us: int) -> Slice:
    """A slice from T+start to T+end with busy_us of busy time."""
    return Slice(T + start, T + end, busy_us * 100)


def j(job_id: str, start: int, end: int | None, weight: float = 1.0) -> JobSpan:
    return JobSpan(
        job_id, f"acct-{job_id}", "m", T + start, None if end is None else T + end, weight
    )


def busy(parts: Parts) -> dict[str, int]:
    out = {p.job_id: p.busy_us for p in parts.jobs}
    out["<fallback>"] = parts.fallback_busy_us
    out["<undelivered>"] = parts.undelivered_busy_us
    return out


# -- by hand -------------------------------------------------------------------------------


def test_consecutive_jobs_get_the_busy_time_their_spans_cover() -> None:
    # 500 µs busy spread over 1000 µs: A covers 400 µs of it (200 busy), B 600 µs (300 busy).
    parts = split([s(0, 1000, 500)], 500, [j("a", 0, 400), j("b", 400, 1000)])
    assert busy(parts) == {"a": 200, "b": 300, "<fallback>": 0, "<undelivered>": 0}


def test_overlapping_jobs_share_the_overlap_evenly() -> None:
    # Fully busy 1000 µs. A alone over [0, 500): 500. Both over [500, 1000): 250 each.
    parts = split([s(0, 1000, 1000)], 1000, [j("a", 0, 1000), j("b", 500, 1000)])
    assert busy(parts)["a"] == 750
    assert busy(parts)["b"] == 250


def test_overlapping_jobs_share_by_declared_weight() -> None:
    # Same, B declared weight 3: the overlap's 500 goes 125 / 375.
    parts = split([s(0, 1000, 1000)], 1000, [j("a", 0, 1000), j("b", 500, 1000, weight=3.0)])
    assert busy(parts)["a"] == 625
    assert busy(parts)["b"] == 375


def test_time_outside_every_job_is_the_fallback_part() -> None:
    parts = split([s(0, 1000, 1000)], 1000, [j("a", 200, 700)])
    assert busy(parts) == {"a": 500, "<fallback>": 500, "<undelivered>": 0}


def test_time_of_undelivered_jobs_is_kept_apart_from_plain_fallback() -> None:
    undelivered = [Interval(T + 300, T + 600)]
    parts = split([s(0, 1000, 1000)], 1000, [j("a", 0, 300)], undelivered)
    assert busy(parts) == {"a": 300, "<fallback>": 400, "<undelivered>": 300}


def test_a_delivered_job_wins_over_undelivered_time() -> None:
    undelivered = [Interval(T, T + 1000)]
    parts = split([s(0, 1000, 1000)], 1000, [j("a", 0, 600)], undelivered)
    assert busy(parts) == {"a": 600, "<fallback>": 0, "<undelivered>": 400}


def test_an_open_job_runs_to_the_end_of_the_window() -> None:
    parts = split([s(0, 1000, 1000)], 1000, [j("a", 300, None)])
    assert busy(parts) == {"a": 700, "<fallback>": 300, "<undelivered>": 0}


def test_rounding_remainder_goes_to_the_largest_remainder_then_job_id_order() -> None:
    # Three equal jobs over 1000 µs busy: 333.33 each; the 1 left over goes to "a".
    spans = [j("c", 0, 1000), j("a", 0, 1000), j("b", 0, 1000)]
    parts = split([s(0, 1000, 1000)], 1000, spans)
    assert [(p.job_id, p.busy_us) for p in parts.jobs] == [("a", 334), ("b", 333), ("c", 333)]


def test_the_leftover_microsecond_goes_to_the_larger_remainder() -> None:
    # 10 µs busy over 1000 µs: A covers a third (3.33 µs), B two thirds (6.67 µs).
    parts = split([s(0, 1000, 10)], 10, [j("a", 0, 333), j("b", 333, 1000)])
    assert (busy(parts)["a"], busy(parts)["b"]) == (3, 7)


def test_the_meters_rounding_carry_is_apportioned_too() -> None:
    # Slices say 999.5 µs; the meter carried 0.5 from the last window and reports 1000.
    parts = split([Slice(T, T + 1000, 99_950)], 1000, [j("a", 0, 500), j("b", 500, 1000)])
    assert busy(parts)["a"] + busy(parts)["b"] == 1000
    assert sorted([busy(parts)["a"], busy(parts)["b"]]) == [500, 500]


def test_carry_without_busy_slices_is_shared_by_time() -> None:
    # The final window of a process: no busy slice, but the carried 0.5 µs rounds up to 1.
    parts = split([Slice(T, T + 1000, 0)], 1, [j("a", 0, None)])
    assert busy(parts)["a"] == 1


def test_no_slices_leaves_everything_to_fallback() -> None:
    assert busy(split([], 3, [j("a", 0, None)])) == {"a": 0, "<fallback>": 3, "<undelivered>": 0}


def test_a_zero_length_slice_belongs_to_the_job_open_at_that_instant() -> None:
    parts = split([Slice(T + 500, T + 500, 1000)], 10, [j("a", 0, 500), j("b", 500, 600)])
    assert busy(parts)["a"] == 0
    assert busy(parts)["b"] == 10


def test_jobs_that_touched_the_window_but_got_nothing_are_listed_with_zero() -> None:
    parts = split([s(0, 1000, 100)], 100, [j("a", 0, 1000), j("idle", 2000, 3000)])
    assert parts.jobs[1] == JobPart("idle", "acct-idle", "m", 0)


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([j("a", 0, 10), j("a", 20, 30)], "twice"),
        ([j("a", 10, 5)], "ends before"),
        ([j("a", 0, 10, weight=0.0)], "weight"),
        ([j("a", 0, 10, weight=float("nan"))], "weight"),
        ([j("a", 0, 10, weight=float("inf"))], "weight"),
    ],
)
def test_bad_spans_are_refused(spans: list[JobSpan], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split([s(0, 1000, 100)], 100, spans)


def test_bad_slices_and_busy_are_refused() -> None:
    with pytest.raises(ValueError, match="bad slice"):
        split([Slice(T + 10, T, 100)], 1, [])
    with pytest.raises(ValueError, match="busy_us"):
        split([], -1, [])


def test_largest_remainders_by_hand() -> None:
    assert largest_remainders(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainders(10, [1, 2]) == [3, 7]  # 3.33 and 6.67: the .67 gets the unit
    assert largest_remainders(7, [0, 5, 2]) == [0, 5, 2]
    assert largest_remainders(0, [0, 0]) == [0, 0]
    with pytest.raises(ValueError):
        largest_remainders(1, [0, 0])


# -- properties ----------------------------------------------------------------------------


@st.composite
def windows(draw: st.DrawFn) -> tuple[list[Slice], int, list[JobSpan], list[Interval]]:
    """Contiguous slices (with possible holes), the meter's busy_us, spans, undelivered time."""
    n = draw(st.integers(0, 8))
    slices: list[Slice] = []
    t = T
    for _ in range(n):
        t += draw(st.integers(0, 300))  # a hole: a period the meter did not see
        length = draw(st.integers(0, 2_000))
        pct = draw(st.integers(0, 100 * length)) if length else draw(st.integers(0, 5_000))
        slices.append(Slice(t, t + length, pct))
        t += length
    carry = draw(st.integers(0, 1))
    busy_us = sum(x.pct_us for x in slices) // 100 + carry
    span_count = draw(st.integers(0, 6))
    spans = []
    for i in range(span_count):
        start = draw(st.integers(T - 500, t + 500))
        end = draw(st.none() | st.integers(start, t + 1_000))
        weight = draw(st.sampled_from([1.0, 0.5, 2.0, 3.0, 1e-6, 1e6]))
        spans.append(JobSpan(f"job-{i}", "acct", "m", start, end, weight))
    undelivered = [
        Interval(a, a + draw(st.integers(0, 3_000)))
        for a in draw(st.lists(st.integers(T - 500, t + 500), max_size=2))
    ]
    return slices, busy_us, spans, undelivered


@settings(max_examples=300, deadline=None)
@given(windows())
def test_parts_sum_exactly_and_none_is_negative(
    window: tuple[list[Slice], int, list[JobSpan], list[Interval]],
) -> None:
    slices, busy_us, spans, undelivered = window
    parts = split(slices, busy_us, spans, undelivered)
    assert parts.busy_us == busy_us
    assert all(p.busy_us >= 0 for p in parts.jobs)
    assert parts.fallback_busy_us >= 0
    assert parts.undelivered_busy_us >= 0
    assert [p.job_id for p in parts.jobs] == sorted(x.job_id for x in spans)


@settings(max_examples=200, deadline=None)
@given(windows(), st.randoms(use_true_random=False))
def test_order_of_slices_and_spans_does_not_matter(
    window: tuple[list[Slice], int, list[JobSpan], list[Interval]], rnd: random.Random
) -> None:
    slices, busy_us, spans, undelivered = window
    expected = split(slices, busy_us, spans, undelivered)
    rnd.shuffle(slices)
    rnd.shuffle(spans)
    rnd.shuffle(undelivered)
    assert split(slices, busy_us, spans, undelivered) == expected


@settings(max_examples=200, deadline=None)
@given(windows(), st.booleans())
def test_a_job_covering_the_whole_window_gets_everything(
    window: tuple[list[Slice], int, list[JobSpan], list[Interval]], open_ended: bool
) -> None:
    slices, busy_us, _, undelivered = window
    start = min((x.start_us for x in slices), default=T)
    end = None if open_ended else max((x.end_us for x in slices), default=T) + 1
    parts = split(slices, busy_us, [JobSpan("all", "acct", "m", start, end)], undelivered)
    if slices:
        assert parts.jobs[0].busy_us == busy_us
        assert parts.fallback_busy_us == parts.undelivered_busy_us == 0
    else:
        assert parts.fallback_busy_us == busy_us  # nothing to split along


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 2_000), st.integers(0, 2_000)), min_size=1, max_size=10),
    st.data(),
)
def test_disjoint_jobs_get_exactly_their_slices_busy_time(
    shape: list[tuple[int, int]], data: st.DataObject
) -> None:
    # Slices back to back; each busy a whole number of µs, so nothing rounds. Jobs cover runs
    # of consecutive slices exactly; the rest is fallback.
    slices, t = [], T
    for length, busy_us in shape:
        slices.append(Slice(t, t + length, min(busy_us, length) * 100))
        t += length
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(slices)), max_size=6))) | {0})
    spans, expected, covered = [], {}, 0
    for k, (a, b) in enumerate(zip(cuts, [*cuts[1:], len(slices)], strict=True)):
        if a == b or not data.draw(st.booleans()):
            continue
        spans.append(JobSpan(f"j{k}", "acct", "m", slices[a].start_us, slices[b - 1].end_us))
        expected[f"j{k}"] = sum(x.pct_us for x in slices[a:b]) // 100
        covered += expected[f"j{k}"]
    busy_us = sum(x.pct_us for x in slices) // 100
    parts = split(slices, busy_us, spans)
    assert {p.job_id: p.busy_us for p in parts.jobs} == expected
    assert parts.fallback_busy_us == busy_us - covered
