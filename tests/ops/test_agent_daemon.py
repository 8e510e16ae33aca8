"""``creditmeter-agent run`` as systemd runs it, on a simulated GPU host: NOTIFY_SOCKET on a
real datagram socket, /metrics parsed by prometheus_client, gRPC health, a GPU lost while
running, the open windows written to the outbox on SIGTERM, and mutual TLS to a real
collector process.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import creditmeter
from creditmeter.agent import keys
from creditmeter.agent.main import main
from creditmeter.agent.outbox import Outbox
from creditmeter.collector.main import main as collector_main
from creditmeter.v1 import usage_pb2

from .certs import SERVER_NAME, Authority
from .processes import (
    BIN,
    DEADLINE_S,
    Daemon,
    NotifySocket,
    daemon_env,
    sample_value,
    scrape,
    wait_until,
)

AGENT_ID = "ops-agent"
STEADY_PID = 2001  # on GPU 0: runs and computes throughout, never exits
# On GPU 1, which falls off the bus from t = 20 s to 30 s (2 to 3 real seconds at 10x).
SCENARIO = """
description = "Two GPUs with one busy process each; GPU 1 is lost for a while."

[host]
name = "sim-ops"
seed = 3

[[gpu]]
product = "H100"
sample_period_us = 200_000
phase_us = 0
ring_periods = 600
sample_reading = "per_period"

[[gpu]]
product = "H100"
sample_period_us = 200_000
phase_us = 0
ring_periods = 600
sample_reading = "per_period"

[[process]]
pid = 2001
gpu = 0
start_s = 0.2
busy = [[0.4, 100000.0, 50]]
env = { CREDITMETER_ACCOUNT = "acme", CREDITMETER_MODEL = "sdxl" }

[[process]]
pid = 2002
gpu = 1
start_s = 0.2
busy = [[0.4, 100000.0, 100]]

[[fault]]
kind = "gpu_lost"
gpu = 1
start_s = 20.0
end_s = 30.0
ring_cleared = true
"""

AGENT_SERIES = (
    "creditmeter_agent_poll_duration_seconds",
    "creditmeter_agent_nvml_errors",  # counters: the parser drops "_total" from the family
    "creditmeter_agent_processes_seen",
    "creditmeter_agent_busy_seconds",
    "creditmeter_agent_outbox_records",
    "creditmeter_agent_outbox_oldest_age_seconds",
    "creditmeter_agent_delivery_lag_seconds",
    "creditmeter_agent_reconnects",
    "creditmeter_agent_gap_seconds",
    "creditmeter_agent_nvml_sessions",
)


def unused_port() -> int:
    """A port nothing listens on (bound a moment ago, then closed): a collector that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify")
    yield receiver
    receiver.close()


def agent_args(state: Path, agent_id: str, settings: dict[str, str]) -> list[str]:
    base = {
        "agent.id": agent_id,
        "agent.state_dir": str(state),
        "nvml.backend": "simulated",
        "nvml.speed": "10",
        "jobs.enabled": "false",
        "metrics.listen": "",
        "collector.backoff_max": "3s",  # real seconds, on a simulated host too
    }
    args = [str(BIN / "creditmeter-agent"), "run"]
    for key, value in {**base, **settings}.items():
        args += ["--set", f"{key}={value}"]
    return args


def health_status(port: int, service: str) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        request = health_pb2.HealthCheckRequest(service=service)
        return stub.Check(request, timeout=DEADLINE_S).status


@pytest.mark.slow
def test_agent_daemon_lifecycle_metrics_health_and_a_lost_gpu(
    tmp_path: Path, notify: NotifySocket
) -> None:
    scenario = tmp_path / "lost.toml"
    scenario.write_text(SCENARIO)
    state = tmp_path / "state"
    state.mkdir()
    keys.generate(state / "signing-key.pem")
    args = agent_args(
        state,
        AGENT_ID,
        {
            "nvml.scenario": str(scenario),
            "meter.window": "1h",  # no window closes by itself: only SIGTERM closes them
            "metrics.listen": "127.0.0.1:0",
            "health.listen": "127.0.0.1:0",
            "collector.address": f"127.0.0.1:{unused_port()}",
            "collector.drain_timeout": "0",
        },
    )
    daemon = Daemon(args, tmp_path / "agent.log", daemon_env(notify, watchdog_usec=1_000_000))
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")  # from the metering loop
        metrics_port = int(daemon.log_match(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
        health_port = int(daemon.log_match(r"gRPC health on 127\.0\.0\.1:(\d+)").group(1))

        daemon.log_match(r"GPU lost .*what its ring does not keep is a gap")
        daemon.log_match(r"GPU is back")  # retried and found again: not a crash
        # The gap is the hole in the ring, known once the GPU is read again.
        wait_until(
            "a GPU_LOST gap in the metrics",
            lambda: _gap_s(scrape(metrics_port), "GAP_REASON_GPU_LOST") > 0,
        )
        metrics = scrape(metrics_port)
        assert daemon.alive()
        check_metrics(metrics)
        assert health_status(health_port, "") == health_pb2.HealthCheckResponse.SERVING
        assert health_status(health_port, "creditmeter.agent.Shipper") == (
            health_pb2.HealthCheckResponse.NOT_SERVING  # the collector is down
        )
        before_stop = sample_value(metrics["creditmeter_agent_outbox_records"])

        assert daemon.terminate() == 0
        notify.wait_for("STOPPING=1")
    finally:
        daemon.close()
    records = outbox_records(state)
    steady = [r for r in records if r.process.pid == STEADY_PID]
    # The steady process neither exited nor reached a window's end: its busy time reached
    # the outbox only because SIGTERM closed the open windows before the agent exited.
    assert len(records) > before_stop
    assert steady and sum(r.busy_us for r in steady) > 0
    assert steady[-1].attribution.account == "acme"
    # agent.host unset: records name the host by its agent id, as enroll and revoke do.
    assert {r.host for r in records} == {AGENT_ID}


def _gap_s(metrics: dict[str, Any], reason: str) -> float:
    series = metrics.get("creditmeter_agent_gap_seconds")
    return sample_value(series, "_total", reason=reason) if series is not None else 0.0


def check_metrics(metrics: dict[str, Any]) -> None:
    missing = [name for name in AGENT_SERIES if name not in metrics]
    assert not missing, missing
    assert sample_value(metrics["creditmeter_agent_poll_duration_seconds"], "_count") > 0
    assert sample_value(metrics["creditmeter_agent_nvml_errors"], "_total", kind="GpuLost") >= 1
    gaps = metrics["creditmeter_agent_gap_seconds"]
    assert sample_value(gaps, "_total", reason="GAP_REASON_GPU_LOST") > 0
    # The lost GPU is looked for in new NVML sessions.
    assert sample_value(metrics["creditmeter_agent_nvml_sessions"], "_total", why="lost") >= 1
    assert sample_value(metrics["creditmeter_agent_processes_seen"], "_total") >= 2
    reconnects = metrics["creditmeter_agent_reconnects"]
    assert sample_value(reconnects, "_total", outcome="transient") >= 1


def outbox_records(state: Path) -> list[usage_pb2.UsageRecord]:
    outbox = Outbox.open(state / "outbox.db", AGENT_ID, keys.load(state / "signing-key.pem"))
    records: list[usage_pb2.UsageRecord] = []
    try:
        after = 0
        while (batch := outbox.batch_after(after, 1000)) is not None:
            records += [usage_pb2.UsageRecord.FromString(data) for data in batch.records]
            after = batch.last_seq
    finally:
        outbox.close()
    return records


# -- mutual TLS between the two daemons -------------------------------------------------------


@pytest.mark.slow
def test_agent_delivers_to_the_collector_over_mutual_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = Authority(tmp_path / "pki")
    server, client = ca.server(), ca.client(AGENT_ID)
    config = tmp_path / "collector.toml"
    config.write_text(
        f"""
[store]
url = "sqlite://{tmp_path / "collector.db"}"
[server]
listen = "127.0.0.1:0"
port_file = "collector.port"
[metrics]
listen = ""
[tls]
enabled = true
ca_file = "{ca.ca_file}"
cert_file = "{server.cert_file}"
key_file = "{server.key_file}"
"""
    )
    state = tmp_path / "state"
    state.mkdir()
    public_hex = keys.generate(state / "signing-key.pem")
    assert collector_main(["enroll", "--config", str(config), AGENT_ID, public_hex]) == 0
    capsys.readouterr()
    env = daemon_env_plain()
    collector = Daemon(
        [str(BIN / "creditmeter-collector"), "serve", "--config", str(config)],
        tmp_path / "collector.log",
        env,
    )
    agent: Daemon | None = None
    try:
        collector.log_match(r"collector listening")
        port = int((tmp_path / "collector.port").read_text())
        tls = {
            "tls.enabled": "true",
            "tls.ca_file": str(ca.ca_file),
            "tls.cert_file": str(client.cert_file),
            "tls.key_file": str(client.key_file),
            "tls.server_name": SERVER_NAME,
        }
        settings = {"nvml.scenario": "exact", "meter.window": "2s", **tls}
        settings["collector.address"] = f"127.0.0.1:{port}"
        settings["metrics.listen"] = "127.0.0.1:0"
        agent = Daemon(agent_args(state, AGENT_ID, settings), tmp_path / "agent.log", env)
        metrics_port = int(agent.log_match(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
        agent.log_match(r"stream to the collector open")
        wait_until("records stored over mutual TLS", lambda: stored(tmp_path) > 0)
        wait_until("an acknowledgement", lambda: delivered(scrape(metrics_port)) > 0)
        metrics = scrape(metrics_port)
        assert sample_value(metrics["creditmeter_agent_busy_seconds"], "_total") > 0
        assert delivered(metrics) > 0
        assert agent.terminate() == 0
        assert collector.terminate() == 0
    finally:
        for daemon in (agent, collector):
            if daemon is not None:
                daemon.close()
    assert "mutual TLS: an agent's certificate CN must be its agent id" in collector.log()
    assert f"agent {AGENT_ID} connected" in collector.log()


def delivered(metrics: dict[str, Any]) -> float:
    """How many acknowledgements the delivery lag histogram has seen."""
    return sample_value(metrics["creditmeter_agent_delivery_lag_seconds"], "_count")


def daemon_env_plain() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        env.pop(name, None)
    return env


def stored(tmp_path: Path) -> int:
    with closing(sqlite3.connect(tmp_path / "collector.db")) as conn, conn:
        count: int = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    return count


# -- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (["tls.cert_file=/etc/a.pem"], "--set: tls.cert_file: set without tls.key_file"),
        (
            ["tls.ca_file=/etc/ca.pem"],
            "--set: tls.ca_file: is set but tls.enabled is false",
        ),
        (["health.listen=9466"], "--set: health.listen: '9466' is not HOST:PORT"),
    ],
)
def test_a_bad_configuration_exits_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], settings: list[str], problem: str
) -> None:
    argv = ["run", "--config", "/dev/null"]
    for setting in settings:
        argv += ["--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err, err


def test_a_value_of_the_wrong_kind_exits_2_naming_the_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--config", "/dev/null", "--set", "tls.enabled=maybe"])
    assert exited.value.code == 2
    assert 'tls.enabled: expected true or false, got "maybe"' in capsys.readouterr().err


@pytest.mark.slow
def test_on_a_fast_simulated_host_the_logged_wait_is_the_real_wait(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """At nvml.speed=30 the log said "retrying in 24.8 s" and the next try came 0.8 s later:
    the shipper waited on the simulated clock. Each try (at debug) states its wait; the next
    one comes no sooner, in real seconds, and warnings do not repeat per try."""
    state = tmp_path / "state"
    state.mkdir()
    keys.generate(state / "signing-key.pem")
    settings = {
        "nvml.scenario": "flux",
        "nvml.speed": "30",
        "collector.address": f"127.0.0.1:{unused_port()}",
        "collector.backoff_max": "1.5s",
        "collector.drain_timeout": "0",
        "log.level": "debug",
        "log.format": "json",
    }
    daemon = Daemon(
        agent_args(state, AGENT_ID, settings),
        tmp_path / "agent.log",
        daemon_env(notify, watchdog_usec=10_000_000),
    )
    try:
        wait_until("six failed tries", lambda: len(failed_tries(daemon.log())) >= 6, 60.0)
    finally:
        daemon.terminate()
    tries = failed_tries(daemon.log())
    for (at_s, wait_s, _), (next_s, _, _) in itertools.pairwise(tries):
        assert next_s - at_s >= wait_s - 0.06, (at_s, wait_s, next_s)  # "%.1f s", ms stamps
    assert [level for _, _, level in tries].count("WARNING") == 1, tries


def failed_tries(log_text: str) -> list[tuple[float, float, str]]:
    """(when, the wait it announced, level) of each "stream to the collector failed" line."""
    tries = []
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        said = re.search(r"stream to the collector failed: .*retrying in ([\d.]+) s", entry["msg"])
        if said is not None:
            moment = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
            tries.append((moment.timestamp(), float(said.group(1)), entry["level"]))
    return tries


@pytest.mark.slow
def test_run_simulate_says_what_it_meters_and_restarts_without_warnings(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """``run --simulate`` needs no other option about the simulator; its first lines say
    the backend, the device count, the agent id and the collector; a restart on the same
    state folder warns about nothing."""
    state = tmp_path / "state"
    state.mkdir()
    keys.generate(state / "signing-key.pem")
    args = [
        str(BIN / "creditmeter-agent"),
        "run",
        "--simulate",
        "--set",
        f"agent.state_dir={state}",
        "--set",
        f"collector.address=127.0.0.1:{unused_port()}",
        "--set",
        "collector.drain_timeout=0",
        "--set",
        "metrics.listen=",
        "--set",
        "jobs.enabled=false",
    ]
    env = daemon_env(notify, watchdog_usec=10_000_000)
    for run in ("first", "second"):
        daemon = Daemon([*args, "--set", f"agent.id={AGENT_ID}"], tmp_path / f"{run}.log", env)
        try:
            daemon.log_match(r"metering as agent ops-agent: ready")
        finally:
            assert daemon.terminate() == 0
        lines = daemon.log().splitlines()
        first = next(line for line in lines if "INFO" in line)
        assert (
            "agent ops-agent: metering 4 GPUs of a SIMULATED host (scenario demo, 1x)" in first
        ), first
        assert "shipping to 127.0.0.1:" in first
        if run == "second":
            warnings = [line for line in lines if " WARNING " in line]
            # The collector is down: the shipper's one line about it is the only warning.
            assert all("stream to the collector failed" in w for w in warnings), warnings


def test_scenarios_lists_every_shipped_host_on_one_line_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("demo ") and "SDXL, FLUX and upscaling" in out[0]
    assert any(line.startswith("mig ") for line in out)
    assert out[-1] == "run one: creditmeter-agent run --simulate NAME (default demo)"


def test_an_unknown_scenario_exits_2_naming_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--simulate", "nosuch", "--set", "agent.state_dir=/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("creditmeter-agent: nvml.scenario: nosuch: no shipped scenario")
    assert "<file>" not in err and "creditmeter-agent scenarios" in err


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "1e9"])
def test_retire_refuses_a_wait_that_is_no_number_of_seconds(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["retire", "--evidence-wait", value])
    assert exited.value.code == 2
    assert f"argument --evidence-wait: {value!r}: " in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"creditmeter-agent {creditmeter.__version__}\n"


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "scenarios" in out


def test_a_reader_that_goes_away_ends_a_command_quietly() -> None:
    """``creditmeter-agent keygen | head -1`` raced into a BrokenPipeError traceback under
    load. The reader's end is closed before the command can write a line."""
    process = subprocess.Popen(
        [str(BIN / "creditmeter-agent"), "scenarios"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141, err
    assert b"Traceback" not in err
