"""The meter: polls every device, measures busy time per process, closes windows.

Identity is ``(gpu_uuid, pid, create_time)``. Busy time comes from NVML per-process samples
on whole GPUs (``agent.sampling`` reads them) and from GPM instance utilisation on MIG
instances, where NVML has no per-process signal. Time the meter could not see is a *gap*
with its reason, never filled in and never turned into zero.

The meter's committed state (cursors, carried remainders, the processes it knows) is
serialised with every batch of records written to the outbox, in the same transaction, so
an agent killed at any moment resumes exactly where its written records end: the driver's
ring buffer still holds the samples of the time in between, or the lost time is a gap.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from creditmeter.agent.errors import GpuLost, NoData, NotSupported, NvmlError, ProcessGone
from creditmeter.agent.gpu import Clock, ComputeProcess, Device, Nvml, ProcessInfo, ProcessTable
from creditmeter.agent.sampling import Reading, SampleInterpreter
from creditmeter.agent.usage import ProcessKey, Slice, Usage, WindowUsage
from creditmeter.v1 import usage_pb2

log = logging.getLogger(__name__)

STATE_VERSION = 1
WALL_STEP_US = 250_000  # wall − monotonic moving more than this between polls is a step
_GPM_SINGLE = usage_pb2.MEASUREMENT_SOURCE_GPM_MIG_INSTANCE
_GPM_SHARED = usage_pb2.MEASUREMENT_SOURCE_GPM_MIG_SHARED
_NO_SIGNAL = usage_pb2.MEASUREMENT_SOURCE_NONE


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


@dataclass(slots=True)
class Tracked:
    """A process the meter knows on one device."""

    key: ProcessKey
    device: Device
    info: ProcessInfo | None
    usage: Usage
    carry_pct_us: int = 0  # remainder below 1 µs, carried into the next window
    listed: bool = False  # in the driver's process list at the latest poll
    gone_at_us: int | None = None  # wall µs it was first missing from the list

    def fresh_usage(self, start_us: int) -> Usage:
        previous, self.usage = self.usage, Usage(start_us=start_us, source=self.usage.source)
        return previous


@dataclass(slots=True)
class DeviceState:
    device: Device
    interpreter: SampleInterpreter = field(default_factory=SampleInterpreter)
    cursor_us: int = 0  # driver time of the newest period consumed
    committed_cursor_us: int = 0  # cursor as of the last window close (what records cover)
    processes: dict[int, list[Tracked]] = field(default_factory=dict)  # pid -> oldest first
    last_poll_mono_us: int | None = None  # monotonic µs: durations never follow wall steps
    lost_at_us: int | None = None  # wall µs the GPU was found lost
    gpm_supported: bool = True

    def elapsed_us(self, now_mono_us: int) -> int:
        return now_mono_us - (self.last_poll_mono_us or now_mono_us)

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
    processes_seen: int = 0
    busy_us_metered: int = 0
    gaps_us: Counter[str] = field(default_factory=Counter)  # by reason name


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
    ) -> None:
        self._nvml = nvml
        self._proc = processes
        self._clock = clock
        self._reopen_interval_s = reopen_interval_s
        self._next_reopen = 0.0
        self._devices: dict[str, DeviceState] = {}
        self._energy = _EnergyLedger()
        self._finished: dict[ProcessKey, int] = {}  # exited since the last close: -> cursor_us
        self.stats = MeterStats()
        self._now_mono_us = _us(clock.monotonic())
        self._wall_offset_us = _us(clock.wall()) - self._now_mono_us  # wall − monotonic
        self._start(_decode_state(state))

    # -- start and state ------------------------------------------------------------------

    def _start(self, saved: dict[str, Any]) -> None:
        now_us = _us(self._clock.wall())
        saved_devices = saved.get("devices", {})
        for device in self._nvml.devices():
            ds = DeviceState(device)
            self._devices[device.uuid] = ds
            self._resume(ds, saved_devices.get(device.uuid))
            ds.last_poll_mono_us = self._now_mono_us
        for gpu, states in self._physical_gpus().items():
            if self._energy.committed(gpu) is None:
                self._energy.restore(gpu, self._energy_counter(states[0].device))
        for entry in saved.get("processes", []):
            self._restore_process(entry, now_us)
        self._finished = {
            ProcessKey(u, p, c): through for u, p, c, through in saved.get("finished", [])
        }

    def _resume(self, ds: DeviceState, saved: dict[str, Any] | None) -> None:
        latest = self._latest_period(ds)
        if latest is None:
            latest = _us(self._clock.wall())  # no period yet: bill those ending from now on
        if saved is not None:
            ds.interpreter = SampleInterpreter(saved["period_us"], Reading(saved["reading"]))
            ds.cursor_us = int(saved["cursor_us"])
            if ds.cursor_us > latest:
                log.warning(
                    "%s: saved cursor is ahead of the driver's newest sample (clock set back "
                    "or driver reloaded); starting from the newest sample",
                    ds.device.uuid,
                )
                ds.cursor_us = latest
            self._energy.restore(ds.device.parent_uuid or ds.device.uuid, saved.get("energy_mj"))
        else:
            # First start: what ran before the agent existed is not ours to bill.
            ds.cursor_us = latest
        ds.committed_cursor_us = ds.cursor_us

    def _latest_period(self, ds: DeviceState) -> int | None:
        if ds.device.is_mig:
            return None
        try:
            samples = self._nvml.device_samples(ds.device, 0)
        except NoData:
            return None
        except NvmlError as exc:
            self._count_error(exc)
            return None
        return samples[-1].timestamp_us if samples else None

    def _restore_process(self, entry: dict[str, Any], now_us: int) -> None:
        ds = self._devices.get(entry["gpu"])
        if ds is None:
            return
        key = ProcessKey(entry["gpu"], int(entry["pid"]), int(entry["create_time_us"]))
        info = ProcessInfo(
            pid=key.pid,
            create_time=key.create_time_us / 1e6,
            name=entry.get("name", ""),
            labels=dict(entry.get("labels", {})),
            container_id=entry.get("container_id", ""),
            pod_uid=entry.get("pod_uid", ""),
        )
        tracked = Tracked(key, ds.device, info, Usage(start_us=now_us))
        tracked.carry_pct_us = int(entry.get("carry_pct_us", 0))
        ds.processes.setdefault(key.pid, []).append(tracked)

    def state(self) -> bytes:
        """The committed state, to be written with the records of the latest close."""
        devices = {
            uuid: {
                "cursor_us": ds.committed_cursor_us,
                "period_us": ds.interpreter.period_us,
                "reading": ds.interpreter.reading.value,
                "energy_mj": self._energy.committed(ds.device.parent_uuid or uuid),
            }
            for uuid, ds in self._devices.items()
        }
        processes = [_process_entry(t) for ds in self._devices.values() for t in ds.tracked()]
        finished = [[k.gpu_uuid, k.pid, k.create_time_us, c] for k, c in self._finished.items()]
        doc = {"v": STATE_VERSION, "devices": devices, "processes": processes, "finished": finished}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    # -- polling --------------------------------------------------------------------------

    def poll(self) -> list[WindowUsage]:
        """One pass over every device. Returns the final usage of processes that exited."""
        self.stats.polls += 1
        now_us = _us(self._clock.wall())
        self._now_mono_us = _us(self._clock.monotonic())
        step_us = self._wall_step(now_us)
        before = {id(t): t.usage.pct_us for ds in self._devices.values() for t in ds.tracked()}
        for ds in self._devices.values():
            if ds.lost_at_us is not None:
                self._while_lost(ds)
                continue
            try:
                self._poll_device(ds, now_us, step_us)
            except GpuLost as exc:
                self._lose(ds, now_us, exc)
            except NvmlError as exc:
                # The cursor did not move: the next poll reads these periods again.
                self._count_error(exc)
                log.warning("%s: poll failed: %s", ds.device.uuid, exc)
            ds.last_poll_mono_us = self._now_mono_us
        self._allocate_energy(before)
        finals = [f for ds in self._devices.values() for f in self._drained(ds, now_us)]
        self._recover_lost()
        return finals

    def _wall_step(self, now_us: int) -> int:
        """How far the wall clock stepped since the last poll (0 when it did not)."""
        offset = now_us - self._now_mono_us
        step_us, self._wall_offset_us = offset - self._wall_offset_us, offset
        if abs(step_us) < WALL_STEP_US:
            return 0  # ordinary slewing and jitter
        log.warning("the wall clock stepped by %+.3f s", step_us / 1e6)
        return step_us

    def _poll_device(self, ds: DeviceState, now_us: int, step_us: int) -> None:
        listed = self._nvml.compute_processes(ds.device)
        self._update_processes(ds, listed, now_us)
        if ds.device.is_mig:
            self._poll_instance(ds, now_us)  # GPM counts time itself: no driver timestamps
            return
        if step_us < 0:
            # Samples stamped before the clock reaches the cursor again look exactly like
            # ones already billed: that stretch is a gap, never a guess.
            self._gap_all(ds, usage_pb2.GAP_REASON_CLOCK_STEP, -step_us)
        self._poll_samples(ds, max(step_us, 0))

    def _poll_samples(self, ds: DeviceState, forward_step_us: int) -> None:
        periods = self._device_samples(ds, ds.cursor_us)
        if not periods:
            return
        samples = self._process_samples(ds)
        newest = max(
            (s.timestamp_us for s in samples if s.pid in ds.processes and s.sm_util <= 100),
            default=0,
        )
        if newest > periods[-1].timestamp_us:
            # A period ended between the two queries; the process query saw it, so read it.
            periods += self._device_samples(ds, periods[-1].timestamp_us)
            periods = [p for p in periods if p.timestamp_us <= newest]
        result = ds.interpreter.interpret(ds.cursor_us, periods, samples, set(ds.processes))
        self.stats.discarded_samples.update(result.discarded)
        # A forward wall step leaves a hole in the driver's timestamps that is no lost time.
        lost_us = sum(end - start for start, end in result.lost) - forward_step_us
        if lost_us > (ds.interpreter.period_us or 0) // 2:
            self._gap_all(ds, usage_pb2.GAP_REASON_RING_OVERFLOW, lost_us)
        for busy in result.busy:
            owner = ds.owner(busy.pid, busy.end_us)
            if owner is not None and not self._already_written(owner.key, busy.end_us):
                owner.usage.add(Slice(busy.start_us, busy.end_us, busy.pct_us))
        ds.cursor_us = result.cursor_us

    def _device_samples(self, ds: DeviceState, since_us: int) -> list[Any]:
        try:
            return list(self._nvml.device_samples(ds.device, since_us))
        except NoData:
            return []

    def _process_samples(self, ds: DeviceState) -> list[Any]:
        try:
            return list(self._nvml.process_samples(ds.device, ds.cursor_us))
        except NoData:
            return []

    def _already_written(self, key: ProcessKey, end_us: int) -> bool:
        through = self._finished.get(key)
        return through is not None and end_us <= through

    def _poll_instance(self, ds: DeviceState, now_us: int) -> None:
        """MIG: GPM says how busy the instance was; its processes share that evenly."""
        elapsed_us = ds.elapsed_us(self._now_mono_us)
        present = [t for t in ds.tracked() if t.listed]
        if not ds.gpm_supported:
            self._no_signal(present, elapsed_us)
            return
        try:
            fraction = self._nvml.instance_busy_fraction(ds.device)
        except NotSupported:
            ds.gpm_supported = False
            log.warning(
                "%s: no GPM on this GPU: MIG processes get wall time and a gap, no busy time",
                ds.device.uuid,
            )
            self._no_signal(present, elapsed_us)
            return
        if fraction is None or not present or elapsed_us <= 0:
            return
        total = round(min(max(fraction, 0.0), 1.0) * 100 * elapsed_us)
        source = _GPM_SINGLE if len(present) == 1 else _GPM_SHARED
        share, extra = divmod(total, len(present))
        start_us = now_us - elapsed_us
        for i, t in enumerate(present):
            t.usage.source = source
            t.usage.add(Slice(start_us, now_us, share + (1 if i < extra else 0)))

    def _no_signal(self, present: list[Tracked], elapsed_us: int) -> None:
        for t in present:
            t.usage.source = _NO_SIGNAL
            t.usage.add_gap(usage_pb2.GAP_REASON_NO_UTILIZATION_SIGNAL, elapsed_us)

    # -- processes --------------------------------------------------------------------------

    def _update_processes(self, ds: DeviceState, listed: list[ComputeProcess], now_us: int) -> None:
        elapsed_us = ds.elapsed_us(self._now_mono_us)
        seen: set[int] = set()
        for proc in listed:
            tracked = self._listed(ds, proc.pid, now_us)
            seen.add(id(tracked))
            tracked.usage.wall_us += min(elapsed_us, max(0, now_us - tracked.usage.start_us))
            tracked.usage.saw_memory(proc.used_memory_bytes)
        for t in ds.tracked():
            if id(t) not in seen and t.gone_at_us is None:
                t.listed = False
                t.gone_at_us = now_us

    def _listed(self, ds: DeviceState, pid: int, now_us: int) -> Tracked:
        entries = ds.processes.setdefault(pid, [])
        current = entries[-1] if entries else None
        if (
            current is not None
            and current.gone_at_us is None
            and current.listed
            and self._same_process(current, pid)
        ):
            return current
        info = self._info(pid)
        key = ProcessKey(ds.device.uuid, pid, _us(info.create_time) if info else 0)
        if current is not None and current.key == key and current.gone_at_us is None:
            current.listed = True
            current.info = current.info or info
            return current
        if current is not None and current.gone_at_us is None:
            current.gone_at_us = now_us  # the pid was reused: the old holder has exited
            current.listed = False
        created_us = key.create_time_us or now_us
        tracked = Tracked(key, ds.device, info, Usage(start_us=max(created_us, now_us - 1)))
        tracked.listed = True
        entries.append(tracked)
        self.stats.processes_seen += 1
        return tracked

    def _same_process(self, current: Tracked, pid: int) -> bool:
        """Whether ``pid`` still names ``current``: a pid reused between two polls must not
        inherit the old holder's seconds."""
        try:
            created_us = _us(self._proc.create_time(pid))
        except ProcessGone:
            return True  # gone from /proc, still listed by NVML: the same dying process
        return created_us == current.key.create_time_us or current.key.create_time_us == 0

    def _info(self, pid: int) -> ProcessInfo | None:
        try:
            return self._proc.info(pid)
        except ProcessGone:
            # Listed by NVML, already gone from /proc: its seconds still count, unlabelled.
            return None

    def _drained(self, ds: DeviceState, now_us: int) -> list[WindowUsage]:
        """Exited processes whose every sample period has been read: their final usage."""
        period_us = ds.interpreter.period_us or 0
        finals = []
        for pid, entries in list(ds.processes.items()):
            for t in list(entries):
                if t.gone_at_us is None or not self._drain_complete(ds, t, period_us, now_us):
                    continue
                entries.remove(t)
                self._finished[t.key] = ds.cursor_us
                finals.append(self._emit(t, now_us, final=True))
            if not entries:
                del ds.processes[pid]
        return finals

    @staticmethod
    def _drain_complete(ds: DeviceState, t: Tracked, period_us: int, now_us: int) -> bool:
        if ds.device.is_mig or ds.lost_at_us is not None:
            return True
        # Its last (partial) period ends at most one period after it left the list.
        return t.gone_at_us is not None and ds.cursor_us >= t.gone_at_us + period_us

    # -- energy ---------------------------------------------------------------------------

    def _allocate_energy(self, before: dict[int, int]) -> None:
        """Hand each physical GPU's energy since the last poll to the processes that computed
        in that poll, by their share of its busy time; energy while idle goes to nobody."""
        for gpu, states in self._physical_gpus().items():
            if any(ds.lost_at_us is not None for ds in states):
                continue
            counter = self._energy_counter(states[0].device)
            if counter is None:
                continue
            gained = [
                (t.usage, t.usage.pct_us - before.get(id(t), 0))
                for ds in states
                for t in ds.tracked()
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
        self._count_error(exc)
        log.error("%s: GPU lost (%s); its time is a gap until it returns", ds.device.uuid, exc)
        ds.lost_at_us = now_us
        self._next_reopen = self._clock.monotonic() + self._reopen_interval_s

    def _while_lost(self, ds: DeviceState) -> None:
        self._gap_all(ds, usage_pb2.GAP_REASON_GPU_LOST, ds.elapsed_us(self._now_mono_us))
        ds.last_poll_mono_us = self._now_mono_us

    def _recover_lost(self) -> None:
        lost = [ds for ds in self._devices.values() if ds.lost_at_us is not None]
        if not lost or self._clock.monotonic() < self._next_reopen:
            return
        self._next_reopen = self._clock.monotonic() + self._reopen_interval_s
        try:
            self._nvml.reopen()
            present = {d.uuid for d in self._nvml.devices()}
        except NvmlError as exc:
            self._count_error(exc)
            return
        for ds in lost:
            if ds.device.uuid in present:
                self._recovered(ds)

    def _recovered(self, ds: DeviceState) -> None:
        log.warning("%s: GPU is back", ds.device.uuid)
        ds.lost_at_us = None
        latest = self._latest_period(ds)
        if latest is not None:
            # What the ring holds now was sampled around the loss: the gap already covers it.
            ds.cursor_us = latest

    def _gap_all(self, ds: DeviceState, reason: int, duration_us: int) -> None:
        if duration_us <= 0:
            return
        self.stats.gaps_us[usage_pb2.GapReason.Name(reason)] += duration_us
        for t in ds.tracked():
            t.usage.add_gap(reason, duration_us)

    def _count_error(self, exc: NvmlError) -> None:
        self.stats.nvml_errors[type(exc).__name__] += 1

    # -- windows --------------------------------------------------------------------------

    def close_window(self) -> list[WindowUsage]:
        """Close every process's window: usage with activity, and a new committed state."""
        now_us = _us(self._clock.wall())
        closed = [
            self._emit(t, now_us, final=False)
            for ds in self._devices.values()
            for t in ds.tracked()
            if t.usage.has_activity
        ]
        for ds in self._devices.values():
            ds.committed_cursor_us = ds.cursor_us
            for t in ds.tracked():
                if not t.usage.has_activity:
                    t.usage.start_us = now_us
        self._energy.commit()
        self._finished.clear()
        return closed

    def _emit(self, t: Tracked, now_us: int, *, final: bool) -> WindowUsage:
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
        return WindowUsage(
            key=t.key,
            device=t.device,
            info=t.info,
            start_us=start,
            end_us=end,
            busy_us=busy_us,
            wall_us=usage.wall_us,
            peak_memory_bytes=usage.peak_memory_bytes,
            energy_mj=usage.energy_mj,
            gaps_us=tuple(sorted(usage.gaps_us.items())),
            source=usage.source,
            final=final,
            slices=tuple(usage.slices),
        )

    def written_through_us(self) -> int:
        """Driver time up to which every device's usage is in closed windows."""
        cursors = [
            ds.committed_cursor_us for ds in self._devices.values() if ds.committed_cursor_us
        ]
        return min(cursors, default=_us(self._clock.wall()))

    def shutdown(self) -> None:
        self._nvml.shutdown()


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


def _process_entry(t: Tracked) -> dict[str, Any]:
    info = t.info
    return {
        "gpu": t.key.gpu_uuid,
        "pid": t.key.pid,
        "create_time_us": t.key.create_time_us,
        "name": info.name if info else "",
        "labels": dict(info.labels) if info else {},
        "container_id": info.container_id if info else "",
        "pod_uid": info.pod_uid if info else "",
        "carry_pct_us": t.carry_pct_us,
    }


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
