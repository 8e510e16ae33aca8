"""Piecewise-constant activity over simulated time, integrated exactly in integers.

A process's kernel activity, a MIG instance's and a whole GPU's are each one
:class:`StepFunction` whose level is an integer (a percent, or a percent weighted by MIG
slices). Integrals over any interval cost two bisections thanks to prefix sums, which is what
keeps per-period sampling cheap however long the scenario is.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Segment:
    """``level`` holds on ``[start_us, end_us)``."""

    start_us: int
    end_us: int
    level: int


class StepFunction:
    """An integer level over simulated µs: zero outside its segments.

    Segments must be sorted, non-overlapping and non-empty; touching segments are fine.
    """

    __slots__ = ("_ends", "_levels", "_prefix", "_starts")

    def __init__(self, segments: Iterable[Segment]) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._levels: list[int] = []
        self._prefix: list[int] = [0]  # integral of everything before segment i
        for seg in segments:
            if seg.end_us <= seg.start_us or (self._ends and seg.start_us < self._ends[-1]):
                raise ValueError(f"segments must be sorted, disjoint and non-empty: {seg}")
            if seg.level == 0:
                continue
            self._starts.append(seg.start_us)
            self._ends.append(seg.end_us)
            self._levels.append(seg.level)
            self._prefix.append(self._prefix[-1] + (seg.end_us - seg.start_us) * seg.level)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(map(Segment, self._starts, self._ends, self._levels))

    @property
    def first_us(self) -> int | None:
        """Start of the first non-zero segment (None when always zero)."""
        return self._starts[0] if self._starts else None

    @property
    def last_us(self) -> int | None:
        """End of the last non-zero segment (None when always zero)."""
        return self._ends[-1] if self._ends else None

    def integral(self, start_us: int, end_us: int) -> int:
        """∫ level dt over ``[start_us, end_us)`` in level·µs (0 for an empty interval)."""
        if end_us <= start_us:
            return 0
        return self._cumulative(end_us) - self._cumulative(start_us)

    def windows(self, start_us: int, width_us: int, count: int) -> dict[int, int]:
        """Integrals over ``count`` consecutive windows of ``width_us`` from ``start_us``,
        as {window index: integral} for the non-zero ones.

        Walks only the segments in range (one bisection when there are none), so a batch of
        sample periods costs about one lookup per process however many periods it spans.
        """
        out: dict[int, int] = {}
        end_us = start_us + width_us * count
        starts, ends, levels = self._starts, self._ends, self._levels
        i = bisect_right(ends, start_us)  # first segment ending after start_us
        while i < len(starts) and starts[i] < end_us:
            _spread(
                out, max(starts[i], start_us), min(ends[i], end_us), levels[i], start_us, width_us
            )
            i += 1
        return out

    def level_at(self, t_us: int) -> int:
        i = bisect_right(self._starts, t_us) - 1
        if i < 0 or t_us >= self._ends[i]:
            return 0
        return self._levels[i]

    def _cumulative(self, t_us: int) -> int:
        i = bisect_right(self._starts, t_us) - 1
        if i < 0:
            return 0
        return self._prefix[i] + (min(t_us, self._ends[i]) - self._starts[i]) * self._levels[i]

    @classmethod
    def sum_of(
        cls, parts: Sequence[tuple[int, StepFunction]], cap: int | None = None
    ) -> StepFunction:
        """Σ weight·f over ``parts``, optionally capped at ``cap`` (time-slicing: ≤ 100 %)."""
        events: dict[int, int] = {}
        for weight, fn in parts:
            for start, end, level in zip(fn._starts, fn._ends, fn._levels, strict=True):
                events[start] = events.get(start, 0) + weight * level
                events[end] = events.get(end, 0) - weight * level
        return cls(_sweep(events, cap))


def _spread(
    out: dict[int, int], seg_start: int, seg_end: int, level: int, start_us: int, width_us: int
) -> None:
    """Add ``level`` on ``[seg_start, seg_end)`` to the windows it overlaps."""
    j = (seg_start - start_us) // width_us
    t = seg_start
    while t < seg_end:
        window_end = start_us + (j + 1) * width_us
        piece_end = min(seg_end, window_end)
        out[j] = out.get(j, 0) + (piece_end - t) * level
        t = piece_end
        j += 1


def _sweep(events: dict[int, int], cap: int | None) -> list[Segment]:
    """Turn level changes at instants into merged segments."""
    out: list[Segment] = []
    level = 0
    times = sorted(events)
    for start, end in itertools.pairwise(times):
        level += events[start]
        shown = level if cap is None else min(cap, level)
        if shown == 0:
            continue
        if out and out[-1].end_us == start and out[-1].level == shown:
            out[-1] = Segment(out[-1].start_us, end, shown)
        else:
            out.append(Segment(start, end, shown))
    return out


SHARE_SCALE = 1_000_000  # shared levels are percent × this: integer shares of a capped device


def capped_shares(parts: Sequence[StepFunction], cap: int = 100) -> list[StepFunction]:
    """What each of ``parts`` (levels in percent) really gets of a device that runs at most
    ``cap`` percent: its own level while the sum fits, its proportional share of ``cap`` while
    the parts contend. Levels of the result are percent × SHARE_SCALE, apportioned by largest
    remainders so that at every instant they add up to exactly min(cap, Σ) × SHARE_SCALE.

    This is both what time-slicing contexts get (their kernels run in turn) and what billing
    by conservation owes concurrent (MPS) kernels: one GPU-second is shared, never billed
    twice.
    """
    events: dict[int, list[tuple[int, int]]] = {}
    for i, fn in enumerate(parts):
        for start, end, level in zip(fn._starts, fn._ends, fn._levels, strict=True):
            events.setdefault(start, []).append((i, level))
            events.setdefault(end, []).append((i, -level))
    levels = [0] * len(parts)
    out: list[list[Segment]] = [[] for _ in parts]
    for start, end in itertools.pairwise(sorted(events)):
        for i, delta in events[start]:
            levels[i] += delta
        for i, level in enumerate(_shared_levels(levels, cap)):
            if level:
                _append_merged(out[i], Segment(start, end, level))
    return [StepFunction(segments) for segments in out]


def _shared_levels(levels: Sequence[int], cap: int) -> list[int]:
    total = sum(levels)
    if total <= cap:
        return [level * SHARE_SCALE for level in levels]
    budget = cap * SHARE_SCALE
    exact = [level * budget for level in levels]  # numerators over ``total``
    shares = [x // total for x in exact]
    left = budget - sum(shares)
    by_remainder = sorted(range(len(levels)), key=lambda i: (-(exact[i] % total), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def _append_merged(segments: list[Segment], seg: Segment) -> None:
    if segments and segments[-1].end_us == seg.start_us and segments[-1].level == seg.level:
        segments[-1] = Segment(segments[-1].start_us, seg.end_us, seg.level)
    else:
        segments.append(seg)
