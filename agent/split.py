"""Splitting one process's busy time in a window among the jobs it ran: pure functions.

One inference worker serves many customers in turn, so a process's busy time is cut along
the jobs' spans. The meter measures busy time per *slice* (a span of driver time and the busy
µs × 100 in it); within a slice, busy time is taken as spread uniformly, so a job gets the
part of a slice its span covers. Jobs open at the same time (batched inference) share the
overlap evenly, or in proportion to their declared weights. Busy time outside every job is
the *fallback* part, billed later by the process's own labels; the part of it that lies in
time for which the worker reported jobs it could not deliver is kept apart, so that its
record can say ``fallback=true``.

Exactness: the parts sum to the window's ``busy_us`` exactly. Every slice's pct_us is
apportioned among the parts in integers (largest remainders), then the window's busy_us is
apportioned in proportion to the parts' pct_us (largest remainders again). Ties go to the
part that sorts first (job id order, then fallback, then undelivered), never to input order,
so the result does not depend on the order of slices or spans.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from creditmeter.agent.usage import Slice

WEIGHT_MIN = 1e-6
WEIGHT_MAX = 1e6
_WEIGHT_UNITS = 1_000_000  # weights become integers in millionths: exact arithmetic after


@dataclass(frozen=True, slots=True)
class JobSpan:
    """A job of the process: [start_us, end_us) in wall µs, same clock as the slices."""

    job_id: str
    account: str
    model: str
    start_us: int
    end_us: int | None = None  # None: still open
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Interval:
    """A span of time, [start_us, end_us)."""

    start_us: int
    end_us: int


@dataclass(frozen=True, slots=True)
class JobPart:
    job_id: str
    account: str
    model: str
    busy_us: int


@dataclass(frozen=True, slots=True)
class Parts:
    """A window's busy time, split. ``busy_us`` of all parts adds up to the window's."""

    jobs: tuple[JobPart, ...]  # one per span given, in job id order; busy_us may be 0
    fallback_busy_us: int  # outside every job: the process's own labels
    undelivered_busy_us: int  # outside every job, in time of jobs declared but not delivered

    @property
    def busy_us(self) -> int:
        return sum(p.busy_us for p in self.jobs) + self.fallback_busy_us + self.undelivered_busy_us


def weight_units(weight: float) -> int:
    """A declared weight in integer millionths. Raises ValueError when out of range."""
    if not math.isfinite(weight) or not WEIGHT_MIN <= weight <= WEIGHT_MAX:
        raise ValueError(
            f"weight {weight!r} is not a finite number in [{WEIGHT_MIN}, {WEIGHT_MAX}]"
        )
    return max(1, round(weight * _WEIGHT_UNITS))


def split(
    slices: Sequence[Slice],
    busy_us: int,
    spans: Sequence[JobSpan],
    undelivered: Sequence[Interval] = (),
) -> Parts:
    """The parts of one process's window: per job, fallback, undelivered.

    ``busy_us`` is the window's busy time as the meter rounded it (it may differ from the
    slices' pct_us / 100 by the meter's carried remainder). Spans are those that touched the
    window; job ids must be unique. Raises ValueError on a slice that ends before it starts,
    negative busy time, a span that ends before it starts, a duplicate job id or a bad weight.
    """
    if busy_us < 0:
        raise ValueError(f"busy_us {busy_us} < 0")
    jobs = _checked_jobs(spans)
    fallback_index, undelivered_index = len(jobs), len(jobs) + 1
    pct = _pct_per_part(slices, jobs, undelivered, by_time=False)
    if sum(pct) == 0:
        # Busy time from the meter's carried remainder and no busy slice: share it by time
        # instead, so that a job spanning the whole window still gets all of it.
        pct = _pct_per_part(slices, jobs, undelivered, by_time=True)
    if sum(pct) == 0:
        pct[fallback_index] = 1  # no slice at all: nothing to split along
    busy = largest_remainders(busy_us, pct)
    return Parts(
        jobs=tuple(JobPart(j.job_id, j.account, j.model, busy[i]) for i, j in enumerate(jobs)),
        fallback_busy_us=busy[fallback_index],
        undelivered_busy_us=busy[undelivered_index],
    )


def largest_remainders(total: int, weights: Sequence[int | Fraction]) -> list[int]:
    """``total`` in integers in proportion to ``weights``; sums to ``total`` exactly.

    Each share is rounded down, and the units left over go to the largest fractional parts,
    ties to the lower index. Weights must be >= 0 and not all 0 unless total is 0.
    """
    if all(type(w) is int for w in weights):
        return _integer_remainders(total, weights)  # type: ignore[arg-type]
    weight_sum = sum(weights, Fraction(0))
    if weight_sum == 0:
        if total:
            raise ValueError("cannot apportion a non-zero total over zero weights")
        return [0] * len(weights)
    exact = [Fraction(total) * w / weight_sum for w in weights]
    shares = [math.floor(x) for x in exact]
    left = total - sum(shares)
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def _integer_remainders(total: int, weights: Sequence[int]) -> list[int]:
    """``largest_remainders`` for integer weights, in integers alone (the meter splits
    every shared period with it): share i is total·w_i // W with remainder total·w_i % W,
    and the remainders order exactly as the fractional parts do."""
    weight_sum = sum(weights)
    if weight_sum == 0:
        if total:
            raise ValueError("cannot apportion a non-zero total over zero weights")
        return [0] * len(weights)
    shares, remainders = [], []
    for w in weights:
        share, remainder = divmod(total * w, weight_sum)
        shares.append(share)
        remainders.append(remainder)
    left = total - sum(shares)
    if left:
        for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
            shares[i] += 1
    return shares


def _checked_jobs(spans: Sequence[JobSpan]) -> list[JobSpan]:
    jobs = sorted(spans, key=lambda s: s.job_id)
    for previous, job in itertools.pairwise(jobs):
        if previous.job_id == job.job_id:
            raise ValueError(f"job {job.job_id!r} appears twice")
    for job in jobs:
        if job.end_us is not None and job.end_us < job.start_us:
            raise ValueError(f"job {job.job_id!r} ends before it starts")
        weight_units(job.weight)
    return jobs


def _pct_per_part(
    slices: Sequence[Slice],
    jobs: Sequence[JobSpan],
    undelivered: Sequence[Interval],
    *,
    by_time: bool,
) -> list[int]:
    """Integer pct_us per part (jobs, fallback, undelivered), each slice apportioned."""
    weights = [weight_units(j.weight) for j in jobs]
    totals = [0] * (len(jobs) + 2)
    for piece in slices:
        if piece.end_us < piece.start_us or piece.pct_us < 0:
            raise ValueError(f"bad slice {piece}")
        # By time, an instant (a zero-length slice) still counts once: it is where it is.
        amount = max(1, piece.end_us - piece.start_us) if by_time else piece.pct_us
        if amount == 0:
            continue
        exact = _slice_shares(piece, jobs, weights, undelivered)
        for i, share in enumerate(largest_remainders(amount, exact)):
            totals[i] += share
    return totals


def _slice_shares(
    piece: Slice,
    jobs: Sequence[JobSpan],
    weights: Sequence[int],
    undelivered: Sequence[Interval],
) -> list[Fraction]:
    """Each part's exact share of one slice, as fractions of the slice (summing to 1)."""
    shares = [Fraction(0)] * (len(jobs) + 2)
    fallback, late = len(jobs), len(jobs) + 1
    for start, end, length in _segments(piece, jobs, undelivered):
        active = [i for i, j in enumerate(jobs) if _covers(j.start_us, j.end_us, start, end)]
        if active:
            weight_sum = sum(weights[i] for i in active)
            for i in active:
                shares[i] += length * weights[i] / weight_sum
        elif any(_covers(u.start_us, u.end_us, start, end) for u in undelivered):
            shares[late] += length
        else:
            shares[fallback] += length
    return shares


def _segments(
    piece: Slice, jobs: Sequence[JobSpan], undelivered: Sequence[Interval]
) -> list[tuple[int, int, Fraction]]:
    """The slice cut at every job and undelivered boundary: (start, end, share of the slice).

    A slice of zero length is a single instant, which is in a job when start <= t < end.
    """
    if piece.end_us == piece.start_us:
        t = piece.start_us
        return [(t, t + 1, Fraction(1))]
    cuts = {piece.start_us, piece.end_us}
    for bound in (
        *(j.start_us for j in jobs),
        *(j.end_us for j in jobs if j.end_us is not None),
        *(u.start_us for u in undelivered),
        *(u.end_us for u in undelivered),
    ):
        if piece.start_us < bound < piece.end_us:
            cuts.add(bound)
    points = sorted(cuts)
    length = piece.end_us - piece.start_us
    return [(a, b, Fraction(b - a, length)) for a, b in itertools.pairwise(points)]


def _covers(start_us: int, end_us: int | None, seg_start: int, seg_end: int) -> bool:
    """True when [start_us, end_us) contains the segment, which no boundary cuts."""
    return start_us <= seg_start and (end_us is None or end_us >= seg_end)
