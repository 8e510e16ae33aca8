"""What the fault tests share: exact scenarios, their ground truth, the real daemons, and
ways to read what the collector stored and what the agent reports about itself.

An *exact* scenario puts every busy edge on the sample-period grid (phase 0) and every sm
on a multiple of 25, with per-period samples: each sample then stands for an exact number
of µs, so an agent that reads every period measures the truth to the microsecond, and a
test can demand ``stored == truth`` with no tolerance at all.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from creditmeter.simnvml import ManualClock, Scenario, SimClock, SimHost
from creditmeter.simnvml.anchor import AnchorFile
from creditmeter.v1 import usage_pb2
from tests.e2e.daemons import Agent, Collector, free_port, make_key, wait_for

Span = tuple[float, float, int]  # [start_s, end_s, sm %]


@dataclass(frozen=True)
class Proc:
    """One simulated process: busy spans on the period grid, sm a multiple of 25."""

    pid: int
    gpu: int
    spans: Sequence[Span]
    start_s: float = 1.0
    exit_s: float | None = None
    account: str = "acme"
    model: str = "m"

    def toml(self) -> str:
        exit_line = f"exit_s = {self.exit_s}\n" if self.exit_s is not None else ""
        busy = ", ".join(f"[{a}, {b}, {sm}]" for a, b, sm in self.spans)
        return (
            f"\n[[process]]\npid = {self.pid}\ngpu = {self.gpu}\nstart_s = {self.start_s}\n"
            f"{exit_line}"
            f'env = {{ CREDITMETER_ACCOUNT = "{self.account}", '
            f'CREDITMETER_MODEL = "{self.model}" }}\n'
            f"busy = [{busy}]\n"
        )


def scenario_text(
    procs: Sequence[Proc],
    *,
    gpus: int = 1,
    period_us: int = 200_000,
    ring_periods: int = 3000,
    faults: str = "",
    name: str = "fault-host",
) -> str:
    """An exact scenario: ``ring_periods`` × ``period_us`` is what the agent may fall behind."""
    gpu = (
        f'\n[[gpu]]\nproduct = "H100"\nsample_period_us = {period_us}\nphase_us = 0\n'
        f'ring_periods = {ring_periods}\nsample_reading = "per_period"\n'
    )
    body = "".join(p.toml() for p in procs)
    return f'[host]\nseed = 5\nname = "{name}"\n{gpu * gpus}{body}{faults}'


def truth_busy_us(text: str, until_s: float) -> int:
    """Busy µs of every process up to sim ``until_s``: whole µs, or the scenario is not exact."""
    host = SimHost(Scenario.from_toml(text), ManualClock())
    total = sum((t.busy_us for t in host.truth(until_s=until_s).values()), Fraction(0))
    assert total.denominator == 1 and total > 0, f"not an exact scenario: {total}"
    return int(total)


def context_us(text: str, until_s: float) -> dict[int, int]:
    """µs each pid held its GPU context up to sim ``until_s`` (monotonic, no wall jumps)."""
    host = SimHost(Scenario.from_toml(text), ManualClock())
    return {key.pid: us for key, us in host.wall_truth(until_s=until_s).items()}


# -- the collector's side ------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    received_at_us: int  # when the segment (batch) holding the record was committed
    record: usage_pb2.UsageRecord


def stored_records(db_path: Path, agent_id: str) -> list[StoredRecord]:
    """What the collector committed for ``agent_id``, in seq order (read-only, beside it)."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            """SELECT r.seq, s.received_at_us, r.record FROM records r JOIN segments s
               ON s.agent_id = r.agent_id
               AND s.last_seq = (SELECT MIN(last_seq) FROM segments
                                 WHERE agent_id = r.agent_id AND last_seq >= r.seq)
               WHERE r.agent_id = ? ORDER BY r.seq""",
            (agent_id,),
        ).fetchall()
    return [
        StoredRecord(seq, received, usage_pb2.UsageRecord.FromString(data))
        for seq, received, data in rows
    ]


def stored_busy_us(collector: Collector) -> int:
    """Busy µs the collector bills, as its report command says (the rollups)."""
    seconds = Decimal(collector.report()["totals"]["busy_seconds"])
    micro = seconds * 1_000_000
    assert micro == micro.to_integral_value(), seconds
    return int(micro)


def gaps_us(records: Sequence[StoredRecord]) -> Counter[str]:
    """Gap µs by reason name, from the stored record bytes themselves."""
    found: Counter[str] = Counter()
    for r in records:
        for gap in r.record.gaps:
            found[usage_pb2.GapReason.Name(gap.reason)] += gap.duration_us
    return found


def assert_chain_in_order(records: Sequence[StoredRecord]) -> None:
    """Seqs 1..n without a hole, committed in seq order (received_at never goes back)."""
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    received = [r.received_at_us for r in records]
    assert received == sorted(received), "records were committed out of seq order"


# -- the agent's side ----------------------------------------------------------------------

_METRICS_LINE = re.compile(r"metrics on http://([^:]+):(\d+)/metrics")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def agent_metrics(agent: Agent) -> dict[str, float]:
    """The agent's /metrics (``metrics.listen`` on port 0: the port is read from its log),
    as {"name{labels}": value}."""
    found = _METRICS_LINE.findall(agent.log())
    assert found, "the agent logs no metrics address"
    host, port = found[-1]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


# -- running the pair ----------------------------------------------------------------------


@dataclass
class Pair:
    """A collector and an agent on a simulated host whose clock runs ``speed`` times real."""

    work: Path
    collector: Collector
    agent: Agent
    speed: float
    anchor: Path
    agent_id: str
    clock: SimClock = field(init=False)

    def __post_init__(self) -> None:
        self.clock = SimClock.shared(self.anchor, self.speed)

    @property
    def db_path(self) -> Path:
        return Path("/" + self.collector.db.removeprefix("sqlite://").lstrip("/"))

    def sim_s(self) -> float:
        return float(self.clock.monotonic())

    def wait_sim(self, sim_s: float) -> None:
        """Until the simulated host reaches ``sim_s`` (a deadline, never a guess)."""
        real_s = max(0.0, sim_s - self.sim_s()) / self.speed
        wait_for(f"sim t={sim_s}", lambda: self.sim_s() >= sim_s, timeout_s=real_s + 10)

    def records(self) -> list[StoredRecord]:
        return stored_records(self.db_path, self.agent_id)

    def sim_of(self, wall_us: int) -> float:
        """The sim second a record's wall µs stands for (no wall jumps)."""
        return float(wall_us - AnchorFile(self.anchor).read().start_wall_us) / 1e6


def agent_settings(
    scenario: Path, speed: float, anchor: Path, collector_address: str
) -> dict[str, str]:
    """Agent options for a fast simulated clock. The meter's durations are *simulated*
    seconds (``real`` converts); the shipper's (ack timeout, backoff, drain) are real ones
    on any host. The ack timeout and the drain get generous values: a loaded CI machine
    must not turn a slow round trip into a fault the test did not inject."""

    def real(seconds: float) -> str:
        return f"{seconds * speed:g}s"

    return {
        "nvml.scenario": str(scenario),
        "nvml.speed": f"{speed:g}",
        "nvml.clock_anchor": str(anchor),
        "collector.address": collector_address,
        "collector.ack_timeout": "5s",
        "collector.backoff_max": "0.5s",
        "collector.drain_timeout": "20s",
        "meter.reopen_interval": real(0.25),
        "metrics.listen": "127.0.0.1:0",
        "log.level": "info",
    }


@contextmanager
def running_pair(
    work: Path,
    text: str,
    *,
    speed: float,
    settings: dict[str, str] | None = None,
    agent_id: str = "fault-agent",
    address: str | None = None,
    collector_port: int | None = None,
    start_collector: bool = True,
    start_agent: bool = True,
) -> Iterator[Pair]:
    """A collector (started unless told not to) and an agent, on a fresh simulated timeline
    held at t=0 until the agent's first start is metering, so work starts after it.
    ``address`` routes the agent elsewhere (a fault proxy in front of ``collector_port``);
    ``settings`` override ``agent_settings``. Both processes are killed when the block ends."""
    scenario = work / "scenario.toml"
    scenario.write_text(text)
    collector = Collector(work, collector_port or free_port())
    collector.start()  # once, to enroll the key; stopped again below when asked
    state = make_key(work, agent_id, collector)
    if not start_collector:
        assert collector.stop() == 0
    anchor = work / "clock.anchor"
    AnchorFile(anchor).open_or_create(speed, None, held=True)
    target = address or f"127.0.0.1:{collector.port}"
    merged = {**agent_settings(scenario, speed, anchor, target), **(settings or {})}
    agent = Agent(state, agent_id, merged, timeline=anchor)
    pair = Pair(work, collector, agent, speed, anchor, agent_id)
    try:
        if start_agent:
            agent.start()  # returns once it is metering, and the timeline starts
        yield pair
    finally:
        for daemon in (agent, collector):
            if daemon.alive():
                daemon.kill()


def stop_agent(pair: Pair) -> None:
    """SIGTERM: the agent closes its windows and drains; it must exit 0."""
    code = pair.agent.stop()
    assert code == 0, f"agent exited {code}:\n{pair.agent.log()[-4000:]}"


def assert_stored_equals_truth(pair: Pair, truth_us: int) -> int:
    """The final check of every fault test; returns the stored µs for the report."""
    stored_us = stored_busy_us(pair.collector)
    assert stored_us == truth_us, (
        f"stored {stored_us} µs != truth {truth_us} µs ({stored_us - truth_us:+d})\n"
        f"agent log tail:\n{pair.agent.log()[-4000:]}"
    )
    pair.collector.cli("audit")  # every stored record re-verified from its bytes
    return stored_us
