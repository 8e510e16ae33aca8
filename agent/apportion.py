"""Apportioning a GPU's busy time among its processes: conservation, by construction.

The device's utilization series (one sample per period, idle ones included) is the total
that gets billed. Per-process evidence only decides who gets which part of it:

- a process *alone* on the GPU over a period gets all of that period's busy time, whatever
  its own samples say, and also when it has none;
- where several processes held contexts, each period's busy time is split by the evidence:
  each piece of evidence says how much busy time a process had over a span (a sample's
  percent × the span it covers), and is trusted up to its *bound* (that plus its rounding);
- busy time no listed process's evidence can take, under any arrangement within the
  bounds, is *unattributed*, with the reason: nobody held a context, the evidence of a
  process the driver never listed (a process that lived between two polls, or garbage)
  claims it, or there is no evidence for it.

Evidence spans and device periods need not line up (a 1 s process grid beside a 1/6 s
device grid, or a cadence per PID): each device period of the shared time is a *row*
holding its busy time, each piece of evidence a column over the periods it overlaps, and
the pieces are fitted to the rows by iterative proportional fitting (rows to their busy
time, pieces to their claims, never past their bounds), each settlement continuing the
last one's fit (``FitMemory``); rows that hold the same pieces, each over the whole row,
are fitted as one (``_Segment``). What the rows then lack is moved along augmenting paths to
the room left under the pieces' bounds (a maximum flow), so that only the minimum cut
stays unattributed. A period is never cut at an evidence boundary, since where its busy
time fell inside it is unknown. Where every piece lies within one row, the split is direct.

Exactness: every row's busy time is split in integers (largest remainders), so per GPU the
shares, unattributed and alone parts add up to the periods' busy time to the µs × %.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from creditmeter.agent.split import largest_remainders

IPF_ROUNDS = 20  # fitting rounds at most per settlement (continued by the next: FitMemory)
# Each fitting step overshoots its exact scaling by this power: over-relaxed IPF (Sinkhorn)
# has the same fixed points and gets nearer them in fewer rounds (Thibault, Chizat, Dossal,
# Papadakis, "Overrelaxed Sinkhorn-Knopp algorithm for regularized optimal transport",
# arXiv:1711.01851). 1.5 was the best of 1.0-1.7 on the traced realistic and stale-stamp
# hours: nearer the truth per process than 100 plain rounds, with less unattributed.
IPF_OVERRELAX = 1.5
IPF_TOLERANCE = 1e-4  # relative: a piece this little over its bound still fits
IPF_STALL = 0.99  # pieces short of their claims by this much of the round before: stalled
AUGMENT_MIN = 1.0  # µs × %: less room, lack or weight than this is none (float residue)
AUGMENT_PATHS = 1_000  # per fit, a guard (traced fits need under 40): the rest stays unattributed


class Unattributed(enum.IntEnum):
    """Why busy time went to nobody (the values of the record's UnattributedReason)."""

    NO_PROCESS = 1  # the device was busy while no process held a context on it
    UNKNOWN_PROCESS = 2  # claimed by a pid the driver never listed on the device
    NO_EVIDENCE = 3  # several processes held contexts and none has evidence for it
    PROCESSES_UNLISTED = 4  # the driver would not list the device's processes


class Period(NamedTuple):
    """One device sample period: [start_us, end_us) and its busy µs × 100. (NamedTuples:
    the meter makes thousands a minute, and a frozen dataclass costs several times more
    to build.)"""

    start_us: int
    end_us: int
    busy_pct_us: int


class Evidence(NamedTuple):
    """What one per-process sample says: ``pct_us`` of busy time (µs × %) over
    [start_us, end_us), trusted up to ``bound_pct_us``. ``known``: the pid is one the driver
    listed on this device; other pids' claims only ever become unattributed time."""

    pid: int
    start_us: int
    end_us: int
    pct_us: int
    bound_pct_us: int
    known: bool = True


class Presence(NamedTuple):
    """A process that may have held a context over [from_us, until_us)."""

    pid: int
    from_us: int
    until_us: int | None  # None: still holds it


class Share(NamedTuple):
    pid: int
    start_us: int
    end_us: int
    pct_us: int
    exact: bool  # alone on the device: no evidence needed


@dataclass(slots=True)
class Apportioned:
    """The committed part of one apportioning: shares, unattributed time by reason, and how
    much of each piece of evidence the committed time used (by index in the input)."""

    shares: list[Share] = field(default_factory=list)
    unattributed: dict[Unattributed, int] = field(default_factory=dict)
    used: dict[int, float] = field(default_factory=dict)
    busy_pct_us: int = 0  # the committed periods' busy time: the total everything adds to
    # Fits whose search for augmenting paths stopped at AUGMENT_PATHS: what their rows
    # still lacked stayed unattributed though a path might have placed it (never billed).
    fits_cut_short: int = 0

    def leave(self, reason: Unattributed, pct_us: int) -> None:
        if pct_us:
            self.unattributed[reason] = self.unattributed.get(reason, 0) + pct_us


PieceKey = tuple[int, int, int]  # (pid, start_us, end_us)


class FitMemory:
    """Where the last fit of one GPU's shared time left it: a factor per piece of evidence
    and one per device period, on the weights a cold fit starts from. Settlements come
    every few seconds and fit mostly the same periods and pieces again (those not yet
    committed): starting where the last fit stopped, a few rounds each go as far as many
    from a cold start, since fitting on the same rows compounds.

    Fitting only ever scales a row's cells alike and a piece's cells alike, so where it
    left the cells is exactly a factor per piece times a factor per period (the
    biproportional form), and the memory holds one number per piece and per period, not per
    cell. A piece or period new to the fit starts at 1: the start stays a scaling of the
    claims, as a cold one is. A piece fitted in two runs of shared time (broken by a period
    that needs no fit) keeps the later run's factor: a start only, which the fit corrects.
    Empty: a cold start (a new agent, or a GPU found again)."""

    __slots__ = ("periods", "pieces")

    def __init__(self) -> None:
        self.pieces: dict[PieceKey, float] = {}
        self.periods: dict[int, float] = {}  # by the period's start_us


def apportion(
    periods: Sequence[Period],
    evidence: Sequence[Evidence],
    presence: Sequence[Presence],
    commit_until_us: int,
    used_before: Sequence[float] = (),
    *,
    complete_until_us: int | None = None,
    memory: FitMemory | None = None,
) -> Apportioned:
    """Split the busy time of ``periods`` (sorted, disjoint) and commit the periods ending
    at or before ``commit_until_us`` (a period end, or past the last).

    ``used_before[i]`` is what earlier commits already took of ``evidence[i]``. The periods
    after the commit are fitted too, so that evidence straddling the commit is shared
    between both sides as it should be, but only the committed side is returned. Up to
    ``complete_until_us`` (default: the commit) all evidence is in, and rows are filled to
    their busy time; after it evidence may still be on its way, and rows are only held to
    at most their busy time. ``memory``: the GPU's last fit, continued, and replaced by
    this one.
    """
    complete = commit_until_us if complete_until_us is None else complete_until_us
    out = Apportioned()
    remaining = [
        max(0.0, e.bound_pct_us - (used_before[i] if i < len(used_before) else 0.0))
        for i, e in enumerate(evidence)
    ]
    shared: list[Period] = []
    claims = _claims(periods, evidence)
    holders = [(p.pid, p.from_us, _NEVER if p.until_us is None else p.until_us) for p in presence]
    steady = _steady(holders, periods)
    shares, used = out.shares, out.used
    for k, (period, claimed) in enumerate(zip(periods, claims, strict=True)):
        start, end, busy = period.start_us, period.end_us, period.busy_pct_us
        committed = end <= commit_until_us
        if committed:
            out.busy_pct_us += busy
        present = steady if steady is not None else _holding(holders, period)
        if len(claimed) == 1 and len(present) > 1:
            # The common shared period: one process's sample, exactly the period.
            i = claimed[0]
            e = evidence[i]
            if e.known and e.start_us == start and e.end_us == end:
                if committed and busy:
                    taken = min(busy, int(remaining[i]))
                    if taken:
                        shares.append(Share(e.pid, start, end, taken, False))
                        used[i] = used.get(i, 0.0) + taken
                        remaining[i] -= taken
                    if busy > taken:
                        out.leave(Unattributed.NO_EVIDENCE, busy - taken)
                continue
        if not claimed:  # nobody's evidence: alone, nobody, or nobody can tell
            if committed and period.busy_pct_us:
                _settle_unclaimed(period, present, out)
            continue
        if _settle_alone(period, evidence, claimed, present, committed, remaining, out):
            continue
        if _aligned(period, evidence, claimed):
            if committed and period.busy_pct_us:  # else nothing to split: its evidence is its own
                around = _Around(periods, claims, evidence, k, complete)
                _split_aligned(period, claimed, evidence, presence, remaining, out, around)
            continue
        shared.append(period)
    runs = _runs(shared)
    last_end_us = periods[-1].end_us if periods else 0
    spans = _spans_to_fit(evidence, runs, last_end_us) if runs else []
    fitted = FitMemory()  # this fit's, for the next settlement
    for run in runs:
        goals = _goals(run, evidence, remaining, spans)
        layout = _layout(run, evidence, complete, memory)
        if _fit(layout.segments, evidence, remaining, goals, complete, memory, fitted):
            out.fits_cut_short += 1
        for segment in layout.segments:
            if segment.members[0].end_us <= commit_until_us:
                _commit_segment(
                    segment, evidence, presence, remaining, layout, commit_until_us, out
                )
    if memory is not None:
        memory.pieces, memory.periods = fitted.pieces, fitted.periods
    return out


def _spans_to_fit(
    evidence: Sequence[Evidence], runs: Sequence[Sequence[Period]], last_end_us: int
) -> list[int]:
    """Each piece's span still to be fitted: its overlap with every run, plus what reaches
    past the periods read so far. Once per apportioning, not once per run."""
    spans = []
    for e in evidence:
        ahead = max(0, e.end_us - max(e.start_us, last_end_us))
        spans.append(ahead + sum(_overlap(e, r[0].start_us, r[-1].end_us) for r in runs))
    return spans


def _goals(
    run: Sequence[Period],
    evidence: Sequence[Evidence],
    remaining: Sequence[float],
    spans: Sequence[int],
) -> dict[int, float]:
    """What each piece overlapping ``run`` should take there: its claim not yet spent, in
    the proportion of its span still to be fitted that lies in this run (a piece reaching
    past the periods read so far keeps that part of its claim for periods still to come)."""
    start, end = run[0].start_us, run[-1].end_us
    goals: dict[int, float] = {}
    for i, e in enumerate(evidence):
        here = _overlap(e, start, end)
        if here <= 0:
            continue
        claim_left = remaining[i] - (e.bound_pct_us - e.pct_us)
        goals[i] = claim_left * here / spans[i] if claim_left > 0 else 0.0
    return goals


# -- alone, and nobody -----------------------------------------------------------------------


def _present(presence: Sequence[Presence], start_us: int, end_us: int) -> list[int]:
    return [
        p.pid
        for p in presence
        if p.from_us < end_us and (p.until_us is None or p.until_us > start_us)
    ]


def _overlap(e: Evidence, start_us: int, end_us: int) -> int:
    return max(0, min(e.end_us, end_us) - max(e.start_us, start_us))


def _claims(periods: Sequence[Period], evidence: Sequence[Evidence]) -> list[list[int]]:
    """For each period, the pieces of evidence that overlap it (by index)."""
    ends = [p.end_us for p in periods]
    out: list[list[int]] = [[] for _ in periods]
    for i, e in enumerate(evidence):
        k = bisect.bisect_right(ends, e.start_us)
        while k < len(periods) and periods[k].start_us < e.end_us:
            out[k].append(i)
            k += 1
    return out


_NEVER = 2**63  # an end later than any time: a context still held
Holder = tuple[int, int, int]  # (pid, from_us, until_us)


def _holding(holders: Sequence[Holder], period: Period) -> list[int]:
    """The pids that may have held a context during ``period``."""
    start, end = period.start_us, period.end_us
    return sorted({pid for pid, from_us, until_us in holders if from_us < end and until_us > start})


def _steady(holders: Sequence[Holder], periods: Sequence[Period]) -> list[int] | None:
    """The holders, when every one held its context over all of ``periods`` (the common
    case: then no period needs its own look)."""
    if not periods:
        return None
    start, end = periods[0].start_us, periods[-1].end_us
    if all(from_us <= start and until_us >= end for _, from_us, until_us in holders):
        return sorted({pid for pid, _, _ in holders})
    return None


def _settle_unclaimed(period: Period, present: Sequence[int], out: Apportioned) -> None:
    start, end = period.start_us, period.end_us
    if len(present) == 1:
        out.shares.append(Share(present[0], start, end, period.busy_pct_us, exact=True))
    elif present:
        out.leave(Unattributed.NO_EVIDENCE, period.busy_pct_us)
    else:
        out.leave(Unattributed.NO_PROCESS, period.busy_pct_us)


def _aligned(period: Period, evidence: Sequence[Evidence], claims: Sequence[int]) -> bool:
    """Whether every piece of evidence on the period is exactly the period (one row per
    sample on the device's grid: the common case, split directly)."""
    for i in claims:
        e = evidence[i]
        if e.start_us != period.start_us or e.end_us != period.end_us:
            return False
    return True


def _split_aligned(
    period: Period,
    claims: Sequence[int],
    evidence: Sequence[Evidence],
    presence: Sequence[Presence],
    remaining: list[float],
    out: Apportioned,
    around: _Around | None = None,
) -> None:
    """A shared period whose every piece is exactly the period: split by the pieces'
    claims, each held to its bound (``_commit_row`` without the rows)."""
    if len(claims) == 1 and evidence[claims[0]].known:  # one process computed: the most common
        i = claims[0]
        taken = min(period.busy_pct_us, int(remaining[i]))
        if taken:
            out.shares.append(
                Share(evidence[i].pid, period.start_us, period.end_us, taken, exact=False)
            )
            out.used[i] = out.used.get(i, 0.0) + taken
            remaining[i] -= taken
        out.leave(Unattributed.NO_EVIDENCE, period.busy_pct_us - taken)
        return
    if _split_exactly(period, claims, evidence, remaining, out, around):
        return
    known = [_Cell(i, float(evidence[i].pct_us)) for i in claims if evidence[i].known]
    row = _Row(period.start_us, period.end_us, period.busy_pct_us, known)
    _fit_aligned(row, known, remaining)
    row.cells = known + [
        _Cell(i, float(evidence[i].pct_us)) for i in claims if not evidence[i].known
    ]
    _commit_row(row, evidence, presence, remaining, out)


def _split_exactly(
    period: Period,
    claims: Sequence[int],
    evidence: Sequence[Evidence],
    remaining: list[float],
    out: Apportioned,
    around: _Around | None = None,
) -> bool:
    """The usual shared period: known processes' samples only, one each, that fit their
    bounds when the period is split by their claims (or, where the claims add up past the
    busy time, by what concurrent kernels got of it: ``_concurrent_weights``). False: take
    the general way."""
    busy = period.busy_pct_us
    pieces = [evidence[i] for i in claims]
    total = 0
    pids = set()
    for e in pieces:
        if not e.known or e.pid in pids:
            return False
        pids.add(e.pid)
        total += e.pct_us
    if not total:
        return False
    weights: list[float] = [e.pct_us for e in pieces]
    concurrent = False
    span_us = period.end_us - period.start_us
    if around is not None and total - busy > len(pieces) * span_us:  # past rounding's 1 %
        weights, concurrent = _concurrent_weights(span_us, pieces, *around.claims()), True
    weight_sum = sum(weights)
    if not weight_sum:
        return False
    for i, w in zip(claims, weights, strict=True):
        if w * busy > remaining[i] * weight_sum:
            return False  # a claim over its bound: fitted the general way
    order = sorted(range(len(pieces)), key=lambda k: pieces[k].pid)
    if concurrent:
        split = largest_remainders(busy, _integral([weights[k] for k in order]))
    else:  # the claims themselves: an exact driver is split exactly
        split = largest_remainders(busy, [pieces[k].pct_us for k in order])
    for k, pct in zip(order, split, strict=True):
        i, e = claims[k], pieces[k]
        if pct:
            out.shares.append(Share(e.pid, period.start_us, period.end_us, pct, False))
        w = weights[k] * busy / weight_sum
        out.used[i] = out.used.get(i, 0.0) + w
        remaining[i] = max(0.0, remaining[i] - w)
    return True


CONCURRENT_FULL = 0.95  # a neighbouring claim this near a process's level: busy all through


class _Around:
    """The aligned claims of the periods on either side of one, looked up only when needed:
    the one before if it is in this apportioning and adjoins, the one after if it also
    adjoins and its evidence is complete."""

    __slots__ = ("_claims", "_complete_us", "_evidence", "_k", "_periods")

    def __init__(
        self,
        periods: Sequence[Period],
        claims: Sequence[Sequence[int]],
        evidence: Sequence[Evidence],
        k: int,
        complete_us: int,
    ) -> None:
        self._periods, self._claims, self._evidence = periods, claims, evidence
        self._k, self._complete_us = k, complete_us

    def claims(self) -> tuple[dict[int, int] | None, dict[int, int] | None]:
        k, periods = self._k, self._periods
        before = after = None
        if k > 0 and periods[k - 1].end_us == periods[k].start_us:
            before = self._aligned_claims(k - 1)
        if (
            k + 1 < len(periods)
            and periods[k + 1].start_us == periods[k].end_us
            and periods[k + 1].end_us <= self._complete_us
        ):
            after = self._aligned_claims(k + 1)
        return before, after

    def _aligned_claims(self, j: int) -> dict[int, int]:
        period = self._periods[j]
        out: dict[int, int] = {}
        for i in self._claims[j]:
            e = self._evidence[i]
            if e.known and e.start_us == period.start_us and e.end_us == period.end_us:
                out[e.pid] = out.get(e.pid, 0) + e.pct_us
        return out


def _concurrent_weights(
    span_us: int,
    pieces: Sequence[Evidence],
    before: dict[int, int] | None,
    after: dict[int, int] | None,
) -> list[float]:
    """What each process's kernels got of a period whose claims add up past its busy time:
    concurrent kernels (MPS), each claim its own level × the time it ran, the device at most
    100 % and shared by level while they contend.

    Splitting by the claims would take most from the process busy longest, though it
    overlapped no more than the others (one busy all the period at 97 %, one half of it:
    0.66 s and 0.33 s for 0.735 s and 0.25 s). Where in the period each ran is read from the
    periods on either side: a process idle before and busy after started in this period and
    ran at its end; busy before and idle after, it ran at the start; its level is its
    largest claim of the three. With neither side known, each ran all through at its claim,
    which is the split by claims."""
    spans = []
    for e in pieces:
        prev = None if before is None else before.get(e.pid, 0)
        nxt = None if after is None else after.get(e.pid, 0)
        level = max(e.pct_us, prev or 0, nxt or 0)
        ran = e.pct_us / level if level else 0.0
        full = CONCURRENT_FULL * level
        if prev is not None and prev < full and (nxt is None or nxt >= full):
            spans.append((1.0 - ran, 1.0, level / span_us))  # started here: ran at the end
        else:
            spans.append((0.0, ran, level / span_us))  # ran from the start
    edges = sorted({edge for a, b, _ in spans for edge in (a, b)})
    got = [0.0] * len(spans)
    for a, b in itertools.pairwise(edges):
        running = [n for n, (s, t, _) in enumerate(spans) if s <= a and t >= b]
        demand = sum(spans[n][2] for n in running)
        scale = min(1.0, 100.0 / demand) if demand else 0.0
        for n in running:
            got[n] += spans[n][2] * scale * (b - a)
    return got


def _settle_alone(
    period: Period,
    evidence: Sequence[Evidence],
    claims: Sequence[int],
    present: Sequence[int],
    committed: bool,
    remaining: list[float],
    out: Apportioned,
) -> bool:
    """Settle a period nobody shares: alone, or nobody at all. False: it is shared."""
    start, end = period.start_us, period.end_us
    if len(present) > 1 or any(not evidence[i].known for i in claims):
        return False
    if not committed:
        return True  # nothing to fit: settled when committed
    if not present:
        out.leave(Unattributed.NO_PROCESS, period.busy_pct_us)
        return True
    pid = present[0]
    if period.busy_pct_us:
        out.shares.append(Share(pid, start, end, period.busy_pct_us, exact=True))
    for i in claims:  # its own evidence of this time is spent, whatever it said
        e = evidence[i]
        taken = e.pct_us * _overlap(e, start, end) / max(1, e.end_us - e.start_us)
        out.used[i] = out.used.get(i, 0.0) + taken
        remaining[i] = max(0.0, remaining[i] - taken)
    return True


def _runs(periods: Sequence[Period]) -> list[list[Period]]:
    """Consecutive periods without a break in time."""
    runs: list[list[Period]] = []
    for p in periods:
        if runs and runs[-1][-1].end_us == p.start_us:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


# -- shared time ------------------------------------------------------------------------------


class _Cell:
    """One piece of evidence's weight in one row."""

    __slots__ = ("i", "start_w", "w")

    def __init__(self, i: int, w: float, start_w: float | None = None) -> None:
        self.i = i  # the piece's index
        self.w = w  # its busy time in the row, µs × %: fitted in place
        self.start_w = w if start_w is None else start_w  # from its claim alone, cold


@dataclass(slots=True)
class _Row:
    start_us: int
    end_us: int
    busy_pct_us: int
    cells: list[_Cell]
    # Aligned rows whose pieces fit uncapped: the pieces' own integer claims, so that an
    # exact driver is split exactly (float weights could move a unit between processes).
    exact: bool = False


class _Segment:
    """Busy periods of a run fitted as one row: those whose known pieces are the same and
    each span the whole of every period (no piece starts or ends among them: a piece
    sampled once a second spans six periods of 1/6 s), or one period alone. Plain fitting
    scales a row's cells alike and a piece's cells alike, so periods fitted as one and
    their result spread back by busy time are the same fit in a fraction of the cells.
    Over-relaxed rounds scale each row by a power of its factor, and take the periods as
    one by another path to the same fixed point: nearer it in the same rounds
    (``tests/agent/test_apportion.py``)."""

    __slots__ = ("base", "members", "row")

    def __init__(self, members: list[Period], base: float) -> None:
        self.members = members
        busy = sum(p.busy_pct_us for p in members)
        self.row = _Row(members[0].start_us, members[-1].end_us, busy, [])
        # Σ length × memory factor over the members: what a piece over all of them weighs
        # per unit of density and of its own factor (the length alone on a cold start).
        self.base = base


class _Layout(NamedTuple):
    """A run's busy periods as segments, with their known pieces as cells, and the pieces
    of pids the driver never listed (by index: only ever unattributed)."""

    segments: list[_Segment]
    unknown: list[int]


def _layout(
    run: Sequence[Period],
    evidence: Sequence[Evidence],
    complete_until_us: int,
    memory: FitMemory | None,
) -> _Layout:
    """The run's busy periods as segments (``_Segment``), each known piece overlapping
    them a cell of each segment it overlaps: its claim spread over its span by time, times
    its factor and the periods' in ``memory``.

    A period is never cut at an evidence boundary: where inside a period its busy time fell
    is unknown, and spreading it by time would put busy time where a process's own sample
    says it was idle (a 1 s process grid half a second off the device's grid), leaving it
    unattributed. The fit instead moves each piece's weight between the periods it spans."""
    start, end = run[0].start_us, run[-1].end_us
    known: list[int] = []
    unknown: list[int] = []
    for i, e in enumerate(evidence):
        if e.start_us < end and e.end_us > start:
            (known if e.known else unknown).append(i)
    busy = [p for p in run if p.busy_pct_us]
    if not busy:
        return _Layout([], unknown)
    # The known pieces change only at their own starts and ends, and completeness at its
    # own edge: periods between two such edges, none inside, have the same pieces.
    edges = [complete_until_us]
    for i in known:
        edges += (evidence[i].start_us, evidence[i].end_us)
    periods = {} if memory is None else memory.periods
    segments = [
        _Segment(group, sum((p.end_us - p.start_us) * periods.get(p.start_us, 1.0) for p in group))
        for group in _groups(busy, sorted(set(edges)))
    ]
    _place_cells(segments, busy, evidence, known, {} if memory is None else memory.pieces)
    return _Layout(segments, unknown)


def _groups(busy: Sequence[Period], edges: Sequence[int]) -> list[list[Period]]:
    """The busy periods cut at every edge: a period with an edge inside is a group alone."""
    out: list[list[Period]] = []
    group: list[Period] = []
    until = 0  # the first edge after the group's start: it may grow up to there
    for p in busy:
        if group and p.end_us > until:
            out.append(group)
            group = []
        if not group:
            k = bisect.bisect_right(edges, p.start_us)
            until = edges[k] if k < len(edges) else _NEVER
            if until < p.end_us:
                out.append([p])
                continue
        group.append(p)
    if group:
        out.append(group)
    return out


def _place_cells(
    segments: Sequence[_Segment],
    busy: Sequence[Period],
    evidence: Sequence[Evidence],
    known: Sequence[int],
    factors: dict[PieceKey, float],
) -> None:
    """A cell for each known piece in each segment it overlaps. A piece spans the whole of
    a segment of several periods, so the walk steps a segment at a time."""
    starts = [p.start_us for p in busy]
    segment_of: list[int] = []
    after: list[int] = []  # the index of the first busy period after each segment
    for n, segment in enumerate(segments):
        segment_of += [n] * len(segment.members)
        after.append(len(segment_of))
    for i in known:
        e = evidence[i]
        density = e.pct_us / max(1, e.end_us - e.start_us)
        factor = factors.get((e.pid, e.start_us, e.end_us), 1.0)
        k = max(0, bisect.bisect_right(starts, e.start_us) - 1)
        while k < len(busy) and busy[k].start_us < e.end_us:
            n = segment_of[k]
            row = segments[n].row
            part = min(e.end_us, row.end_us) - max(e.start_us, row.start_us)
            if part > 0:
                start_w = density * part  # a segment of several: part is its whole span
                w = start_w * factor * segments[n].base / (row.end_us - row.start_us)
                row.cells.append(_Cell(i, w, start_w))
            k = after[n]


def _fit(
    segments: Sequence[_Segment],
    evidence: Sequence[Evidence],
    bound: Sequence[float],
    goals: dict[int, float],
    complete_until_us: int,
    memory: FitMemory | None,
    fitted: FitMemory,
) -> bool:
    """Fit the known pieces' cells: each row whose evidence is complete to its busy time,
    each piece to its claim (``goals``), and never past its bound. Later rows are only held
    to at most their busy time: their evidence may still be on its way, and must not pull
    the others' share away. Unknown pieces keep their own weights: they only take what is
    left over.

    Pieces are pulled up to their claims as well as down to their bounds: fitting rows
    alone spreads a long piece (a PID sampled every 4.5 s) evenly over its span, into
    periods where its process was idle, and the short pieces of the processes that were
    busy there lose what they claimed; those long pieces then drift to their bounds, and
    over an hour a process sampled slowly is billed about 1 % more than it ran, one
    sampled fast 1 % less, though each one's claims add up to within 0.1 %.

    The fit starts where the last settlement's left it (``memory``, applied to the cells
    already) and leaves its own in ``fitted``. Where bounds bind, what the rows still lack
    is then given out along augmenting paths (``_top_up``), not by more rounds. True: that
    search stopped at its guard (``AUGMENT_PATHS``)."""
    rows = [segment.row for segment in segments]
    by_piece: dict[int, list[_Cell]] = {}
    periods: dict[int, int] = {}  # piece: how many busy periods it overlaps
    for segment in segments:
        for c in segment.row.cells:
            by_piece.setdefault(c.i, []).append(c)
            periods[c.i] = periods.get(c.i, 0) + len(segment.members)
    if all(n == 1 for n in periods.values()):
        for row in rows:
            for c in row.cells:
                c.w = c.start_w  # each row split by its pieces' own claims
            _fit_aligned(row, row.cells, bound)
        return False
    row_factors, piece_factors = _ipf(rows, by_piece, bound, goals, complete_until_us)
    # Remembered before the bounds' repair below: the fit alone only scales each row and
    # piece, so the next settlement starts from a scaling of the claims, as a cold one does.
    _remember(segments, evidence, row_factors, piece_factors, memory, fitted)
    # Rows had the last word; now bounds, and what rows lack goes to the room left under
    # them (also where claims of zero left the rows nothing to scale).
    _cap_pieces(by_piece, bound)
    return _top_up(rows, [row.cells for row in rows], by_piece, bound, complete_until_us)


def _remember(
    segments: Sequence[_Segment],
    evidence: Sequence[Evidence],
    row_factors: Sequence[float],
    piece_factors: dict[int, float],
    memory: FitMemory | None,
    fitted: FitMemory,
) -> None:
    """Put in ``fitted`` the factors that start the next fit where this one stopped: each
    piece's, times what it started from, and each period's, its segment's factor spread
    back by busy time (the next fit may take the period in another segment)."""
    before = {} if memory is None else memory.pieces
    for i, factor in piece_factors.items():
        e = evidence[i]
        key = (e.pid, e.start_us, e.end_us)
        fitted.pieces[key] = before.get(key, 1.0) * factor
    for segment, factor in zip(segments, row_factors, strict=True):
        per_busy = factor * segment.base / segment.row.busy_pct_us
        for p in segment.members:
            fitted.periods[p.start_us] = per_busy * p.busy_pct_us / (p.end_us - p.start_us)


def _ipf(
    rows: Sequence[_Row],
    by_piece: dict[int, list[_Cell]],
    bound: Sequence[float],
    goals: dict[int, float],
    complete_until_us: int,
) -> tuple[list[float], dict[int, float]]:
    """Over-relaxed iterative proportional fitting, ``IPF_ROUNDS`` at most, until every
    piece is at its claim or within its bound; then rows to their busy time exactly.
    Returns what each row and each piece was scaled by in all.

    The rounds are the agent's hottest loop under drivers with cadences of their own, so
    what each row and piece is held to is worked out once, not once a round."""
    lines = [(r.busy_pct_us, r.end_us <= complete_until_us, r.cells) for r in rows]
    row_factors = [1.0] * len(rows)
    piece_factors = dict.fromkeys(by_piece, 1.0)
    pieces = [
        (
            i,
            cells,
            bound[i] * (1 + IPF_TOLERANCE),  # over this: capped to its bound
            bound[i],
            goals.get(i, 0.0) * (1 - IPF_TOLERANCE),  # under this: pulled up to its goal
            min(goals.get(i, 0.0), bound[i]),
        )
        for i, cells in by_piece.items()
    ]
    power = IPF_OVERRELAX
    previous_short = float("inf")
    for _ in range(IPF_ROUNDS):
        _scale_lines(lines, power, row_factors)
        capped, short = False, 0.0
        for i, cells, over, cap, under, goal in pieces:
            total = 0.0
            for c in cells:
                total += c.w
            if total > over:
                factor, capped = cap / total, True
            elif 0 < total < under:
                factor = goal / total
                short += goal - total
            else:
                continue
            factor **= power
            piece_factors[i] *= factor
            for c in cells:
                c.w *= factor
        if not capped and not short:
            break
        if not capped and short > IPF_STALL * previous_short:
            break  # claims the rows cannot all give (a rounded claim, a row still to come)
        previous_short = short
    _scale_lines(lines, 1.0, row_factors)
    return row_factors, piece_factors


def _scale_lines(
    lines: Sequence[tuple[int, bool, list[_Cell]]],
    power: float,
    factors: list[float] | None = None,
) -> None:
    """Each row to its busy time (or, where its evidence may still come, down to it at
    most), the factor to the ``power``; each row's factor multiplied into ``factors``."""
    for n, (busy, up, cells) in enumerate(lines):
        total = 0.0
        for c in cells:
            total += c.w
        if total > 0 and (up or total > busy):
            factor = busy / total if power == 1.0 else (busy / total) ** power
            if factors is not None:
                factors[n] *= factor
            for c in cells:
                c.w *= factor


def _cap_pieces(by_piece: dict[int, list[_Cell]], bound: Sequence[float]) -> None:
    """Scale each piece over its bound down to it."""
    for i, cells in by_piece.items():
        total = sum(c.w for c in cells)
        if total > bound[i] * (1 + IPF_TOLERANCE):
            factor = bound[i] / total
            for c in cells:
                c.w *= factor


def _top_up(
    rows: Sequence[_Row],
    mine: Sequence[list[_Cell]],
    by_piece: dict[int, list[_Cell]],
    bound: Sequence[float],
    complete_until_us: int,
) -> bool:
    """Fitting converges only geometrically where bounds bind: give what each complete row
    still lacks to its pieces that have room left under their bounds, then move weight
    along augmenting paths (``_augment``) until no arrangement within the bounds can fill a
    complete row further. True: the paths stopped at their guard."""
    # A piece's weight in rows not complete yet only holds a place (their evidence may still
    # come): the complete rows, whose evidence is all in, take its room under its bound first.
    complete = [k for k, row in enumerate(rows) if row.end_us <= complete_until_us]
    room = {i: bound[i] for i in by_piece}
    for k in complete:
        for c in mine[k]:
            room[c.i] -= c.w
    lacking: dict[int, float] = {}
    for k in complete:
        lack = rows[k].busy_pct_us - sum(c.w for c in mine[k])
        if lack > AUGMENT_MIN:
            lack = _fill_from_room(lack, mine[k], room)
        if lack > AUGMENT_MIN:
            lacking[k] = lack
    if lacking and any(r > AUGMENT_MIN for r in room.values()):
        return _augment(complete, mine, room, lacking)
    return False


def _fill_from_room(lack: float, cells: Sequence[_Cell], room: dict[int, float]) -> float:
    """Give up to ``lack`` to a row's pieces in proportion to the room each has left under
    its bound (and take it from their room); returns what the row still lacks."""
    spare = sum(max(0.0, room[c.i]) for c in cells)
    if spare <= 0:
        return lack
    share = min(1.0, lack / spare)
    for c in cells:
        extra = max(0.0, room[c.i]) * share
        c.w += extra
        room[c.i] -= extra
    return lack - min(lack, spare)


def _augment(
    complete: Sequence[int],
    mine: Sequence[list[_Cell]],
    room: dict[int, float],
    lacking: dict[int, float],
) -> bool:
    """Fill complete rows to the most the pieces' bounds allow: a maximum flow from the
    pieces' room to the rows' lack, over augmenting paths (Edmonds-Karp). A path starts at
    a piece with room, adds weight to a row it spans, takes as much from a second piece in
    that row, which adds it to another row it spans, and so on to a row that lacks: every
    row between keeps its total, every piece between its own. When no path is left, what
    the rows still lack is busy time no arrangement of the evidence within its bounds can
    take (the minimum cut): unattributed, and never billed to a guess. True: the search
    stopped at ``AUGMENT_PATHS`` paths with rows still lacking (the guard against a fit
    taking without bound; what they lack stays unattributed, and the meter counts it)."""
    rows_of: dict[int, list[tuple[int, _Cell]]] = {}
    for k in complete:
        for c in mine[k]:
            rows_of.setdefault(c.i, []).append((k, c))
    for _ in range(AUGMENT_PATHS):
        path = _augmenting_path(mine, room, lacking, rows_of)
        if path is None:
            return False
        start, end, added, taken = path
        flow = min(room[start], lacking[end], *(c.w for c in taken))
        for c in added:
            c.w += flow
        for c in taken:
            c.w -= flow
        room[start] -= flow
        lacking[end] -= flow
        if lacking[end] <= AUGMENT_MIN:
            del lacking[end]
            if not lacking:
                return False
    return True


def _augmenting_path(
    mine: Sequence[list[_Cell]],
    room: dict[int, float],
    lacking: dict[int, float],
    rows_of: dict[int, list[tuple[int, _Cell]]],
) -> tuple[int, int, list[_Cell], list[_Cell]] | None:
    """The shortest path (breadth first) from a piece with room to a row that lacks: the
    piece, the row, the cells that gain and the cells that give; None: there is none."""
    came: dict[int, tuple[int, _Cell]] = {}  # row: (the piece it was reached from, its cell)
    reached: dict[int, tuple[int, _Cell] | None] = {}  # piece: (the row it gives in, cell)
    frontier = [i for i, r in room.items() if r > AUGMENT_MIN and i in rows_of]
    reached.update((i, None) for i in frontier)
    while frontier:
        following = []
        for i in frontier:
            for k, cell in rows_of[i]:
                if k in came:
                    continue
                came[k] = (i, cell)
                if k in lacking:
                    return _path_to(k, came, reached)
                for c in mine[k]:
                    if c.i not in reached and c.w > AUGMENT_MIN:
                        reached[c.i] = (k, c)
                        following.append(c.i)
        frontier = following
    return None


def _path_to(
    end: int,
    came: dict[int, tuple[int, _Cell]],
    reached: dict[int, tuple[int, _Cell] | None],
) -> tuple[int, int, list[_Cell], list[_Cell]]:
    added: list[_Cell] = []
    taken: list[_Cell] = []
    k = end
    while True:
        i, cell = came[k]
        added.append(cell)
        via = reached[i]
        if via is None:
            return i, end, added, taken
        k, gives = via
        taken.append(gives)


def _fit_aligned(row: _Row, cells: list[_Cell], bound: Sequence[float]) -> None:
    """Every piece within this one row: split the row by the pieces' claims, directly. What
    a piece capped at its bound cannot take goes to the others, up to their bounds."""
    _scale_lines([(row.busy_pct_us, True, cells)], 1.0)
    capped = False
    while True:  # each pass caps at least one more piece for good, or ends
        over = [c for c in cells if c.w > bound[c.i]]
        if not over:
            break
        capped = True
        for c in over:
            c.w = bound[c.i]
        room = [c for c in cells if c.w < bound[c.i]]
        lacking = row.busy_pct_us - sum(c.w for c in cells)
        total = sum(c.w for c in room)
        if not room or lacking <= 0 or total <= 0:
            break
        factor = 1 + lacking / total
        for c in room:
            c.w *= factor
    lacking = row.busy_pct_us - sum(c.w for c in cells)
    if lacking > AUGMENT_MIN:  # claims of zero cannot be scaled up: their room can be used
        _fill_from_room(lacking, cells, {c.i: bound[c.i] - c.w for c in cells})
        capped = True
    row.exact = not capped


def _commit_row(
    row: _Row,
    evidence: Sequence[Evidence],
    presence: Sequence[Presence],
    remaining: list[float],
    out: Apportioned,
) -> None:
    """Turn a fitted row into integer shares; what its known pieces cannot take goes to
    unknown pids' claims (as unattributed), then to no evidence."""
    unknown = 0.0
    for c in row.cells:
        if c.w > 0 and not evidence[c.i].known:
            unknown += min(c.w, remaining[c.i])
    known = [c for c in row.cells if evidence[c.i].known]
    weights, claims = _spend(known, evidence, 1.0, remaining, out)
    pids = sorted(weights)
    busy = row.busy_pct_us
    taken = min(busy, round(sum(weights.values())))
    _add_shares(row.start_us, row.end_us, taken, pids, _ratios(pids, weights, claims, row), out)
    _leave(row.start_us, row.end_us, busy - taken, unknown, presence, out)


def _commit_segment(
    segment: _Segment,
    evidence: Sequence[Evidence],
    presence: Sequence[Presence],
    remaining: list[float],
    layout: _Layout,
    commit_until_us: int,
    out: Apportioned,
) -> None:
    """Turn a fitted segment's committed periods into integer shares: each period takes
    its part of the segment's cells by its busy time, and is split as a row is
    (``_commit_row``), the pids' ratios worked out once for the segment."""
    members = [p for p in segment.members if p.end_us <= commit_until_us]
    row = segment.row
    total = row.busy_pct_us
    spent = (
        1.0 if len(members) == len(segment.members) else sum(p.busy_pct_us for p in members) / total
    )
    weights, claims = _spend(row.cells, evidence, spent, remaining, out)
    pids = sorted(weights)
    whole = sum(weights.values())
    ratios = _ratios(pids, weights, claims, row)
    splits: dict[int, list[int]] = {}  # periods alike (a steady load) are split alike
    for p in members:
        busy = p.busy_pct_us
        taken = min(busy, round(whole * (busy / total)))
        _add_shares(p.start_us, p.end_us, taken, pids, ratios, out, splits)
        if busy > taken:
            unknown = _unknown_claims(p, layout.unknown, evidence, remaining)
            _leave(p.start_us, p.end_us, busy - taken, unknown, presence, out)


def _spend(
    cells: Sequence[_Cell],
    evidence: Sequence[Evidence],
    part: float,
    remaining: list[float],
    out: Apportioned,
) -> tuple[dict[int, float], dict[int, int]]:
    """Take ``part`` of the known ``cells`` from their pieces: the weight and the claims
    of each pid."""
    weights: dict[int, float] = {}
    claims: dict[int, int] = {}
    for c in cells:
        if c.w <= 0:
            continue
        e = evidence[c.i]
        weights[e.pid] = weights.get(e.pid, 0.0) + c.w
        claims[e.pid] = claims.get(e.pid, 0) + e.pct_us
        taken = c.w * part
        out.used[c.i] = out.used.get(c.i, 0.0) + taken
        remaining[c.i] = max(0.0, remaining[c.i] - taken)
    return weights, claims


def _ratios(
    pids: Sequence[int], weights: dict[int, float], claims: dict[int, int], row: _Row
) -> list[int]:
    """The integer ratios a row's busy time is split by among ``pids``: their own claims
    where the row is exact, else their fitted weights."""
    if len(pids) < 2:
        return []
    if row.exact and all(claims.values()):
        return [claims[p] for p in pids]
    return _integral([weights[p] for p in pids])


def _add_shares(
    start_us: int,
    end_us: int,
    taken: int,
    pids: Sequence[int],
    ratios: list[int],
    out: Apportioned,
    splits: dict[int, list[int]] | None = None,
) -> None:
    """``taken`` split among ``pids`` by ``ratios``, as shares of [start_us, end_us);
    ``splits``: the splits already worked out with these ratios, by what was split."""
    if taken and len(pids) == 1:  # one process computed: its share needs no split
        out.shares.append(Share(pids[0], start_us, end_us, taken, exact=False))
    elif taken:
        split = None if splits is None else splits.get(taken)
        if split is None:
            split = largest_remainders(taken, ratios)
            if splits is not None:
                splits[taken] = split
        for pid, pct in zip(pids, split, strict=True):
            if pct:
                out.shares.append(Share(pid, start_us, end_us, pct, exact=False))


def _unknown_claims(
    period: Period, unknown: Sequence[int], evidence: Sequence[Evidence], remaining: list[float]
) -> float:
    """What the pieces of pids the driver never listed claim of ``period``."""
    claimed = 0.0
    for i in unknown:
        e = evidence[i]
        part = _overlap(e, period.start_us, period.end_us)
        if part > 0 and e.pct_us > 0:
            density = e.pct_us / max(1, e.end_us - e.start_us)
            claimed += min(density * part, remaining[i])
    return claimed


def _leave(
    start_us: int,
    end_us: int,
    left: int,
    unknown: float,
    presence: Sequence[Presence],
    out: Apportioned,
) -> None:
    """Busy time of a row no known piece took: to unknown pids' claims (as unattributed),
    then to no evidence, or to nobody where no process held a context."""
    if not left:
        return
    claimed = min(left, round(unknown))
    out.leave(Unattributed.UNKNOWN_PROCESS, claimed)
    reason = Unattributed.NO_EVIDENCE
    if not _present(presence, start_us, end_us):
        reason = Unattributed.NO_PROCESS
    out.leave(reason, left - claimed)


def _integral(weights: Sequence[float]) -> list[int]:
    """Float weights as integers good to a part in 2^40, for an exact integer split."""
    top = max(weights, default=0.0)
    if top <= 0:
        return [1] * len(weights)
    return [max(0, round(w / top * 2**40)) for w in weights]
