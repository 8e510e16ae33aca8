"""Who pays for a process's time: the accounts its busy seconds would be billed to.

The meter asks it where it has a reading but no per-process evidence to split it by: a MIG
instance shared by several processes (NVML has no per-process utilization on MIG). An even
split between processes that one account pays for moves seconds only between that
account's own records; between accounts it would be a guess billed to someone, so the
meter leaves such time unattributed instead.

The answer is what the record path will bill: the accounts of the jobs the process declared
over the span (the job API), and its own ``account`` label for any part outside them or
in jobs whose declaration did not arrive. ``""`` is nobody's (unattributed in reports).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from creditmeter.agent.errors import AgentError
from creditmeter.agent.gpu import ProcessInfo
from creditmeter.agent.split import split
from creditmeter.agent.usage import ProcessKey, Slice

if TYPE_CHECKING:  # the registry's module brings sqlite3, which the selftest must not load
    from creditmeter.agent.jobs import JobSpanSource, WindowSpans

log = logging.getLogger(__name__)


class Payers(Protocol):
    def accounts(
        self, key: ProcessKey, info: ProcessInfo | None, start_us: int, end_us: int
    ) -> frozenset[str] | None:
        """The accounts the process's time in [start_us, end_us) is billed to; None when
        that cannot be known now."""
        ...


class LabelsAndJobs:
    """Payers from the processes' labels and, when given, the job registry's spans."""

    def __init__(self, spans: JobSpanSource | None = None) -> None:
        self._spans = spans

    def accounts(
        self, key: ProcessKey, info: ProcessInfo | None, start_us: int, end_us: int
    ) -> frozenset[str] | None:
        label = info.labels.get("account", "") if info is not None else ""
        if self._spans is None:
            return frozenset({label})
        try:
            window = self._spans.spans_for(
                key.pid, key.create_time_us, start_us, end_us, gpu_uuid=key.gpu_uuid
            )
        except AgentError as exc:
            log.warning("pid %d: its jobs cannot be read (%s): payer unknown", key.pid, exc)
            return None
        return _billed_accounts(window, label, start_us, end_us)


def _billed_accounts(window: WindowSpans, label: str, start_us: int, end_us: int) -> frozenset[str]:
    """The accounts ``split`` gives a share of busy time spread over [start_us, end_us):
    the record path's own rule, so that a job that only touches the span's edge pays
    nothing, and the label pays only for time outside every job."""
    span_us = end_us - start_us
    if span_us <= 0:
        return frozenset({label})
    parts = split(
        [Slice(start_us, end_us, span_us * 100)], span_us, window.jobs, window.undelivered
    )
    accounts = {p.account for p in parts.jobs if p.busy_us > 0}
    if parts.fallback_busy_us > 0 or parts.undelivered_busy_us > 0:
        accounts.add(label)
    return frozenset(accounts)
