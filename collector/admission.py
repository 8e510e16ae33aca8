"""Who gets one of the collector's stream slots, and when.

A stream holds a server thread for as long as it is open, so slots are what an attacker
would take. Before its Hello a stream is nobody: it waits in a small pool of its own
(``max_pending``, at most ``max_pending_per_peer`` from one address) for at most
``hello_timeout_s``, then it is cancelled. Only an authenticated Hello moves it to one of
the ``max_streams`` agent slots, at most ``max_per_agent`` for one agent id (an agent runs
one stream; a second is a reconnect overlapping the old one, more are someone else). Streams
that never speak can then hold only the pending pool, for seconds at a time, and never an
agent's slot.

An admitted stream that sends nothing for ``idle_timeout_s`` is cancelled too
(``idle_streams``): agents close their own streams once everything is acknowledged, so a
silent one is a stuck or older agent holding a slot the rest of the fleet needs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from creditmeter.collector.errors import TooManyStreams

Timer = Callable[[float, Callable[[], None]], Callable[[], None]]  # (s, fn) -> cancel


def thread_timer(seconds: float, fn: Callable[[], None]) -> Callable[[], None]:
    timer = threading.Timer(seconds, fn)
    timer.daemon = True
    timer.start()
    return timer.cancel


def peer_host(address: str) -> str:
    """The host part of a gRPC peer ("ipv4:10.0.0.7:53412" -> "ipv4:10.0.0.7"): one
    machine opening many connections counts once, whatever its source ports."""
    return address.rsplit(":", 1)[0] if address.count(":") >= 2 else address


class Admission:
    """Counts pending and admitted streams; thread-safe."""

    def __init__(
        self,
        max_streams: int,
        max_pending: int,
        max_pending_per_peer: int,
        hello_timeout_s: float,
        timer: Timer = thread_timer,
        max_per_agent: int = 4,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_streams = max_streams
        self.max_per_agent = max_per_agent
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self.hello_timeout_s = hello_timeout_s
        self._timer = timer
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._streams: dict[Ticket, Callable[[], None]] = {}  # admitted -> cancel
        self._pending: Counter[str] = Counter()
        self._admitted = 0
        self._per_agent: Counter[str] = Counter()

    def arrive(self, peer: str, cancel_stream: Callable[[], None]) -> Ticket:
        """A new stream from ``peer``: pending until its Hello. Raises TooManyStreams when
        the pending pool, or this peer's share of it, is full."""
        host = peer_host(peer)
        with self._lock:
            if sum(self._pending.values()) >= self.max_pending:
                raise TooManyStreams(
                    f"collector has {self.max_pending} streams waiting for their Hello"
                )
            if self._pending[host] >= self.max_pending_per_peer:
                raise TooManyStreams(
                    f"{host} has {self.max_pending_per_peer} streams waiting for their Hello"
                )
            self._pending[host] += 1
        stop_timer = self._timer(self.hello_timeout_s, cancel_stream)
        return Ticket(self, host, stop_timer, cancel_stream)

    def idle_streams(self, idle_timeout_s: float) -> list[str]:
        """Cancels the admitted streams that received nothing for ``idle_timeout_s``;
        returns their agents' ids (for the log)."""
        now_s = self._monotonic()
        with self._lock:
            idle = [t for t in self._streams if now_s - t.active_s >= idle_timeout_s]
            cancels = [self._streams.pop(t) for t in idle]
        for cancel in cancels:  # outside the lock: grpc may run callbacks that leave()
            cancel()
        return [t.agent_id or "" for t in idle]

    def _admit(self, ticket: Ticket, host: str, agent_id: str) -> None:
        with self._lock:
            if self._admitted >= self.max_streams:
                raise TooManyStreams(f"collector serves its limit of {self.max_streams} streams")
            if self._per_agent[agent_id] >= self.max_per_agent:
                raise TooManyStreams(
                    f"agent {agent_id!r} already has {self.max_per_agent} streams open"
                )
            _decrement(self._pending, host)
            self._admitted += 1
            self._per_agent[agent_id] += 1
            self._streams[ticket] = ticket.cancel_stream

    def _leave(self, ticket: Ticket, host: str, agent_id: str | None) -> None:
        with self._lock:
            self._streams.pop(ticket, None)
            if agent_id is not None:
                self._admitted -= 1
                _decrement(self._per_agent, agent_id)
            else:
                _decrement(self._pending, host)

    @property
    def counts(self) -> tuple[int, int]:
        """(pending, admitted) now."""
        with self._lock:
            return sum(self._pending.values()), self._admitted


def _decrement(counts: Counter[str], key: str) -> None:
    """One less of ``key``, forgotten at 0: addresses and agents come and go."""
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


class Ticket:
    """One stream's place: pending, then admitted after its Hello, then gone."""

    def __init__(
        self,
        admission: Admission,
        host: str,
        stop_timer: Callable[[], None],
        cancel_stream: Callable[[], None],
    ) -> None:
        self._admission = admission
        self._host = host
        self._stop_timer = stop_timer
        self.cancel_stream = cancel_stream
        self._agent_id: str | None = None  # set once admitted
        self._left = False
        self.active_s = admission._monotonic()  # the last request received

    @property
    def agent_id(self) -> str | None:
        return self._agent_id

    def touch(self) -> None:
        """A request arrived: the stream is not idle."""
        self.active_s = self._admission._monotonic()

    def admit(self, agent_id: str) -> None:
        """The stream's Hello for ``agent_id`` was accepted: it takes an agent slot (or
        TooManyStreams, and it stays pending until it leaves)."""
        self._stop_timer()
        self.touch()
        self._admission._admit(self, self._host, agent_id)
        self._agent_id = agent_id

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        self._stop_timer()
        self._admission._leave(self, self._host, self._agent_id)
