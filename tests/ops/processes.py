"""Helpers to run a daemon as a real process and watch it as systemd and Prometheus would.

``NotifySocket`` is a real AF_UNIX datagram socket standing in for systemd's: the daemon gets
its path in ``NOTIFY_SOCKET`` and every datagram it sends is kept. Waits are bounded by
monotonic deadlines; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent
DEADLINE_S = 30.0  # generous: two cores shared with other test runs
POLL_S = 0.02  # how often a file another process writes is looked at


def wait_until(what: str, ready: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


class NotifySocket:
    """Receives sd_notify datagrams in a thread; ``wait_for`` blocks until one arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)  # lets the reader notice close()
        self._cond = threading.Condition()
        self.messages: list[str] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def fields(self) -> list[str]:
        """Every KEY=value line received so far, in order."""
        with self._cond:
            return [line for message in self.messages for line in message.split("\n")]

    def wait_for(self, line: str, timeout_s: float = DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while line not in [f for m in self.messages for f in m.split("\n")]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {line} within {timeout_s} s; got {self.messages}")
                self._cond.wait(left)

    def close(self) -> None:
        self._open = False
        self._sock.close()
        self._thread.join()


class Daemon:
    """One daemon process, its output in a file; stopped (killed if need be) at ``close``."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_match(self, pattern: str, timeout_s: float = DEADLINE_S) -> re.Match[str]:
        """The first match of ``pattern`` in the log, once it appears."""
        found: list[re.Match[str]] = []

        def appeared() -> bool:
            match = re.search(pattern, self.log())
            if match is not None:
                found.append(match)
                return True
            if not self.alive():
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            return False

        wait_until(f"{pattern!r} in {self.log_path.name}", appeared, timeout_s)
        return found[0]

    def terminate(self, timeout_s: float = DEADLINE_S) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()


def daemon_env(notify: NotifySocket, watchdog_usec: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec))
    env.pop("WATCHDOG_PID", None)  # as systemd does for the main process: it is ours
    env.pop("JOURNAL_STREAM", None)
    return env


def scrape(port: int) -> dict[str, Metric]:
    """GET /metrics, parsed by prometheus_client's own parser: name -> family."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=DEADLINE_S) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(family: Metric, suffix: str = "", **labels: str) -> float:
    """The value of the family's sample ``name + suffix`` with exactly ``labels``; 0 if absent
    (a labelled counter has no sample until its first increment)."""
    for sample in family.samples:
        if sample.name == family.name + suffix and sample.labels == labels:
            return float(sample.value)
    return 0.0


def families_named(metrics: dict[str, Metric], prefix: str) -> Iterator[str]:
    return (name for name in metrics if name.startswith(prefix))
