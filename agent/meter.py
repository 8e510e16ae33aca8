"""The meter: polls every device, measures busy time per process, closes windows.

Identity is ``(gpu_uuid, pid, create_time)``. On a whole GPU the device's utilization series
is the total that gets billed (``agent.sampling``); per-process evidence only apportions it
(``agent.evidence`` reads it, ``agent.apportion`` splits): a process alone gets the device's
busy time, shared time is split by the evidence, and what nobody can take is unattributed
with its reason. Per GPU and window, billed plus unattributed busy time equals the device's
busy time, exactly, and every window ends in a *device record* carrying those books. MIG
instances, where NVML has no per-process signal, are measured by GPM instance utilisation.
Time the meter could not see is a *gap* with its reason, never filled in and never zero.

Evidence arrives late on real drivers (a PID's sample covers seconds before its stamp), so
device periods wait until every listed process's evidence of them can have arrived (the
*settlement lag*, learnt from the evidence) before they are apportioned.

The meter's committed state (cursors, periods read and not yet settled, carried
remainders, learnt evidence, unsettled evidence, the processes it knows) is serialised with
every batch of records written to the outbox, in the same transaction, and once before the
first poll (``MeterLoop.run``), so an agent killed at any moment resumes exactly where its
written records end: what it had read comes back with the state, the driver's ring buffer
still holds the samples of the time since, or the lost time is a gap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from creditmeter.agent import apportion, listings
from creditmeter.agent.apportion import Evidence, Period, Presence, Unattributed
from creditmeter.agent.errors import (
    GpuLost,
    NoData,
    NotPermitted,
    NotSupported,
    NvmlError,
    ProcessGone,
)
from creditmeter.agent.evidence import EvidenceReader, EvidenceStats, Reading, Source
from creditmeter.agent.gpu import (
    Clock,
    ComputeProcess,
    Device,
    DeviceSample,
    Nvml,
    ProcessInfo,
    ProcessTable,
)
from creditmeter.agent.listings import ListingSchedule
from creditmeter.agent.payers import LabelsAndJobs, Payers
from creditmeter.agent.sampling import DeviceSeries, Quiet
from creditmeter.agent.stamps import SeriesStamps
from creditmeter.agent.usage import DeviceBooks, ProcessKey, Slice, Usage, WindowUsage
from creditmeter.labels import LabelProblem
from creditmeter.v1 import usage_pb2

log = logging.getLogger(__name__)

STATE_VERSION = 2
WALL_STEP_US = 250_000  # wall − monotonic moving more than this between polls is a step
DEFAULT_RING_US = 20_000_000  # a ring this long is assumed until the driver shows its own
# While a GPU is lost, time older than this (or than its ring, if longer) is given up as a
# gap at each window close; a shorter ring learnt at start may only mean a young driver.
MIN_HOLD_US = 60_000_000
# A device whose books stay empty (idle: no busy time, none unattributed, no gap) still
# writes a device record this often, so that the collector can tell an idle host from one
# whose agent is down or cut off: either way no usage comes, and only this says which.
IDLE_RECORD_S = 300.0
# No device series: a stretch this long unread (polls failing, the agent down) is checked
# against how far back the driver's per-process memory reaches; what it has dropped is a gap.
UNREAD_CHECK_US = 5_000_000
# Busy time is apportioned at every window close, at least this often (a longer window still
# settles), and at every poll while an exited process drains. Each settlement fits again
# every period whose evidence is not all in (seconds of them under stale per-PID stamps), so
# settling seldom costs less; and a period is committed with more of what follows it.
# Against 2 s, on the realistic and stale-stamp hours: agent CPU per cycle about 15 % less
# (mean), per-process |error| 98.3 → 90.1 s and unattributed 11.6 → 10.3 s.
SETTLE_INTERVAL_US = 10_000_000
# A lost GPU whose books hold nothing but the time it is missing closes them this often, not
# at every window: a GPU gone for good (pulled, dead) would otherwise write a device record
# every window for as long as the agent runs. Its books are in the saved state meanwhile.
LOST_BOOKS_US = 600_000_000
# A row stamped this close to the next device period's end (1/20 of a period: the drivers'
# stamps jitter) may be on it: the series is read again before the row is judged.
CATCH_UP_SLACK = 20
_GPM_SINGLE = usage_pb2.MEASUREMENT_SOURCE_GPM_MIG_INSTANCE
_GPM_SHARED = usage_pb2.MEASUREMENT_SOURCE_GPM_MIG_SHARED
_NO_SIGNAL = usage_pb2.MEASUREMENT_SOURCE_NONE
_DEVICE_UTIL = usage_pb2.MEASUREMENT_SOURCE_NVML_DEVICE_UTIL
_PROCESS_EVIDENCE = usage_pb2.MEASUREMENT_SOURCE_NVML_PROCESS_EVIDENCE
EVIDENCE_CODES = {
    None: usage_pb2.EVIDENCE_SOURCE_NONE,
    Source.UTILIZATION_INFO: usage_pb2.EVIDENCE_SOURCE_PROCESSES_UTILIZATION_INFO,
    Source.PROCESS_UTILIZATION: usage_pb2.EVIDENCE_SOURCE_PROCESS_UTILIZATION,
    Source.ACCOUNTING: usage_pb2.EVIDENCE_SOURCE_ACCOUNTING_STATS,
}


# A MIG instance by its GPU and ids: known from a process list before any listing.
InstanceId = tuple[str, int | None, int | None]


def _evidence(instance: InstanceId) -> str:
    """The instance as evidence of a change, for the listing schedule and the logs."""
    parent_uuid, gi, ci = instance
    return f"{parent_uuid} gi {gi} ci {ci}"


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


class SharedReading(NamedTuple):
    """A MIG instance's GPM reading over [start_us, end_us) (µs × 100) while several
    processes held it: split evenly only if one account pays for all of them."""

    start_us: int
    end_us: int
    pct_us: int
    present: tuple[Tracked, ...]


@dataclass(slots=True)
class Tracked:
    """A process the meter knows on one device."""

    key: ProcessKey
    device: Device
    info: ProcessInfo | None
    usage: Usage
    seen_from_us: int  # wall µs from which it may have held a context
    carry_pct_us: int = 0  # remainder below 1 µs, carried into the next window
    listed: bool = False  # in the driver's process list at the latest poll
    gone_at_us: int | None = None  # wall µs it was first missing from the list

    def fresh_usage(self, start_us: int) -> Usage:
        previous, self.usage = self.usage, Usage(start_us=start_us, source=self.usage.source)
        return previous

    def presence(self) -> Presence:
        return Presence(self.key.pid, self.seen_from_us, self.gone_at_us)


@dataclass(slots=True)
class SeenProcess:
    """A process seen on a MIG instance no listing has shown yet (on its GPU's list)."""

    info: ProcessInfo | None  # read from /proc when first seen: it may be gone by the listing
    gone_us: int | None = None  # wall µs it was first missing from the GPU's list


@dataclass(slots=True)
class UnlistedInstance:
    """A MIG instance whose processes its GPU's list shows, not yet listed itself."""

    gpu: Device  # its physical GPU, in MIG mode
    since_us: int  # the listing before the first sight of it: it was made after that
    processes: dict[int, SeenProcess] = field(default_factory=dict)


@dataclass(slots=True)
class Books:
    """A whole GPU's books since its previous device record."""

    start_us: int
    attributed_us: int = 0  # µs of process usage emitted for the GPU since then
    unattributed_pct_us: Counter[int] = field(default_factory=Counter)  # by reason
    carry_pct_us: Counter[int] = field(default_factory=Counter)  # below 1 µs, by reason
    gaps_us: Counter[int] = field(default_factory=Counter)  # unmeasured device time, by reason
    # The time the booked µs lie in: a process record written now may cover periods settled
    # before the previous device record's end (a stalled agent, a long window), and the
    # device record must span its books (the collector refuses more busy than time).
    first_us: int | None = None
    last_us: int = 0

    def cover(self, start_us: int, end_us: int) -> None:
        self.first_us = start_us if self.first_us is None else min(self.first_us, start_us)
        self.last_us = max(self.last_us, end_us)

    @property
    def empty(self) -> bool:
        return self.gaps_only and not any(self.gaps_us.values())

    @property
    def gaps_only(self) -> bool:
        """Nothing but unmeasured time (if that): no busy time booked."""
        return not self.attributed_us and not any(self.unattributed_pct_us.values())


@dataclass(slots=True)
class DeviceState:
    device: Device
    stamps: SeriesStamps  # the clock its series is stamped with, and the way to the wall
    series: DeviceSeries = field(default_factory=DeviceSeries)
    evidence: EvidenceReader | None = None  # whole GPUs
    cursor_us: int = 0  # driver time (stamps placed on the wall clock) of the newest period read
    settled_us: int = 0  # driver time up to which busy time is apportioned
    committed_us: int = 0  # settled_us as of the last window close (what records cover)
    pending: list[Period] = field(default_factory=list)  # read, not yet settled
    pieces: list[Evidence] = field(default_factory=list)  # evidence not yet spent
    used: list[float] = field(default_factory=list)  # what settled time took of each piece
    fit: apportion.FitMemory = field(default_factory=apportion.FitMemory)  # the last fit
    processes: dict[int, list[Tracked]] = field(default_factory=dict)  # pid -> oldest first
    last_poll_mono_us: int | None = None  # monotonic µs: durations never follow wall steps
    lost_at_us: int | None = None  # wall µs the GPU was found lost
    # Why a hole at the cursor is a hole: the agent was down since it (a restart), the GPU
    # was lost since it, else the driver's ring dropped periods not yet read.
    hole_reason: int = usage_pb2.GAP_REASON_RING_OVERFLOW
    quiet: Quiet = field(default_factory=Quiet)  # a series that holds no idle period
    gpm_supported: bool = True
    # MIG: how its processes are listed. Its own list is not supported on a host in vGPU
    # host virtualization mode (nvml.h), where its GPU's list (every instance's) is read
    # instead; that one needs privileges. "none": neither answers.
    process_list: Literal["own", "gpu", "none"] = "own"
    # MIG: monotonic µs of the GPM sample the next reading is measured from (None: no
    # sample yet, so the time since the last poll is unmeasured).
    gpm_from_mono_us: int | None = None
    # MIG after a restart: (wall µs its records end, wall µs this meter measures from, gap
    # reason). GPM cannot look back: what ran in between is unknown, a gap, never free.
    down_us: tuple[int, int, int] | None = None
    has_series: bool = True  # False: nvmlDeviceGetSamples is not supported
    ring_us: int | None = None  # how far back the driver's ring reaches; None: not yet seen
    # No device series: wall µs through which its processes' own evidence was read (what
    # the driver keeps of the time since is read at the next poll), and how far back its
    # per-process memory was seen to reach (None: not seen since the meter began or the GPU
    # was lost; a reset may have emptied it).
    read_through_us: int = 0
    process_reach_us: int | None = None
    graphics_listed: bool = True  # False: the driver has no graphics process list
    unmeasurable: bool = False  # no device series and no per-process source (logged once)
    recorded_through_us: int = 0  # wall µs its latest device record ends (or metering began)
    books: Books = field(default_factory=lambda: Books(0))
    # The state as of the last window close, which a restart resumes from (the books'
    # attributed µs excepted: those follow every write, finals between closes included).
    committed: dict[str, Any] = field(default_factory=dict)
    next_settle_mono_us: int = 0  # monotonic µs of the next settlement
    # No process list read yet by this meter, or since the device was found again after a
    # loss: the ones listed first may have held a context since they started, over ring
    # history read from before the meter did.
    never_listed: bool = True
    # Listed no more while its GPU is (MIG instances destroyed, MIG mode changed): metering
    # ends, its processes are final and it leaves the state at the next close.
    configured_away: bool = False
    settled_now: bool = False  # settled at this poll (energy goes with settled busy time)
    failed_polls: int = 0  # polls in a row that failed (NvmlError, the GPU not lost)
    # MIG: readings of several processes at once, whose payers are judged when the window
    # closes (or one of them is final), as the record path bills jobs declared until then.
    shared: list[SharedReading] = field(default_factory=list)

    def elapsed_us(self, now_mono_us: int) -> int:
        if self.last_poll_mono_us is None:
            return 0
        return now_mono_us - self.last_poll_mono_us

    def tracked(self) -> Iterable[Tracked]:
        for entries in self.processes.values():
            yield from entries

    def owner(self, pid: int, at_us: int) -> Tracked | None:
        """The process that held ``pid`` at driver time ``at_us``: the newest created before."""
        entries = self.processes.get(pid)
        if not entries:
            return None
        for t in reversed(entries):
            if t.key.create_time_us < at_us:
                return t
        return entries[0]


@dataclass(slots=True)
class MeterStats:
    """Counters the daemon exports as metrics."""

    polls: int = 0
    nvml_errors: Counter[str] = field(default_factory=Counter)  # by error class
    discarded_samples: Counter[str] = field(default_factory=Counter)  # by quirk
    evidence_switches: Counter[str] = field(default_factory=Counter)  # sources left, by why
    evidence_requeries: Counter[str] = field(default_factory=Counter)  # asked again, by why
    evidence_requery_rows: Counter[str] = field(default_factory=Counter)  # rows they showed
    processes_seen: int = 0
    busy_us_metered: int = 0
    device_busy_us: int = 0  # the devices' own busy time (whole GPUs)
    unattributed_us: Counter[str] = field(default_factory=Counter)  # by reason name
    gaps_us: Counter[str] = field(default_factory=Counter)  # by reason name
    gpu_losses: Counter[str] = field(default_factory=Counter)  # by device uuid
    relistings: Counter[str] = field(default_factory=Counter)  # new NVML sessions, by why
    fits_cut_short: int = 0  # fits whose augmenting paths stopped at their guard
    series_catch_ups: int = 0  # device series read again within a poll (rows stamped later)
    labels_refused: Counter[str] = field(default_factory=Counter)  # "name:PROBLEM"


@dataclass(frozen=True)
class Learned:
    """What the meter learned of one GPU's driver: its device sample period (None: no
    device series), the per-process evidence source in use and how its rows read, each
    PID's sampling stride (µs), the sources left, with why, and how far back the device
    series reached when first read (None: not seen; a driver loaded since holds less), and
    the clock its stamps count on ("wall", "boot"; None: not seen)."""

    period_us: int | None
    source: str | None
    reading: str
    strides_us: dict[int, int]
    left: dict[str, str]
    ring_us: int | None = None
    stamps: str | None = None


class Meter:
    """Measures every device of one host. Not thread-safe: one thread polls and closes."""

    def __init__(
        self,
        nvml: Nvml,
        processes: ProcessTable,
        clock: Clock,
        *,
        state: bytes | None = None,
        reopen_interval_s: float = 5.0,
        payers: Payers | None = None,
        idle_record_s: float = IDLE_RECORD_S,
    ) -> None:
        """``payers``: who each process's time is billed to (default: its account label),
        asked where a reading has no per-process evidence to split it by.
        ``idle_record_s``: a device with nothing in its books writes an empty device record
        at least this often (0: never)."""
        self._nvml = nvml
        self._payers: Payers = payers if payers is not None else LabelsAndJobs()
        self._proc = processes
        self._clock = clock
        self._reopen_interval_s = reopen_interval_s
        self._idle_record_us = _us(idle_record_s)
        self._listed_us = 0  # wall µs the driver's devices were last listed
        self._mig_gpus: dict[str, Device] = {}  # GPUs in MIG mode, as their parent devices
        self._unwatched: set[str] = set()  # ... whose processes cannot be listed
        # MIG instances with processes on their GPU's list that no listing has shown yet.
        self._unlisted: dict[InstanceId, UnlistedInstance] = {}
        self._held_finals: list[WindowUsage] = []  # found at the start: the first poll's
        # This poll's process lists of GPUs in MIG mode, or why there is none.
        self._gpu_lists: dict[str, list[ComputeProcess] | NvmlError] = {}
        self._devices: dict[str, DeviceState] = {}
        self._energy = _EnergyLedger()
        self._finished: dict[ProcessKey, int] = {}  # exited since the last close: -> settled
        self._evidence_stats = EvidenceStats()
        self.stats = MeterStats()
        self._now_mono_us = _us(clock.monotonic())
        self._listings = ListingSchedule(self._now_mono_us / 1e6, reopen_interval_s)
        self._wall_offset_us = _us(clock.wall()) - self._now_mono_us  # wall − monotonic
        self._now_us = self._now_mono_us + self._wall_offset_us  # the wall clock of the poll
        self._start(_decode_state(state))

    # -- start and state ------------------------------------------------------------------

    def _start(self, saved: dict[str, Any]) -> None:
        now_us = _us(self._clock.wall())
        saved_devices = saved.get("devices", {})
        listed = self._nvml.devices()
        self._note_listed(now_us)
        # A device the previous run did not meter was made since its last listing (while it
        # ran, or while no agent did): from there, as a device found by a relisting is.
        made_after_us = _listed_through_us(saved)
        self._unlisted = self._restored_unlisted(saved.get("unlisted", []), now_us)
        for device in listed:
            doc = saved_devices.get(device.uuid)
            if doc is None:
                self._held_finals += self._add_made(device, made_after_us, now_us)
            else:
                self._add_device(device, doc, now_us)
        for key in self._unlisted:  # still unlisted: their processes are resolved by a listing
            self._listings.changed(_evidence(key))
        listed_gpus = {ds.device.parent_uuid or uuid for uuid, ds in self._devices.items()}
        for uuid, doc in saved_devices.items():
            if uuid not in self._devices:
                self._add_missing(uuid, doc, now_us, listed_gpus)
        for gpu, states in self._physical_gpus().items():
            if self._energy.committed(gpu) is None:
                self._energy.restore(gpu, self._energy_counter(states[0].device))
        for entry in saved.get("processes", []):
            self._restore_process(entry, now_us)
        self._finished = {
            ProcessKey(u, p, c): through for u, p, c, through in saved.get("finished", [])
        }

    def _add_made(
        self, device: Device, made_after_us: int | None, now_us: int
    ) -> list[WindowUsage]:
        """A device made since the listing at ``made_after_us`` (None: nothing before now is
        ours to bill, a first start): metered from there, or from the listing before its
        processes were first seen on its GPU's list. Returns the usage of those of them
        gone already (those running are listed at the next poll, their time until then a
        gap too)."""
        instance = None
        if device.parent_uuid is not None:
            key = (device.parent_uuid, device.gpu_instance_id, device.compute_instance_id)
            instance = self._unlisted.pop(key, None)
        bounds = [made_after_us, instance.since_us if instance else None]
        since_us = min([b for b in bounds if b is not None], default=None)
        self._add_device(device, None, now_us, created_after_us=since_us)
        if instance is None or since_us is None:
            return []
        return self._seen_usage(device, instance, since_us, now_us, gone_only=True)

    def _restored_unlisted(
        self, entries: list[dict[str, Any]], now_us: int
    ) -> dict[InstanceId, UnlistedInstance]:
        """The saved run's unlisted instances and the processes seen on them. One no
        longer running (it exited while no agent ran) left their list by now at the
        latest."""
        restored = {}
        for entry in entries:
            gpu = Device(mig_enabled=True, **entry["gpu"])
            instance = UnlistedInstance(gpu, int(entry["since_us"]))
            for doc in entry["processes"]:
                pid, gone_us = int(doc["pid"]), doc.get("gone_us")
                info = _restored_info(pid, doc) if "create_time_us" in doc else None
                if gone_us is None and (
                    info is None or self._created_us(pid) != _us(info.create_time)
                ):
                    gone_us = now_us
                instance.processes[pid] = SeenProcess(info, gone_us)
            restored[(gpu.uuid, entry["gi"], entry["ci"])] = instance
        return restored

    def _add_device(
        self,
        device: Device,
        saved: dict[str, Any] | None,
        now_us: int,
        *,
        listed: bool = True,
        created_after_us: int | None = None,
    ) -> None:
        """``created_after_us``: a device created while this meter ran, after the listing at
        that moment; its processes are metered from there, not from now."""
        ds = DeviceState(device, SeriesStamps(self._clock), books=Books(now_us))
        ds.recorded_through_us = now_us
        self._devices[device.uuid] = ds
        if not device.is_mig:
            ev_state = saved.get("evidence") if saved else None
            ds.evidence = EvidenceReader(self._nvml, device, self._evidence_stats, ev_state)
        self._resume(ds, saved, now_us, listed=listed, created_after_us=created_after_us)
        ds.last_poll_mono_us = self._now_mono_us
        if device.is_mig and listed:
            self._prime_instance(ds, _us(self._clock.monotonic()))
        ds.committed = self._snapshot(ds)

    def _add_missing(
        self, uuid: str, saved: dict[str, Any], now_us: int, listed_gpus: set[str]
    ) -> None:
        """A device metered before this start that the driver does not list now (fallen off
        the bus, Xid 79): lost from where its records end, with its processes, and looked
        for by UUID as any lost GPU is. Found again, it resumes from its saved cursor where
        the ring still holds the samples; only the rest is a gap. A device whose GPU is
        listed, in MIG mode or out of it, was configured away: it will never be back."""
        device = _saved_device(uuid, saved)
        if device is None:
            log.error(
                "%s: metered before this start but not listed now, and its saved state "
                "predates device identities: metered again only once listed at a start",
                uuid,
            )
            return
        if (device.parent_uuid or uuid) in listed_gpus:
            # A MIG mode change or new instances need the GPU idle and reset: its processes
            # ended before, and its ring went with the reset.
            log.warning(
                "%s: not listed, but its GPU is (MIG mode or instances changed): its "
                "metering ends where its records end",
                uuid,
            )
            return
        self._add_device(device, saved, now_us, listed=False)
        ds = self._devices[uuid]
        log.error("%s: not listed by the driver at start; lost until it is found again", uuid)
        ds.lost_at_us = now_us
        ds.hole_reason = usage_pb2.GAP_REASON_GPU_LOST
        self._listings.lost(self._clock.monotonic())

    def _resume(
        self,
        ds: DeviceState,
        saved: dict[str, Any] | None,
        now_us: int,
        *,
        listed: bool = True,
        created_after_us: int | None = None,
    ) -> None:
        latest = self._ring_bounds(ds, now_us) if listed else None
        newest = latest if latest is not None else now_us  # nothing yet: bill from now on
        if saved is not None:
            ds.series = DeviceSeries(_shorter(saved.get("period_us"), ds.series.period_us))
            ds.settled_us = int(saved["cursor_us"])
            # The periods read and not yet settled come back with the state, not from the
            # ring: a driver reloaded, a host rebooted or a GPU reset since has none of them.
            ds.cursor_us = int(saved.get("read_us", ds.settled_us))
            ds.pending = [Period(*p) for p in saved.get("pending", [])]
            if ds.cursor_us > newest and latest is not None:
                # The driver's stamps went back (clock set back, driver reloaded): what it
                # holds now is all new to us.
                log.info("%s: resuming from the driver's newest sample", ds.device.uuid)
                ds.pending = []
                ds.cursor_us = ds.settled_us = min(ds.settled_us, newest)
            ds.books = _restore_books(saved.get("books"), now_us)
            ds.pieces = [Evidence(*p) for p in saved.get("pieces", [])]
            ds.used = [float(u) for u in saved.get("used", [0.0] * len(ds.pieces))]
            self._energy.restore(ds.device.parent_uuid or ds.device.uuid, saved.get("energy_mj"))
            ds.quiet.dry = bool(saved.get("dry", False))
            # Lost when the agent stopped: a GPU lost and not found since is still lost.
            lost = saved.get("lost", False)
            ds.hole_reason = (
                usage_pb2.GAP_REASON_GPU_LOST if lost else usage_pb2.GAP_REASON_AGENT_DOWN
            )
            if ds.device.is_mig and now_us > ds.settled_us:
                ds.down_us = (ds.settled_us, now_us, ds.hole_reason)
        elif created_after_us is not None:
            # Created while this meter ran: from the listing before, read back from the ring
            # (a whole GPU) or a gap (GPM cannot look back). It did not exist before then.
            reason = usage_pb2.GAP_REASON_DEVICE_UNLISTED
            ds.cursor_us = ds.settled_us = min(created_after_us, newest)
            ds.hole_reason = reason
            if ds.device.is_mig and now_us > created_after_us:
                ds.down_us = (created_after_us, now_us, reason)
        else:
            # First start: what ran before the agent existed is not ours to bill.
            ds.cursor_us = ds.settled_us = newest
        ds.committed_us = ds.settled_us
        ds.read_through_us = int(
            saved.get("read_through_us", ds.settled_us) if saved else ds.settled_us
        )
        if ds.evidence is not None:
            ds.evidence.start(ds.settled_us)
            if listed and not ds.has_series:
                try:
                    self._learn_reach(ds, now_us)
                except NvmlError as exc:  # learnt at the first poll that needs it
                    self._count_error(exc)

    def _ring_bounds(self, ds: DeviceState, now_us: int) -> int | None:
        """The newest period the driver holds (learning how far back its ring reaches)."""
        if ds.device.is_mig:
            return None
        try:
            samples = ds.stamps.samples(self._nvml, ds.device, 0, now_us)
        except NoData:
            return None
        except NotSupported:
            ds.has_series = False
            return None
        except NvmlError as exc:
            self._count_error(exc)
            return None
        if not samples:
            return None
        if len(samples) > 1:
            ds.ring_us = samples[-1].timestamp_us - samples[0].timestamp_us
        ds.series.learn(samples)
        return samples[-1].timestamp_us

    def _restore_process(self, entry: dict[str, Any], now_us: int) -> None:
        ds = self._devices.get(entry["gpu"])
        if ds is None:
            return
        key = ProcessKey(entry["gpu"], int(entry["pid"]), int(entry["create_time_us"]))
        info = _restored_info(key.pid, entry)
        seen_from = int(entry.get("seen_from_us", key.create_time_us or now_us))
        tracked = Tracked(key, ds.device, info, Usage(start_us=now_us), seen_from)
        tracked.carry_pct_us = int(entry.get("carry_pct_us", 0))
        ds.processes.setdefault(key.pid, []).append(tracked)

    def state(self) -> bytes:
        """The committed state, to be written with the records of the latest close (and the
        books of emitted usage, written with every batch)."""
        devices = {uuid: self._device_state(ds) for uuid, ds in self._devices.items()}
        processes = [_process_entry(t) for ds in self._devices.values() for t in ds.tracked()]
        finished = [[k.gpu_uuid, k.pid, k.create_time_us, c] for k, c in self._finished.items()]
        doc = {
            "v": STATE_VERSION,
            "devices": devices,
            "processes": processes,
            "finished": finished,
            # Every device made before this is among ``devices`` or was gone by then.
            "listed_us": min([self._listed_us, *(u.since_us for u in self._unlisted.values())]),
            "unlisted": [_unlisted_entry(key, u) for key, u in self._unlisted.items()],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def _device_state(self, ds: DeviceState) -> dict[str, Any]:
        doc = dict(ds.committed)
        doc["books"] = dict(doc["books"], attributed_us=ds.books.attributed_us)
        doc["energy_mj"] = self._energy.committed(ds.device.parent_uuid or ds.device.uuid)
        return doc

    def _snapshot(self, ds: DeviceState) -> dict[str, Any]:
        """What a restart needs of a device, as it is now (taken at every close)."""
        doc: dict[str, Any] = {
            "device": _device_entry(ds.device),
            "cursor_us": ds.settled_us,
            "read_us": ds.cursor_us,
            "pending": [list(p) for p in ds.pending],
            "period_us": ds.series.period_us,
            "books": _books_entry(ds.books),
            "lost": ds.lost_at_us is not None,
        }
        if not ds.has_series:
            doc["read_through_us"] = ds.read_through_us
        if ds.quiet.dry:
            doc["dry"] = True  # so that what the ring shows of the time it was down is idle
        if ds.evidence is not None:
            doc["evidence"] = json.loads(json.dumps(ds.evidence.state()))
            doc["pieces"] = [list(_piece_entry(p)) for p in ds.pieces]
            doc["used"] = list(ds.used)
        return doc

    # -- polling --------------------------------------------------------------------------

    def poll(self) -> list[WindowUsage]:
        """One pass over every device. Returns the final usage of processes that exited."""
        self.stats.polls += 1
        now_us = self._now_us = _us(self._clock.wall())
        self._now_mono_us = _us(self._clock.monotonic())
        step_us = self._wall_step(now_us)
        before = {id(t): t.usage.pct_us for ds in self._devices.values() for t in ds.tracked()}
        self._gpu_lists.clear()
        for ds in self._devices.values():
            ds.settled_now = ds.device.is_mig
            if ds.lost_at_us is not None or ds.configured_away:
                ds.last_poll_mono_us = self._now_mono_us
                continue
            try:
                self._poll_device(ds, now_us, step_us)
            except GpuLost as exc:
                self._lose(ds, now_us, exc)
            except NvmlError as exc:
                # The cursors did not move: the next poll reads these periods again.
                self._poll_failed(ds, exc)
                # An instance destroyed since the session began answers NOT_FOUND.
                if ds.device.is_mig and isinstance(exc, NoData):
                    self._listings.changed(ds.device.uuid)
            else:
                self._poll_succeeded(ds)
            ds.last_poll_mono_us = self._now_mono_us
        self._allocate_energy(before, now_us)
        self._watch_instances(now_us)
        finals, self._held_finals = self._held_finals, []
        finals += self._relist_devices(now_us)
        finals += [f for ds in self._devices.values() for f in self._drained(ds, now_us)]
        self._sync_stats()
        return finals

    def _poll_failed(self, ds: DeviceState, exc: NvmlError) -> None:
        """Count the failure; log the first of a run of them. A driver gone for an hour
        would otherwise write a warning per GPU per poll (28,800 an hour on 8 GPUs):
        creditmeter_agent_nvml_errors_total counts every one."""
        self._count_error(exc)
        ds.failed_polls += 1
        if ds.hole_reason == usage_pb2.GAP_REASON_RING_OVERFLOW:
            # What the ring drops meanwhile is lost to the failing calls, not to slow reads.
            ds.hole_reason = usage_pb2.GAP_REASON_NVML_ERROR
        if ds.failed_polls == 1:
            log.warning(
                "%s: poll failed: %s (until it polls again, failures are only counted)",
                ds.device.uuid,
                exc,
            )
        else:
            log.debug("%s: poll failed (%d in a row): %s", ds.device.uuid, ds.failed_polls, exc)

    @staticmethod
    def _poll_succeeded(ds: DeviceState) -> None:
        if ds.failed_polls:
            log.warning("%s: polled again after %d failed polls", ds.device.uuid, ds.failed_polls)
            ds.failed_polls = 0

    def _wall_step(self, now_us: int) -> int:
        """How far the wall clock stepped since the last poll (0 when it did not)."""
        offset = now_us - self._now_mono_us
        step_us, self._wall_offset_us = offset - self._wall_offset_us, offset
        if abs(step_us) < WALL_STEP_US:
            return 0  # ordinary slewing and jitter
        log.warning("the wall clock stepped by %+.3f s", step_us / 1e6)
        return step_us

    def _poll_device(self, ds: DeviceState, now_us: int, step_us: int) -> None:
        if ds.device.is_mig:
            listed = self._instance_processes(ds)
            if listed is not None:
                self._update_processes(ds, listed, now_us)
            # GPM counts time itself: no driver timestamps.
            self._poll_instance(ds, now_us, unlisted=listed is None)
            return
        listed = self._whole_gpu_processes(ds)
        if any(p.gpu_instance_id is not None for p in listed):
            # In MIG mode since this session began: those processes are its instances'.
            log.info("%s: processes on MIG instances: listing devices again", ds.device.uuid)
            self._listings.changed(ds.device.uuid)
            listed = [p for p in listed if p.gpu_instance_id is None]
        fresh = self._update_processes(ds, listed, now_us)
        if step_us:
            ds.quiet.forget()
        if step_us < 0:
            # Samples stamped before the clock reaches the cursor again look exactly like
            # ones already billed: that stretch is a gap, never a guess.
            self._gap_all(ds, usage_pb2.GAP_REASON_CLOCK_STEP, -step_us)
        busy_fraction = self._read_series(ds, max(step_us, 0)) if ds.has_series else 0.0
        assert ds.evidence is not None
        if not ds.has_series:
            self._unread_gap(ds, now_us)
        # Known: listed now, or exited and still draining (its last samples come late).
        reading = ds.evidence.read(
            now_us, set(ds.processes), fresh, ds.cursor_us, lambda us: self._catch_up(ds, us)
        )
        ds.evidence.judge(reading, busy_fraction)
        if not ds.has_series and ds.evidence.source is None:
            self._unmeasurable(ds, now_us)
        self._take_evidence(ds, reading)
        draining = any(t.gone_at_us is not None for t in ds.tracked())
        ds.read_through_us = now_us
        if self._now_mono_us >= ds.next_settle_mono_us or draining:
            self._settle_device(ds, now_us)

    def _unmeasurable(self, ds: DeviceState, now_us: int) -> None:
        """No device series and no per-process source (a virtual GPU without accounting
        mode): nothing measures its processes' busy time, so their time since the last poll
        that read is a NO_UTILIZATION_SIGNAL gap, never idle. It used to be nothing at all:
        no record, no gap."""
        if not ds.unmeasurable:
            log.error(
                "%s: neither a device series nor any per-process source answers: its "
                "processes' time is a NO_UTILIZATION_SIGNAL gap (accounting mode would "
                "measure them: nvidia-smi -am 1)",
                ds.device.uuid,
            )
            ds.unmeasurable = True
        present = [t for t in ds.tracked() if t.listed or t.gone_at_us == now_us]
        self._no_signal(present, max(0, now_us - ds.read_through_us))

    def _whole_gpu_processes(self, ds: DeviceState) -> list[ComputeProcess]:
        """The processes with a compute or a graphics context. nvml.h leaves graphics
        applications (OpenGL, Vulkan, DirectX) out of the compute list, and their kernels are
        the device's busy time as any: unlisted, a process alone in the compute list took
        their time (and shared, it went unattributed). A graphics list the driver will never
        answer (NOT_SUPPORTED, NO_PERMISSION) is asked no more; any other failure fails the
        poll, as the compute list's does."""
        listed = self._nvml.compute_processes(ds.device)
        if not ds.graphics_listed:
            return listed
        try:
            graphics = self._nvml.graphics_processes(ds.device)
        except (NotSupported, NotPermitted) as exc:
            log.warning("%s: graphics processes cannot be listed (%s)", ds.device.uuid, exc)
            ds.graphics_listed = False
            return listed
        pids = {p.pid for p in listed}
        return listed + [p for p in graphics if p.pid not in pids]

    def _unread_gap(self, ds: DeviceState, now_us: int) -> None:
        """No device series: what the driver's per-process memory no longer holds of the
        time since the evidence was last read (polls failing, the agent down, the GPU lost)
        is a gap of the hole's reason; idle time would show no row either, and cannot be
        told from it. How far back that memory reaches is documented nowhere: at least as
        far as its oldest row (nvml.h lists only processes with some utilization). Where the
        source fails (NvmlError), so does the poll, and nothing is given up."""
        assert ds.evidence is not None
        unread_us = now_us - ds.read_through_us
        reason = ds.hole_reason
        if unread_us > UNREAD_CHECK_US and ds.evidence.forgets:
            self._learn_reach(ds, now_us)  # may raise: the reason stays for the next poll
            self._give_up_unread(ds, now_us - (ds.process_reach_us or 0), reason)
        elif unread_us > UNREAD_CHECK_US and reason != usage_pb2.GAP_REASON_RING_OVERFLOW:
            # Accounting counters lose nothing of the processes the meter knows, but one that
            # started and ended meanwhile (the agent down, the GPU lost, polls failing) was
            # never listed: the device's own time then is unmeasured.
            self._device_gap(ds, reason, unread_us)
        ds.hole_reason = usage_pb2.GAP_REASON_RING_OVERFLOW

    def _learn_reach(self, ds: DeviceState, now_us: int) -> None:
        assert ds.evidence is not None
        oldest_us = ds.evidence.oldest_held_us(now_us)
        if oldest_us is not None and oldest_us < now_us:
            # It holds the row stamped ``oldest_us``: the next query asks from just before.
            ds.process_reach_us = max(ds.process_reach_us or 0, now_us - oldest_us + 1)

    def _give_up_unread(self, ds: DeviceState, horizon_us: int, reason: int) -> None:
        """No device series: the time unread before ``horizon_us`` is a gap of ``reason``,
        and no row stamped in it is billed later."""
        assert ds.evidence is not None
        if horizon_us <= ds.read_through_us or not ds.evidence.forgets:
            return
        self._gap_spans(ds, reason, [(ds.read_through_us, horizon_us)], 0)
        ds.read_through_us = horizon_us
        ds.evidence.skip_to(horizon_us)

    def _settle_device(self, ds: DeviceState, now_us: int, through_us: int | None = None) -> None:
        ds.next_settle_mono_us = self._now_mono_us + SETTLE_INTERVAL_US
        ds.settled_now = True
        if ds.has_series:
            self._settle(ds, now_us, through_us=through_us)
        else:
            self._settle_by_evidence(ds)

    def _read_series(self, ds: DeviceState, forward_step_us: int) -> float:
        """Read new device periods; returns how busy they were (0..1)."""
        try:
            samples = ds.stamps.samples(self._nvml, ds.device, ds.cursor_us, self._now_us)
        except NoData:
            self._nothing_new(ds)
            return 0.0
        except NotSupported:
            log.warning(
                "%s: no device utilization series: processes' own evidence is billed as it is",
                ds.device.uuid,
            )
            ds.has_series = False
            return 0.0
        if ds.series.period_us is None and samples:
            self._learn_period(ds)
        read = ds.series.read(ds.cursor_us, samples, self._now_us)
        if not read.periods and not read.held:
            self._nothing_new(ds)
        elif read.lost and not forward_step_us and ds.series.period_us:
            ds.quiet.idle_in(
                read,
                ds.cursor_us,
                ds.series.period_us,
                lambda us: self._reaches(ds, us),
                lambda start, end: _claimed(ds.pieces, start, end),
            )
        # A forward wall step leaves a hole in the driver's timestamps that is no lost time.
        lost_us = sum(end - start for start, end in read.lost) - forward_step_us
        if lost_us > (ds.series.period_us or 0) // 2:
            self._gap_spans(ds, ds.hole_reason, read.lost, forward_step_us)
        ds.hole_reason = usage_pb2.GAP_REASON_RING_OVERFLOW
        assert ds.evidence is not None
        ds.evidence.on_periods(read.periods)
        ds.pending.extend(read.periods)
        ds.cursor_us = read.cursor_us
        span = sum(p.end_us - p.start_us for p in read.periods)
        return sum(p.busy_pct_us for p in read.periods) / (100 * span) if span else 0.0

    def _nothing_new(self, ds: DeviceState) -> None:
        if ds.quiet.nothing_new(ds.cursor_us, self._now_us, ds.series.period_us):
            log.warning(
                "%s: the device series holds no idle periods (it answers nothing for "
                "seconds): holes the driver did not drop are idle time from here on",
                ds.device.uuid,
            )

    def _reaches(self, ds: DeviceState, cursor_us: int) -> bool:
        """Whether the driver's ring still holds a sample at or before ``cursor_us`` (not
        known: no, so what it may have dropped stays a gap)."""
        ring = self._whole_ring(ds)
        return bool(ring) and ring[0].timestamp_us <= cursor_us

    def _learn_period(self, ds: DeviceState) -> None:
        """The period from the whole ring, where the answers since the cursor show none (a
        series that holds no idle period answers one sample at a time after a hole); one
        not read is learnt from a later answer."""
        ds.series.learn(self._whole_ring(ds))

    def _whole_ring(self, ds: DeviceState) -> list[DeviceSample]:
        """Every sample the driver holds, on the wall clock; none where it answers none or
        fails (counted, as every failed NVML call is)."""
        try:
            return ds.stamps.samples(self._nvml, ds.device, 0, self._now_us)
        except NoData:
            return []
        except NvmlError as exc:
            self._count_error(exc)
            return []

    def _catch_up(self, ds: DeviceState, stamp_us: int) -> None:
        """Read the device's periods again where per-process evidence reaches at or past
        the end of the next one (a row's stamp; for accounting counters, which have none,
        ``evidence.ALWAYS``): time passed between the calls (a loaded host, many GPUs), and
        the driver may have closed periods since."""
        period_us = ds.series.period_us
        if not ds.has_series or not period_us:
            return
        if stamp_us >= ds.cursor_us + period_us - period_us // CATCH_UP_SLACK:
            self.stats.series_catch_ups += 1
            self._read_series(ds, 0)

    def _take_evidence(self, ds: DeviceState, reading: Reading) -> None:
        """Keep this poll's evidence. A piece reaching back into settled time (an average
        since an old lastSeen) keeps its whole claim on the time not settled: earlier answers
        showed no activity of its process back there."""
        for piece in reading.pieces:
            if not ds.has_series:
                # Billed as it is: one PID's pieces chain end to start, so a piece later
                # than another PID's claims nothing twice.
                ds.pieces.append(piece)
                ds.used.append(0.0)
                continue
            if piece.end_us <= ds.settled_us:
                self._evidence_stats.discarded["late_evidence"] += 1
                continue
            if piece.start_us < ds.settled_us:
                piece = piece._replace(start_us=ds.settled_us)
            ds.pieces.append(piece)
            ds.used.append(0.0)

    def _complete_us(self, ds: DeviceState, now_us: int) -> int:
        """Up to when the evidence of every process that may have run is in. Alone on the
        device a process needs no evidence: then everything read is complete."""
        assert ds.evidence is not None
        pids = {t.key.pid for t in ds.tracked()}
        if len(pids) < 2 or ds.evidence.source is None:
            return ds.cursor_us
        return ds.evidence.complete_until_us(now_us, pids)

    def _settle(self, ds: DeviceState, now_us: int, *, through_us: int | None = None) -> None:
        """Apportion the periods old enough that their evidence is in (``through_us``: every
        period read that ends by then, with the evidence at hand)."""
        if not ds.pending:
            return
        complete = self._complete_us(ds, now_us)
        # A piece that straddles the complete point can only be placed once the evidence
        # after it is in.
        straddling = [p.start_us for p in ds.pieces if p.start_us < complete < p.end_us]
        horizon = min([complete, *straddling]) if through_us is None else through_us
        settle_to = self._settle_point(ds, horizon)
        if settle_to <= ds.settled_us:
            return
        presence = [t.presence() for t in ds.tracked()]
        result = apportion.apportion(
            ds.pending,
            ds.pieces,
            presence,
            settle_to,
            ds.used,
            complete_until_us=complete,
            memory=ds.fit,
        )
        ds.books.cover(ds.pending[0].start_us, settle_to)
        self._book(ds, result)
        ds.pending = [p for p in ds.pending if p.end_us > settle_to]
        self._spend(ds, result.used, settle_to)
        ds.settled_us = settle_to

    @staticmethod
    def _settle_point(ds: DeviceState, horizon_us: int) -> int:
        settle_to = ds.settled_us
        for p in ds.pending:
            if p.end_us > horizon_us:
                break
            settle_to = p.end_us
        return settle_to

    def _book(self, ds: DeviceState, result: apportion.Apportioned) -> None:
        assert ds.evidence is not None
        code = EVIDENCE_CODES[ds.evidence.source]
        only: dict[int, Tracked] = {
            pid: entries[0] for pid, entries in ds.processes.items() if len(entries) == 1
        }
        for share in result.shares:
            owner = only.get(share.pid) or ds.owner(share.pid, share.end_us)
            if owner is None:
                ds.books.unattributed_pct_us[Unattributed.NO_PROCESS] += share.pct_us
                continue
            if self._finished and self._already_written(owner.key, share.end_us):
                continue  # written before a restart: its µs are in the books already
            piece = Slice(share.start_us, share.end_us, share.pct_us)
            owner.usage.source = _DEVICE_UTIL
            if share.exact:
                owner.usage.add(piece)
            else:
                owner.usage.add_shared(piece, code)
        for reason, pct in result.unattributed.items():
            ds.books.unattributed_pct_us[reason] += pct
        self.stats.fits_cut_short += result.fits_cut_short
        self.stats.device_busy_us += result.busy_pct_us // 100

    def _spend(self, ds: DeviceState, used: dict[int, float], settle_to: int) -> None:
        """Record what settled time took of each piece; drop pieces wholly settled."""
        for i, amount in used.items():
            ds.used[i] += amount
        kept = [i for i, p in enumerate(ds.pieces) if p.end_us > settle_to]
        ds.pieces = [ds.pieces[i] for i in kept]
        ds.used = [ds.used[i] for i in kept]

    def _settle_by_evidence(self, ds: DeviceState) -> None:
        """No device series: each piece of evidence is the busy time of its own span."""
        for piece in ds.pieces:
            owner = ds.owner(piece.pid, piece.end_us) if piece.known else None
            if owner is None or self._already_written(owner.key, piece.end_us):
                if owner is None:
                    ds.books.unattributed_pct_us[Unattributed.UNKNOWN_PROCESS] += piece.pct_us
                continue
            owner.usage.source = _PROCESS_EVIDENCE
            owner.usage.add(Slice(piece.start_us, piece.end_us, piece.pct_us))
            self.stats.device_busy_us += piece.pct_us // 100
        if ds.pieces:
            ds.settled_us = max(ds.settled_us, max(p.end_us for p in ds.pieces))
        ds.pieces, ds.used = [], []

    def _already_written(self, key: ProcessKey, end_us: int) -> bool:
        through = self._finished.get(key)
        return through is not None and end_us <= through

    def _instance_processes(self, ds: DeviceState) -> list[ComputeProcess] | None:
        """A MIG instance's processes: from its own handle, or where the driver does not
        support that (a host in vGPU host virtualization mode, nvml.h on
        nvmlDeviceGetComputeRunningProcesses) from its GPU's list, by instance ids. None when
        neither answers, for good (the GPU's list needs privileges: nvml.h); a passing
        failure raises, and the next poll reads the instance again."""
        if ds.process_list == "own":
            try:
                return self._nvml.compute_processes(ds.device)
            except NotSupported:
                log.warning(
                    "%s: the driver does not list its processes (a host in vGPU host mode): "
                    "they are read from its GPU's list",
                    ds.device.uuid,
                )
                ds.process_list = "gpu"
        parent = ds.device.parent_uuid
        everyone = self._gpu_list(parent) if parent is not None else NotSupported("no GPU", 0)
        if isinstance(everyone, (NotSupported, NotPermitted)):
            if ds.process_list != "none":
                log.error(
                    "%s: its processes cannot be listed (%s): its busy time is unattributed "
                    "(PROCESSES_UNLISTED) until they can",
                    ds.device.uuid, everyone,
                )  # fmt: skip
                ds.process_list = "none"
            return None
        if isinstance(everyone, NvmlError):
            raise everyone
        if ds.process_list == "none":
            log.warning("%s: its processes are listed again", ds.device.uuid)
            ds.process_list = "gpu"
        ids = (ds.device.gpu_instance_id, ds.device.compute_instance_id)
        return [p for p in everyone if (p.gpu_instance_id, p.compute_instance_id) == ids]

    def _gpu_list(self, parent_uuid: str) -> list[ComputeProcess] | NvmlError:
        """The process list of a GPU in MIG mode (every instance's processes, with their
        ids), read once a poll however many instances and the watch ask for it."""
        if parent_uuid not in self._gpu_lists:
            parent = self._mig_gpus.get(parent_uuid)
            try:
                if parent is None:
                    raise NotSupported(f"{parent_uuid}: not listed in MIG mode", 0)
                self._gpu_lists[parent_uuid] = self._nvml.compute_processes(parent)
            except GpuLost:
                raise
            except NvmlError as exc:
                self._count_error(exc)
                self._gpu_lists[parent_uuid] = exc
        return self._gpu_lists[parent_uuid]

    def _poll_instance(self, ds: DeviceState, now_us: int, *, unlisted: bool = False) -> None:
        """MIG: GPM says how busy the instance was since its previous sample; its processes
        share that evenly. Time no pair of GPM samples covers is a gap, never free. Busy time
        with no process to take it (none listed, or ``unlisted``: none could be) is
        unattributed on the instance's books."""
        # Listed now, or at the previous poll: one that exited since ran for part of this
        # interval (its last seconds are in it, and in no other).
        present = (
            [] if unlisted else [t for t in ds.tracked() if t.listed or t.gone_at_us == now_us]
        )
        self._gap_downtime(ds)
        if not ds.gpm_supported:
            self._no_signal(present, ds.elapsed_us(self._now_mono_us))
            return
        if ds.gpm_from_mono_us is None:
            # No sample to measure from (the one taken at start or after a re-init failed).
            elapsed_us = ds.elapsed_us(self._now_mono_us)
            self._gap_each(present, usage_pb2.GAP_REASON_NVML_ERROR, elapsed_us)
            self._prime_instance(ds, self._now_mono_us)
            return
        try:
            fraction = self._nvml.instance_busy_fraction(ds.device)
        except NotSupported:
            self._without_gpm(ds)
            self._no_signal(present, ds.elapsed_us(self._now_mono_us))
            return
        interval_us = self._now_mono_us - ds.gpm_from_mono_us
        ds.gpm_from_mono_us = self._now_mono_us
        if fraction is None:
            # The library no longer had the sample this one is measured from.
            self._gap_each(present, usage_pb2.GAP_REASON_NVML_ERROR, interval_us)
            return
        if interval_us <= 0:
            return
        total = round(min(max(fraction, 0.0), 1.0) * 100 * interval_us)
        start_us = now_us - interval_us
        ds.settled_us = now_us
        if not present:
            if total:
                why = Unattributed.PROCESSES_UNLISTED if unlisted else Unattributed.NO_PROCESS
                ds.books.unattributed_pct_us[why] += total
                ds.books.cover(start_us, now_us)
            return
        if len(present) == 1:
            present[0].usage.source = _GPM_SINGLE
            present[0].usage.add(Slice(start_us, now_us, total))
            return
        for t in present:
            t.usage.source = _GPM_SHARED
        ds.shared.append(SharedReading(start_us, now_us, total, tuple(present)))

    def _resolve_shared(self, ds: DeviceState) -> None:
        """Split each shared reading evenly where one account pays for all its processes.
        Between accounts that would be a guess billed to someone: the busy time is nobody's,
        and each process's record says it had no signal of its own for that span (so its
        record, and the time it held the instance, are kept)."""
        for r in ds.shared:
            if r.pct_us == 0:
                continue  # idle: nothing to split
            if not self._one_payer(r.present, r.start_us, r.end_us):
                ds.books.unattributed_pct_us[Unattributed.NO_EVIDENCE] += r.pct_us
                ds.books.cover(r.start_us, r.end_us)
                self._gap_each(
                    list(r.present),
                    usage_pb2.GAP_REASON_NO_UTILIZATION_SIGNAL,
                    r.end_us - r.start_us,
                )
                continue
            share, extra = divmod(r.pct_us, len(r.present))
            for i, t in enumerate(r.present):
                t.usage.add(Slice(r.start_us, r.end_us, share + (1 if i < extra else 0)))
        ds.shared.clear()

    def _one_payer(self, present: Sequence[Tracked], start_us: int, end_us: int) -> bool:
        """Whether one account pays for all of ``present`` over the span: then an even
        split moves seconds between that account's own records only."""
        payers: set[str] = set()
        for t in present:
            accounts = self._payers.accounts(t.key, t.info, start_us, end_us)
            if accounts is None:
                return False
            payers |= accounts
        return len(payers) == 1

    def _prime_instance(self, ds: DeviceState, at_mono_us: int) -> None:
        """Take the GPM sample an instance's next reading is measured from: at start, and
        after every re-init (nvmlShutdown frees the samples the library held)."""
        ds.gpm_from_mono_us = None
        if not ds.gpm_supported:
            return
        try:
            self._nvml.instance_busy_fraction(ds.device)
        except NotSupported:
            self._without_gpm(ds)
            return
        except NvmlError as exc:
            self._count_error(exc)
            log.warning("%s: GPM sample failed: %s", ds.device.uuid, exc)
            return
        ds.gpm_from_mono_us = at_mono_us

    @staticmethod
    def _without_gpm(ds: DeviceState) -> None:
        ds.gpm_supported = False
        log.warning(
            "%s: no GPM on this GPU: MIG processes get wall time and a gap, no busy time",
            ds.device.uuid,
        )

    def _gap_downtime(self, ds: DeviceState) -> None:
        """Once after a restart, or for an instance made while the meter ran (at the first
        poll, or when the instance is found again or given up): each process the instance
        had or has now ran unmeasured from where its records end, or the listing before it
        was made (or the process's start, when later), to when this meter measures from."""
        if ds.down_us is None:
            return
        from_us, to_us, reason = ds.down_us
        ds.down_us = None
        ds.settled_us = max(ds.settled_us, to_us)
        self._device_gap(ds, reason, to_us - from_us)
        for t in ds.tracked():
            t.usage.add_gap(reason, to_us - max(from_us, t.key.create_time_us))

    def _gap_each(self, present: list[Tracked], reason: int, duration_us: int) -> None:
        if present:
            self._count_gap(reason, duration_us)
        for t in present:
            t.usage.add_gap(reason, duration_us)

    def _no_signal(self, present: list[Tracked], elapsed_us: int) -> None:
        for t in present:
            t.usage.source = _NO_SIGNAL
        self._gap_each(present, usage_pb2.GAP_REASON_NO_UTILIZATION_SIGNAL, elapsed_us)

    # -- processes --------------------------------------------------------------------------

    def _update_processes(
        self, ds: DeviceState, listed: list[ComputeProcess], now_us: int
    ) -> set[int]:
        """Track the listed processes; returns the pids first seen at this poll."""
        elapsed_us = ds.elapsed_us(self._now_mono_us)
        seen: set[int] = set()
        fresh: set[int] = set()
        # Unlisted at the previous poll, a process held no context then; at this meter's
        # first list, it may have since its start (read from /proc): an agent restarted, or
        # killed before its first window, reads the ring back past its own start, and those
        # periods are the listed processes' to share, not nobody's.
        unlisted_since_us = 0 if ds.never_listed else now_us - elapsed_us
        ds.never_listed = False
        for proc in listed:
            tracked, new = self._listed(ds, proc.pid, now_us, unlisted_since_us)
            seen.add(id(tracked))
            if new:
                fresh.add(proc.pid)
            tracked.usage.wall_us += min(elapsed_us, max(0, now_us - tracked.usage.start_us))
            tracked.usage.saw_memory(proc.used_memory_bytes)
        for t in ds.tracked():
            if id(t) not in seen and t.gone_at_us is None:
                t.listed = False
                t.gone_at_us = now_us
        return fresh

    def _listed(
        self, ds: DeviceState, pid: int, now_us: int, unlisted_since_us: int
    ) -> tuple[Tracked, bool]:
        entries = ds.processes.setdefault(pid, [])
        current = entries[-1] if entries else None
        if (
            current is not None
            and current.gone_at_us is None
            and current.listed
            and self._same_process(current, pid)
        ):
            return current, False
        info = self._info(pid)
        key = ProcessKey(ds.device.uuid, pid, _us(info.create_time) if info else 0)
        if current is not None and current.key == key and current.gone_at_us is None:
            current.listed = True
            current.info = current.info or info
            return current, False
        if current is not None and current.gone_at_us is None:
            current.gone_at_us = now_us  # the pid was reused: the old holder has exited
            current.listed = False
        # From when it was last seen unlisted at the earliest, or from its start when /proc
        # says it started later.
        seen_from = max(key.create_time_us, unlisted_since_us)
        tracked = Tracked(
            key, ds.device, info, Usage(start_us=max(seen_from, now_us - 1)), seen_from
        )
        tracked.listed = True
        entries.append(tracked)
        self.stats.processes_seen += 1
        return tracked, True

    def _same_process(self, current: Tracked, pid: int) -> bool:
        """Whether ``pid`` still names ``current``: a pid reused between two polls must not
        inherit the old holder's seconds."""
        created_us = self._created_us(pid)
        if created_us is None:
            return True  # gone from /proc, still listed by NVML: the same dying process
        return current.key.create_time_us in (0, created_us)

    def _created_us(self, pid: int) -> int | None:
        """When ``pid`` started, by /proc; None when no such process is running."""
        try:
            return _us(self._proc.create_time(pid))
        except ProcessGone:
            return None

    def _info(self, pid: int) -> ProcessInfo | None:
        try:
            info = self._proc.info(pid)
        except ProcessGone:
            # Listed by NVML, already gone from /proc: its seconds still count, unlabelled.
            return None
        for name, problem in info.refused_labels:
            self.stats.labels_refused[f"{name}:{LabelProblem(problem).name}"] += 1
            log.warning(
                "pid %d: label %s refused (%s); its usage goes without it",
                pid, name, LabelProblem(problem).name,
            )  # fmt: skip
        return info

    def _drained(self, ds: DeviceState, now_us: int) -> list[WindowUsage]:
        """Exited processes whose time is all settled: their final usage."""
        if ds.shared and any(t.gone_at_us is not None for t in ds.tracked()):
            self._resolve_shared(ds)  # a final record carries its share
        finals = []
        for pid, entries in list(ds.processes.items()):
            for t in list(entries):
                if t.gone_at_us is None or not self._drain_complete(ds, t):
                    continue
                entries.remove(t)
                self._finished[t.key] = ds.settled_us
                finals.append(self._emit(ds, t, now_us, final=True))
            if not entries:
                del ds.processes[pid]
                if ds.evidence is not None:
                    ds.evidence.forget(pid)
        return finals

    @staticmethod
    def _drain_complete(ds: DeviceState, t: Tracked) -> bool:
        """Exited, and settled up to its exit: on a lost GPU, given up as a gap that far
        (until then its last seconds may still be in the ring when the GPU is back)."""
        if ds.device.is_mig or ds.configured_away:
            return True
        return t.gone_at_us is not None and ds.settled_us >= t.gone_at_us

    def _exited_while_lost(self, ds: DeviceState, now_us: int) -> None:
        """Processes of a lost GPU that are gone from the host (a CUDA process whose GPU fell
        off the bus mostly dies): they may have run until now at the latest. Once the time up
        to now is given up as a gap they are final, not carried as gaps for as long as the
        GPU stays away (for good, if it was taken out)."""
        for t in ds.tracked():
            if t.gone_at_us is None and not self._alive(t):
                t.listed = False
                t.gone_at_us = now_us

    def _alive(self, t: Tracked) -> bool:
        created_us = self._created_us(t.key.pid)
        return created_us is not None and t.key.create_time_us in (0, created_us)

    # -- energy ---------------------------------------------------------------------------

    def _allocate_energy(self, before: dict[int, int], now_us: int) -> None:
        """Hand each physical GPU's energy since the last poll to the processes that computed
        in that poll, by their share of its busy time; energy while idle goes to nobody. A
        shared MIG reading, whose payer is judged later, counts evenly here: energy is
        reported, not billed."""
        for gpu, states in self._physical_gpus().items():
            if any(ds.lost_at_us is not None for ds in states):
                continue
            if not any(ds.settled_now for ds in states):
                continue  # its energy waits for the busy time it goes with
            counter = self._energy_counter(states[0].device)
            if counter is None:
                continue
            gained = [
                (t.usage, t.usage.pct_us - before.get(id(t), 0))
                for ds in states
                for t in ds.tracked()
            ]
            gained += [
                (t.usage, r.pct_us // len(r.present))
                for ds in states
                for r in ds.shared
                if r.end_us == now_us
                for t in r.present
            ]
            self._energy.allocate(gpu, counter, gained)

    def _energy_counter(self, device: Device) -> int | None:
        try:
            return self._nvml.total_energy_mj(device)
        except NvmlError as exc:
            self._count_error(exc)
            return None

    def _physical_gpus(self) -> dict[str, list[DeviceState]]:
        groups: dict[str, list[DeviceState]] = {}
        for ds in self._devices.values():
            groups.setdefault(ds.device.parent_uuid or ds.device.uuid, []).append(ds)
        return groups

    # -- lost GPUs ------------------------------------------------------------------------

    def _lose(self, ds: DeviceState, now_us: int, exc: GpuLost) -> None:
        """Only this device is lost: its cursors stay where its records end, and the ring
        may still hold the time in between when it is found again."""
        self._count_error(exc)
        self.stats.gpu_losses[ds.device.uuid] += 1
        log.error("%s: GPU lost (%s); what its ring does not keep is a gap", ds.device.uuid, exc)
        ds.lost_at_us = now_us
        ds.hole_reason = usage_pb2.GAP_REASON_GPU_LOST
        ds.process_reach_us = None  # a reset empties the driver's memory of the GPU
        self._listings.lost(self._clock.monotonic() + self._reopen_interval_s)

    def _watch_instances(self, now_us: int) -> None:
        """A process on a MIG instance this meter does not list means instances were made
        since the session began (it lists those of its nvmlInit only): list them again. On
        the parent's handle the process list has every instance's processes, with their ids
        (nvml.h, nvmlDeviceGetComputeRunningProcesses: aggregate information for a
        privileged caller). The list is read once a poll in any case."""
        for parent_uuid in self._mig_gpus:
            if parent_uuid in self._unwatched:
                continue
            known = {
                (ds.device.gpu_instance_id, ds.device.compute_instance_id)
                for ds in self._devices.values()
                if ds.device.parent_uuid == parent_uuid and not ds.configured_away
            }
            try:
                listed = self._gpu_list(parent_uuid)
            except GpuLost:
                continue  # its instances are found lost at their own polls
            if isinstance(listed, (NotSupported, NotPermitted)):
                log.warning(
                    "%s: its processes cannot be listed (%s): MIG instances made while the "
                    "agent runs are found by the relisting every %.0f s only",
                    parent_uuid, listed, listings.RELIST_INTERVAL_S,
                )  # fmt: skip
                self._unwatched.add(parent_uuid)
                continue
            if isinstance(listed, NvmlError):
                continue  # a passing failure: watched again at the next poll
            unknown: dict[InstanceId, set[int]] = {}
            for p in listed:
                if (p.gpu_instance_id, p.compute_instance_id) not in known:
                    instance = (parent_uuid, p.gpu_instance_id, p.compute_instance_id)
                    unknown.setdefault(instance, set()).add(p.pid)
            if unknown and not self._listings.change_pending:
                log.info("%s: processes on MIG instances not listed: %s", parent_uuid, unknown)
            for instance in unknown:
                self._listings.changed(_evidence(instance))
            self._see_unlisted(self._mig_gpus[parent_uuid], unknown, now_us)

    def _see_unlisted(self, gpu: Device, unknown: dict[InstanceId, set[int]], now_us: int) -> None:
        """Remember the processes of instances not listed yet, with their labels while
        /proc has them: one that exits before a listing finds its instance still gets a
        record, its time there a DEVICE_UNLISTED gap, never nothing."""
        parent_uuid = gpu.uuid
        for key, pids in unknown.items():
            # Made after the listing before the first sight of it, at the latest.
            instance = self._unlisted.setdefault(key, UnlistedInstance(gpu, self._listed_us))
            for pid in pids:
                if pid not in instance.processes:
                    instance.processes[pid] = SeenProcess(self._info(pid))
        for key, instance in self._unlisted.items():
            if key[0] == parent_uuid:
                for pid, seen in instance.processes.items():
                    if seen.gone_us is None and pid not in unknown.get(key, ()):
                        seen.gone_us = now_us

    def _relist_devices(self, now_us: int) -> list[WindowUsage]:
        """List the driver's devices afresh when the schedule says so: a lost GPU is found
        again by UUID, a device made since is metered, one configured away ends. Returns
        the final usage of processes on instances no listing found."""
        lost = [ds for ds in self._devices.values() if ds.lost_at_us is not None]
        mono = self._now_mono_us / 1e6  # this poll's: no clock reading of its own
        why = self._listings.due(mono, lost=bool(lost))
        if why is None:
            return []
        self.stats.relistings[why] += 1
        try:
            self._nvml.reopen()
            present = {d.uuid: d for d in self._nvml.devices()}
        except NvmlError as exc:
            self._count_error(exc)
            self._listings.failed(mono)
            log.warning("listing the devices again failed: %s", exc)
            return []
        listed_before_us = self._listed_us
        self._note_listed(now_us)
        for ds in lost:
            if ds.device.uuid in present:
                log.warning("%s: GPU is back", ds.device.uuid)
                ds.lost_at_us = None
                # Its process list while away is unknown: a process listed now may have
                # held a context since its start (a job begun after the GPU's reset).
                ds.never_listed = True
                self._rebind(ds, present[ds.device.uuid])
                if ds.device.is_mig:  # no ring to read back: all the time away is a gap
                    self._gap_downtime(ds)
                    self._gap_all(ds, usage_pb2.GAP_REASON_GPU_LOST, now_us - ds.settled_us)
                    ds.settled_us = max(ds.settled_us, now_us)
        self._end_configured_away(present, now_us)
        self._prime_instances(lost)
        finals: list[WindowUsage] = []
        for uuid, device in present.items():
            if uuid not in self._devices:
                log.warning("%s: a device not listed before; metering it", uuid)
                finals += self._add_made(device, listed_before_us, now_us)
        self._listings.listed(mono, still_lost=any(ds.lost_at_us is not None for ds in lost))
        return finals + self._forget_unlisted(now_us)

    def _forget_unlisted(self, now_us: int, *, all_of_them: bool = False) -> list[WindowUsage]:
        """Instances a listing did not find whose processes have all exited (``all_of_them``:
        every one, for an agent leaving service): nothing will list them (destroyed, or never
        to be listed). What ran there is unknown: the final usage of their processes, with
        no busy time and their time there a DEVICE_UNLISTED gap."""
        finals = []
        for key, instance in list(self._unlisted.items()):
            if all_of_them or all(s.gone_us is not None for s in instance.processes.values()):
                del self._unlisted[key]
                log.error(
                    "MIG instance %s was never listed; the time of its processes %s there, "
                    "from %s at the earliest, is a DEVICE_UNLISTED gap",
                    _evidence(key), sorted(instance.processes),
                    datetime.fromtimestamp(instance.since_us / 1e6, UTC).isoformat(),
                )  # fmt: skip
                # On its GPU, known by the instance's ids there: its UUID never was.
                _, gi, ci = key
                gpu = dataclasses.replace(instance.gpu, gpu_instance_id=gi, compute_instance_id=ci)
                seen = self._seen_usage(gpu, instance, instance.since_us, now_us, gone_only=False)
                # No device to count the time on (a found one counts its own): its processes'.
                for usage in seen:
                    self._count_gap(
                        usage_pb2.GAP_REASON_DEVICE_UNLISTED, usage.end_us - usage.start_us
                    )
                finals += seen
        return finals

    def _seen_usage(
        self,
        device: Device,
        instance: UnlistedInstance,
        since_us: int,
        now_us: int,
        *,
        gone_only: bool,
    ) -> list[WindowUsage]:
        """The usage on ``device`` of the processes seen on ``instance`` through its GPU's
        list: no busy time, their time there a DEVICE_UNLISTED gap (GPM cannot look back),
        from ``since_us`` or their start to when they left the list (or ``now_us``); final
        for those gone. ``gone_only``: those still running are left to be listed."""
        finals = []
        for pid, seen in instance.processes.items():
            if gone_only and seen.gone_us is None:
                continue
            created_us = _us(seen.info.create_time) if seen.info is not None else 0
            from_us = max(since_us, created_us)
            until_us = seen.gone_us if seen.gone_us is not None else now_us
            self.stats.processes_seen += 1
            usage = Usage(start_us=from_us, source=_GPM_SINGLE)
            usage.add_gap(usage_pb2.GAP_REASON_DEVICE_UNLISTED, until_us - from_us)
            process = ProcessKey(device.uuid, pid, created_us)
            final = seen.gone_us is not None
            span = (from_us, until_us)
            finals.append(_window(process, device, seen.info, usage, 0, span, final=final))
        return finals

    def _note_listed(self, now_us: int) -> None:
        """Remember when the devices were listed, and which GPUs are in MIG mode, instances
        or not (dynamic MIG makes them as jobs come)."""
        self._listed_us = now_us
        self._mig_gpus = {g.uuid: g for g in self._nvml.mig_gpus()}

    def _end_configured_away(self, present: dict[str, Device], now_us: int) -> None:
        """Devices not listed while their GPU is: configured away (a MIG instance destroyed,
        MIG mode turned on or off), not lost. An instance is destroyed only when not in use,
        and a GPU changes mode only when idle: their processes have ended."""
        gpus = {d.parent_uuid or d.uuid for d in present.values()}
        for uuid, ds in self._devices.items():
            if uuid in present or ds.configured_away:
                continue
            if (ds.device.parent_uuid or uuid) not in gpus:
                continue  # the GPU itself is gone: lost, or found lost at its next poll
            log.warning("%s: no longer listed while its GPU is: configured away", uuid)
            if ds.lost_at_us is not None:  # lost, and back in another configuration
                self._give_up_lost(ds, now_us, hold_us=0)
            elif not ds.device.is_mig:
                self._settle_device(ds, now_us, through_us=ds.cursor_us)
            ds.lost_at_us = None
            ds.configured_away = True
            for t in ds.tracked():
                if t.gone_at_us is None:
                    t.listed = False
                    t.gone_at_us = now_us

    def _prime_instances(self, lost: list[DeviceState]) -> None:
        """After a re-init, every listed MIG instance measures from a new GPM sample. For one
        that was not lost, the moments between its sample at this poll and the new one are
        unmeasured (the re-init's own time)."""
        at_mono_us = _us(self._clock.monotonic())
        for ds in self._devices.values():
            if not ds.device.is_mig or ds.lost_at_us is not None or ds.configured_away:
                continue
            if ds not in lost and ds.gpm_from_mono_us is not None:
                present = [t for t in ds.tracked() if t.listed]
                self._gap_each(
                    present, usage_pb2.GAP_REASON_NVML_ERROR, at_mono_us - ds.gpm_from_mono_us
                )
            self._prime_instance(ds, at_mono_us)

    @staticmethod
    def _rebind(ds: DeviceState, device: Device) -> None:
        """A device found again as the driver lists it now (its index may have changed)."""
        if device == ds.device:
            return
        ds.device = device
        for t in ds.tracked():
            t.device = device
        if ds.evidence is not None:
            ds.evidence.rebind(device)

    def _give_up_lost(self, ds: DeviceState, now_us: int, hold_us: int | None = None) -> None:
        """Give up the time a lost GPU's ring can no longer hold (or older than ``hold_us``):
        what was read of it before the loss is apportioned with the evidence at hand (no
        more can come: the driver keeps no older samples), and only the rest is a gap."""
        self._exited_while_lost(ds, now_us)
        self._give_up(ds, now_us, usage_pb2.GAP_REASON_GPU_LOST, hold_us)

    def _give_up(
        self, ds: DeviceState, now_us: int, reason: int, hold_us: int | None = None
    ) -> None:
        """Give up the time the ring of a GPU that cannot be read (lost, or its polls
        failing) no longer holds, as a gap of ``reason``."""
        self._gap_downtime(ds)  # a MIG instance lost at a restart
        ring_us = (ds.ring_us if ds.has_series else ds.process_reach_us) or DEFAULT_RING_US
        horizon = now_us - (max(ring_us, MIN_HOLD_US) if hold_us is None else hold_us)
        if not ds.device.is_mig and not ds.has_series:
            self._settle_device(ds, now_us)
            self._give_up_unread(ds, horizon, reason)
            return
        if ds.settled_us >= horizon:
            return
        if not ds.device.is_mig:
            self._settle_device(ds, now_us, through_us=horizon)
            if ds.has_series and ds.cursor_us >= horizon:
                return  # all read: the period across the horizon goes with the next
        if ds.settled_us >= horizon:
            return
        self._gap_all(ds, reason, horizon - ds.settled_us)
        ds.pending = [p for p in ds.pending if p.end_us > horizon]
        keep = [i for i, p in enumerate(ds.pieces) if p.end_us > horizon]
        ds.pieces, ds.used = [ds.pieces[i] for i in keep], [ds.used[i] for i in keep]
        ds.cursor_us = max(ds.cursor_us, horizon)
        ds.settled_us = horizon
        if ds.evidence is not None:
            ds.evidence.cursor_us = max(ds.evidence.cursor_us, horizon)

    def _gap_all(self, ds: DeviceState, reason: int, duration_us: int) -> None:
        if duration_us <= 0:
            return
        self._device_gap(ds, reason, duration_us)
        for t in ds.tracked():
            t.usage.add_gap(reason, duration_us)

    def _gap_spans(
        self, ds: DeviceState, reason: int, spans: Sequence[tuple[int, int]], less_us: int
    ) -> None:
        """A hole in the device's series (wall µs spans, ``less_us`` of them a forward clock
        step): each process's gap is the part within its life. One started since (a job on
        a GPU found again after its reset) was not there to lose any of it."""
        self._device_gap(ds, reason, sum(end - start for start, end in spans) - less_us)
        for t in ds.tracked():
            until_us = t.gone_at_us if t.gone_at_us is not None else spans[-1][1]
            within_us = sum(
                max(0, min(end, until_us) - max(start, t.key.create_time_us))
                for start, end in spans
            )
            t.usage.add_gap(reason, within_us - less_us)

    def _device_gap(self, ds: DeviceState, reason: int, duration_us: int) -> None:
        """Time of the device itself nobody measured: on its books (its next device record)
        whether or not a process was there to carry it, and counted."""
        if duration_us > 0:
            ds.books.gaps_us[reason] += duration_us
            self._count_gap(reason, duration_us)

    def _count_gap(self, reason: int, duration_us: int) -> None:
        if duration_us > 0:
            self.stats.gaps_us[usage_pb2.GapReason.Name(reason)] += duration_us

    def _count_error(self, exc: NvmlError) -> None:
        self.stats.nvml_errors[type(exc).__name__] += 1

    def _sync_stats(self) -> None:
        self.stats.discarded_samples = self._evidence_stats.discarded
        self.stats.evidence_switches = self._evidence_stats.switches
        self.stats.evidence_requeries = self._evidence_stats.requeries
        self.stats.evidence_requery_rows = self._evidence_stats.requery_rows

    # -- windows --------------------------------------------------------------------------

    def close_window(self, *, all_books: bool = False) -> list[WindowUsage]:
        """Close every process's window, then every whole GPU's books: usage with activity,
        a device record per GPU, and a new committed state. ``all_books``: a lost GPU's
        books of missing time too, however young (an agent leaving service)."""
        now_us = _us(self._clock.wall())
        for ds in self._devices.values():
            self._resolve_shared(ds)
            if ds.lost_at_us is not None:
                self._give_up_lost(ds, now_us)
            elif not ds.device.is_mig and not ds.settled_now and not ds.configured_away:
                if ds.failed_polls:
                    # Unread while its polls fail: what the ring has dropped by now is a gap
                    # now, not only once a poll reads again, which may be never.
                    self._give_up(ds, now_us, usage_pb2.GAP_REASON_NVML_ERROR)
                self._settle_device(ds, now_us)
        closed = [
            self._emit(ds, t, now_us, final=False)
            for ds in self._devices.values()
            for t in ds.tracked()
            if t.usage.has_activity
        ]
        for ds in self._devices.values():
            ds.committed_us = ds.settled_us
            for t in ds.tracked():
                if not t.usage.has_activity:
                    t.usage.start_us = now_us
            books = (
                None if self._books_held(ds, now_us, all_books) else self._close_books(ds, now_us)
            )
            if books is not None:
                closed.append(books)
            ds.committed = self._snapshot(ds)
        for uuid in [
            u for u, ds in self._devices.items() if ds.configured_away and not ds.processes
        ]:
            del self._devices[uuid]  # its books are closed: it leaves the state
        self._energy.commit()
        self._finished.clear()
        return closed

    def _emit(self, ds: DeviceState, t: Tracked, now_us: int, *, final: bool) -> WindowUsage:
        usage = t.fresh_usage(now_us)
        total = t.carry_pct_us + usage.pct_us
        busy_us, t.carry_pct_us = divmod(total, 100)
        if final and t.carry_pct_us >= 50:
            busy_us += 1
        self.stats.busy_us_metered += busy_us
        start = min([usage.start_us, *(s.start_us for s in usage.slices)])
        # A wall clock stepped back further than the window is long puts "now" before the
        # window's start: it then ends where it began, never before (the collector refuses
        # an end before the start, and would block the agent's chain on it).
        end = max([start, now_us, *(s.end_us for s in usage.slices)])
        ds.books.attributed_us += busy_us
        ds.books.cover(start, end)
        return _window(t.key, t.device, t.info, usage, busy_us, (start, end), final=final)

    @staticmethod
    def _books_held(ds: DeviceState, now_us: int, all_books: bool) -> bool:
        """A lost GPU's books of missing time alone, younger than LOST_BOOKS_US: kept open."""
        young = now_us - ds.books.start_us < LOST_BOOKS_US
        return ds.lost_at_us is not None and ds.books.gaps_only and young and not all_books

    def _idle_record_due(self, ds: DeviceState, now_us: int) -> bool:
        """Whether an empty device record is due: none written for ``idle_record_s``, and
        its empty books mean idle. They do not where nothing measures the device (no device
        series and no per-process source; a MIG instance without GPM), nor while its polls
        fail or it is lost or configured away: then they only mean unread."""
        due_us = ds.recorded_through_us + self._idle_record_us
        return bool(self._idle_record_us) and now_us >= due_us and _measured(ds)

    def _close_books(self, ds: DeviceState, now_us: int) -> WindowUsage | None:
        """The device record of a whole GPU or MIG instance: its books since the previous
        one."""
        books = ds.books
        if books.empty:
            if not self._idle_record_due(ds, now_us):
                books.start_us = now_us
                return None
            books.start_us = ds.recorded_through_us  # metered, and idle, all along
        unattributed = []
        for reason in sorted(books.unattributed_pct_us):
            carried = books.carry_pct_us[reason] + books.unattributed_pct_us[reason]
            us, books.carry_pct_us[reason] = divmod(carried, 100)
            if us:
                unattributed.append((int(reason), us))
                self.stats.unattributed_us[Unattributed(reason).name] += us
        device_us = books.attributed_us + sum(us for _, us in unattributed)
        start = min(books.start_us, now_us, books.first_us or now_us)
        end = max(now_us, books.last_us)
        ds.books = Books(now_us, carry_pct_us=books.carry_pct_us)
        ds.recorded_through_us = end
        return WindowUsage(
            key=ProcessKey(ds.device.uuid, 0, 0),
            device=ds.device,
            info=None,
            start_us=start,
            end_us=end,
            busy_us=0,
            wall_us=0,
            peak_memory_bytes=None,
            energy_mj=None,
            gaps_us=(),
            source=_device_source(ds),
            final=False,
            slices=(),
            quality=usage_pb2.QUALITY_UNATTRIBUTED,
            evidence=EVIDENCE_CODES[ds.evidence.source if ds.evidence else None],
            books=DeviceBooks(
                device_us,
                books.attributed_us,
                tuple(unattributed),
                tuple(sorted((int(r), us) for r, us in books.gaps_us.items() if us)),
            ),
        )

    def learned(self) -> dict[str, Learned]:
        """Per whole GPU, what the meter has learned of its driver so far (selftest, logs)."""
        out = {}
        for uuid, ds in self._devices.items():
            ev = ds.evidence
            if ev is None:
                continue
            source = ev.source
            out[uuid] = Learned(
                ds.series.period_us if ds.has_series else None,
                source.value if source is not None else None,
                ev.reading.value,
                dict(ev.strides),
                dict(ev.left),
                ds.ring_us,
                ds.stamps.stamped.value if ds.stamps.stamped is not None else None,
            )
        return out

    def written_through_us(self) -> int:
        """Driver time up to which every device's usage is in closed windows."""
        cursors = [ds.committed_us for ds in self._devices.values() if ds.committed_us]
        return min(cursors, default=_us(self._clock.wall()))

    # -- retiring -------------------------------------------------------------------------

    def read_through_us(self) -> dict[str, int]:
        """Per whole GPU, the time its evidence is to cover before a retiring agent settles:
        the driver time read so far by its device series; with none, now (its processes'
        own samples of the time until now come seconds late: nvtop#110, go-nvml#51)."""
        now_us = _us(self._clock.wall())
        return {
            uuid: ds.cursor_us if ds.has_series else now_us
            for uuid, ds in self._devices.items()
            if not ds.device.is_mig and ds.lost_at_us is None
        }

    def lost_since_us(self) -> dict[str, int]:
        """The devices lost now, each with the wall µs it was found lost."""
        return {u: ds.lost_at_us for u, ds in self._devices.items() if ds.lost_at_us is not None}

    def settle_now(self) -> None:
        """Apportion whatever evidence allows on every whole GPU, not waiting for the next
        settlement (a retiring agent waits on it)."""
        now_us = _us(self._clock.wall())
        for ds in self._devices.values():
            if not ds.device.is_mig and ds.lost_at_us is None:
                self._settle_device(ds, now_us)

    def settled_through(self, read_us: dict[str, int]) -> bool:
        """Whether every GPU of ``read_us`` (``read_through_us`` earlier) is apportioned up
        to there: the evidence of that time is all in. A GPU lost since waits for nothing."""
        now_us = _us(self._clock.wall())
        return all(
            self._evidence_through_us(ds, now_us) >= read_us[uuid] or ds.lost_at_us is not None
            for uuid, ds in self._devices.items()
            if uuid in read_us
        )

    @staticmethod
    def _evidence_through_us(ds: DeviceState, now_us: int) -> int:
        """Up to when a GPU's busy time is settled: with no device series, up to when the
        evidence of its listed processes is all in."""
        if ds.has_series:
            return ds.settled_us
        assert ds.evidence is not None
        pids = {t.key.pid for t in ds.tracked() if t.listed}
        return ds.evidence.complete_until_us(now_us, pids) if pids else now_us

    def retire(self) -> list[WindowUsage]:
        """Settle everything read and close every window, for an agent whose host leaves
        service: its next start, which would settle the periods still waiting for evidence,
        never comes. Busy time whose evidence did not come is unattributed (no evidence),
        a lost GPU's unread time a gap; processes whose time is all settled are final."""
        now_us = _us(self._clock.wall())
        finals, self._held_finals = self._held_finals, []
        for ds in self._devices.values():
            if ds.lost_at_us is not None:
                self._give_up_lost(ds, now_us, hold_us=0)
            elif not ds.device.is_mig:
                self._settle_device(ds, now_us, through_us=ds.cursor_us)
            finals.extend(self._drained(ds, now_us))
        unlisted = self._forget_unlisted(now_us, all_of_them=True)
        return finals + unlisted + self.close_window(all_books=True)

    def shutdown(self) -> None:
        self._nvml.shutdown()


def _window(
    key: ProcessKey,
    device: Device,
    info: ProcessInfo | None,
    usage: Usage,
    busy_us: int,
    span_us: tuple[int, int],
    *,
    final: bool,
) -> WindowUsage:
    """A process's window over ``span_us`` from its accumulators: ``busy_us`` whole µs."""
    return WindowUsage(
        key=key,
        device=device,
        info=info,
        start_us=span_us[0],
        end_us=span_us[1],
        busy_us=busy_us,
        wall_us=usage.wall_us,
        peak_memory_bytes=usage.peak_memory_bytes,
        energy_mj=usage.energy_mj,
        gaps_us=tuple(sorted(usage.gaps_us.items())),
        source=usage.source,
        final=final,
        slices=tuple(usage.slices),
        quality=usage.quality,
        evidence=usage.evidence if usage.apportioned_pct_us else usage_pb2.EVIDENCE_SOURCE_NONE,
    )


def _measured(ds: DeviceState) -> bool:
    """Whether the device is being measured now, so that books with nothing in them mean
    that it was idle."""
    if ds.failed_polls or ds.lost_at_us is not None or ds.configured_away:
        return False
    if ds.device.is_mig:
        return ds.gpm_supported and ds.gpm_from_mono_us is not None
    return ds.has_series or (ds.evidence is not None and ds.evidence.source is not None)


def _device_source(ds: DeviceState) -> int:
    """What a device record's busy time was measured by."""
    if ds.device.is_mig:
        return _GPM_SINGLE
    return _DEVICE_UTIL if ds.has_series else _PROCESS_EVIDENCE


class _EnergyLedger:
    """Energy counters per physical GPU, and what is left to hand out after rounding."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}  # physical uuid -> counter at the latest read, mJ
        self._committed: dict[str, int] = {}  # counter at the last window close
        self._leftover: dict[str, int] = {}  # mJ not yet handed out (rounding)

    def restore(self, gpu: str, counter_mj: int | None) -> None:
        if counter_mj is not None:
            self._last[gpu] = self._committed[gpu] = int(counter_mj)

    def committed(self, gpu: str) -> int | None:
        return self._committed.get(gpu)

    def commit(self) -> None:
        self._committed.update(self._last)

    def allocate(self, gpu: str, counter_mj: int, gained: list[tuple[Usage, int]]) -> None:
        previous = self._last.get(gpu)
        self._last[gpu] = counter_mj
        if previous is None or counter_mj < previous:
            return  # first read, or the driver reloaded and the counter started again
        busy = [(usage, pct) for usage, pct in gained if pct > 0]
        total_pct = sum(pct for _, pct in busy)
        if total_pct == 0:
            self._leftover[gpu] = 0  # idle energy: nobody's
            return
        pool = counter_mj - previous + self._leftover.get(gpu, 0)
        handed = 0
        for usage, pct in busy:
            share = pool * pct // total_pct
            usage.add_energy(share)
            handed += share
        self._leftover[gpu] = pool - handed


def _device_entry(device: Device) -> dict[str, Any]:
    """What a restart needs to know a device by, should the driver not list it then."""
    # Not dataclasses.asdict: it deep-copies, and this runs for every device at every close.
    return {f.name: getattr(device, f.name) for f in dataclasses.fields(device) if f.name != "uuid"}


def _saved_device(uuid: str, saved: dict[str, Any]) -> Device | None:
    doc = saved.get("device")
    return None if doc is None else Device(uuid=uuid, **doc)


def _piece_entry(p: Evidence) -> Sequence[Any]:
    return (p.pid, p.start_us, p.end_us, p.pct_us, p.bound_pct_us, p.known)


def _books_entry(books: Books) -> dict[str, Any]:
    return {
        "start_us": books.start_us,
        "attributed_us": books.attributed_us,
        "unattributed": {str(int(k)): v for k, v in books.unattributed_pct_us.items()},
        "carry": {str(int(k)): v for k, v in books.carry_pct_us.items()},
        "gaps": {str(int(k)): v for k, v in books.gaps_us.items()},
    }


def _restore_books(doc: dict[str, Any] | None, now_us: int) -> Books:
    if not doc:
        return Books(now_us)
    return Books(
        int(doc.get("start_us", now_us)),
        int(doc.get("attributed_us", 0)),
        Counter({int(k): int(v) for k, v in doc.get("unattributed", {}).items()}),
        Counter({int(k): int(v) for k, v in doc.get("carry", {}).items()}),
        Counter({int(k): int(v) for k, v in doc.get("gaps", {}).items()}),
    )


def _process_entry(t: Tracked) -> dict[str, Any]:
    return {
        "gpu": t.key.gpu_uuid,
        "pid": t.key.pid,
        "seen_from_us": t.seen_from_us,
        "carry_pct_us": t.carry_pct_us,
        **_info_entry(t.key.create_time_us, t.info),
    }


def _info_entry(create_time_us: int, info: ProcessInfo | None) -> dict[str, Any]:
    return {
        "create_time_us": create_time_us,
        "name": info.name if info else "",
        "labels": dict(info.labels) if info else {},
        "container_id": info.container_id if info else "",
        "pod_uid": info.pod_uid if info else "",
    }


def _restored_info(pid: int, entry: dict[str, Any]) -> ProcessInfo:
    return ProcessInfo(
        pid=pid,
        create_time=int(entry["create_time_us"]) / 1e6,
        name=entry.get("name", ""),
        labels=dict(entry.get("labels", {})),
        container_id=entry.get("container_id", ""),
        pod_uid=entry.get("pod_uid", ""),
    )


def _unlisted_entry(key: InstanceId, instance: UnlistedInstance) -> dict[str, Any]:
    """An unlisted instance as saved: its GPU, ids, since when, and what was seen on it."""
    gpu = instance.gpu
    processes = []
    for pid, seen in instance.processes.items():
        doc: dict[str, Any] = {"pid": pid, "gone_us": seen.gone_us}
        if seen.info is not None:
            doc.update(_info_entry(_us(seen.info.create_time), seen.info))
        processes.append(doc)
    return {
        "gpu": {"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name},
        "gi": key[1],
        "ci": key[2],
        "since_us": instance.since_us,
        "processes": processes,
    }


def _listed_through_us(saved: dict[str, Any]) -> int | None:
    """When the saved run's devices were last listed: None on a first start (what ran
    before any agent is not ours to bill), and for a state written before this was kept
    (nothing in it bounds that listing: such a device is metered from now, as before)."""
    if not saved.get("devices"):
        return None
    if "listed_us" not in saved:
        log.warning("the saved state predates listing times: new devices are metered from now")
        return None
    return int(saved["listed_us"])


def _decode_state(state: bytes | None) -> dict[str, Any]:
    if not state:
        return {}
    try:
        doc = json.loads(state)
    except ValueError:
        log.error("the saved meter state is not JSON; starting afresh")
        return {}
    if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
        log.error("the saved meter state has an unknown version; starting afresh")
        return {}
    return doc


def _shorter(a: int | None, b: int | None) -> int | None:
    """The shorter of two periods learnt, either of them None (not learnt)."""
    return min(a, b) if a is not None and b is not None else a or b


def _claimed(pieces: Sequence[Evidence], start_us: int, end_us: int) -> bool:
    """Whether a piece of evidence puts busy time in [start_us, end_us)."""
    return any(p.pct_us and p.start_us < end_us and p.end_us > start_us for p in pieces)
