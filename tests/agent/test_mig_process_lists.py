"""Where a MIG instance's processes come from, and what its busy time is when none can be
listed.

nvml.h on nvmlDeviceGetComputeRunningProcesses: "In MIG mode, if device handle is provided,
the API returns aggregate information, only if the caller has appropriate privileges.
Per-instance information can be queried by using specific MIG device handles. Querying
per-instance information using MIG device handles is not supported if the device is in
vGPU Host virtualization mode."

On such a host every poll of every instance used to fail: its processes were never metered
and its busy time was never read, with no gap and nothing unattributed, and each failure
asked for a new NVML session (one every reopen interval for as long as the agent ran).
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

from bench.harness import Run, drive, metered
from creditmeter.agent.apportion import Unattributed
from creditmeter.simnvml import Scenario

END_S = 60.0
LIST_CALL = "nvmlDeviceGetComputeRunningProcesses_v3"


def scenario(*, host_vgpu: bool, privileged: bool = True, extra: str = "") -> Scenario:
    """An H100 in MIG mode with three instances, a process alone on two of them."""
    return Scenario.from_toml(f"""
[host]
seed = 31
privileged = {str(privileged).lower()}

[[gpu]]
product = "H100"
host_vgpu = {str(host_vgpu).lower()}

[[gpu.mig]]
gi = 1
profile = "3g.40gb"

[[gpu.mig]]
gi = 5
profile = "2g.20gb"

[[gpu.mig]]
gi = 13
profile = "1g.10gb"

[[process]]
pid = 100
gpu = 0
gi = 1
start_s = 1.0
exit_s = 50.0
busy = [[2.0, 20.0, 60], [25.0, 45.0, 90]]

[[process]]
pid = 200
gpu = 0
gi = 5
start_s = 1.5
exit_s = 40.0
busy = [[3.0, 38.0, 40]]
{extra}""")


def metered_run(s: Scenario) -> tuple[Run, Counter[str], Counter[str]]:
    """The run, its NVML calls by name, and the meter's relistings by why."""
    calls: Counter[str] = Counter()
    with metered(s) as (run, meter):
        run.lib.before_call = lambda name: calls.update([name])
        drive(run, meter, END_S)
        run.usages.extend(meter.close_window())
        return run, calls, Counter(meter.stats.relistings)


def unattributed_by_reason(run: Run) -> dict[int, int]:
    totals: Counter[int] = Counter()
    for u in run.usages:
        if u.books is not None:
            for reason, us in u.books.unattributed_us:
                totals[reason] += us
    return dict(totals)


def test_on_a_vgpu_host_the_instances_processes_come_from_their_gpus_list() -> None:
    """Each process alone on its instance is billed as on any host, from one GPU list a
    poll for all instances, and no new NVML session is asked for."""
    vgpu, calls, relistings = metered_run(scenario(host_vgpu=True))
    plain, plain_calls, _ = metered_run(scenario(host_vgpu=False))
    truth = vgpu.truth_us()
    assert {k.pid for k in truth} == {100, 200}
    for key, busy in truth.items():
        billed = vgpu.measured_us()[key]
        assert abs(billed - busy) <= busy / 10_000, key
        assert billed == plain.measured_us()[key]
    assert not relistings
    assert not unattributed_by_reason(vgpu)
    # A list is two calls where it has processes (the size, then the rows). Own lists:
    # three instances' and the watch's GPU list a poll; here the GPU list alone.
    polls = END_S
    assert plain_calls[LIST_CALL] >= 6 * polls
    assert calls[LIST_CALL] <= 2 * polls + 2


def test_where_no_list_answers_the_instances_busy_time_is_unattributed() -> None:
    """A vGPU host and an agent without the privileges of the GPU's list: no process can be
    known, so nothing is billed to one, and each instance's busy time is on its device
    records, unattributed as PROCESSES_UNLISTED. Nothing asks for a new NVML session."""
    run, _, relistings = metered_run(scenario(host_vgpu=True, privileged=False))
    assert not run.measured_us()
    device_busy = sum(run.device_busy_us().values())
    truth = sum(run.truth_us().values())
    assert unattributed_by_reason(run) == {Unattributed.PROCESSES_UNLISTED: device_busy}
    assert abs(device_busy - truth) <= truth / 10_000
    assert not relistings


def test_without_the_privileges_of_the_gpus_list_each_instance_lists_its_own() -> None:
    """Off a vGPU host the instances' own lists need no privileges: billed as ever."""
    run, _, relistings = metered_run(scenario(host_vgpu=False, privileged=False))
    for key, busy in run.truth_us().items():
        assert abs(run.measured_us()[key] - busy) <= busy / 10_000, key
    assert not relistings


def test_busy_time_of_a_process_never_listed_is_unattributed_on_its_instance() -> None:
    """A process that held a context for 0.6 s between two polls is never listed: its
    instance's busy time then has no process to take it. It used to be dropped (the
    instance's books said nothing); it is NO_PROCESS, as on a whole GPU."""
    blink = (
        "\n[[process]]\npid = 300\ngpu = 0\ngi = 13\nstart_s = 10.2\nexit_s = 10.8\n"
        "busy = [[10.25, 10.75, 100]]\n"
    )
    run, _, _ = metered_run(scenario(host_vgpu=False, extra=blink))
    never = next(k for k in run.truth_us() if k.pid == 300)
    assert never not in run.measured_us()
    truth = run.truth_us()[never]
    assert truth == Fraction(500_000)
    unattributed = unattributed_by_reason(run)
    assert abs(unattributed[Unattributed.NO_PROCESS] - truth) <= 1_000
