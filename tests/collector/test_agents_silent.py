"""creditmeter_collector_agents_silent: the enrolled agents that stopped delivering. An agent
writes at least every meter.idle_record_interval even when its GPUs idle, so one whose last
batch is older than server.agent_silent_after is down or cut off, not quiet."""

from __future__ import annotations

from creditmeter.collector.errors import StoreError
from creditmeter.collector.store import AgentStatus
from creditmeter.collector.telemetry import CollectorTelemetry, silent_agents
from creditmeter.metrics import Registry

NOW_US = 1_750_000_000_000_000
MINUTE_US = 60_000_000


def status(agent: str, seen_minutes_ago: float | None, *, revoked: bool = False) -> AgentStatus:
    seen = None if seen_minutes_ago is None else NOW_US - round(seen_minutes_ago * MINUTE_US)
    return AgentStatus(agent, revoked, 1, seen, seen)


def test_silent_agents_are_those_not_seen_for_the_limit_or_ever() -> None:
    statuses = [
        status("idle-host", 4),  # its idle books came 4 minutes ago
        status("edge", 15),  # exactly at the limit: not yet
        status("down", 15.01),
        status("never", None),  # enrolled, never delivered
        status("retired", 600, revoked=True),  # revoked: nothing more is expected
    ]
    assert silent_agents(statuses, NOW_US, 15 * 60) == 2


def test_the_gauge_counts_them_at_each_scrape_and_is_nan_while_the_store_fails() -> None:
    telemetry = CollectorTelemetry(Registry())
    answers: list[list[AgentStatus] | None] = [[status("down", 20)], None]

    def statuses() -> list[AgentStatus]:
        answer = answers.pop(0)
        if answer is None:
            raise StoreError("the database is down")
        return answer

    telemetry.watch_agents(statuses, lambda: NOW_US, 15 * 60)
    assert telemetry.registry.value("creditmeter_collector_agents_silent") == 1
    value = telemetry.registry.value("creditmeter_collector_agents_silent")
    assert value is not None and value != value  # NaN
