"""Per-process evidence of one GPU: which NVML source, which rows to trust, what span each
row stands for.

Per-process numbers only ever apportion the device's own busy time (``agent.apportion``),
so what matters here is that each piece of evidence says the right amount over the right
span, and that a source that lies is dropped. The sources, best first:

1. ``nvmlDeviceGetProcessesUtilizationInfo`` (driver >= 550). On Blackwell it is right
   where the legacy call reports smUtil 0 for every process (Project-HAMi/HAMi#2015).
2. ``nvmlDeviceGetProcessUtilization``, the legacy call.
3. ``nvmlDeviceGetAccountingStats_v2``, where accounting mode is on: its ``sumGpuUtil`` and
   ``sampleCount`` count every sample since the process started, a cumulative counter whose
   difference between two polls is the evidence of that span. Without _v2 the accounting
   stats hold a lifetime average only, which is no evidence of a span, and are not used.

A source is left for the next one, counted with the reason, when it answers NOT_SUPPORTED,
when its rows are padding or duplicates (NVIDIA/go-nvml#11, Syllo/nvtop#110: 97 zero rows
and smUtil 37100 in a 100-row answer), or when it answers zeros while the device is busy.
With no source left, the device's busy time still gets billed where a process is alone, and
is unattributed where several shared it.

What one row stands for is not documented, and drivers differ: one row per sample on the
device's grid, a process sampler on its own grid, a cadence per PID whose stamps lag by
seconds (go-nvml#51, nvtop#110), or one row per PID averaging every sample since lastSeen
(nvtop PR #91, nvitop PR #85). One rule covers them: a row stamped ``t`` covers one of the
PID's own sample periods back from ``t``; where its stamp is one of the device's own period
ends and rows are not known to be one per sample (several rows of one PID in one answer),
it is the per-query average and covers back to the query's lastSeen. Never anything before
the PID's previous row. A PID's sample period is learnt as the shortest step between its
consecutive stamps; a row of a PID whose period is not known yet waits for the PID's next
row (at most UNLEARNT_WAIT_US, then the shortest period seen on the device is assumed).

On a cadence of its own, a PID's row is ambiguous when k >= 2 of its samples fall since
lastSeen: one sample, or the mean of those k, diluted by the idle ones. The driver is asked
again with lastSeen just before that row's stamp: a driver of one row per sample answers the
same value, an averaging one the undiluted value of that one sample. The answer settles the
row, and two answers alike settle the driver's reading (then a per-sample driver is not
asked again). A new PID's first row is asked about the same way, at once: its period is not
known yet, and by the time it is, the row is no longer its PID's latest sample, which is all
a query can single out.

An averaging driver that leaves out rows below a threshold (nvtop#364) also leaves out a
busy sample diluted by idle ones of the same PID since lastSeen, and once lastSeen moves past
it no query can show it. So where a PID with a learnt period shows no row although a sample
of it fell due after another since lastSeen, the driver is asked again with lastSeen half a
period before that sample: its row, if it has one, is then that sample alone.
"""

from __future__ import annotations

import bisect
import enum
import logging
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from creditmeter.agent.apportion import Evidence, Period
from creditmeter.agent.errors import NoData, NotSupported, NvmlError
from creditmeter.agent.gpu import AccountingCounters, Device, Nvml, UtilSample

log = logging.getLogger(__name__)

FUTURE_SLACK_US = 1_000_000  # a stamp this far past the agent's clock is garbage
ZERO_STRIKES = 3  # polls in a row of zero rows on a busy device before leaving a source
BUSY_ENOUGH = 0.10  # the device this busy over a poll counts as busy
MAX_SPAN_US = 10_000_000  # no row stands for more than this, whatever the stamps say
UNLEARNT_WAIT_US = 5_000_000  # a row waits this long at most for its PID's next row
GRID_KEPT = 1024  # period ends kept when the grid is trimmed (minutes of them at 1/6 s)
GRID_MAX = 4096  # period ends held before the grid is trimmed to GRID_KEPT
ALWAYS = 2**62  # a stamp for ``catch_up`` later than any period: read the series again


_Waiting = tuple[UtilSample, int, int, bool, int | None]  # see EvidenceReader._waiting


def _waiting_row(entry: list[Any]) -> _Waiting:
    """A waiting row as the state holds it: [row fields, lastSeen, read, known, recent]."""
    row, since_us, read_us, known, recent = entry
    return UtilSample(*row), int(since_us), int(read_us), bool(known), recent


class Source(enum.Enum):
    """Where per-process evidence comes from (the values name the record's source)."""

    UTILIZATION_INFO = "processes_utilization_info"
    PROCESS_UTILIZATION = "process_utilization"
    ACCOUNTING = "accounting_stats"


ORDER = (Source.UTILIZATION_INFO, Source.PROCESS_UTILIZATION, Source.ACCOUNTING)
# Left for these, a source is still better than none: its rows are usable once cleaned.
SOFT_REASONS = frozenset({"padded_answer", "duplicate_rows"})


@dataclass(slots=True)
class EvidenceStats:
    discarded: Counter[str] = field(default_factory=Counter)  # rows dropped, by reason
    switches: Counter[str] = field(default_factory=Counter)  # sources left, by reason
    # Queries with an earlier lastSeen, by why, and the rows they changed or showed.
    requeries: Counter[str] = field(default_factory=Counter)
    requery_rows: Counter[str] = field(default_factory=Counter)


class RowReading(enum.Enum):
    """What one row of a PID on a cadence of its own stands for, once known."""

    UNKNOWN = "unknown"
    PER_SAMPLE = "per_sample"  # one sample
    AVERAGED = "averaged"  # the mean of its samples since lastSeen


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll's evidence, and whether the source answered with rows at all."""

    pieces: list[Evidence]
    rows: int  # valid rows
    zero_rows: int  # valid rows whose smUtil was 0


class EvidenceReader:
    """The evidence of one whole GPU. Not thread-safe: the meter's thread reads it."""

    def __init__(
        self, nvml: Nvml, device: Device, stats: EvidenceStats, state: dict[str, Any] | None
    ) -> None:
        self._nvml = nvml
        self._device = device
        self.stats = stats
        state = state or {}
        self.left: dict[str, str] = dict(state.get("left", {}))  # source -> why it was left
        self.cursor_us = int(state.get("cursor_us", 0))
        self.strides: dict[int, int] = {int(k): v for k, v in state.get("strides", {}).items()}
        self.last_stamp: dict[int, int] = {
            int(k): v for k, v in state.get("last_stamp", {}).items()
        }
        # The stamp of each PID's latest row made evidence: no row reaches back past it.
        # (Not last_stamp: a row waiting for its PID's period is read, not evidence yet.)
        self._previous: dict[int, int] = {
            int(k): v for k, v in state.get("previous", self.last_stamp).items()
        }
        self.reading = RowReading(state.get("reading", RowReading.UNKNOWN.value))
        self._votes: list[RowReading] = []
        self._read_us = int(state.get("read_us", 0))  # when the previous answer was read
        self._accounting: dict[int, tuple[int, int, int, int]] = {
            int(k): tuple(v) for k, v in state.get("accounting", {}).items()
        }
        self._zero_strikes = 0
        self._ends: list[int] = []  # recent device period ends, in order, each once
        self._held_from_us: int | None = None  # every period ending after this is in _ends
        self.busy_until_us = 0  # the end of the device's latest busy period
        self.grid_until_us = 0  # the end of the device's latest period read
        # Rows of PIDs whose sample period is not known yet: (row, lastSeen, read time,
        # known, recent). Kept in the state: lastSeen has passed them, and a restart would
        # never be shown them again.
        self._waiting: dict[int, list[_Waiting]] = {
            int(pid): [_waiting_row(entry) for entry in rows]
            for pid, rows in state.get("waiting", {}).items()
        }

    def on_periods(self, periods: Sequence[Period]) -> None:
        """The device periods just read: a row stamped at one's end is on the device grid."""
        ends = self._ends
        if len(ends) > GRID_MAX:
            del ends[:-GRID_KEPT]
            self._held_from_us = ends[0]
        if periods and self._held_from_us is None:
            self._held_from_us = periods[0].start_us
        for p in periods:
            if not ends or p.end_us > ends[-1]:
                ends.append(p.end_us)
            elif not self._on_grid(p.end_us):  # a period read again after a re-find
                bisect.insort(ends, p.end_us)
            self.grid_until_us = max(self.grid_until_us, p.end_us)
            if p.busy_pct_us:
                self.busy_until_us = max(self.busy_until_us, p.end_us)

    def _on_grid(self, stamp_us: int) -> bool:
        """Whether ``stamp_us`` is the end of a device period read."""
        ends = self._ends
        i = bisect.bisect_left(ends, stamp_us)
        return i < len(ends) and ends[i] == stamp_us

    def state(self) -> dict[str, Any]:
        return {
            "left": self.left,
            "cursor_us": self.cursor_us,
            "strides": self.strides,
            "last_stamp": self.last_stamp,
            "reading": self.reading.value,
            "read_us": self._read_us,
            "accounting": self._accounting,
            "previous": self._previous,
            "waiting": {
                pid: [[list(row), *rest] for row, *rest in rows]
                for pid, rows in self._waiting.items()
            },
        }

    @property
    def source(self) -> Source | None:
        """The source in use: the best one not left; else the best one left only for
        padding or duplicates (cleaned, its rows still count); else none."""
        for s in ORDER:
            if s.value not in self.left:
                return s
        for s in ORDER:
            if self.left[s.value] in SOFT_REASONS:
                return s
        return None

    def start(self, cursor_us: int) -> None:
        """Begin (or resume) reading rows stamped after ``cursor_us``."""
        if not self.cursor_us:
            self.cursor_us = cursor_us

    def skip_to(self, since_us: int) -> None:
        """Ask for no row stamped before ``since_us``: the time before it is a gap."""
        self.cursor_us = max(self.cursor_us, since_us)

    @property
    def forgets(self) -> bool:
        """Whether what the source shows of a span is lost once the driver has kept it long
        enough: sampled rows are kept for a while only; accounting counters count from the
        process's start, and lose nothing of any span in between. With no source, there is
        nothing to lose."""
        return self.source not in (Source.ACCOUNTING, None)

    def oldest_held_us(self, now_us: int) -> int | None:
        """The stamp of the oldest row the source still holds (asked with lastSeen 1: 0
        invites duplicate rows), None where it shows none: nvml.h lists only processes
        with some utilization, so an idle GPU's memory shows nothing of how far it reaches.
        Counted among the re-queries. Raises NvmlError where the source fails."""
        source = self.source
        if source is None or source is Source.ACCOUNTING:
            return None
        self.stats.requeries["memory_reach"] += 1
        try:
            raw = self._rows(source, 1)
        except (NoData, NotSupported):  # NOT_SUPPORTED: the poll's read leaves the source
            return None
        rows = self._clean(raw, max(now_us, self.grid_until_us), 1)[0]
        return min((s.timestamp_us for s in rows), default=None)

    # -- reading ------------------------------------------------------------------------------

    def read(
        self,
        now_us: int,
        listed: Collection[int],
        fresh: Collection[int],
        device_cursor_us: int = 0,
        catch_up: Callable[[int], None] | None = None,
    ) -> Reading:
        """This poll's evidence. ``listed``: pids the meter knows on the device (listed, or
        exited and draining); ``fresh``: those first seen at this poll (their accounting
        counters are all new). ``device_cursor_us``: the newest device period read; with no
        row since lastSeen, the next query starts there (an average since lastSeen must not
        reach back over idle time already settled). ``catch_up(stamp)``: read the device's
        periods again, up to ``stamp`` if they reach it (rows stamped after the newest
        period read: time passed between the two calls)."""
        while (source := self.source) is not None:
            try:
                if source is Source.ACCOUNTING:
                    return self._accounting_reading(now_us, listed, fresh, catch_up)
                return self._rows_reading(source, now_us, listed, device_cursor_us, catch_up)
            except NotSupported:
                self.leave(source, "not_supported")
            except NoData:
                self._nothing_since(device_cursor_us, now_us)
                return Reading([], 0, 0)
        return Reading([], 0, 0)

    def _nothing_since(self, device_cursor_us: int, now_us: int) -> None:
        """No row since lastSeen. If the device was idle all along, the next query starts at
        its newest period (an average since lastSeen must not be diluted by idle time). If
        it was busy, lastSeen stays: a driver that answers NOT_FOUND while the GPU looks
        quiet (nvtop#364) shows the same sample to a query over a longer, busier span."""
        if self.busy_until_us <= self.cursor_us:
            self.cursor_us = max(self.cursor_us, self._idle_cursor_us(device_cursor_us, now_us))
        self._read_us = now_us

    def _idle_cursor_us(self, device_cursor_us: int, now_us: int) -> int:
        """Where the next query starts after idle time: the device's newest period end, or
        the newest one read that is plausible (not past the agent's clock by more than
        FUTURE_SLACK_US). On the grid either way: a driver's average since lastSeen covers
        every period ending after it, so a lastSeen inside a period (the poll's own time,
        which a period read after a slow call may pass) would leave part of that period
        out of the span the meter gives the average, and its claim short."""
        ends = self._ends
        k = bisect.bisect_right(ends, min(device_cursor_us, now_us + FUTURE_SLACK_US))
        return ends[k - 1] if k else min(device_cursor_us, now_us)

    def leave(self, source: Source, reason: str) -> None:
        if self.left.get(source.value) not in (None, *SOFT_REASONS):
            return
        if source.value in self.left and reason in SOFT_REASONS:
            return
        self.left[source.value] = reason
        self.stats.switches[reason] += 1
        following = self.source
        log.warning(
            "%s: per-process evidence from %s dropped (%s); using %s",
            self._device.uuid,
            source.value,
            reason,
            following.value if following else "none: shared busy time is unattributed",
        )
        self.reading = RowReading.UNKNOWN

    def vote(self, reading: RowReading) -> None:
        """A re-query's verdict; two alike settle how rows are read. A mean seen outweighs
        a row alike, which a mean of samples alike gives too: on a steady load, votes of
        both kinds in turn would never settle that an averaging driver averages, and its
        rows' earlier samples would go to nobody."""
        if reading is RowReading.PER_SAMPLE and self._averaging():
            return
        self._votes = [*self._votes[-1:], reading]
        if len(self._votes) == 2 and self._votes[0] is self._votes[1]:
            if self.reading is not reading:
                log.info("%s: per-process rows read as %s", self._device.uuid, reading.value)
            self.reading = reading

    def _rows_reading(
        self,
        source: Source,
        now_us: int,
        listed: Collection[int],
        device_cursor_us: int,
        catch_up: Callable[[int], None] | None,
    ) -> Reading:
        since = max(1, self.cursor_us)  # lastSeen 0 invites duplicate rows (Kepler)
        raw = self._rows(source, since)
        newest_us = max((s.timestamp_us for s in raw if s.pid and s.sm_util <= 100), default=0)
        if catch_up is not None and newest_us > max(self.grid_until_us, device_cursor_us):
            # Whether a row is on the device's grid (an average since lastSeen) or not (one
            # sample) must be known, not judged against an older grid: a row taken for one
            # sample leaves the rest of its span without evidence.
            catch_up(newest_us)
        # The driver's newest period may be later than the poll's start on a loaded host
        # (seconds pass between the calls): rows stamped up to it are no future garbage.
        rows, suspect = self._clean(raw, max(now_us, device_cursor_us, self.grid_until_us))
        if suspect and self._another_after(source):
            self.leave(source, suspect)
        if not rows:  # padding and garbage only: as NOT_FOUND
            self._nothing_since(device_cursor_us, now_us)
            return Reading([], 0, 0)
        recent = self._undiluted(source, rows, since, now_us)
        due = self._due_unanswered(rows, since, listed)
        reading = self._pieces(rows, since, listed, self._read_us or since, recent)
        if due:
            self._isolated(source, due, rows[-1].timestamp_us, now_us, reading)
        self._read_us = now_us
        return reading

    def _rows(self, source: Source, since_us: int) -> list[UtilSample]:
        if source is Source.UTILIZATION_INFO:
            return self._nvml.processes_utilization_info(self._device, since_us)
        return self._nvml.process_samples(self._device, since_us)

    def _ambiguous(self, s: UtilSample, since_us: int) -> bool:
        """Whether row ``s`` may be the mean of several of its PID's samples. A new PID's
        first row may be: its period is not known yet, and once it is, the row is no longer
        its PID's latest sample, which is all a query can single out."""
        if self.reading is RowReading.PER_SAMPLE or self._on_grid(s.timestamp_us):
            return False
        stride = self.strides.get(s.pid)
        if stride is None:
            return self._first_row(s.pid)
        return s.timestamp_us - max(since_us, self._previous.get(s.pid, 0)) > stride

    def _first_row(self, pid: int) -> bool:
        return pid not in self._previous and pid not in self._waiting

    def _requery(
        self, source: Source, since_us: int, now_us: int, reason: str
    ) -> list[UtilSample] | None:
        """The source's rows since ``since_us`` (an earlier lastSeen than the poll's), or
        None where it answers none (NOT_FOUND: nothing since then, or all below the
        driver's threshold)."""
        self.stats.requeries[reason] += 1
        try:
            raw = self._rows(source, since_us)
        except NvmlError:
            return None
        # Later than the poll's start on a loaded host: the device's newest period is too.
        return self._clean(raw, max(now_us, self.grid_until_us), since_us)[0]

    def _undiluted(
        self, source: Source, rows: Sequence[UtilSample], since_us: int, now_us: int
    ) -> dict[tuple[int, int], int]:
        """For ambiguous rows, each one's own last sample's percent, asked of the driver
        with lastSeen just before its stamp: (pid, stamp) -> percent."""
        ambiguous = [s for s in rows if self._ambiguous(s, since_us)]
        if not ambiguous:
            return {}
        since = min(s.timestamp_us for s in ambiguous) - 1
        again = self._requery(source, since, now_us, "ambiguous_rows")
        if again is None:  # the rows are read as they came
            return {}
        answer = {(s.pid, s.timestamp_us): s.sm_util for s in again}
        out = {}
        for s in ambiguous:
            recent = answer.get((s.pid, s.timestamp_us))
            if recent is None:
                continue
            out[(s.pid, s.timestamp_us)] = recent
            if recent != s.sm_util:
                # Its last sample alone reads otherwise: the row is a mean (a driver that
                # answers each PID's latest sample answers that same sample again).
                self.stats.requery_rows["ambiguous_rows"] += 1
                self.vote(RowReading.AVERAGED)
            elif s.sm_util and not self._first_row(s.pid):
                # Alike: one sample, or a mean of samples alike (a steady load). (A first
                # row alike proves nothing: it may be one sample either way.)
                self.vote(RowReading.PER_SAMPLE)
        return out

    def _averaging(self) -> bool:
        """Whether the driver's rows are means: known, or a mean seen and nothing since
        to say otherwise."""
        return self.reading is RowReading.AVERAGED or (
            self.reading is RowReading.UNKNOWN and RowReading.AVERAGED in self._votes
        )

    def _due_unanswered(
        self, rows: Sequence[UtilSample], since_us: int, listed: Collection[int]
    ) -> dict[int, int]:
        """PIDs with no row in this answer although one of their samples fell due since
        lastSeen, on a driver known to average: pid -> that sample's expected stamp.

        An averaging driver's row is the mean of every sample of its PID since lastSeen, and
        a driver that leaves out rows below a threshold (nvtop#364) then also leaves out a
        busy sample diluted by idle ones before it. Once this answer moves lastSeen past
        that sample, no later query can show it: it is asked for now, on its own."""
        if self.reading is not RowReading.AVERAGED or self.busy_until_us <= since_us:
            return {}
        newest = rows[-1].timestamp_us
        answered = {s.pid for s in rows}
        due = {}
        for pid in listed:
            stride, last = self.strides.get(pid), self.last_stamp.get(pid)
            if pid in answered or stride is None or last is None or last + stride > newest:
                continue
            stamp = last + (newest - last) // stride * stride  # its latest sample due
            if stamp - stride > since_us:  # another of its samples since lastSeen: diluted
                due[pid] = stamp
        return due

    def _isolated(
        self, source: Source, due: dict[int, int], newest_us: int, now_us: int, out: Reading
    ) -> None:
        """Ask again with lastSeen half a sample period before the earliest sample due, so
        that each such PID's row is the mean of its samples since then only (one, mostly),
        and add those rows as evidence. A PID whose previous row is after that lastSeen
        is left out: its row would average in a sample already claimed."""
        ask_us = min(stamp - self.strides[pid] // 2 for pid, stamp in due.items())
        again = self._requery(source, ask_us, now_us, "left_out_rows")
        for s in again or ():
            pid, stamp = s.pid, s.timestamp_us
            if pid not in due or stamp > newest_us or self.last_stamp[pid] > ask_us:
                continue
            last, stride = self.last_stamp[pid], self.strides[pid]
            samples = 1 + (stamp - ask_us - 1) // stride
            self._stamped(pid, stamp)
            self._previous[pid] = stamp
            out.pieces.append(_evidence(s, max(last, stamp - samples * stride), known=True))
            self.stats.requery_rows["left_out_rows"] += 1

    def _another_after(self, source: Source) -> bool:
        return any(s.value not in self.left for s in ORDER[ORDER.index(source) + 1 :])

    def _clean(
        self, raw: Sequence[UtilSample], now_us: int, since_us: int | None = None
    ) -> tuple[list[UtilSample], str]:
        """The rows worth reading (stamped after ``since_us``, default lastSeen), and why
        the answer as a whole is suspect ("" if not)."""
        floor = self.cursor_us if since_us is None else since_us
        discarded = self.stats.discarded
        suspect = ""
        seen: dict[tuple[int, int], UtilSample | None] = {}
        padding = 0
        future_us = now_us + FUTURE_SLACK_US
        # By index, and padding counted once: a padded answer is ~97 zero rows a call.
        for s in raw:
            pid, stamp = s[0], s[1]
            if not pid or not stamp:
                padding += 1
                suspect = suspect or "padded_answer"
            elif s[2] > 100:
                discarded["util_over_100"] += 1
            elif stamp <= floor:
                discarded["stale_timestamp"] += 1
            elif stamp > future_us:
                discarded["future_timestamp"] += 1
            else:
                key = (pid, stamp)
                if key in seen:
                    discarded["duplicate_row"] += 1
                    suspect = suspect or "duplicate_rows"
                    if seen[key] != s:
                        seen[key] = None  # two different answers for one sample: neither
                else:
                    seen[key] = s
        if padding:
            discarded["padding"] += padding
        rows = [s for s in seen.values() if s is not None]
        rows.sort(key=lambda s: (s.timestamp_us, s.pid))
        return rows, suspect

    def _pieces(
        self,
        rows: list[UtilSample],
        since_us: int,
        listed: Collection[int],
        read_us: int,
        recent: dict[tuple[int, int], int],
    ) -> Reading:
        """Rows as evidence (pieces of zero length dropped)."""
        if len({s.pid for s in rows}) < len(rows):
            self.reading = RowReading.PER_SAMPLE  # several rows of one PID in one answer
        out = Reading([], len(rows), sum(s.sm_util == 0 for s in rows))
        strides, waiting_rows = self.strides, self._waiting
        for s in rows:
            pid, stamp = s.pid, s.timestamp_us
            known = pid in listed
            if not known:
                self.stats.discarded["pid_not_on_device"] += 1
            self._stamped(pid, stamp)
            if pid not in strides:
                waiting_rows.setdefault(pid, []).append(
                    (s, since_us, read_us, known, recent.get((pid, stamp)))
                )
                continue
            for row, row_since, row_read, row_known, row_recent in waiting_rows.pop(pid, ()):
                self._piece(row, row_since, row_read, row_known, out, row_recent)
            self._piece(s, since_us, read_us, known, out, recent.get((pid, stamp)))
        if waiting_rows:
            self._flush_waiting(out)
        if rows:
            self.cursor_us = max(self.cursor_us, rows[-1].timestamp_us)
        out.pieces[:] = [p for p in out.pieces if p.end_us > p.start_us]
        return out

    def _stamped(self, pid: int, stamp: int) -> None:
        """A row of ``pid`` stamped ``stamp`` was seen: its latest stamp, and its sample
        period learnt as the shortest step between its stamps."""
        previous = self.last_stamp.get(pid)
        if previous is None or stamp > previous:
            self.last_stamp[pid] = stamp
            if previous is not None and stamp - previous < self.strides.get(pid, stamp):
                self.strides[pid] = stamp - previous

    def complete_until_us(self, now_us: int, pids: Collection[int]) -> int:
        """Up to when every one of ``pids`` has shown all its evidence: a PID's rows up to
        its latest stamp are in, and a PID quiet since then would have shown a row one of its
        sample periods after; a PID whose period is not known yet may sample slowly (nvtop#110
        saw 4.5 s) and a row still waiting for its PID's period may reach back that far.

        "Quiet since" counts only up to the last answer actually read: after a failed read
        (INSUFFICIENT_SIZE when periods arrive between the size query and the fill, on a
        loaded host) the rows since are unread, not absent, and the periods they cover must
        wait for them instead of settling as busy time nobody claimed."""
        seen_us = min(now_us, self._read_us) if self._read_us else now_us
        until = seen_us
        for pid in pids:
            stride = self.strides.get(pid)
            if stride is None:
                until = min(until, seen_us - UNLEARNT_WAIT_US)
                continue
            until = min(until, max(self.last_stamp.get(pid, 0), seen_us - stride))
        waiting = self.waiting_from_us()
        return until if waiting is None else min(until, waiting)

    def waiting_from_us(self) -> int | None:
        """The earliest time a row still waiting for its PID's period may cover: nothing
        from there on may be settled before the row is read."""
        stamps = [rows[0][0].timestamp_us for rows in self._waiting.values()]
        return min(stamps) - UNLEARNT_WAIT_US if stamps else None

    def _flush_waiting(self, out: Reading) -> None:
        """Rows that waited long enough for their PID's next row: read with the shortest
        period seen on the device."""
        for pid in list(self._waiting):
            rows = self._waiting[pid]
            if self.cursor_us - rows[0][0].timestamp_us >= UNLEARNT_WAIT_US:
                del self._waiting[pid]
                for row, row_since, row_read, row_known, row_recent in rows:
                    self._piece(row, row_since, row_read, row_known, out, row_recent)

    def _piece(
        self,
        s: UtilSample,
        since_us: int,
        read_us: int,
        known: bool,
        out: Reading,
        recent: int | None = None,
    ) -> None:
        """Row ``s`` as evidence. ``recent``: its own last sample's percent, where the
        driver was asked again because the row may be an average (``_undiluted``)."""
        stamp = s.timestamp_us
        stride = self.strides.get(s.pid) or self.default_stride()
        previous = self._previous.get(s.pid)
        self._previous[s.pid] = stamp
        floor = previous if previous is not None else stamp - MAX_SPAN_US
        last_start = stamp - stride if stamp - stride > floor else floor
        if self.reading is not RowReading.PER_SAMPLE and self._on_grid(stamp):
            # On the device grid: the average of every period since lastSeen.
            out.pieces.append(_evidence(s, max(floor, min(stamp - stride, since_us)), known))
            return
        # A mean holds its PID's samples since lastSeen, each over the stride before its
        # stamp: it starts where the earliest one's span does (lastSeen may fall inside it),
        # and never before the PID's previous row.
        samples = -(-(stamp - max(floor, since_us)) // stride)
        mean_start = max(floor, stamp - samples * stride)
        if recent is not None and (recent != s.sm_util or self._averaging()):
            # A mean: its last sample at ``recent``, the earlier ones the rest (on a driver
            # known to average, also where the last sample reads as the mean: taken for one
            # sample, the earlier ones' busy time would go to nobody).
            out.pieces.extend(_averaged_pieces(s, mean_start, last_start, stride, recent, known))
        elif recent is None and samples > 1 and self._averaging():
            # A mean whose last sample could not be asked for alone: over all of them.
            out.pieces.append(_evidence(s, mean_start, known))
        else:
            out.pieces.append(_evidence(s, last_start, known))  # one sample: the common case

    def default_stride(self) -> int:
        """A PID's sample period before it has shown its own: the device's shortest so far,
        else one second (what every driver seen samples at most)."""
        return min(self.strides.values(), default=1_000_000)

    # -- accounting ---------------------------------------------------------------------------

    def _accounting_reading(
        self,
        now_us: int,
        listed: Collection[int],
        fresh: Collection[int],
        catch_up: Callable[[int], None] | None,
    ) -> Reading:
        if not self._nvml.accounting_enabled(self._device):
            raise NotSupported(f"{self._device.uuid}: accounting mode is off", 0)
        query = self._nvml.accounting_counters
        read = [(c, c.pid in fresh) for pid in sorted(listed) if (c := query(self._device, pid))]
        if catch_up is not None and read:
            # A counter holds every sample up to its call and carries no stamp: where time
            # passed since the series was read, its newest samples are of periods not read
            # yet. The series is read again (NOT_FOUND where no period closed).
            catch_up(ALWAYS)
        pieces = []
        for counters, is_fresh in read:
            piece = self._accounted(counters, now_us, is_fresh, catch_up is not None)
            if piece is not None:
                pieces.append(piece)
        for pid in [p for p in self._accounting if p not in listed]:
            del self._accounting[pid]
        self._read_us = now_us  # a read that answered: completeness may count up to it
        return Reading(pieces, len(pieces), sum(p.pct_us == 0 for p in pieces))

    def _once_a_period(self, samples: int, lived_us: int) -> int | None:
        """The device's period where a PID's ``samples`` since its last read, over the
        ``lived_us`` its context lived meanwhile, are one a device period (calls straddle
        period ends differently: a period either way still is); else None."""
        ends = self._ends
        if len(ends) < 2 or samples <= 0:
            return None
        period_us = ends[-1] - ends[-2]
        if abs(lived_us - samples * period_us) > period_us + samples * period_us // 4:
            return None
        return period_us

    def _newest_end_us(self, now_us: int) -> int:
        """The newest device period end read, where one was: a counter's samples end there."""
        return min(now_us, self.grid_until_us) if self.grid_until_us else now_us

    def _read_since(self, start_us: int) -> bool:
        """Whether every device period that ended after ``start_us`` has been read."""
        return self._held_from_us is not None and start_us >= self._held_from_us

    def _last_counted_us(self, c: AccountingCounters, now_us: int, caught_up: bool) -> int | None:
        """The end of the newest period counters ``c`` hold: the last one that ended before
        the call, placed by the process's start and the time it has run (to the ms ``time``
        is given in), where the series was read again after the call (``caught_up``); None
        where no period read ended before it. Without those (or once the process exited:
        ``time`` is then its whole life), the newest period end read."""
        if not (caught_up and c.start_us and c.running):
            return self._newest_end_us(now_us)
        k = bisect.bisect_right(self._ends, c.start_us + c.time_ms * 1000)
        return self._ends[k - 1] if k else None

    def _periods_on_us(self, from_us: int, periods: int) -> int | None:
        """The end of the ``periods``-th device period after ``from_us``; None where it is
        not read yet."""
        k = bisect.bisect_right(self._ends, from_us) + periods - 1
        return self._ends[k] if k < len(self._ends) else None

    def _accounted(
        self, c: AccountingCounters, now_us: int, fresh: bool, caught_up: bool
    ) -> Evidence | None:
        """The counters' difference since the PID's previous read, as evidence of the span
        between the two. A counter holds whole samples only, and where it samples on the
        device's grid (as every accounting driver seen does) its latest sample ends at a
        period end: so many periods after the previous span's end where it samples once a
        period, else the device's newest period end, never the time of the call. Spans of
        one PID chain end to start, so no busy time is claimed twice or left between. A
        chain starts at the process's start where every period since is read, else (a PID
        the agent found running) at the newest period its counters hold."""
        before = self._accounting.get(c.pid)
        if before is None:
            # Its start from the counters' startTime: the poll's time less the time it has
            # run is early by however long the poll had taken by this call (a loaded host).
            start_us = c.start_us or now_us - c.time_ms * 1000
            if not (fresh and self._read_since(start_us)):
                # Counted before the agent watched, or before the first period it read (a
                # new agent on a busy GPU): not this span's evidence. The chain starts at
                # its newest sample, the last period that ended before the call.
                anchor_us = self._last_counted_us(c, now_us, caught_up)
                if anchor_us is not None:  # else the series is not read that far: next time
                    self._accounting[c.pid] = (c.sample_count, c.sum_gpu_util, c.time_ms, anchor_us)
                return None
            before = (0, 0, 0, start_us)  # started since: its samples count from its start
        count, total, time_ms, read_us = before
        samples = c.sample_count - count
        grid_period = self._once_a_period(samples, (c.time_ms - time_ms) * 1000)
        if grid_period is not None:
            # Counted in periods: the span ends where its last sample does, whenever the
            # counters were read (time passes between the calls on a loaded host), and the
            # next span starts there.
            span_end_us = self._periods_on_us(read_us, samples)
        else:
            span_end_us = self._newest_end_us(now_us)
        if span_end_us is None or (samples > 0 and span_end_us <= read_us):
            # Counted, but its periods are not read yet: claim it next time.
            self._accounting[c.pid] = before
            return None
        end_us = span_end_us
        self._accounting[c.pid] = (c.sample_count, c.sum_gpu_util, c.time_ms, end_us)
        if samples <= 0:
            return None
        if grid_period is not None:
            period_us = grid_period
        else:
            period_us = (c.time_ms - time_ms) * 1000 // samples if c.time_ms > time_ms else 0
            period_us = max(1, period_us or (end_us - read_us) // samples)
        pct_us = (c.sum_gpu_util - total) * period_us // 100  # sumGpuUtil is percent × 100
        bound = pct_us + samples * period_us // 2  # each sample's rounding, half a percent
        return Evidence(c.pid, read_us, end_us, pct_us, bound, known=True)

    # -- health ---------------------------------------------------------------------------------

    def judge(self, reading: Reading, device_busy_fraction: float) -> None:
        """Leave a source that answers only zeros while the device is busy (Blackwell's
        legacy call, HAMi#2015), after ZERO_STRIKES polls in a row."""
        source = self.source
        if source is None:
            return
        if (
            reading.rows
            and reading.zero_rows == reading.rows
            and device_busy_fraction > BUSY_ENOUGH
        ):
            self._zero_strikes += 1
        else:
            self._zero_strikes = 0
        if self._zero_strikes >= ZERO_STRIKES and self._another_after(source):
            self._zero_strikes = 0
            self.leave(source, "zero_while_busy")

    def rebind(self, device: Device) -> None:
        """The same GPU, as the driver lists it after it was found again."""
        self._device = device

    def forget(self, pid: int) -> None:
        """A process left the device for good: its learnt stamps go with it."""
        self.strides.pop(pid, None)
        self.last_stamp.pop(pid, None)
        self._previous.pop(pid, None)
        self._waiting.pop(pid, None)
        self._accounting.pop(pid, None)


def _averaged_pieces(
    s: UtilSample, start_us: int, last_start_us: int, stride_us: int, recent: int, known: bool
) -> list[Evidence]:
    """Row ``s``, the mean of its samples since ``start_us``, whose last one alone read
    ``recent``: that sample, and the earlier ones as the rest of the mean (where the rest
    is more than their rounding)."""
    last = _evidence(s._replace(sm_util=recent), last_start_us, known)
    samples = -(-(s.timestamp_us - start_us) // stride_us)
    rest_pct_us = s.sm_util * samples * stride_us - recent * (s.timestamp_us - last_start_us)
    rounding = samples * stride_us // 2
    if start_us >= last_start_us or rest_pct_us <= rounding:
        return [last]
    return [
        last,
        Evidence(s.pid, start_us, last_start_us, rest_pct_us, rest_pct_us + rounding, known),
    ]


def _evidence(s: UtilSample, start_us: int, known: bool) -> Evidence:
    """Row ``s`` as evidence of [start_us, stamp): its percent of the span."""
    span = s.timestamp_us - start_us
    pct_us = s.sm_util * span
    # A whole percent is the true value rounded: up to half a percent more is still true.
    return Evidence(s.pid, start_us, s.timestamp_us, pct_us, pct_us + span // 2, known)
