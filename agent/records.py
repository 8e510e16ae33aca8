"""From closed windows to usage record drafts, and the policy when the outbox cannot take them.

A draft is a ``UsageRecord`` without agent id, seq and prev_hash: the outbox sets those when
it writes. Drafts that cannot be written (outbox full, disk failing) wait here, coalesced per
process and job, so metering goes on and memory stays bounded by the number of distinct
process/job identities, not by time. Nothing is dropped silently: if even that bound is
reached, the oldest drafts are dropped with an ERROR naming the busy seconds lost, and the
loss is counted for the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from creditmeter.agent.errors import AgentError
from creditmeter.agent.usage import DeviceBooks, WindowUsage
from creditmeter.labels import lawful_text
from creditmeter.v1 import usage_pb2

RepeatedGaps = RepeatedCompositeFieldContainer[usage_pb2.Gap]

log = logging.getLogger(__name__)

STATE_KEY = "meter"  # the outbox state entry holding the meter's committed state

_LABEL_KEYS = ("account", "model", "job")
_LABEL_NAMES = {
    "account": usage_pb2.LABEL_NAME_ACCOUNT,
    "model": usage_pb2.LABEL_NAME_MODEL,
    "job": usage_pb2.LABEL_NAME_JOB,
}


def reportable(usages: Iterable[WindowUsage]) -> list[WindowUsage]:
    """Usage worth a record: compute or missing time, and every GPU's books. A process that
    exits after an idle window still ends its life in the meter, but idle alone is never
    written, never billed."""
    return [u for u in usages if u.busy_us > 0 or u.gaps_us or u.books is not None]


def draft(usage: WindowUsage, host: str) -> usage_pb2.UsageRecord:
    """The record of one process's window, attributed by its environment labels; or, for
    a device record, the GPU's books."""
    record = usage_pb2.UsageRecord(
        host=host,
        start_unix_us=usage.start_us,
        end_unix_us=usage.end_us,
        busy_us=usage.busy_us,
        wall_us=usage.wall_us,
        source=usage.source,  # type: ignore[arg-type]
        final=usage.final,
        quality=usage.quality,  # type: ignore[arg-type]
        evidence=usage.evidence,  # type: ignore[arg-type]
    )
    _fill_gpu(record.gpu, usage)
    if usage.books is not None:
        _fill_books(record.device, usage.books)
        record.attribution.source = usage_pb2.ATTRIBUTION_SOURCE_NONE
        return record
    _fill_process(record.process, usage)
    labels = usage.info.labels if usage.info else {}
    record.attribution.account = labels.get("account", "")
    record.attribution.model = labels.get("model", "")
    record.attribution.job_id = labels.get("job", "")
    record.attribution.source = (
        usage_pb2.ATTRIBUTION_SOURCE_ENVIRONMENT
        if any(k in labels for k in _LABEL_KEYS)
        else usage_pb2.ATTRIBUTION_SOURCE_NONE
    )
    for name, problem in usage.info.refused_labels if usage.info else ():
        record.attribution.refused.add(label=_LABEL_NAMES[name], problem=problem)
    if usage.peak_memory_bytes is not None:
        record.peak_memory_bytes = usage.peak_memory_bytes
    if usage.energy_mj is not None:
        record.energy_mj = usage.energy_mj
    for reason, duration_us in usage.gaps_us:
        record.gaps.add(duration_us=duration_us, reason=reason)
    return record


def _fill_gpu(gpu: usage_pb2.GpuRef, usage: WindowUsage) -> None:
    device = usage.device
    gpu.uuid = device.uuid
    gpu.index = device.index
    gpu.name = device.name
    if device.parent_uuid:
        gpu.parent_uuid = device.parent_uuid
    if device.gpu_instance_id is not None:
        gpu.gpu_instance_id = device.gpu_instance_id
    if device.compute_instance_id is not None:
        gpu.compute_instance_id = device.compute_instance_id


def _fill_books(books: usage_pb2.DeviceBooks, of: DeviceBooks) -> None:
    books.SetInParent()  # an idle device's books are all zeros: present all the same
    books.device_busy_us = of.device_busy_us
    books.attributed_busy_us = of.attributed_busy_us
    for reason, busy_us in of.unattributed_us:
        books.unattributed.add(reason=reason, busy_us=busy_us)
    for reason, duration_us in of.gaps_us:
        books.gaps.add(reason=reason, duration_us=duration_us)


def _fill_process(process: usage_pb2.ProcessRef, usage: WindowUsage) -> None:
    process.pid = usage.key.pid
    process.create_time_us = usage.key.create_time_us
    if usage.info is not None:
        process.name = lawful_text(usage.info.name)  # comm: any process may set it
        process.container_id = usage.info.container_id
        process.pod_uid = usage.info.pod_uid


# -- writing -------------------------------------------------------------------------------


class OutboxWriter(Protocol):
    def append(
        self, drafts: Sequence[usage_pb2.UsageRecord], state: Mapping[str, bytes] | None = None
    ) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class _Identity:
    gpu_uuid: str
    pid: int
    create_time_us: int
    account: str
    model: str
    job_id: str
    final: bool


def _identity(r: usage_pb2.UsageRecord) -> _Identity:
    a = r.attribution
    return _Identity(
        r.gpu.uuid, r.process.pid, r.process.create_time_us, a.account, a.model, a.job_id, r.final
    )


def merge(into: usage_pb2.UsageRecord, more: usage_pb2.UsageRecord) -> None:
    """Fold ``more`` (a later window of the same process and job) into ``into``."""
    into.start_unix_us = min(into.start_unix_us, more.start_unix_us)
    into.end_unix_us = max(into.end_unix_us, more.end_unix_us)
    into.busy_us += more.busy_us
    into.wall_us += more.wall_us
    if more.HasField("peak_memory_bytes"):
        into.peak_memory_bytes = max(into.peak_memory_bytes, more.peak_memory_bytes)
    if more.HasField("energy_mj"):
        into.energy_mj = into.energy_mj + more.energy_mj
    _merge_gaps(into.gaps, more.gaps)
    if more.quality == usage_pb2.QUALITY_APPORTIONED:  # shared somewhere: apportioned
        into.quality = more.quality
        into.evidence = more.evidence
    if more.HasField("device"):
        _merge_books(into.device, more.device)


def _merge_books(into: usage_pb2.DeviceBooks, more: usage_pb2.DeviceBooks) -> None:
    into.device_busy_us += more.device_busy_us
    into.attributed_busy_us += more.attributed_busy_us
    busy = _by_reason([(u.reason, u.busy_us) for u in (*into.unattributed, *more.unattributed)])
    del into.unattributed[:]
    for reason, busy_us in busy:
        into.unattributed.add(reason=reason, busy_us=busy_us)
    _merge_gaps(into.gaps, more.gaps)


def _merge_gaps(into: RepeatedGaps, more: RepeatedGaps) -> None:
    gaps = _by_reason([(g.reason, g.duration_us) for g in (*into, *more)])
    del into[:]
    for reason, duration_us in gaps:
        into.add(duration_us=duration_us, reason=reason)


def _by_reason(amounts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(reason, µs) pairs summed per reason, in reason order."""
    totals: dict[int, int] = {}
    for reason, amount_us in amounts:
        totals[reason] = totals.get(reason, 0) + amount_us
    return sorted(totals.items())


def _books_last(drafts: Iterable[usage_pb2.UsageRecord]) -> list[usage_pb2.UsageRecord]:
    """Process records first, then the device records (a GPU's books), each group in its
    order. A device record closes its GPU's books: the process records written since the
    previous one must carry exactly its attributed µs (what audit checks). Held across
    windows, the coalesced books cover every held window, so every held process record,
    also one first seen after the books were held, must go before them."""
    drafts = list(drafts)
    return [d for d in drafts if not is_device(d)] + [d for d in drafts if is_device(d)]


def is_device(rec: usage_pb2.UsageRecord) -> bool:
    """A device record: a GPU's books for its window (mirrors the collector's rule)."""
    return rec.quality == usage_pb2.QUALITY_UNATTRIBUTED


class Flusher:
    """Writes drafts with the meter state; holds them, coalesced, while the outbox cannot."""

    def __init__(self, outbox: OutboxWriter, *, max_pending: int = 100_000) -> None:
        self._outbox = outbox
        self._max_pending = max_pending
        self._pending: dict[_Identity, usage_pb2.UsageRecord] = {}
        self.failing_since: float | None = None
        self.dropped_busy_us = 0
        self.last_error = ""

    @property
    def pending(self) -> int:
        return len(self._pending)

    def write(self, drafts: Iterable[usage_pb2.UsageRecord], state: bytes, now: float) -> bool:
        """True when everything waiting, these drafts included, is durable in the outbox."""
        for d in drafts:
            self._hold(d)
        if not self._pending:
            # Nothing to write, but the state moved on (cursors): persist it with no records.
            return self._append([], state, now)
        return self._append(_books_last(self._pending.values()), state, now)

    def _append(self, drafts: list[usage_pb2.UsageRecord], state: bytes, now: float) -> bool:
        try:
            self._outbox.append(drafts, {STATE_KEY: state})
        except AgentError as exc:
            self._failed(exc, now)
            return False
        if self.failing_since is not None:
            log.warning("outbox writable again; %d held records written", len(drafts))
        self._pending.clear()
        self.failing_since = None
        return True

    def _hold(self, d: usage_pb2.UsageRecord) -> None:
        key = _identity(d)
        held = self._pending.get(key)
        if held is not None:
            merge(held, d)
            return
        if len(self._pending) >= self._max_pending:
            self._drop_oldest()
        self._pending[key] = d

    def _drop_oldest(self) -> None:
        key = next(iter(self._pending))
        lost = self._pending.pop(key)
        self.dropped_busy_us += lost.busy_us
        log.error(
            "usage held for the outbox exceeds %d identities: dropped %.6f busy seconds of "
            "pid %d on %s (account %r)",
            self._max_pending,
            lost.busy_us / 1e6,
            lost.process.pid,
            lost.gpu.uuid,
            lost.attribution.account,
        )

    def _failed(self, exc: AgentError, now: float) -> None:
        self.last_error = str(exc)
        if self.failing_since is None:
            self.failing_since = now
            log.error(
                "cannot write usage to the outbox: %s; metering goes on, %d records held in "
                "memory (coalesced per process and job) until it can",
                exc,
                len(self._pending),
            )
