"""Scenario loading and validation; every shipped scenario runs under pynvml."""

from __future__ import annotations

import pynvml
import pytest

from creditmeter.simnvml import ManualClock, Scenario, ScenarioError, SimHost, installed
from creditmeter.simnvml.scenario import shipped_scenarios

GPU = '[[gpu]]\nproduct = "H100"\n'
PROC = "[[process]]\npid = 1\ngpu = 0\n"

BAD = [
    ("bogus = 1\n" + GPU, "bogus", "unknown key"),
    ("", "gpu", "at least one"),
    ('[[gpu]]\nproduct = "H100"\nsample_perod_us = 5\n', "gpu[0].sample_perod_us", "unknown key"),
    ('[[gpu]]\nproduct = "X9000"\n', "gpu[0].memory_total_bytes", "unknown product"),
    (
        '[[gpu]]\nproduct = "X9000"\nmemory_total_bytes = 1\nidle_w = 1\nbusy_w = 2\n',
        "gpu[0].sample_period_us",
        "unknown product",
    ),
    (GPU + 'sample_reading = "sometimes"\n', "gpu[0].sample_reading", "per_period"),
    (GPU + "sample_period_us = 1000\nphase_us = 1000\n", "gpu[0].phase_us", "below"),
    (GPU + 'idle_w = "lots"\n', "gpu[0].idle_w", "number"),
    ('[[gpu]]\nproduct = "L4"\n[[gpu.mig]]\ngi = 1\nprofile = "1g.5gb"\n', "gpu[0].mig", "no MIG"),
    (
        GPU
        + '[[gpu.mig]]\ngi = 1\nprofile = "4g.40gb"\n[[gpu.mig]]\ngi = 2\nprofile = "4g.40gb"\n',
        "gpu[0].mig[1].profile",
        "slices",
    ),
    (GPU + '[[gpu.mig]]\ngi = 1\nprofile = "big"\n', "gpu[0].mig[0].profile", "3g.40gb"),
    (GPU + PROC + "busy = [[1.0, 2.0, 101]]\n", "process[0].busy[0]", "0..100"),
    (GPU + PROC + "busy = [[1.0, 2.0, 50.5]]\n", "process[0].busy[0]", "whole percent"),
    (GPU + PROC + "busy = [[2.0, 1.0, 50]]\n", "process[0].busy[0]", "after start"),
    (GPU + PROC + "busy = [[1.0, 2.0]]\n", "process[0].busy[0]", "[start_s, end_s, sm]"),
    (GPU + PROC + "exit_s = 5\nbusy = [[4.0, 6.0, 50]]\n", "process[0].busy[0]", "outside"),
    (GPU + PROC + "start_s = 3\nbusy = [[1.0, 4.0, 50]]\n", "process[0].busy[0]", "outside"),
    (GPU + PROC + "busy = [[1.0, 3.0, 50], [2.0, 4.0, 50]]\n", "process[0].busy[1]", "overlaps"),
    (
        GPU
        + PROC
        + "[[process.bursts]]\nstart_s = 1\nevery_s = 1\nlength_s = 2\nsm = 9\ncount = 3\n",
        "process[0].bursts[0]",
        "overlaps",
    ),
    (
        GPU + PROC + "[[process.bursts]]\nstart_s = 1\nlength_s = 2\nsm = 9\ncolor = 1\n",
        "process[0].bursts[0].color",
        "unknown key",
    ),
    (GPU + PROC + "exit_s = 5\n" + PROC + "start_s = 4\n", "process[1].pid", "overlap"),
    (GPU + PROC + PROC, "process[1].pid", "overlap"),
    (GPU + PROC + "gi = 1\n", "process[0].gi", "not in MIG mode"),
    (
        GPU + '[[gpu.mig]]\ngi = 1\nprofile = "1g.10gb"\ncreated_s = 5\ndestroyed_s = 5\n',
        "gpu[0].mig[0].destroyed_s",
        "after created_s",
    ),
    (
        GPU + '[[gpu.mig]]\ngi = 1\nprofile = "1g.10gb"\ncreated_s = 5\n' + PROC + "gi = 1\n",
        "process[0].start_s",
        "before MIG instance gi 1 ci 0 is created",
    ),
    (
        GPU + '[[gpu.mig]]\ngi = 1\nprofile = "1g.10gb"\ndestroyed_s = 9\n' + PROC + "gi = 1\n",
        "process[0].exit_s",
        "no later than MIG instance gi 1 ci 0 is destroyed",
    ),
    (GPU + "[[process]]\npid = 1\ngpu = 3\n", "process[0].gpu", "no GPU 3"),
    (GPU + PROC + "start_s = 5\nexit_s = 4\n", "process[0].exit_s", "after start_s"),
    (GPU + PROC + "env = { CREDITMETER_ACCOUNT = 42 }\n", "process[0].env.CREDITMETER_ACCOUNT", ""),
    (GPU + PROC + "memory_bytes = -1\n", "process[0].memory_bytes", "unknown"),
    (GPU + PROC + "proc_exit_lead_s = 1\n", "process[0].proc_exit_lead_s", "needs exit_s"),
    (GPU + '[[fault]]\nkind = "gpu_lost"\n', "fault[0].gpu", "required"),
    (GPU + '[[fault]]\nkind = "meteor"\n', "fault[0].kind", "must be one of"),
    (GPU + '[[fault]]\nkind = "no_permission"\ngpu = 0\n', "fault[0].gpu", "not about one GPU"),
    (GPU + '[[fault]]\nkind = "wall_jump"\nstart_s = 1\n', "fault[0].jump_s", "required"),
    (GPU + "[host]\nstart_wall = 2025-01-01T00:00:00\n", "host.start_wall", "UTC offset"),
    ("[[gpu]]\nproduct = \n", "", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "problem"), BAD)
def test_bad_scenarios_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        Scenario.from_toml(text, "bad.toml")
    assert raised.value.key == key
    assert problem in raised.value.problem
    assert str(raised.value).startswith(f"bad.toml: {key}: " if key else "bad.toml: not valid")


def test_products_fill_in_defaults() -> None:
    scenario = Scenario.from_toml(
        '[[gpu]]\nproduct = "H100"\n[[gpu]]\nproduct = "T4"\n[[gpu]]\n'
        'product = "NVIDIA A100-SXM4-80GB"\n'
    )
    h100, t4, a100 = scenario.gpus
    assert (h100.product, h100.sample_period_us, h100.gpm_supported, h100.busy_w) == (
        "NVIDIA H100 80GB HBM3",
        166_667,
        True,
        700.0,
    )
    assert (t4.product, t4.sample_period_us, t4.max_mig_devices) == ("Tesla T4", 1_000_000, 0)
    assert (a100.gpm_supported, a100.max_mig_devices) == (False, 7)
    assert h100.sample_reading == "per_period" and h100.ring_periods == 120


def test_an_unknown_product_with_its_parameters_is_fine() -> None:
    (gpu,) = Scenario.from_toml(
        '[[gpu]]\nproduct = "NVIDIA B200"\nsample_period_s = 0.5\nmemory_total_bytes = 10\n'
        "idle_w = 100\nbusy_w = 1000\ngpm_supported = true\n"
    ).gpus
    assert (gpu.product, gpu.sample_period_us, gpu.gpm_supported) == ("NVIDIA B200", 500_000, True)


def test_with_overrides_changes_every_gpu() -> None:
    scenario = Scenario.load("demo").with_overrides(
        sample_period_us=500_000, sample_reading="per_query", ring_periods=10
    )
    assert {(g.sample_period_us, g.sample_reading, g.ring_periods) for g in scenario.gpus} == {
        (500_000, "per_query", 10)
    }
    with pytest.raises(ScenarioError, match="sample_reading"):
        scenario.with_overrides(sample_reading="hourly")


def test_bursts_expand_deterministically_within_their_bounds() -> None:
    first, second = Scenario.load("sdxl"), Scenario.load("sdxl")
    assert first.processes[0].busy == second.processes[0].busy
    spans = first.processes[0].busy
    assert len(spans) == 32
    assert all(5_000_000 <= s.end_us - s.start_us <= 10_000_000 and s.sm == 97 for s in spans)


def test_unknown_shipped_scenario() -> None:
    with pytest.raises(ScenarioError, match="no shipped scenario"):
        Scenario.load("nope")


EXPECTED_SHIPPED = {
    "demo",
    "eight_gpus",
    "exact",
    "exit_mid_window",
    "flux",
    "idle_context",
    "mig",
    "pid_reuse",
    "sdxl",
    "timeslice",
    "training",
    "upscale",
}


def test_the_library_ships_every_scenario() -> None:
    assert set(shipped_scenarios()) == EXPECTED_SHIPPED


@pytest.mark.parametrize("name", sorted(EXPECTED_SHIPPED))
def test_every_shipped_scenario_runs_under_pynvml(name: str) -> None:
    clock = ManualClock()
    host = SimHost(Scenario.load(name), clock)
    with installed(host):
        pynvml.nvmlInit()
        assert pynvml.nvmlDeviceGetCount() == len(host.scenario.gpus)
        clock.advance(120)
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        pynvml.nvmlShutdown()
    assert host.truth()  # something has started within two minutes


def test_demo_finishes_in_about_thirty_minutes() -> None:
    scenario = Scenario.load("demo")
    exits = [p.exit_us for p in scenario.processes]
    assert all(e is not None and e <= 1_800_000_000 for e in exits)
    assert any(not p.env.get("CREDITMETER_ACCOUNT") for p in scenario.processes)
    gpus = [p.gpu for p in scenario.processes]
    assert any(gpus.count(g) >= 2 for g in gpus)  # two processes share a GPU
