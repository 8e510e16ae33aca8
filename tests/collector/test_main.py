"""The command line: administration commands in-process, the daemon as a real process."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import creditmeter
from creditmeter import chain
from creditmeter.collector.main import DB_ENV, main
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier

from .conftest import NOW_US, ingest_stub
from .records import AgentChain, batch_request, hello

STARTUP_TIMEOUT_S = 30.0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, problem: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith("creditmeter-collector: error: ")
    assert problem in err
    assert "Traceback" not in err


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite://{db_path}"


def test_enroll_and_revoke(capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    key_hex = chain.public_key_hex(chain.generate_key())
    assert run(capsys, "enroll", "--db", db_url, "agent-7", key_hex) == (
        0,
        f"enrolled agent-7 (key {key_hex})\n",
        "",
    )
    assert run(capsys, "enroll", "--db", db_url, "agent-7", key_hex)[0] == 0  # idempotent
    code, _, err = run(capsys, "enroll", "--db", db_url, "agent-7", "ab" * 32)
    assert code == 2
    assert_one_line_error(err, "agent 'agent-7': is already enrolled with another public key")
    assert run(capsys, "revoke", "--db", db_url, "agent-7") == (0, "revoked agent-7\n", "")


def test_the_database_may_come_from_the_environment(
    capsys: pytest.CaptureFixture[str], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DB_ENV, db_url)
    key_hex = chain.public_key_hex(chain.generate_key())
    assert run(capsys, "enroll", "agent-8", key_hex)[0] == 0


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["enroll", "--db", "sqlite:///x.db"], "the following arguments are required"),
        (["enroll", "--db", "sqlite://relative.db", "a", "ab" * 32], "must be absolute"),
        (["audit", "--db", "sqlite:///no/such/dir/x.db"], "does not exist"),
        (["audit", "--db", "postgresql://localhost/cm?bogus=1"], "not a usable PostgreSQL URL"),
        (["audit", "--db", "mysql://x"], "is not sqlite:///absolute/path"),
        (["enroll", "--db", "sqlite:///tmp/x.db", "a b", "ab" * 32], "whitespace"),
        (["report", "--db", "sqlite:///tmp/x.db", "--from", "soon"], "--from 'soon' is not"),
        (["report", "--db", "sqlite:///tmp/x.db", "--format", "xml"], "invalid choice: 'xml'"),
        (["serve", "--db", "sqlite:///tmp/x.db", "--listen", "nowhere"], "is not HOST:PORT"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], problem: str, tmp_path: Path
) -> None:
    # Each run gets its own database path: a shared one such as /tmp/x.db may hold anything.
    argv = [arg.replace("sqlite:///tmp/x.db", f"sqlite://{tmp_path}/x.db") for arg in argv]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert_one_line_error(err, problem)


def test_a_bad_enrollment_is_refused_before_the_database_is_opened(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    not_a_database = tmp_path / "x.db"
    not_a_database.write_bytes(b"garbage")
    url = f"sqlite://{not_a_database}"
    for agent_id, key, problem in (("a b", "ab" * 32, "whitespace"), ("a", "zz", "public key")):
        code, _, err = run(capsys, "enroll", "--db", url, agent_id, key)
        assert code == 2
        assert_one_line_error(err, problem)
    assert not_a_database.read_bytes() == b"garbage"


def test_a_missing_database_is_not_created_by_reading_commands(
    capsys: pytest.CaptureFixture[str], db_path: Path, db_url: str
) -> None:
    for command in ("audit", "report", "revoke"):
        argv = [command, "--db", db_url] + (["agent-1"] if command == "revoke" else [])
        code, _, err = run(capsys, *argv)
        assert code == 3
        assert_one_line_error(err, f"no database at {db_path}")
    assert not db_path.exists()


def test_no_database_at_all_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DB_ENV, raising=False)
    code, _, err = run(capsys, "audit")
    assert code == 2
    assert_one_line_error(err, f"pass --db sqlite:///absolute/path or set {DB_ENV}")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "serve" in out and "report" in out


def fill(store: SQLiteStore) -> AgentChain:
    agent = AgentChain("agent-1")
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    verifier = Verifier(clock_us=lambda: NOW_US)
    store.ingest(agent.agent_id, verifier.verify(agent.extend(4), agent.key.public_key()))
    return agent


def test_report_json_reads_what_was_ingested(
    capsys: pytest.CaptureFixture[str], store: SQLiteStore, db_url: str
) -> None:
    fill(store)
    code, out, err = run(capsys, "report", "--db", db_url, "--format", "json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document["rows"] == [
        {
            "account": "acme",
            "model": "llama-3-70b",
            "busy_seconds": "28.493824",  # 4 × 7.123456
            "requests": 0,
            "credits": "28.493824",
            "records": 4,
            "default_price": True,
        }
    ]
    code, out, _ = run(capsys, "report", "--db", db_url, "--from", "2025-06-16")
    assert code == 0
    assert out.splitlines()[-1].split() == ["TOTAL", "0.000000", "0", "0.000000", "0"]
    code, out, _ = run(capsys, "report", "--db", db_url, "--format", "csv", "--to", "2025-06-16")
    assert out.splitlines()[1] == "acme,llama-3-70b,28.493824,0,28.493824,4,true"


def test_audit_exits_0_when_clean_and_1_with_findings(
    capsys: pytest.CaptureFixture[str], store: SQLiteStore, db_path: Path, db_url: str
) -> None:
    fill(store)
    assert run(capsys, "audit", "--db", db_url) == (
        0,
        "audit: 1 agents, 4 records, 0 findings\n",
        "",
    )
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("DELETE FROM records WHERE seq = 2")
    code, out, _ = run(capsys, "audit", "--db", db_url)
    assert code == 1
    assert out.splitlines()[0] == (
        "agent 'agent-1' seq 3: chain broken: follows seq 1 (seqs 2..2 missing)"
    )
    # The hole, the span signature that covered seq 2, and the hourly, device, GPU usage and
    # monthly device rollups that still count seq 2.
    assert out.splitlines()[-1] == "audit: 1 agents, 3 records, 6 findings"


# -- the daemon ------------------------------------------------------------------------------


def wait_for_port(port_file: Path, process: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if process.poll() is not None:
            raise AssertionError(f"collector exited: {process.communicate()}")
        time.sleep(0.02)  # polling a file another process writes
    raise AssertionError("collector did not write its port file")


@pytest.fixture
def daemon(tmp_path: Path, db_url: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "creditmeter.collector.main",
            "serve",
            "--db",
            db_url,
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--grace-s",
            "1",
            "--metrics-listen",  # off: the default port may be another collector's
            "",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, wait_for_port(port_file, process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_serve_ingests_and_stops_in_order_on_sigterm(
    daemon: tuple[subprocess.Popen[str], int], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    process, port = daemon
    agent = AgentChain("agent-1")
    assert (
        run(capsys, "enroll", "--db", f"sqlite://{db_path}", "agent-1", agent.public_key_hex)[0]
        == 0
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = ingest_stub(channel)
        acks = [
            r.ack.acked_seq
            for r in stub.Stream(
                iter([hello(agent.agent_id), batch_request(agent.extend(3))]), timeout=10
            )
        ]
    assert acks == [0, 3]

    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert not (db_path.parent / "port").exists()
    lines = out.splitlines()
    assert any("INFO creditmeter.collector: collector listening on 127.0.0.1:0" in x for x in lines)
    assert any("agent agent-1 connected" in x for x in lines)
    assert "stopping" in lines[-2] and lines[-1].endswith("stopped")


@pytest.mark.slow
def test_serve_on_a_taken_port_exits_1(
    daemon: tuple[subprocess.Popen[str], int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, port = daemon
    db_url = f"sqlite://{tmp_path / 'other.db'}"
    code, _, err = run(capsys, "serve", "--db", db_url, "--listen", f"127.0.0.1:{port}")
    assert code == 1
    assert_one_line_error(err, f"cannot listen on 127.0.0.1:{port}")


def test_a_second_collector_on_one_sqlite_file_refuses_naming_the_first(
    daemon: tuple[subprocess.Popen[str], int], db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite is one file and one collector: a second `serve` on it (even on another port)
    exits at once, naming the first's pid; commands still run beside it."""
    first, _ = daemon
    code, _, err = run(capsys, "serve", "--db", db_url, "--listen", "127.0.0.1:0")
    assert code == 1
    assert_one_line_error(err, f"another collector (pid {first.pid}) serves")
    assert first.poll() is None  # the first serves on
    assert run(capsys, "report", "--db", db_url)[0] == 0


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, f"creditmeter-collector {creditmeter.__version__}\n")


def test_health_asks_a_running_collector(
    daemon: tuple[subprocess.Popen[str], int], capsys: pytest.CaptureFixture[str]
) -> None:
    _, port = daemon
    code, out, _ = run(capsys, "health", "--config", "/dev/null", "--address", f"127.0.0.1:{port}")
    assert (code, out) == (0, f"127.0.0.1:{port}: SERVING\n")


def test_health_of_nothing_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = run(
        capsys, "health", "--config", "/dev/null", "--address", f"127.0.0.1:{port}"
    )
    assert (code, out) == (1, "")
    assert_one_line_error(err, f"no health answer from 127.0.0.1:{port}: UNAVAILABLE")


def test_repeated_enroll_and_revoke_say_nothing_changed(
    capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    key_hex = chain.public_key_hex(chain.generate_key())
    assert run(capsys, "enroll", "--db", db_url, "gpu-1", key_hex)[:2] == (
        0,
        f"enrolled gpu-1 (key {key_hex})\n",
    )
    assert run(capsys, "enroll", "--db", db_url, "gpu-1", key_hex)[:2] == (
        0,
        "gpu-1 is enrolled with this key already (nothing changed)\n",
    )
    assert run(capsys, "revoke", "--db", db_url, "gpu-1")[:2] == (0, "revoked gpu-1\n")
    code, out, _ = run(capsys, "revoke", "--db", db_url, "gpu-1")
    assert code == 0 and out.startswith("gpu-1 was revoked already, at 20")
    assert out.endswith("Z (nothing changed)\n")
    assert run(capsys, "quarantine", "list", "--db", db_url)[:2] == (0, "nothing in quarantine\n")


def test_a_lost_key_is_replaced_with_a_reason_and_the_audit_notes_it(
    capsys: pytest.CaptureFixture[str], store: SQLiteStore, db_url: str
) -> None:
    fill(store)
    new_hex = chain.public_key_hex(chain.generate_key())
    replace = ["enroll", "--db", db_url, "agent-1", new_hex, "--replace"]
    code, _, err = run(capsys, *replace)
    assert code == 2
    assert_one_line_error(err, "--replace needs --reason")
    code, out, _ = run(capsys, *replace, "--reason", "disk died", "--by", "alice")
    assert (code, out) == (
        0,
        f"replaced the key of agent-1: key {new_hex} signs its records after seq 4; audit "
        "notes the replacement (by alice: disk died)\n",
    )
    code, out, _ = run(capsys, *replace, "--reason", "disk died", "--by", "alice")
    assert (code, out) == (0, "agent-1 signs with this key already (nothing changed)\n")
    code, out, _ = run(capsys, "audit", "--db", db_url)
    assert code == 0
    assert out.splitlines()[0].startswith("note: agent 'agent-1': key replaced by alice at ")
    assert out.splitlines()[-1] == "audit: 1 agents, 4 records, 0 findings"
