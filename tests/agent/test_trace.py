"""Traces: what the meter saw on a host, recorded, then replayed offline to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from creditmeter.agent.errors import GpuLost
from creditmeter.agent.gpu import Device, DeviceSample
from creditmeter.agent.main import main
from creditmeter.agent.trace import TraceError, open_text, read
from creditmeter.agent.trace_cli import replay_trace, replayed, summary
from creditmeter.simnvml.profiles import profile_names
from creditmeter.simnvml.replay import ReplayNvml

SCENARIOS = Path(__file__).parent.parent.parent / "simnvml" / "scenarios"

FIXTURES = Path(__file__).parent.parent / "fixtures" / "traces"
SHIPPED = sorted(FIXTURES.glob("*.jsonl.gz"))
GPU = Device(0, "GPU-1", "NVIDIA H100", mig_enabled=False)


def scenario_file(tmp_path: Path, profile: str) -> Path:
    path = tmp_path / f"timeslice-{profile}.toml"
    shipped = (SCENARIOS / "timeslice.toml").read_text()
    path.write_text(f'{shipped}\n[driver]\nprofile = "{profile}"\n')
    return path


def trace_host(capsys: pytest.CaptureFixture[str], scenario: Path, out: Path) -> str:
    """Runs ``creditmeter-agent trace`` on the simulated host; returns what it printed."""
    sim = ["--set", "nvml.backend=simulated", "--set", f"nvml.scenario={scenario}"]
    code = main(["trace", "--seconds", "30", "--out", str(out), *sim, "--set", "nvml.speed=100"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.endswith(f"trace: {out}\n")
    return printed.removesuffix(f"trace: {out}\n")


@pytest.mark.parametrize("profile", profile_names())
def test_a_trace_replays_to_what_the_meter_measured_under_every_profile(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, profile: str
) -> None:
    out = tmp_path / "host.jsonl"
    measured = trace_host(capsys, scenario_file(tmp_path, profile), out)
    assert "device busy" in measured and "billed" in measured
    assert main(["replay", str(out)]) == 0
    assert capsys.readouterr().out == measured


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name.removesuffix(".jsonl.gz") for p in SHIPPED])
def test_the_shipped_traces_replay_to_their_recorded_result(path: Path) -> None:
    expected = path.with_name(path.name.removesuffix(".jsonl.gz") + ".txt").read_text()
    assert summary(replay_trace(path)) == expected


# The replay once cut every recorded answer to rows newer than the meter's cursor, padding
# included: on the padded and realistic traces the meter never saw the padding, never left
# that source as the recorded one had, and never asked for the accounting mode.
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name.removesuffix(".jsonl.gz") for p in SHIPPED])
def test_the_shipped_traces_replay_call_for_call(path: Path) -> None:
    assert replayed(path)[1] == ""


def _entries_without(path: Path, out: Path, drop: str, last: bool) -> None:
    """The trace at ``path`` written to ``out`` less one ``drop`` answer (the last one, or
    the first)."""
    with open_text(path, "r") as f:
        lines = f.read().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if json.loads(line).get("f") == drop]
    del lines[hits[-1] if last else hits[0]]
    with open_text(out, "w") as f:
        f.write("".join(lines))


def test_a_trace_recorded_before_graphics_lists_replays_as_a_driver_without_one(
    tmp_path: Path,
) -> None:
    """Agents before graphics process lists recorded none: such a trace answers
    NOT_SUPPORTED to a meter that asks, as a driver without the list would, and replays to
    its result call for call."""
    path = FIXTURES / "timeslice-ideal.jsonl.gz"
    with open_text(path, "r") as f:
        lines = f.read().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("f") != "graphics_processes"]
    assert len(kept) < len(lines)
    older = tmp_path / "older.jsonl.gz"
    with open_text(older, "w") as f:
        f.write("".join(kept))
    assert summary(replay_trace(older)) == path.with_name("timeslice-ideal.txt").read_text()
    assert replayed(older)[1] == ""


def test_a_trace_short_of_an_answer_is_no_reproduction_and_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """As when a newer meter asks for more than the recording one did."""
    short = tmp_path / "short.jsonl.gz"
    _entries_without(FIXTURES / "timeslice-ideal.jsonl.gz", short, "device_samples", last=True)
    assert main(["replay", str(short)]) == 1
    captured = capsys.readouterr()
    assert "device busy" in captured.out  # what it could measure is still shown
    assert captured.err.count("\n") == 1
    assert "not a reproduction" in captured.err
    assert "1 call (device_samples ×1) the trace holds no answer to" in captured.err


def test_answers_never_asked_for_are_no_reproduction_either(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """As when a newer meter asks for less: the recorded accounting-mode answer is one the
    meter reaches only after the padding it drops."""
    path = FIXTURES / "timeslice-padded.jsonl.gz"
    with open_text(path, "r") as f:
        lines = f.read().splitlines(keepends=True)
    extra = [line for line in lines if json.loads(line).get("f") == "accounting_enabled"]
    assert extra
    more = tmp_path / "more.jsonl"
    with open_text(more, "w") as f:
        f.write("".join(lines + extra))
    assert main(["replay", str(more)]) == 1
    err = capsys.readouterr().err
    assert "1 call (accounting_enabled ×1) recorded but never asked for" in err


def test_every_profile_has_a_shipped_trace() -> None:
    assert {p.name.removesuffix(".jsonl.gz").removeprefix("timeslice-") for p in SHIPPED} >= set(
        profile_names()
    )


def test_a_trace_keeps_the_raw_answers_quirks_included(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "padded.jsonl.gz"
    trace_host(capsys, scenario_file(tmp_path, "padded"), out)
    header, entries = read(out)
    assert header["trace"] == 1 and header["driver"]
    rows = [row for e in entries if e.get("f") == "process_samples" and "v" in e for row in e["v"]]
    assert any(row[0] == 0 and row[1] == 0 for row in rows)  # the padding the driver sent
    assert all("t" in e for e in entries if e["k"] in ("nvml", "proc"))


def test_a_meter_asking_from_another_cursor_gets_the_rows_after_it() -> None:
    answer = [[1_000_000, 50], [2_000_000, 60], [3_000_000, 70]]
    entry = {"k": "nvml", "f": "device_samples", "a": ["GPU-1", 0], "t": 1.0, "v": answer}
    nvml = ReplayNvml([entry])
    assert nvml.device_samples(GPU, 1_500_000) == [
        DeviceSample(2_000_000, 60),
        DeviceSample(3_000_000, 70),
    ]
    with pytest.raises(GpuLost, match="no more answers to device_samples GPU-1"):
        nvml.device_samples(GPU, 3_000_000)  # past the end: a gap, never a guess


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "not a creditmeter trace"),
        ('{"trace": 2}\n', "trace version 2"),
        ('{"trace": 1}\nnot json\n', ":2: not JSON"),
        ('{"trace": 1}\n[1]\n', ":2: not a JSON object"),
    ],
)
def test_a_bad_trace_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError, match=problem):
        read(path)
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and "Traceback" not in err


def test_the_daemons_replay_backend_needs_a_trace(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[nvml]\nbackend = "replay"\n')
    key = ["--set", f"agent.state_dir={tmp_path}"]
    assert main(["run", "--config", str(config), *key]) == 1


def test_open_text_writes_what_read_reads(tmp_path: Path) -> None:
    for name in ("t.jsonl", "t.jsonl.gz"):
        with open_text(tmp_path / name, "w") as f:
            f.write(
                json.dumps({"trace": 1}) + "\n" + json.dumps({"k": "cycle", "close": True}) + "\n"
            )
        assert read(tmp_path / name) == ({"trace": 1}, [{"k": "cycle", "close": True}])
