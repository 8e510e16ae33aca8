"""Whose seconds: a closed window becomes one draft per job that computed, plus the rest.

A process's busy time is split along the job spans the local job API recorded
(``agent.split``); what ran outside every job is billed by the process's own labels
(``CREDITMETER_*``), or to nobody in particular (``unattributed``, which operators see).
Time inside jobs a worker declared but could not deliver is billed by the process's labels
and flagged as fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from creditmeter.agent.jobs import JobSpanSource
from creditmeter.agent.records import draft, reportable
from creditmeter.agent.split import JobPart, JobSpan, largest_remainders, split
from creditmeter.agent.usage import WindowUsage
from creditmeter.v1 import usage_pb2


class RecordBuilder:
    """Drafts for closed windows; ``spans`` is the job registry (None: labels only)."""

    def __init__(self, host: str, spans: JobSpanSource | None = None) -> None:
        self._host = host
        self._spans = spans

    def __call__(self, usages: Sequence[WindowUsage]) -> list[usage_pb2.UsageRecord]:
        drafts: list[usage_pb2.UsageRecord] = []
        for usage in usages:
            drafts.extend(self._drafts(usage))
        return drafts

    def _drafts(self, u: WindowUsage) -> list[usage_pb2.UsageRecord]:
        if self._spans is None or u.books is not None:  # a GPU's books: no jobs to split
            return [draft(u, self._host) for u in reportable([u])]
        window = self._spans.spans_for(
            u.key.pid, u.key.create_time_us, u.start_us, u.end_us, gpu_uuid=u.device.uuid
        )
        if u.final:
            self._spans.close_process(u.key.pid, u.key.create_time_us, u.end_us)
        if not window.jobs and not window.undelivered:
            return [draft(u, self._host) for u in reportable([u])]
        parts = split(u.slices, u.busy_us, window.jobs, window.undelivered)
        spans = {s.job_id: s for s in window.jobs}
        energy = _energy_shares(u, parts.jobs, parts.fallback_busy_us, parts.undelivered_busy_us)
        out = [
            self._job_draft(u, part, spans[part.job_id], energy[i])
            for i, part in enumerate(parts.jobs)
            if part.busy_us > 0
        ]
        rest = draft(u, self._host)
        rest.busy_us = parts.fallback_busy_us
        rest.wall_us = max(0, u.wall_us - sum(r.wall_us for r in out))
        _set_energy(rest, energy[-2])
        if rest.busy_us > 0 or rest.gaps:
            out.append(rest)
        if parts.undelivered_busy_us > 0:
            out.append(self._undelivered(u, parts.undelivered_busy_us, energy[-1]))
        return out

    def _job_draft(
        self, u: WindowUsage, part: JobPart, span: JobSpan, energy_mj: int | None
    ) -> usage_pb2.UsageRecord:
        record = draft(u, self._host)
        record.busy_us = part.busy_us
        end = u.end_us if span.end_us is None else min(span.end_us, u.end_us)
        record.wall_us = max(0, end - max(span.start_us, u.start_us))
        del record.gaps[:]  # gaps are the process's: reported once, on its own record
        _set_energy(record, energy_mj)
        record.final = span.end_us is not None and span.end_us <= u.end_us
        a = record.attribution
        a.account, a.model, a.job_id = part.account, part.model, part.job_id
        a.source = usage_pb2.ATTRIBUTION_SOURCE_JOB_API
        a.fallback = False
        return record

    def _undelivered(
        self, u: WindowUsage, busy_us: int, energy_mj: int | None
    ) -> usage_pb2.UsageRecord:
        record = draft(u, self._host)
        record.busy_us = busy_us
        record.wall_us = 0
        record.final = False
        del record.gaps[:]
        _set_energy(record, energy_mj)
        record.attribution.fallback = True
        return record


def _energy_shares(
    u: WindowUsage, jobs: Sequence[JobPart], fallback_us: int, undelivered_us: int
) -> Sequence[int | None]:
    """The window's energy split like its busy time: per job, then fallback, undelivered."""
    weights: list[int | Fraction] = [p.busy_us for p in jobs]
    weights += [fallback_us, undelivered_us]
    if u.energy_mj is None:
        return [None] * len(weights)
    if sum(weights) == 0:
        return [*([0] * (len(weights) - 2)), u.energy_mj, 0]
    return [*largest_remainders(u.energy_mj, weights)]


def _set_energy(record: usage_pb2.UsageRecord, energy_mj: int | None) -> None:
    if energy_mj is None:
        record.ClearField("energy_mj")
    else:
        record.energy_mj = energy_mj
