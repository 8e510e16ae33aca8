"""``creditmeter-collector serve`` as systemd runs it: a real process with NOTIFY_SOCKET on a
real datagram socket, its configuration from collector.toml, /metrics parsed by
prometheus_client, JSON logs on stdout, and an ordered drain on SIGTERM.
"""

from __future__ import annotations

import json
import queue
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from creditmeter.collector.main import main
from creditmeter.v1 import ingest_pb2, ingest_pb2_grpc
from tests.collector.records import AgentChain, batch_request, hello

from .processes import BIN, DEADLINE_S, Daemon, NotifySocket, daemon_env, sample_value, scrape

COLLECTOR_SERIES = (
    "creditmeter_collector_streams",
    "creditmeter_collector_batches",  # counters: the parser drops "_total" from the family
    "creditmeter_collector_records_received",
    "creditmeter_collector_records_ingested",
    "creditmeter_collector_rejects",
    "creditmeter_collector_chain_gaps",
    "creditmeter_collector_chain_forks",
    "creditmeter_collector_store_duration_seconds",
    "creditmeter_collector_store_up",
    "creditmeter_collector_api_refusals",
    "creditmeter_collector_agents_silent",
)


class OpenStream:
    """One Ingest stream whose requests the test sends one at a time."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[ingest_pb2.IngestRequest | None] = queue.Queue()
        stub = ingest_pb2_grpc.IngestStub(channel)  # type: ignore[no-untyped-call]
        self._responses = stub.Stream(iter(self._requests.get, None), timeout=DEADLINE_S)

    def send(self, request: ingest_pb2.IngestRequest) -> int:
        """Sends ``request`` and returns the acked seq it is answered with."""
        self._requests.put(request)
        return int(next(self._responses).ack.acked_seq)

    def finish(self) -> grpc.StatusCode:
        """Ends the requests; how the server ended the stream."""
        self._requests.put(None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


def refused_code(channel: grpc.Channel, requests: list[ingest_pb2.IngestRequest]) -> Any:
    stub = ingest_pb2_grpc.IngestStub(channel)  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Stream(iter(requests), timeout=DEADLINE_S))
    return refused.value.code()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    socket = NotifySocket(tmp_path / "notify")
    yield socket
    socket.close()


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "etc" / "collector.toml"
    config.parent.mkdir()
    config.write_text(
        f"""
[store]
url = "sqlite://{tmp_path / "collector.db"}"

[server]
listen = "127.0.0.1:0"
port_file = "../collector.port"  # relative to this file
grace = "5s"

[metrics]
listen = "127.0.0.1:0"

[log]
format = "json"
"""
    )
    return config


@pytest.mark.slow
def test_collector_daemon_notifies_systemd_exports_metrics_and_drains_on_sigterm(
    tmp_path: Path, notify: NotifySocket, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    daemon = Daemon(
        [str(BIN / "creditmeter-collector"), "serve", "--config", str(config)],
        tmp_path / "collector.log",
        daemon_env(notify, watchdog_usec=1_000_000),
    )
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")  # from the health thread, every 0.5 s
        metrics_port = int(daemon.log_match(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
        port = int((tmp_path / "collector.port").read_text())
        agent, stranger = AgentChain("agent-1"), AgentChain("agent-2")
        for enrolled in (agent, stranger):  # the admin command finds the db in the config
            argv = ["enroll", "--config", str(config), enrolled.agent_id]
            assert main([*argv, enrolled.public_key_hex]) == 0
        capsys.readouterr()

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert refused_code(channel, [hello("nobody")]) == grpc.StatusCode.UNAUTHENTICATED
            stranger.extend(3)  # a gap: records 1 and 2 never sent
            gap = [hello(stranger.agent_id), batch_request(stranger.batch(3, 3))]
            assert refused_code(channel, gap) == grpc.StatusCode.FAILED_PRECONDITION

            stream = OpenStream(channel)
            assert stream.send(hello(agent.agent_id)) == 0
            assert stream.send(batch_request(agent.extend(3))) == 3
            assert stream.send(batch_request(agent.batch(1, 3))) == 3  # a resend
            check_metrics(scrape(metrics_port))

            daemon.proc.send_signal(15)  # SIGTERM, as systemctl stop
            notify.wait_for("STOPPING=1")
            # The open stream may still commit its batch; then the collector ends it.
            assert stream.send(batch_request(agent.extend(2))) == 5
            assert stream.finish() == grpc.StatusCode.OK
        assert daemon.proc.wait(timeout=DEADLINE_S) == 0
    finally:
        daemon.close()
    assert stored_seqs(tmp_path / "collector.db") == [1, 2, 3, 4, 5]
    assert not (tmp_path / "collector.port").exists()
    check_json_logs(daemon.log())


def check_metrics(metrics: dict[str, Any]) -> None:
    missing = [name for name in COLLECTOR_SERIES if name not in metrics]
    assert not missing, missing
    assert sample_value(metrics["creditmeter_collector_streams"]) == 1
    assert sample_value(metrics["creditmeter_collector_batches"], "_total") == 2
    assert sample_value(metrics["creditmeter_collector_records_received"], "_total") == 6
    assert sample_value(metrics["creditmeter_collector_records_ingested"], "_total") == 3
    rejects = metrics["creditmeter_collector_rejects"]
    assert sample_value(rejects, "_total", status="UNAUTHENTICATED", reason="UnknownAgent") == 1
    assert sample_value(rejects, "_total", status="FAILED_PRECONDITION", reason="ChainHole") == 1
    assert sample_value(metrics["creditmeter_collector_chain_gaps"], "_total") == 1
    assert sample_value(metrics["creditmeter_collector_chain_forks"], "_total") == 0
    store = metrics["creditmeter_collector_store_duration_seconds"]
    assert sample_value(store, "_count", operation="ingest") == 2
    assert sample_value(store, "_count", operation="probe") >= 1
    assert sample_value(metrics["creditmeter_collector_store_up"]) == 1
    # agent-2 is enrolled and never delivered a batch (its one was refused): silent.
    assert sample_value(metrics["creditmeter_collector_agents_silent"]) == 1


def stored_seqs(db: Path) -> list[int]:
    with closing(sqlite3.connect(db)) as conn, conn:
        rows = conn.execute("SELECT seq FROM records WHERE agent_id = 'agent-1' ORDER BY seq")
        return [int(seq) for (seq,) in rows]


def check_json_logs(log: str) -> None:
    """Structured logs with levels: every line a JSON object, the last one "stopped"."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert {"INFO", "WARNING"} <= {line["level"] for line in lines}
    assert lines[-1]["msg"] == "stopped"
    assert any(line["msg"].startswith("refused stream") for line in lines)


# -- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[server]\ngrace = -1\n", "collector.toml: server.grace: must be >= 0, got -1"),
        ("[server]\nlisten = 7300\n", "collector.toml: server.listen: expected a string"),
        ('[server]\nlisten = "nowhere"\n', "server.listen: 'nowhere' is not HOST:PORT"),
        ("[sever]\ngrace = 1\n", "sever.grace: unknown key; did you mean server.grace?"),
        ("[tls]\nenabled = true\n", "tls.enabled: true needs tls.cert_file and tls.key_file"),
        ('[tls]\ncert_file = "x.pem"\n', "tls.cert_file: is set but tls.enabled is false"),
        ('[api]\nclients = ["ops"]\n', "api.clients: client certificates need tls.ca_file"),
        ('[metrics]\nlisten = "9465"\n', "metrics.listen: '9465' is not HOST:PORT"),
    ],
)
def test_a_bad_configuration_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(f'[store]\nurl = "sqlite://{tmp_path}/c.db"\n{text}')
    assert main(["serve", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("creditmeter-collector: error: ")
    assert problem in err


def test_flags_override_the_file_and_name_themselves_in_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "collector.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:7300"\n')
    argv = ["serve", "--config", str(config), "--listen", "bad", "--db", "sqlite:///x.db"]
    assert main(argv) == 2
    assert "--listen: server.listen: 'bad' is not HOST:PORT" in capsys.readouterr().err


def test_unusable_tls_files_exit_3_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(
        f'[store]\nurl = "sqlite://{tmp_path}/c.db"\n'
        '[tls]\nenabled = true\ncert_file = "missing.pem"\nkey_file = "missing.key"\n'
    )
    assert main(["serve", "--config", str(config), "--metrics-listen", ""]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"tls.cert_file {tmp_path / 'missing.pem'}: cannot read" in err
