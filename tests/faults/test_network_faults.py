"""Network faults between a real agent and a real collector, through a real TCP fault proxy.

The simulated host is exact (harness.py), so whatever the network does, the collector must
end up billing the simulator's ground truth to the microsecond: nothing lost, nothing twice,
and every record committed in seq order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.daemons import free_port, wait_for
from tests.faults.harness import (
    Pair,
    Proc,
    Span,
    agent_metrics,
    assert_chain_in_order,
    assert_stored_equals_truth,
    running_pair,
    scenario_text,
    stop_agent,
    truth_busy_us,
)
from tests.faults.proxy import FaultProxy, Mode

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    """A fault proxy in front of the port the collector will listen on."""
    with FaultProxy(("127.0.0.1", free_port())) as proxy:
        yield proxy


def through(proxy: FaultProxy) -> dict[str, Any]:
    """running_pair's arguments that put ``proxy`` between the agent and the collector."""
    return {"address": proxy.address, "collector_port": proxy.target[1]}


def busy_every(
    period_s: float, length_s: float, first_s: float, until_s: float, sm: int
) -> list[Span]:
    """Spans of ``length_s`` every ``period_s`` from ``first_s``: work that never stops long."""
    spans: list[Span] = []
    t = first_s
    while t + length_s <= until_s:
        spans.append((round(t, 1), round(t + length_s, 1), sm))
        t += period_s
    return spans


# -- chaos: every fault mode in turn -------------------------------------------------------

CHAOS_SPEED = 20.0
CHAOS_END_S = 440.0  # sim seconds: the faults below take ~17 real s = 340 sim s


def chaos_scenario() -> str:
    procs = [
        Proc(3101, 0, busy_every(10.0, 4.2, 4.0, CHAOS_END_S - 20, 100), account="acme"),
        Proc(3102, 0, busy_every(10.0, 3.0, 9.0, CHAOS_END_S - 20, 50), account="globex"),
        Proc(3201, 1, busy_every(7.0, 5.0, 3.0, CHAOS_END_S - 20, 75), exit_s=CHAOS_END_S - 15),
    ]
    return scenario_text(procs, gpus=2)


# (mode, delay_s, real seconds held): each fault long enough to meet a live stream.
CHAOS_SCHEDULE = (
    (Mode.PASS, 0.0, 1.5),
    (Mode.DELAY, 0.25, 2.0),  # 250 ms each way: slow, never broken
    (Mode.RESET, 0.0, 0.6),  # RST on the live stream and on every reconnect
    (Mode.PASS, 0.0, 1.0),
    (Mode.DROP, 0.0, 0.6),  # FIN on the live stream and on every reconnect
    (Mode.PASS, 0.0, 1.0),
    (Mode.STALL, 0.0, 1.5),  # shorter than the ack timeout: the stream survives it
    (Mode.PASS, 0.0, 1.0),
    (Mode.BLACKHOLE, 0.0, 4.5),  # 90 sim s: longer than the ack timeout
    (Mode.PASS, 0.0, 1.0),
    (Mode.REFUSE, 0.0, 1.0),
    (Mode.PASS, 0.0, 0.0),
)


def test_every_network_fault_in_turn_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, proxy: FaultProxy
) -> None:
    text = chaos_scenario()
    truth_us = truth_busy_us(text, CHAOS_END_S)
    settings = {"meter.window": "5s", "collector.ack_timeout": "2s"}
    with running_pair(
        tmp_path, text, speed=CHAOS_SPEED, settings=settings, **through(proxy)
    ) as pair:
        pair.wait_sim(10.0)  # the first window is delivered through the proxy
        wait_for("a first delivery", lambda: len(pair.records()) > 0)
        for mode, delay_s, held_s in CHAOS_SCHEDULE:
            proxy.set_mode(mode, delay_s)
            time.sleep(held_s)  # the fault's duration is the experiment, not a wait
        pair.wait_sim(CHAOS_END_S)
        stop_agent(pair)
        stats = proxy.stats()
        stored_us = assert_stored_equals_truth(pair, truth_us)
        records = pair.records()
    assert_chain_in_order(records)
    # Each fault struck a real connection, and the agent came back after each.
    assert stats.reset >= 1 and stats.dropped >= 1 and stats.blackholed >= 1, stats
    assert stats.bytes_discarded > 0, stats
    assert stats.accepted >= 5, stats
    log = pair.agent.log()
    assert "no answer for" in log  # the black hole was noticed by the ack timeout
    assert "Traceback" not in log
    print(
        f"chaos: {len(records)} records, stored {stored_us} µs == truth; proxy "
        f"accepted {stats.accepted}, reset {stats.reset}, dropped {stats.dropped}, "
        f"black-holed {stats.blackholed} ({stats.bytes_discarded} bytes)"
    )


# -- a long outage: hours of simulated time ------------------------------------------------

OUTAGE_SPEED = 600.0
UP_UNTIL_S = 1800.0  # sim: half an hour of normal service
HOLE_UNTIL_S = UP_UNTIL_S + 3600.0  # then an hour of black hole (the collector is up)
DOWN_UNTIL_S = HOLE_UNTIL_S + 3600.0  # then an hour with the collector down
OUTAGE_END_S = DOWN_UNTIL_S + 1200.0


def outage_scenario() -> str:
    # 1 s periods and an hour of ring: a loaded machine may stall the agent for seconds of
    # real time (minutes of simulated time) without the driver dropping a sample.
    procs = [
        Proc(4101, 0, busy_every(300.0, 120.0, 10.0, OUTAGE_END_S - 60, 100), account="acme"),
        Proc(4102, 0, busy_every(300.0, 90.0, 160.0, OUTAGE_END_S - 60, 25), account="globex"),
        Proc(4201, 1, busy_every(600.0, 400.0, 5.0, OUTAGE_END_S - 60, 75), account="initech"),
    ]
    return scenario_text(procs, gpus=2, period_us=1_000_000, ring_periods=3600)


def outbox_depth(pair: Pair) -> float:
    return agent_metrics(pair.agent).get("creditmeter_agent_outbox_records", -1.0)


def test_hours_long_outage_is_ridden_out_by_the_outbox_and_drained_in_order(
    tmp_path: Path, proxy: FaultProxy
) -> None:
    text = outage_scenario()
    truth_us = truth_busy_us(text, OUTAGE_END_S)
    settings = {"meter.poll_interval": "15s", "meter.window": "60s"}
    with running_pair(
        tmp_path, text, speed=OUTAGE_SPEED, settings=settings, **through(proxy)
    ) as pair:
        pair.wait_sim(UP_UNTIL_S)
        before = len(pair.records())
        proxy.set_mode(Mode.BLACKHOLE)
        pair.wait_sim(HOLE_UNTIL_S)
        pair.collector.kill()  # and then the collector itself goes down
        proxy.set_mode(Mode.PASS)
        pair.wait_sim(DOWN_UNTIL_S - 60)
        held = outbox_depth(pair)
        pair.collector.start()
        back = time.monotonic()
        wait_for("the outbox to drain", lambda: outbox_depth(pair) == 0, timeout_s=60)
        drain_real_s = time.monotonic() - back
        pair.wait_sim(OUTAGE_END_S)
        stop_agent(pair)
        stored_us = assert_stored_equals_truth(pair, truth_us)
        records = pair.records()
    assert_chain_in_order(records)
    # Every record of the two hours waited in the outbox, and none was lost or reordered.
    outage = (UP_UNTIL_S + 120, DOWN_UNTIL_S - 120)
    during = [r for r in records if outage[0] <= pair.sim_of(r.record.end_unix_us) <= outage[1]]
    assert before > 0 and len(during) > 50 and held >= len(during), (before, len(during), held)
    assert proxy.stats().blackholed >= 1
    print(
        f"outage: {len(records)} records, {held:.0f} held in the outbox over 2 h simulated, "
        f"drained {drain_real_s:.1f} real s after the collector was back; stored "
        f"{stored_us} µs == truth"
    )
