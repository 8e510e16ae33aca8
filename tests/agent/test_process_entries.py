"""Process lists are read in entries of the size the driver wrote: 24 bytes as nvml.h lays
them out, 32 on R535 (XuehaiPan/nvitop PR #79), 16 on 550.127.08 (nvitop PR #226). Read at 24
on those drivers, the agent saw the first process of a shared GPU and lost the rest: under
`r535_entries` × `timeslice` it billed pid 5101 169.328 s of its 168.522 s and pid 5102
nothing of its 136.850 s (136.036 s unattributed); under `v1_entries` it billed nothing."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from bench.harness import drive, metered, run_scenario, scenario_end_s
from creditmeter.agent import process_entries
from creditmeter.agent.errors import BadAnswer
from creditmeter.agent.gpu import ComputeProcess
from creditmeter.agent.nvml import PynvmlNvml
from creditmeter.agent.trace import decode_error
from creditmeter.nvml_abi import ProcessInfo, ProcessInfoCc, ProcessInfoV1
from creditmeter.simnvml import FakeNvmlLibrary, Scenario, SimHost, installed
from creditmeter.simnvml.specs import DEFAULT_RING_PERIODS
from creditmeter.v1 import usage_pb2

NOT_MIG = 0xFFFFFFFF
NOT_AVAILABLE = 0xFFFF_FFFF_FFFF_FFFF
LAYOUTS: dict[int, type[ctypes.Structure]] = {16: ProcessInfoV1, 24: ProcessInfo, 32: ProcessInfoCc}
# (pid, memory, gi, ci): outside MIG, memory unknown, on a MIG instance.
ROWS = [
    (4242, 2_000_000_000, NOT_MIG, NOT_MIG),
    (77, NOT_AVAILABLE, NOT_MIG, NOT_MIG),
    (9, 5, 1, 0),
]


def answer(size: int, rows: list[tuple[int, int, int, int]], capacity: int = 8) -> bytes:
    """A buffer from blank_buffer as a driver writing ``size``-byte entries leaves it."""
    buffer = process_entries.blank_buffer(capacity)
    layout = LAYOUTS[size]
    fields = len(layout._fields_)
    entries = (layout * len(rows))(*[(*row, 0)[:fields] for row in rows])
    ctypes.memmove(buffer, entries, ctypes.sizeof(entries))
    return bytes(buffer)


def expected(size: int, rows: list[tuple[int, int, int, int]]) -> list[ComputeProcess]:
    def one(pid: int, memory: int, gi: int, ci: int) -> ComputeProcess:
        on_mig = size > 16 and gi != NOT_MIG  # v1 entries carry no instance ids
        return ComputeProcess(
            pid,
            None if memory == NOT_AVAILABLE else memory,
            gi if on_mig else None,
            ci if on_mig else None,
        )

    return [one(*row) for row in rows]


@pytest.mark.parametrize("size", [16, 24, 32])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_entries_are_read_at_the_size_the_driver_wrote(size: int, count: int) -> None:
    raw = answer(size, ROWS[:count])
    assert process_entries.entry_bytes(raw, count) == size
    assert process_entries.processes(raw, count, size) == expected(size, ROWS[:count])


def test_each_size_is_read_as_its_layout_lies() -> None:
    assert {size: fmt.size for size, fmt in process_entries._ROWS.items()} == {
        size: ctypes.sizeof(layout) for size, layout in process_entries.LAYOUTS.items()
    }


def test_a_driver_that_cleared_its_whole_buffer_cannot_tell_its_size() -> None:
    raw = bytes(len(answer(32, ROWS)))  # every byte written (zeros past the entries)
    assert process_entries.entry_bytes(raw, len(ROWS)) is None


@pytest.mark.parametrize(("written", "read"), [(32, 24), (16, 24), (24, 32), (24, 16)])
def test_entries_read_at_the_wrong_size_are_a_bad_answer_not_processes(
    written: int, read: int
) -> None:
    """The rows after the first are garbage at any other size (gpustat#161): a pid of 0 or
    past the kernel's limit, or memory bytes where instance ids belong."""
    rows = ROWS[:2]
    with pytest.raises(BadAnswer):
        process_entries.processes(answer(written, rows), len(rows), read)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ((0, 1, NOT_MIG, NOT_MIG), "pid 0"),
        ((process_entries.PID_LIMIT + 1, 1, NOT_MIG, NOT_MIG), "no such pid"),
        ((12, 1, 3, NOT_MIG), "no MIG instance"),
        ((12, 1, 173_015_040, 0), "no MIG instance"),
    ],
)
def test_rows_that_are_no_process_make_the_answer_bad(
    row: tuple[int, int, int, int], problem: str
) -> None:
    with pytest.raises(BadAnswer, match=problem):
        process_entries.processes(answer(24, [ROWS[0], row]), 2, 24)


def test_a_count_past_the_buffer_or_an_unknown_size_is_a_bad_answer() -> None:
    raw = answer(24, ROWS[:1], capacity=1)
    with pytest.raises(BadAnswer, match="overrun"):
        process_entries.processes(raw, 3, 24)
    with pytest.raises(BadAnswer, match="20 bytes"):
        process_entries.processes(raw, 1, 20)


# -- through the simulated library -------------------------------------------------------------

HOST = """
[host]
seed = 3
[[gpu]]
product = "H100"
[driver]
process_entry_bytes = {size}
[[process]]
pid = 100
gpu = 0
start_s = 0.5
[[process]]
pid = 101
gpu = 0
start_s = 0.5
memory_bytes = "unknown"
"""


class Rewriting:
    """nvmlDeviceGetComputeRunningProcesses_v3 as the simulated driver answers it, then, while
    ``rewrite`` is set, its buffer changed by it. Installed before the agent's first call:
    pynvml caches the symbol it finds."""

    def __init__(self, library: FakeNvmlLibrary) -> None:
        self._v3 = library.nvmlDeviceGetComputeRunningProcesses_v3
        self.rewrite: Callable[[Any], None] | None = None
        library.nvmlDeviceGetComputeRunningProcesses_v3 = self

    def __call__(self, handle: Any, count: Any, infos: Any) -> int:
        ret: int = self._v3(handle, count, infos)
        if infos is not None and self.rewrite is not None:
            self.rewrite(infos)
        return ret


@contextmanager
def opened(size: int) -> Iterator[tuple[PynvmlNvml, Rewriting]]:
    host, clock = SimHost.manual(Scenario.from_toml(HOST.format(size=size)))
    clock.advance(1.0)
    with installed(host) as library:
        rewriting = Rewriting(library)
        nvml = PynvmlNvml.open()
        try:
            yield nvml, rewriting
        finally:
            nvml.shutdown()


@pytest.mark.parametrize("size", [16, 24, 32])
def test_the_agent_lists_every_process_whatever_size_its_driver_writes(size: int) -> None:
    with opened(size) as (nvml, _):
        gpu = nvml.devices()[0]
        assert nvml.process_entry_bytes is None
        assert [p.pid for p in nvml.compute_processes(gpu)] == [100, 101]
        assert nvml.process_entry_bytes == size


def zeros_past_the_entries(infos: Any) -> None:
    """What a driver that clears all of its buffer would leave (none is known to)."""
    raw = bytearray(bytes(infos))
    end = len(raw.rstrip(bytes([process_entries.UNWRITTEN])))
    ctypes.memset(ctypes.addressof(infos) + end, 0, len(raw) - end)


def test_an_answer_that_cannot_tell_is_read_at_the_size_last_measured() -> None:
    with opened(32) as (nvml, rewriting):
        gpu = nvml.devices()[0]
        assert [p.pid for p in nvml.compute_processes(gpu)] == [100, 101]
        rewriting.rewrite = zeros_past_the_entries
        assert [p.pid for p in nvml.compute_processes(gpu)] == [100, 101]
        assert nvml.process_entry_bytes == 32


def test_before_any_measure_such_an_answer_is_read_as_nvml_h_lays_it_out() -> None:
    with opened(24) as (nvml, rewriting):
        rewriting.rewrite = zeros_past_the_entries
        assert [p.pid for p in nvml.compute_processes(nvml.devices()[0])] == [100, 101]
        assert nvml.process_entry_bytes is None


def second_pid_zero(infos: Any) -> None:
    ctypes.memset(ctypes.addressof(infos) + ctypes.sizeof(ProcessInfo), 0, 4)


def test_a_list_that_reads_as_no_processes_fails_the_poll_and_nothing_is_guessed() -> None:
    """Its periods are read again at the next poll that reads, so a few unreadable lists in
    the middle of a time-sliced run change nothing billed; a run of them the driver's ring
    outlasts would leave a gap."""
    scenario = Scenario.load("timeslice")
    end_s = scenario_end_s(scenario) + 5

    def garbled_between(from_s: float, to_s: float) -> Callable[[], None]:
        def each_poll() -> None:
            at = run.clock.monotonic()
            rewriting.rewrite = second_pid_zero if from_s <= at < to_s else None

        return each_poll

    with metered(scenario) as (run, meter):
        rewriting = Rewriting(run.lib)
        drive(run, meter, end_s, each_poll=garbled_between(30.0, 34.0))
        run.usages.extend(meter.close_window(all_books=True))
        assert meter.stats.nvml_errors["BadAnswer"] == 4
    ideal = run_scenario(scenario)
    assert run.measured_us() == ideal.measured_us()
    assert not run.gaps_us()


def test_polls_failing_for_minutes_leave_a_gap_while_they_fail() -> None:
    """The time a failing device's ring has dropped is a gap at each window close while the
    polls still fail (older than a minute, as for a lost GPU: a ring learnt short may be a
    young driver's), not only once a poll reads again, which may be never: before, the
    device wrote nothing at all for that time, neither billed nor a gap. What its ring
    still holds when a poll reads again is billed."""
    scenario = Scenario.load("timeslice")
    end_s = scenario_end_s(scenario) + 5
    nvml_error = usage_pb2.GAP_REASON_NVML_ERROR
    with metered(scenario) as (run, meter):
        rewriting = Rewriting(run.lib)

        def each_poll() -> None:
            rewriting.rewrite = second_pid_zero if 30.0 <= run.clock.monotonic() < 160.0 else None

        drive(run, meter, 159.0, each_poll=each_poll)
        failing = run.unmeasured_us()
        drive(run, meter, end_s, each_poll=each_poll)
        run.usages.extend(meter.close_window(all_books=True))
    (gpu,) = failing
    ring_s = (DEFAULT_RING_PERIODS - 1) / 6
    read_through_s = 29  # the last poll that read
    # At the close at 150 s, all but the last minute:
    assert failing[gpu][nvml_error] == pytest.approx((150 - 60 - read_through_s) * 1e6, abs=1e6)
    gaps = run.unmeasured_us()[gpu]
    assert set(gaps) == {nvml_error}
    # Once read again at 160 s, all but what the ring still held:
    assert gaps[nvml_error] == pytest.approx((160 - read_through_s - ring_s) * 1e6, abs=1e6)
    ideal = run_scenario(scenario)
    assert 0 < sum(run.measured_us().values()) < sum(ideal.measured_us().values())
    assert run.unattributed_us() == ideal.unattributed_us()


@pytest.mark.parametrize("profile", ["r535_entries", "v1_entries"])
def test_a_shared_gpu_on_those_drivers_is_billed_as_on_nvml_hs(profile: str) -> None:
    runs = [
        run_scenario(Scenario.load("timeslice").with_overrides(profile=p))
        for p in (profile, "ideal")
    ]
    assert runs[0].measured_us() == runs[1].measured_us()
    assert runs[0].unattributed_us() == runs[1].unattributed_us()
    assert len(runs[0].measured_us()) == 2


def test_a_trace_carries_a_bad_answer_as_one() -> None:
    assert isinstance(decode_error({"e": ["BadAnswer", "pid 0", 0]}), BadAnswer)
