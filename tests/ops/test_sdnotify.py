"""sd_notify: the exact datagrams systemd receives, and silence outside systemd."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from creditmeter.sdnotify import Notifier

RECEIVE_DEADLINE_S = 5.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(RECEIVE_DEADLINE_S)  # a missing datagram fails the test, not hangs it
    yield sock, str(path)
    sock.close()


@pytest.fixture
def notifier_for() -> Iterator[list[Notifier]]:
    made: list[Notifier] = []
    yield made
    for notifier in made:
        notifier.close()


def _notifier(made: list[Notifier], environ: dict[str, str]) -> Notifier:
    notifier = Notifier.from_environment(environ)
    made.append(notifier)
    return notifier


def test_each_call_sends_its_exact_datagram(
    receiver: tuple[socket.socket, str], notifier_for: list[Notifier]
) -> None:
    sock, address = receiver
    notifier = _notifier(notifier_for, {"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready("metering 4 GPUs")
    assert sock.recv(4096) == b"READY=1\nSTATUS=metering 4 GPUs"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("collector unreachable, 120 records queued")
    assert sock.recv(4096) == b"STATUS=collector unreachable, 120 records queued"
    assert notifier.extend_timeout(12.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=12500000"
    assert notifier.stopping("flushing windows")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=flushing windows"


def test_abstract_namespace_socket(notifier_for: list[Notifier]) -> None:
    name = f"creditmeter-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECEIVE_DEADLINE_S)
        notifier = _notifier(notifier_for, {"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1\nSTATUS=running"


def test_reads_os_environ_by_default(
    receiver: tuple[socket.socket, str],
    notifier_for: list[Notifier],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock, address = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_environment()
    notifier_for.append(notifier)
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_does_nothing_outside_systemd(notifier_for: list[Notifier]) -> None:
    notifier = _notifier(notifier_for, {})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert notifier.watchdog_interval_s() is None


def test_unusable_address_kind_is_ignored(
    notifier_for: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = _notifier(notifier_for, {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert "vsock:2:1234" in caplog.text


def test_send_failure_is_returned_and_warned_once(
    tmp_path: Path, notifier_for: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    gone = tmp_path / "nobody-listens"
    notifier = _notifier(notifier_for, {"NOTIFY_SOCKET": str(gone)})
    with caplog.at_level(logging.DEBUG, logger="creditmeter.sdnotify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.watchdog()
    levels = [r.levelno for r in caplog.records if r.name == "creditmeter.sdnotify"]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert str(gone) in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("environ", "timeout_s", "interval_s"),
    [
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0, 15.0),
        ({"WATCHDOG_USEC": "30000000"}, 30.0, 15.0),  # no PID given: it is ours
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None, None),
        ({"WATCHDOG_USEC": "soon"}, None, None),
        ({"WATCHDOG_USEC": "0"}, None, None),
        ({}, None, None),
    ],
)
def test_watchdog_interval_from_environment(
    environ: dict[str, str],
    timeout_s: float | None,
    interval_s: float | None,
    notifier_for: list[Notifier],
) -> None:
    notifier = _notifier(notifier_for, environ)
    assert notifier.watchdog_timeout_s() == timeout_s
    assert notifier.watchdog_interval_s() == interval_s
