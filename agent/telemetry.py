"""The agent's Prometheus metrics, fed from the counters its parts already keep."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable

from creditmeter.agent.meter import MeterStats
from creditmeter.metrics import Counter, Registry

_POLL_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LAG_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0, 3600.0)


class _Tallied:
    """A labelled counter that follows a ``collections.Counter`` another part increments."""

    def __init__(self, counter: Counter, label: str) -> None:
        self._counter = counter
        self._label = label
        self._seen: Tally[str] = Tally()

    def follow(self, tally: Tally[str], scale: float = 1.0) -> None:
        for key, value in tally.items():
            delta = value - self._seen[key]
            if delta:
                self._counter.labels(**{self._label: key}).inc(delta * scale)
                self._seen[key] = value


class AgentTelemetry:
    """Creates every agent metric; ``after_cycle`` brings the meter's counters up to date."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        r = registry
        self.poll_seconds = r.histogram(
            "creditmeter_agent_poll_duration_seconds",
            "Time one poll of every device took.",
            buckets=_POLL_BUCKETS_S,
        )
        self._errors = _Tallied(
            r.counter("creditmeter_agent_nvml_errors_total", "NVML errors, by kind.", ["kind"]),
            "kind",
        )
        self._discarded = _Tallied(
            r.counter(
                "creditmeter_agent_samples_discarded_total",
                "Per-process samples dropped as driver quirks, by reason.",
                ["reason"],
            ),
            "reason",
        )
        self._gaps = _Tallied(
            r.counter(
                "creditmeter_agent_gap_seconds_total",
                "Time the agent could not see, by reason (reported, never billed).",
                ["reason"],
            ),
            "reason",
        )
        self._unattributed = _Tallied(
            r.counter(
                "creditmeter_agent_unattributed_busy_seconds_total",
                "Device busy time no process could take, by reason (reported, never billed).",
                ["reason"],
            ),
            "reason",
        )
        self._switches = _Tallied(
            r.counter(
                "creditmeter_agent_evidence_source_switches_total",
                "Per-process evidence sources left for the next one, by reason.",
                ["reason"],
            ),
            "reason",
        )
        self._requeries = _Tallied(
            r.counter(
                "creditmeter_agent_evidence_requeries_total",
                "Per-process utilization asked of the driver again with an earlier lastSeen "
                "(a row that may be a mean, a new PID's first row, rows left out), by reason.",
                ["reason"],
            ),
            "reason",
        )
        self._requery_rows = _Tallied(
            r.counter(
                "creditmeter_agent_evidence_requery_rows_total",
                "Rows those queries showed that the poll's own answer did not, by reason.",
                ["reason"],
            ),
            "reason",
        )
        self._losses = _Tallied(
            r.counter(
                "creditmeter_agent_gpu_lost_total", "Times a device was found lost.", ["gpu"]
            ),
            "gpu",
        )
        self._sessions = _Tallied(
            r.counter(
                "creditmeter_agent_nvml_sessions_total",
                "New NVML sessions (nvmlShutdown, nvmlInit) opened to list the devices again, "
                "by why: lost (looking for a lost GPU), changed (MIG devices made or "
                "destroyed), periodic, retry (the one before failed).",
                ["why"],
            ),
            "why",
        )
        self._job_requests = _Tallied(
            r.counter(
                "creditmeter_agent_job_requests_total",
                "Job API requests, by outcome (permission_denied: a caller named a process "
                "it may not attribute to).",
                ["outcome"],
            ),
            "outcome",
        )
        self._job_outcomes: Callable[[], Tally[str]] = Tally
        self._refused = _Tallied(
            r.counter(
                "creditmeter_agent_labels_refused_total",
                "Labels processes set that the label law refused, by label and problem "
                "(the usage is kept without them).",
                ["label"],
            ),
            "label",
        )
        self._device_busy = r.counter(
            "creditmeter_agent_device_busy_seconds_total",
            "The devices' own busy time (whole GPUs): billed plus unattributed.",
        )
        self._processes = r.counter(
            "creditmeter_agent_processes_seen_total", "Distinct GPU processes seen."
        )
        self._busy = r.counter(
            "creditmeter_agent_busy_seconds_total", "Busy GPU seconds metered (billed measure)."
        )
        self._cut_short = r.counter(
            "creditmeter_agent_fits_cut_short_total",
            "Apportioning fits whose search for augmenting paths stopped at its guard: busy "
            "time they left unattributed might have had a taker (reported, never billed).",
        )
        self._catch_ups = r.counter(
            "creditmeter_agent_series_catch_ups_total",
            "Device utilization series read again within a poll: per-process rows came "
            "stamped after its newest period (time passed between the calls: a loaded host).",
        )
        self._dropped = r.counter(
            "creditmeter_agent_dropped_busy_seconds_total",
            "Busy seconds dropped because memory for held records ran out (should stay 0).",
        )
        self._last = MeterStats()
        self._last_dropped_us = 0
        self.delivery_lag = r.histogram(
            "creditmeter_agent_delivery_lag_seconds",
            "From a record's creation to its acknowledgement by the collector.",
            buckets=_LAG_BUCKETS_S,
        )
        self.reconnects = r.counter(
            "creditmeter_agent_reconnects_total",
            "Streams to the collector that ended, by outcome.",
            ["outcome"],
        )
        self.batches = r.counter("creditmeter_agent_batches_sent_total", "Batches sent.")
        self.acked = r.counter("creditmeter_agent_records_acked_total", "Records acknowledged.")

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.registry.gauge(name, help_text, callback=read)

    def follow_jobs(self, outcomes: Callable[[], Tally[str]]) -> None:
        """Count the job API's requests by outcome, read at each cycle."""
        self._job_outcomes = outcomes

    def after_cycle(self, stats: MeterStats, dropped_busy_us: int) -> None:
        self._job_requests.follow(self._job_outcomes())
        self._errors.follow(stats.nvml_errors)
        self._discarded.follow(stats.discarded_samples)
        self._gaps.follow(stats.gaps_us, scale=1e-6)
        self._unattributed.follow(stats.unattributed_us, scale=1e-6)
        self._switches.follow(stats.evidence_switches)
        self._requeries.follow(stats.evidence_requeries)
        self._requery_rows.follow(stats.evidence_requery_rows)
        self._losses.follow(stats.gpu_losses)
        self._sessions.follow(stats.relistings)
        self._refused.follow(stats.labels_refused)
        self._device_busy.inc((stats.device_busy_us - self._last.device_busy_us) / 1e6)
        self._last.device_busy_us = stats.device_busy_us
        self._processes.inc(stats.processes_seen - self._last.processes_seen)
        self._busy.inc((stats.busy_us_metered - self._last.busy_us_metered) / 1e6)
        self._last.processes_seen = stats.processes_seen
        self._last.busy_us_metered = stats.busy_us_metered
        self._cut_short.inc(stats.fits_cut_short - self._last.fits_cut_short)
        self._last.fits_cut_short = stats.fits_cut_short
        self._catch_ups.inc(stats.series_catch_ups - self._last.series_catch_ups)
        self._last.series_catch_ups = stats.series_catch_ups
        self._dropped.inc((dropped_busy_us - self._last_dropped_us) / 1e6)
        self._last_dropped_us = dropped_busy_us

    # ShipperObserver
    def batch_sent(self, records: int) -> None:
        self.batches.inc()

    def records_acked(self, records: int, oldest_lag_s: float) -> None:
        self.acked.inc(records)
        self.delivery_lag.observe(oldest_lag_s)

    def stream_ended(self, outcome: str, detail: str) -> None:
        self.reconnects.labels(outcome=outcome).inc()
