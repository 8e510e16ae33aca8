"""Apportioning a GPU's busy time among its processes: conservation, by construction.

The device's utilization series (one sample per period, idle ones included) is the total
that gets billed. Per-process evidence only decides who gets which part of it:

- a process *alone* on the GPU over a period gets all of that period's busy time, whatever
  its own samples say, and also when it has none;
- where several processes held contexts, each period's busy time is split by the evidence:
  each piece of evidence says how much busy time a process had over a span (a sample's
  percent × the span it covers), and is trusted up to its *bound* (that plus its rounding);
- busy time no listed process's evidence can take is *unattributed*, with the reason:
  nobody held a context, the evidence of a process the driver never listed (a process that
  lived between two polls, or garbage) claims it, or there is no evidence for it.

Evidence spans and device periods need not line up (a 1 s process grid beside a 1/6 s
device grid, or a cadence per PID): each device period of the shared time is a *row*
holding its busy time, each piece of evidence a column over the periods it overlaps, and
the pieces are fitted to the rows by iterative proportional fitting (rows to their busy
time, pieces to their claims, never past their bounds). A period is never cut at an
evidence boundary, since where its busy time fell inside it is unknown. Where every piece
lies within one row, the split is direct.

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

IPF_ROUNDS = 100  # fitting rounds at most; it stops sooner once the rows fit
IPF_TOLERANCE = 1e-4  # relative: a piece this little over its bound still fits
IPF_STALL = 0.99  # pieces short of their claims by this much of the round before: stalled


class Unattributed(enum.IntEnum):
    """Why busy time went to nobody (the values of the record's UnattributedReason)."""

    NO_PROCESS = 1  # the device was busy while no process held a context on it
    UNKNOWN_PROCESS = 2  # claimed by a pid the driver never listed on the device
    NO_EVIDENCE = 3  # several processes held contexts and none has evidence for it


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

    def leave(self, reason: Unattributed, pct_us: int) -> None:
        if pct_us:
            self.unattributed[reason] = self.unattributed.get(reason, 0) + pct_us


def apportion(
    periods: Sequence[Period],
    evidence: Sequence[Evidence],
    presence: Sequence[Presence],
    commit_until_us: int,
    used_before: Sequence[float] = (),
    *,
    complete_until_us: int | None = None,
) -> Apportioned:
    """Split the busy time of ``periods`` (sorted, disjoint) and commit the periods ending
    at or before ``commit_until_us`` (a period end, or past the last).

    ``used_before[i]`` is what earlier commits already took of ``evidence[i]``. The periods
    after the commit are fitted too, so that evidence straddling the commit is shared
    between both sides as it should be, but only the committed side is returned. Up to
    ``complete_until_us`` (default: the commit) all evidence is in, and rows are filled to
    their busy time; after it evidence may still be on its way, and rows are only held to
    at most their busy time.
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
    for run in runs:
        goals = _goals(run, evidence, remaining, spans)
        _fit_run(run, evidence, presence, commit_until_us, complete, remaining, goals, out)
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
    known = [i for i in claims if evidence[i].known]
    total = sum(evidence[i].pct_us for i in known)
    cells = []
    capped = False
    for i in known:
        w = evidence[i].pct_us * period.busy_pct_us / total if total else 0.0
        if w > remaining[i]:
            w, capped = remaining[i], True
        cells.append(_Cell(i, w))
    cells += [_Cell(i, float(evidence[i].pct_us)) for i in claims if not evidence[i].known]
    row = _Row(period.start_us, period.end_us, period.busy_pct_us, cells, exact=not capped)
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

    __slots__ = ("i", "w")

    def __init__(self, i: int, w: float) -> None:
        self.i = i  # the piece's index
        self.w = w  # its busy time in the row, µs × %: fitted in place


@dataclass(slots=True)
class _Row:
    start_us: int
    end_us: int
    busy_pct_us: int
    cells: list[_Cell]
    # Aligned rows whose pieces fit uncapped: the pieces' own integer claims, so that an
    # exact driver is split exactly (float weights could move a unit between processes).
    exact: bool = False


def _fit_run(
    run: Sequence[Period],
    evidence: Sequence[Evidence],
    presence: Sequence[Presence],
    commit_until_us: int,
    complete_until_us: int,
    remaining: list[float],
    goals: dict[int, float],
    out: Apportioned,
) -> None:
    rows = _rows(run, evidence)
    _fit([r for r in rows if r.busy_pct_us], evidence, remaining, goals, complete_until_us)
    for row in rows:
        if row.end_us <= commit_until_us and row.busy_pct_us:
            _commit_row(row, evidence, presence, remaining, out)


def _rows(run: Sequence[Period], evidence: Sequence[Evidence]) -> list[_Row]:
    """One row per device period of the run, with the evidence overlapping it as cells
    (a piece's claim spread over its span by time: only its starting weight).

    A period is never cut at an evidence boundary: where inside a period its busy time fell
    is unknown, and spreading it by time would put busy time where a process's own sample
    says it was idle (a 1 s process grid half a second off the device's grid), leaving it
    unattributed. The fit instead moves each piece's weight between the periods it spans."""
    rows = [_Row(p.start_us, p.end_us, p.busy_pct_us, []) for p in run]
    starts = [p.start_us for p in run]
    start, end = run[0].start_us, run[-1].end_us
    for i, e in enumerate(evidence):
        if e.end_us <= start or e.start_us >= end:
            continue
        density = e.pct_us / max(1, e.end_us - e.start_us)
        k = max(0, bisect.bisect_right(starts, e.start_us) - 1)
        while k < len(rows) and rows[k].start_us < e.end_us:
            row = rows[k]
            part = min(e.end_us, row.end_us) - max(e.start_us, row.start_us)
            if part > 0:
                row.cells.append(_Cell(i, density * part))
            k += 1
    return rows


def _fit(
    rows: Sequence[_Row],
    evidence: Sequence[Evidence],
    bound: Sequence[float],
    goals: dict[int, float],
    complete_until_us: int,
) -> None:
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
    sampled fast 1 % less, though each one's claims add up to within 0.1 %."""
    mine = [[c for c in r.cells if evidence[c.i].known] for r in rows]
    by_piece: dict[int, list[_Cell]] = {}
    for cells in mine:
        for c in cells:
            by_piece.setdefault(c.i, []).append(c)
    if all(len(cells) == 1 for cells in by_piece.values()):
        for row, cells in zip(rows, mine, strict=True):
            _fit_aligned(row, cells, bound)
        return
    previous_short = float("inf")
    for _ in range(IPF_ROUNDS):
        _scale_rows(rows, mine, complete_until_us)
        capped, short = _pull_pieces(by_piece, bound, goals)
        if not capped and not short:
            return  # rows at their busy time, every piece at its claim or within its bound
        if not capped and short > IPF_STALL * previous_short:
            break  # claims the rows cannot all give (a rounded claim, a row still to come)
        previous_short = short
    # Rows get the last word, then bounds: what a capped piece leaves goes to others' room.
    _scale_rows(rows, mine, complete_until_us)
    if _pull_pieces(by_piece, bound, {})[0]:
        _top_up(rows, mine, by_piece, bound, complete_until_us)


def _scale_rows(rows: Sequence[_Row], mine: Sequence[list[_Cell]], complete_until_us: int) -> None:
    for row, cells in zip(rows, mine, strict=True):
        _scale_row(row.busy_pct_us, cells, up=row.end_us <= complete_until_us)


def _pull_pieces(
    by_piece: dict[int, list[_Cell]], bound: Sequence[float], goals: dict[int, float]
) -> tuple[bool, float]:
    """Scale each piece down to its bound, or up to its goal; returns whether any was over
    its bound, and by how much in all the pieces were short of their goals."""
    capped, short = False, 0.0
    for i, cells in by_piece.items():
        total = sum(c.w for c in cells)
        if total > bound[i] * (1 + IPF_TOLERANCE):
            goal, capped = bound[i], True
        elif 0 < total < goals.get(i, 0.0) * (1 - IPF_TOLERANCE):
            goal = min(goals[i], bound[i])
            short += goal - total
        else:
            continue
        factor = goal / total
        for c in cells:
            c.w *= factor
    return capped, short


def _top_up(
    rows: Sequence[_Row],
    mine: Sequence[list[_Cell]],
    by_piece: dict[int, list[_Cell]],
    bound: Sequence[float],
    complete_until_us: int,
) -> None:
    """Fitting converges only geometrically where bounds bind: give what each complete row
    still lacks to its pieces that have room left under their bounds; failing that, move a
    piece's weight into the row from another row where a third piece has room to take its
    place (an augmenting path of one step)."""
    # A piece's weight in rows not complete yet only holds a place (their evidence may still
    # come): the complete rows, whose evidence is all in, take its room under its bound first.
    room = {i: bound[i] for i in by_piece}
    for row, cells in zip(rows, mine, strict=True):
        if row.end_us <= complete_until_us:
            for c in cells:
                room[c.i] -= c.w
    where = {id(c): k for k, cells in enumerate(mine) for c in cells}
    for row, cells in zip(rows, mine, strict=True):
        if row.end_us > complete_until_us:
            continue
        lacking = row.busy_pct_us - sum(c.w for c in cells)
        spare = sum(max(0.0, room[c.i]) for c in cells)
        if lacking > 0 and spare > 0:
            share = min(1.0, lacking / spare)
            for c in cells:
                extra = max(0.0, room[c.i]) * share
                c.w += extra
                room[c.i] -= extra
            lacking -= min(lacking, spare)
        for c in cells:
            if lacking <= 0:
                break
            for other in by_piece[c.i]:
                if other is c or lacking <= 0:
                    continue
                lacking -= _shift(c, other, mine[where[id(other)]], room, lacking)


def _shift(
    into: _Cell, away: _Cell, away_row: Sequence[_Cell], room: dict[int, float], want: float
) -> float:
    """Move up to ``want`` of a piece's weight from ``away`` to ``into`` where other pieces
    in ``away``'s row have room to fill in for it; returns how much moved."""
    spare = sum(max(0.0, room[c.i]) for c in away_row if c.i != away.i)
    moved = min(want, away.w, spare)
    if moved <= 0:
        return 0.0
    into.w += moved
    away.w -= moved
    for c in away_row:
        if c.i != away.i and room[c.i] > 0:
            fill = moved * room[c.i] / spare
            c.w += fill
            room[c.i] -= fill
    return moved


def _fit_aligned(row: _Row, cells: list[_Cell], bound: Sequence[float]) -> None:
    """Every piece within this one row: split the row by the pieces' claims, directly. What
    a piece capped at its bound cannot take goes to the others, up to their bounds."""
    _scale_row(row.busy_pct_us, cells)
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
    row.exact = not capped


def _scale_row(busy_pct_us: int, cells: list[_Cell], *, up: bool = True) -> None:
    total = 0.0
    for c in cells:
        total += c.w
    if total > 0 and (up or total > busy_pct_us):
        factor = busy_pct_us / total
        for c in cells:
            c.w *= factor


def _commit_row(
    row: _Row,
    evidence: Sequence[Evidence],
    presence: Sequence[Presence],
    remaining: list[float],
    out: Apportioned,
) -> None:
    """Turn a fitted row into integer shares; what its known pieces cannot take goes to
    unknown pids' claims (as unattributed), then to no evidence."""
    busy = row.busy_pct_us
    weights: dict[int, float] = {}
    claims: dict[int, int] = {}
    unknown = 0.0
    for c in row.cells:
        e = evidence[c.i]
        if c.w <= 0:
            continue
        if not e.known:
            unknown += min(c.w, remaining[c.i])
            continue
        weights[e.pid] = weights.get(e.pid, 0.0) + c.w
        claims[e.pid] = claims.get(e.pid, 0) + e.pct_us
        out.used[c.i] = out.used.get(c.i, 0.0) + c.w
        remaining[c.i] = max(0.0, remaining[c.i] - c.w)
    taken = min(busy, round(sum(weights.values())))
    if taken:
        pids = sorted(weights)
        exact = [claims[p] for p in pids] if row.exact and all(claims.values()) else None
        split = largest_remainders(taken, exact or _integral([weights[p] for p in pids]))
        for pid, pct in zip(pids, split, strict=True):
            if pct:
                out.shares.append(Share(pid, row.start_us, row.end_us, pct, exact=False))
    left = busy - taken
    if not left:
        return
    claimed = min(left, round(unknown))
    out.leave(Unattributed.UNKNOWN_PROCESS, claimed)
    reason = Unattributed.NO_EVIDENCE
    if not _present(presence, row.start_us, row.end_us):
        reason = Unattributed.NO_PROCESS
    out.leave(reason, left - claimed)


def _integral(weights: Sequence[float]) -> list[int]:
    """Float weights as integers good to a part in 2^40, for an exact integer split."""
    top = max(weights, default=0.0)
    if top <= 0:
        return [1] * len(weights)
    return [max(0, round(w / top * 2**40)) for w in weights]
