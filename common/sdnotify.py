"""Telling systemd how the daemon is doing (sd_notify), without libsystemd.

Both units run with ``Type=notify`` and ``WatchdogSec=``: systemd considers the daemon started
only once it sends ``READY=1``, and restarts it when the watchdog pings stop. Outside systemd
(tests, the demo, a shell) ``NOTIFY_SOCKET`` is unset and every method does nothing, so the
daemons call the notifier unconditionally.

A notification is one datagram of ``KEY=value`` lines on the AF_UNIX socket named by
``NOTIFY_SOCKET``: a path, or ``@name`` for a socket in the abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd; a no-op when not started by systemd.

    Sending never raises: a daemon must not die because its supervisor's socket went away.
    The first failure is logged at WARNING (systemd will then likely kill us on the watchdog,
    and the log says why); later ones at DEBUG so a broken socket cannot flood the journal.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address`` as in ``NOTIFY_SOCKET``; ``watchdog_usec`` as in ``WATCHDOG_USEC``."""
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec
        self._lock = threading.Lock()
        self._warned = False
        self._socket: socket.socket | None = None
        if self._address is not None:
            # One socket for the daemon's lifetime: a watchdog ping then costs one sendto().
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through the environment (``os.environ`` by default).

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is absent or names this process:
        a child that inherited the variables must not believe it is the one being watched.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        return cls(address, _watchdog_usec(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._socket is not None

    def ready(self, status: str = "running") -> bool:
        """Startup finished: systemd marks the unit active and starts ordering units after it."""
        return self.notify(READY="1", STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        """Shutdown began: systemd shows the unit as deactivating while we flush and drain."""
        return self.notify(STOPPING="1", STATUS=status)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping: send at least every ``watchdog_interval_s()`` seconds."""
        return self.notify(WATCHDOG="1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop timeout fires.

        For a shutdown that is making progress but needs longer than ``TimeoutStopSec=``
        (a large outbox to fsync, many streams to drain); repeat it while progress continues.
        """
        return self.notify(EXTEND_TIMEOUT_USEC=str(round(seconds * 1_000_000)))

    def watchdog_timeout_s(self) -> float | None:
        """The watchdog timeout systemd enforces (``WatchdogSec=``), or None when off."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the timeout (as sd_watchdog_enabled(3) advises), or None.

        Half leaves a whole interval of slack for a slow iteration of the main loop.
        """
        timeout_s = self.watchdog_timeout_s()
        return None if timeout_s is None else timeout_s / 2

    def notify(self, **fields: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; True if sent, False if off or failed."""
        if self._socket is None or self._address is None:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(payload.encode(), self._address)
        except OSError as err:
            with self._lock:
                first, self._warned = not self._warned, True
            level = logging.WARNING if first else logging.DEBUG
            log.log(level, "cannot notify systemd at %s: %s", self._display_address(), err)
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _display_address(self) -> str:
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address


def _socket_address(notify_socket: str) -> str | None:
    """The sendto() address for a NOTIFY_SOCKET value; None for a kind we cannot use."""
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]  # Linux abstract namespace
    if notify_socket.startswith("/"):
        return notify_socket
    # e.g. "vsock:…" (systemd ≥ 254 in VMs): not for a service on the host.
    log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract socket", notify_socket)
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    watched_pid = env.get("WATCHDOG_PID")
    if watched_pid and watched_pid.strip() != str(pid):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec_text)
        return None
    return usec if usec > 0 else None
