"""Real daemons for end-to-end tests: the collector and the agent as separate processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port that was free a moment ago: daemons restarted on it keep one address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_s(anchor: Path) -> float:
    """Simulated seconds since the clock anchored in ``anchor`` started."""
    from creditmeter.simnvml.anchor import AnchorFile

    a = AnchorFile(anchor).read()
    if a.monotonic_ns is None:
        return 0.0  # held
    return (time.monotonic_ns() - a.monotonic_ns) / 1e9 * a.speed


def stored_head(db: Path, agent_id: str) -> int:
    """The head seq a SQLite collector holds for ``agent_id`` (0 before its first batch)."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT head_seq FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
    return int(row[0]) if row else 0


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """One daemon process with its log; restartable with the same arguments."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        # As the systemd units run them: SIGABRT writes every thread's stack to the log.
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as a crash or an OOM kill."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, and its exit status. A daemon still running ``timeout_s`` later is
        aborted, and the failure shows where each of its threads was."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._abort()
            raise AssertionError(
                f"{self.name} was still running {timeout_s} s after SIGTERM; its log ends "
                f"with its threads' stacks:\n{self.log()[-12000:]}"
            ) from None

    def _abort(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGABRT)  # faulthandler dumps, then the process dies
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Collector(Daemon):
    def __init__(self, work: Path, port: int, db: str | None = None) -> None:
        self.db = db or f"sqlite:///{work / 'collector.db'}"
        self.port = port
        self.port_file = work / f"collector-{port}.port"
        args = [str(BIN / "creditmeter-collector"), "serve", "--db", self.db]
        args += ["--listen", f"127.0.0.1:{port}", "--port-file", str(self.port_file)]
        args += ["--grace-s", "2", "--metrics-listen", ""]
        super().__init__(f"collector-{port}", args, work)

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        super().start()
        wait_for(f"{self.name} to listen", self._listening)

    def _listening(self) -> bool:
        if not self.alive():
            raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
        return self.port_file.exists() and bool(self.port_file.read_text().strip())

    def cli(self, *args: str) -> str:
        command = [str(BIN / "creditmeter-collector"), args[0], "--db", self.db, *args[1:]]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: {done.returncode}\n{done.stderr}")
        return done.stdout

    def report(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("report", "--format", "json")))


def make_key(work: Path, agent_id: str, collector: Collector) -> Path:
    """A signing key for ``agent_id``, enrolled at the collector."""
    state = work / agent_id
    state.mkdir(parents=True, exist_ok=True)
    key = state / "signing-key.pem"
    out = subprocess.run(
        [str(BIN / "creditmeter-agent"), "keygen", "--key", str(key), "--agent-id", agent_id],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    collector.cli("enroll", agent_id, out.split()[0])
    return state


class Agent(Daemon):
    """``creditmeter-agent run``; with ``timeline``, the anchor of a held simulated
    timeline that its first start releases once the agent is metering."""

    def __init__(
        self, state: Path, agent_id: str, settings: dict[str, str], timeline: Path | None = None
    ) -> None:
        self.timeline = timeline
        self._log_offset = 0  # where the log of the latest start begins
        base = {
            "agent.id": agent_id,
            "agent.state_dir": str(state),
            "nvml.backend": "simulated",
            "metrics.listen": "",
            "jobs.enabled": "false",
            "collector.backoff_max": "2s",
        }
        args = [str(BIN / "creditmeter-agent"), "run"]
        for key, value in {**base, **settings}.items():
            args += ["--set", f"{key}={value}"]
        super().__init__(agent_id, args, state)

    def start(self) -> None:
        """Starts the agent. A held timeline starts once it is metering: the simulated work
        then begins with the agent up, however long its start-up took (a first start bills
        nothing that ran before it, by design)."""
        # A start killed while importing logs nothing: what this start logged is what
        # follows this offset, not the n-th line of the log.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start()
        if self.timeline is None:
            return
        from creditmeter.simnvml.anchor import AnchorFile

        anchor = AnchorFile(self.timeline)
        if anchor.read().monotonic_ns is None:
            self.wait_metering()
            anchor.release()

    def wait_metering(self, timeout_s: float = 60.0) -> None:
        """Until this start of the agent says it is metering."""

        def metering() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return b"metering as agent" in log.read()

        wait_for(f"{self.name} to meter", metering, timeout_s)


# A GPU whose every sample is exact: 0.2 s periods on a fixed grid, each period read as it
# is, and a ring long enough to ride out agent restarts.
EXACT_GPU = """
[[gpu]]
product = "H100"
sample_period_us = 200_000
phase_us = 0
ring_periods = 3000
sample_reading = "per_period"
"""


def simulated_agent(
    work: Path,
    agent_id: str,
    collector: Collector,
    scenario_file: Path,
    speed: float,
    settings: dict[str, str],
) -> Agent:
    """An agent enrolled at ``collector``, metering ``scenario_file`` on a clock anchored in
    ``work`` (restarts see the same timeline), held at t=0 until its first start is
    metering; not started."""
    from creditmeter.simnvml.anchor import AnchorFile

    state = make_key(work, agent_id, collector)
    anchor = work / "clock.anchor"
    AnchorFile(anchor).open_or_create(speed, None, held=True)
    base = {
        "nvml.scenario": str(scenario_file),
        "nvml.speed": str(speed),
        "nvml.clock_anchor": str(anchor),
        "collector.address": f"127.0.0.1:{collector.port}",
    }
    return Agent(state, agent_id, {**base, **settings}, timeline=anchor)


def environment_without_notify() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env
