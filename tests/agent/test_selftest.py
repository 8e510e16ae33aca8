"""``creditmeter-agent selftest``: known work measured through the real NVML path. Here the
work runs on the simulated host (every driver profile); on a GPU host it runs for real."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from creditmeter.agent import selftest
from creditmeter.agent.cuda import PTX, CudaUnavailable, Span
from creditmeter.agent.procfs import ProcFs
from creditmeter.agent.selftest import CudaWorkload, Phase, SelftestHost
from creditmeter.agent.selftest_worker import KERNEL_NS, kernels_ns
from creditmeter.agent.trace_cli import replay_trace
from creditmeter.simnvml.profiles import find_profile, profile_names
from creditmeter.simnvml.specs import DEFAULT_RING_PERIODS
from creditmeter.simnvml.workload import SimWorkload, sim_host

NOT_NEEDED = ("grpc", "cryptography", "sqlite3", "_sqlite3", "psycopg", "creditmeter.collector")


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, profile: str) -> tuple[int, str]:
    code = selftest.main(["--trace-dir", str(tmp_path)], lambda p: sim_host(p, profile))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("profile", profile_names())
def test_every_pattern_meets_its_bar_under_every_profile(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, profile: str
) -> None:
    code, out = run(capsys, tmp_path, profile)
    assert code == 0, out
    table = [
        line.split() for line in out.splitlines() if line.startswith(("rhythm ", "timeslice "))
    ]
    assert [row[:3] for row in table] == [
        ["rhythm", "7001", "10.000"],
        ["timeslice", "7001", "30.000"],
        ["timeslice", "7002", "10.000"],
        ["timeslice", "GPU", "40.000"],
    ]
    assert all(row[-1] == "met" for row in table)
    assert "evidence" in out
    if profile == "no_device_series":
        assert "no device series" in out
    else:
        clock = "boot" if profile == "boot_stamps" else "wall"
        assert f"device sample period 166667 µs, stamped on the {clock} clock" in out
    driver = find_profile(profile)
    assert driver is not None
    assert f"process entries {driver.driver.process_entry_bytes} bytes" in out


@pytest.mark.parametrize(
    ("profile", "ring"),
    [("ideal", f"{(DEFAULT_RING_PERIODS - 1) / 6:.2f} s"), ("no_device_series", "unknown")],
)
def test_it_says_how_far_back_the_drivers_ring_reached(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, profile: str, ring: str
) -> None:
    """What a lost GPU's search interval waits on (agent/listings.py): the simulated
    driver's ring holds DEFAULT_RING_PERIODS samples of 1/6 s."""
    argv = ["--trace-dir", str(tmp_path), "--pattern", "rhythm"]
    assert selftest.main(argv, lambda p: sim_host(p, profile)) == 0
    assert f"; ring {ring} of samples at the first read;" in capsys.readouterr().out


def test_the_traces_it_writes_replay_to_what_it_measured(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out = run(capsys, tmp_path, "stale_stamps")
    assert code == 0
    measured = {
        int(row[1]): float(row[3])
        for row in (line.split() for line in out.splitlines())
        if row[:1] == ["timeslice"] and row[1].isdigit()
    }
    usages = replay_trace(tmp_path / "selftest-timeslice.jsonl.gz")
    replayed = {pid: 0 for pid in measured}
    for u in usages:
        if u.books is None:
            replayed[u.key.pid] += u.busy_us
    assert {pid: round(us / 1e6, 3) for pid, us in replayed.items()} == measured


class LyingWorkload(SimWorkload):
    """Claims each kernel ran half a second longer than it did."""

    def spans(self) -> dict[int, list[Span]]:
        return {
            pid: [Span(s.start_ns, s.end_ns + 500_000_000) for s in spans]
            for pid, spans in super().spans().items()
        }


def test_a_result_beyond_the_bar_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    @contextmanager
    def lying(pattern: str) -> Iterator[SelftestHost]:
        with sim_host(pattern) as host:
            yield host._replace(workload=LyingWorkload(host.workload._host, host.workload._clock))  # type: ignore[attr-defined]

    assert selftest.main(["--trace-dir", str(tmp_path), "--pattern", "rhythm"], lying) == 1
    assert "MISSED" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has an NVIDIA driver")
def test_without_a_cuda_driver_it_says_so_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "creditmeter.agent.cli", "selftest", "--trace-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(tmp_path)},
    )
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "no GPU to test: no CUDA driver: cannot load libcuda.so.1" in done.stderr


def test_a_worker_without_a_cuda_driver_is_reported_as_such() -> None:
    workload = CudaWorkload(0)
    workload.start([[Phase(0.0, 0.1)]])
    with pytest.raises(CudaUnavailable, match=r"libcuda\.so\.1"):
        workload.spans()


def test_selftest_imports_neither_signing_grpc_nor_databases(tmp_path: Path) -> None:
    probe = (
        "import sys; from creditmeter.agent import cli; "
        f"cli.main(['selftest', '--trace-dir', {str(tmp_path)!r}]); "
        f"print(sorted(m for m in sys.modules if m.startswith({NOT_NEEDED!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr


def test_busy_phases_become_kernels_of_100_ms() -> None:
    assert kernels_ns(0.25) == [KERNEL_NS, KERNEL_NS, 50_000_000]
    assert sum(kernels_ns(2.0)) == 2_000_000_000


def test_expected_shares_split_overlaps_evenly() -> None:
    spans = {1: [Span(0, 40)], 2: [Span(10, 30)], 3: [Span(50, 60)]}
    assert selftest.expected_ns(spans) == {1: 30.0, 2: 10.0, 3: 10.0}
    assert selftest.union_ns([s for ss in spans.values() for s in ss]) == 50


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="no CUDA toolkit (ptxas) here")
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_the_spin_kernel_is_valid_ptx(tmp_path: Path, arch: str) -> None:
    source = tmp_path / "spin.ptx"
    source.write_bytes(PTX)
    done = subprocess.run(
        ["ptxas", "--gpu-name", arch, str(source), "-o", str(tmp_path / "spin.cubin")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_selftest_outside_the_hosts_pid_namespace_warns_and_measures_anyway(
    tmp_path: Path,
) -> None:
    """The daemon refuses there (exit 75); on a lent GPU in a container the selftest's
    result is what says what NVML does with PIDs there (Project-HAMi/HAMi-core#112)."""
    for namespace in (4026532177, 4026531836):  # a container's, the host's
        (tmp_path / str(namespace) / "self" / "ns").mkdir(parents=True)
        (tmp_path / str(namespace) / "self" / "ns" / "pid").symlink_to(f"pid:[{namespace}]")
    warning = selftest.pid_namespace_warning(ProcFs(tmp_path / "4026532177"))
    assert warning is not None and "pid:[4026532177]" in warning and "anyway" in warning
    assert selftest.pid_namespace_warning(ProcFs(tmp_path / "4026531836")) is None
