"""A loopback TCP fault proxy: a real threaded forwarder whose behaviour changes at run time.

The agent connects to the proxy, the proxy to the collector. Every fault acts on real
sockets, so the agent's gRPC stack meets what a bad network does to it:

* ``PASS``: bytes flow both ways as they arrive.
* ``DELAY``: every chunk is held ``delay_s`` before it is passed on, in order (a delay line
  per direction: latency, not a throughput cap).
* ``DROP``: every connection is closed (FIN on both sides); new ones are accepted and
  closed at once.
* ``RESET``: every connection is aborted with an RST on both sides (SO_LINGER 0); new ones
  are accepted and reset at once.
* ``STALL``: nothing is read any more; data piles up in the kernel's buffers and flows on
  when the mode changes back (a stuck middlebox). New connections are accepted and wait.
* ``BLACKHOLE``: everything is read and thrown away, nothing ever answers, nothing is
  closed (a route that died). A connection that lost bytes this way is black-holed for
  good, since its stream can never make sense again; new connections work once the mode
  changes back.
* ``REFUSE``: the listening socket is closed, so connects are refused (the host is up, the
  service is not); it listens again on the same port when the mode changes.

``stats()`` counts what the proxy did, so a test can show that a fault really struck.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import queue
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CHUNK_BYTES = 65536
POLL_S = 0.05  # how soon a pump notices a mode change


class Mode(enum.Enum):
    PASS = "pass"
    DELAY = "delay"
    DROP = "drop"
    RESET = "reset"
    STALL = "stall"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


@dataclass
class ProxyStats:
    accepted: int = 0  # client connections accepted
    upstream_failures: int = 0  # could not connect to the collector
    bytes_up: int = 0  # agent -> collector, delivered
    bytes_down: int = 0  # collector -> agent, delivered
    bytes_discarded: int = 0  # black-holed
    dropped: int = 0  # connections closed by DROP
    reset: int = 0  # connections aborted by RESET
    blackholed: int = 0  # connections that lost bytes to BLACKHOLE
    modes: list[str] = field(default_factory=list)  # every mode set, in order


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.holed = False  # lost bytes to a black hole: discard forever
        self.closed = threading.Event()
        self._close_lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._run, name="proxy-link", daemon=True).start()

    def _run(self) -> None:
        if not self._connect_upstream():
            return
        assert self.upstream is not None
        pumps = [
            _Pump(self, self.client, self.upstream, "up"),
            _Pump(self, self.upstream, self.client, "down"),
        ]
        for pump in pumps:
            pump.start()

    def _connect_upstream(self) -> bool:
        # A connection that arrives during a black hole never reaches the collector.
        if self.proxy.mode is Mode.BLACKHOLE:
            self.mark_holed()
            _Pump(self, self.client, None, "up").start()
            return False
        try:
            self.upstream = socket.create_connection(self.proxy.target, timeout=5.0)
            self.upstream.settimeout(None)
        except OSError:
            self.proxy.count("upstream_failures")
            self.close(reset=False)
            return False
        return True

    def mark_holed(self) -> None:
        if not self.holed:
            self.holed = True
            self.proxy.count("blackholed")

    def close(self, *, reset: bool) -> None:
        """Close both sides, once; ``reset`` aborts them with an RST instead of a FIN."""
        with self._close_lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if reset:
                # SO_LINGER on, 0 s: close() sends RST and drops unsent data.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.proxy.forget(self)


class _Pump:
    """One direction of a link: a reader thread feeding a delay line, a writer thread."""

    def __init__(
        self, link: _Link, source: socket.socket, sink: socket.socket | None, direction: str
    ) -> None:
        self.link = link
        self.source = source
        self.sink = sink
        self.direction = direction
        self.line: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

    def start(self) -> None:
        threading.Thread(target=self._read, name=f"proxy-{self.direction}", daemon=True).start()
        if self.sink is not None:
            threading.Thread(
                target=self._write, name=f"proxy-{self.direction}-w", daemon=True
            ).start()

    def _read(self) -> None:
        proxy, link = self.link.proxy, self.link
        try:
            while not link.closed.is_set():
                mode, delay_s = proxy.mode_and_delay()
                if mode is Mode.STALL and not link.holed:
                    proxy.wait_for_change(mode, POLL_S)
                    continue
                readable, _, _ = select.select([self.source], [], [], POLL_S)
                if not readable:
                    continue
                data = self.source.recv(CHUNK_BYTES)
                if not data:
                    break  # the peer closed its side
                if link.holed or proxy.mode is Mode.BLACKHOLE:
                    link.mark_holed()
                    proxy.count("bytes_discarded", len(data))
                    continue
                self.line.put((time.monotonic() + delay_s, data))
        except (OSError, ValueError):
            pass  # closed under us (DROP, RESET, the peer's RST)
        self.line.put(None)
        if self.sink is None:
            link.close(reset=False)

    def _write(self) -> None:
        assert self.sink is not None
        proxy, link = self.link.proxy, self.link
        try:
            while (item := self.line.get()) is not None:
                due_s, data = item
                wait_s = due_s - time.monotonic()
                if wait_s > 0 and link.closed.wait(wait_s):
                    return
                self.sink.sendall(data)
                proxy.count("bytes_up" if self.direction == "up" else "bytes_down", len(data))
        except OSError:
            pass
        # The source ended: end the whole link, as the collector or agent would see it.
        link.close(reset=False)


class FaultProxy:
    """Listens on 127.0.0.1 (port 0 by default) and forwards to ``target``."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self._cond = threading.Condition()
        self._mode = Mode.PASS
        self._delay_s = 0.0
        self._links: set[_Link] = set()
        self._stats = ProxyStats(modes=[Mode.PASS.value])
        self._stopping = False
        self._listener: socket.socket | None = self._listen(port)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def mode_and_delay(self) -> tuple[Mode, float]:
        with self._cond:
            return self._mode, (self._delay_s if self._mode is Mode.DELAY else 0.0)

    def set_mode(self, mode: Mode, delay_s: float = 0.0) -> None:
        """Switch behaviour now; DROP and RESET act on every open connection at once."""
        with self._cond:
            self._mode = mode
            self._delay_s = delay_s
            self._stats.modes.append(mode.value)
            links = list(self._links)
            self._cond.notify_all()
        if mode in (Mode.DROP, Mode.RESET):
            for link in links:
                link.close(reset=mode is Mode.RESET)
                self.count("reset" if mode is Mode.RESET else "dropped")
        if mode is Mode.REFUSE:
            self._close_listener()
        elif self._listener is None:
            self._listener = self._listen(self.port)

    def stats(self) -> ProxyStats:
        with self._cond:
            return ProxyStats(**{**self._stats.__dict__, "modes": list(self._stats.modes)})

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            links = list(self._links)
            self._cond.notify_all()
        self._close_listener()
        for link in links:
            link.close(reset=False)

    # -- internals ------------------------------------------------------------------------------

    def count(self, name: str, amount: int = 1) -> None:
        with self._cond:
            setattr(self._stats, name, getattr(self._stats, name) + amount)

    def forget(self, link: _Link) -> None:
        with self._cond:
            self._links.discard(link)

    def wait_for_change(self, mode: Mode, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._mode is not mode or self._stopping, timeout_s)

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        with self._cond:
            self._cond.notify_all()  # the acceptor waits for a listener in REFUSE mode
        return listener

    def _close_listener(self) -> None:
        with self._cond:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _accept(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                listener = self._listener
                if listener is None:
                    self._cond.wait(POLL_S)
                    continue
            try:
                readable, _, _ = select.select([listener], [], [], POLL_S)
                if not readable:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.EBADF, errno.EINVAL, None):
                    raise
                continue  # the listener was closed (REFUSE, close)
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        link = _Link(self, client)
        with self._cond:
            self._stats.accepted += 1
            mode = self._mode
            self._links.add(link)
        if mode in (Mode.DROP, Mode.RESET):
            link.close(reset=mode is Mode.RESET)
            self.count("reset" if mode is Mode.RESET else "dropped")
            return
        link.start()
