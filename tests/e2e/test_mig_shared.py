"""A MIG instance two accounts share, through a real agent and a real collector.

NVML has no per-process signal on MIG: the agent bills the process alone on its instance
exactly, and leaves the shared instance's busy time unattributed on the instance's own
device record, which the collector verifies, stores and audits like a whole GPU's books.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from creditmeter.simnvml import ManualClock, Scenario, SimHost
from creditmeter.v1 import usage_pb2
from tests.faults.harness import running_pair, stop_agent

pytestmark = pytest.mark.slow

SPEED = 20.0
END_S = 75.0
NO_EVIDENCE = usage_pb2.UNATTRIBUTED_REASON_NO_EVIDENCE
NO_SIGNAL = usage_pb2.GAP_REASON_NO_UTILIZATION_SIGNAL


def process(pid: int, gi: int, busy: tuple[float, float, int], account: str) -> str:
    a, b, sm = busy
    return (
        f"\n[[process]]\npid = {pid}\ngpu = 0\ngi = {gi}\nstart_s = 1.0\nexit_s = 70.0\n"
        f"busy = [[{a}, {b}, {sm}]]\nenv = {{ CREDITMETER_ACCOUNT = {account!r} }}\n"
    ).replace("'", '"')


SCENARIO = (
    '[host]\nseed = 41\nname = "mig-host"\n\n[[gpu]]\nproduct = "H100"\n'
    '\n[[gpu.mig]]\ngi = 1\nci = 0\nprofile = "3g.40gb"\n'
    '\n[[gpu.mig]]\ngi = 5\nci = 0\nprofile = "2g.20gb"\n'
    + process(7101, 1, (4.0, 30.0, 80), "acme")
    + process(7102, 1, (10.0, 40.0, 50), "globex")
    + process(7103, 5, (5.0, 50.0, 100), "initech")
)


def truth_by_pid(until_s: float) -> dict[int, Fraction]:
    host = SimHost(Scenario.from_toml(SCENARIO), ManualClock())
    return {k.pid: t.busy_us for k, t in host.truth(until_s=until_s).items()}


def test_a_mig_instance_of_two_accounts_is_nobodys_and_the_collector_keeps_its_books(
    tmp_path: Path,
) -> None:
    with running_pair(tmp_path, SCENARIO, speed=SPEED) as pair:
        pair.wait_sim(END_S)
        stop_agent(pair)
        records = [r.record for r in pair.records()]
        pair.collector.cli("audit")  # every stored record re-verified, books included
    truth = truth_by_pid(END_S)
    billed: dict[int, int] = {}
    for r in records:
        if r.process.pid:
            billed[r.process.pid] = billed.get(r.process.pid, 0) + r.busy_us
    assert billed.get(7101, 0) == billed.get(7102, 0) == 0
    # Their records stay, with a gap with no signal of their own while the instance was
    # busy (4 s to 40 s): the time they held it is on record, not billed.
    no_signal = {7101: 0, 7102: 0}
    for r in records:
        for g in r.gaps:
            if r.process.pid in no_signal and g.reason == NO_SIGNAL:
                no_signal[r.process.pid] += g.duration_us
    assert no_signal[7101] == no_signal[7102] >= 35_000_000
    assert abs(billed[7103] - truth[7103]) <= truth[7103] / 1000  # alone: the whole reading
    shared_uuid = next(r.gpu.uuid for r in records if r.process.pid == 7101)
    books = [r.device for r in records if r.HasField("device") and r.gpu.uuid == shared_uuid]
    unattributed = sum(u.busy_us for b in books for u in b.unattributed if u.reason == NO_EVIDENCE)
    shared_truth = truth[7101] + truth[7102]
    assert abs(unattributed - shared_truth) <= shared_truth / 1000
    assert all(b.attributed_busy_us == 0 for b in books)
