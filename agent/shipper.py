"""The shipper: streams the outbox's records to the collector until they are acknowledged.

One bidirectional stream (``creditmeter.v1.Ingest/Stream``) at a time:

1. send ``Hello{agent_id}``; the collector's first ``Ack`` is the head it has stored, and the
   shipper resumes from it (``_resume`` handles a collector ahead of or behind the outbox);
2. send batches of whole segments (at most ``batch_max`` records, at most
   ``max_in_flight`` batches unacknowledged), the records' bytes exactly as written;
3. persist every ``Ack`` in the outbox, which prunes what it covers.

Per stream, three threads share one condition variable: the caller's thread supervises
(stop, deadlines, acks overdue), gRPC's request thread runs the sender (``_requests``), and a
reader thread takes the acks. The outbox wakes the condition on every append, so a record
leaves as soon as it is durable.

The shipper never gives up. After a failed stream it waits (exponential backoff, full
jitter, capped) and reconnects; a stream that made progress resets the backoff, and a stream
the server ended cleanly (connection recycling) is replaced at once. Refusals an operator
must resolve (UNAUTHENTICATED, INVALID_ARGUMENT, FAILED_PRECONDITION, a hash mismatch, a gap
at the collector) are logged at ERROR and retried all the same, at the capped pace: the
records' bytes cannot change, so they wait in the outbox until someone acts.
RESOURCE_EXHAUSTED (a message too large) halves the batch size for the next streams, down
to one segment per batch.

With ``idle_close_s`` set (the agent's default), a stream lives only while there is
something to deliver: once everything sent is acknowledged and nothing new came for
``idle_close_s``, the shipper half-closes it, and it opens the next one (on the same
channel) when a record is appended. A collector's stream slot is a thread, so a fleet of
agents writing a window every 10 s holds about one slot per hundred agents instead of one
each (issue 13: the limit on streams must fit 10,000 hosts).

Stop the shipper (``run`` returns, then ``drain``) before closing the outbox.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import grpc

from creditmeter.agent.backoff import Backoff
from creditmeter.agent.failure_log import FailureLog
from creditmeter.agent.gpu import Clock, SystemClock
from creditmeter.agent.outbox import AckBeyondHead, AckMismatch, Batch, OutboxError, RecordsGone
from creditmeter.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_BATCH_MAX: Final = 1000  # records; 1000 records of ~300 bytes stay far below 4 MB
DEFAULT_MAX_IN_FLIGHT: Final = 4  # batches sent and not yet acknowledged
DEFAULT_ACK_TIMEOUT_S: Final = 20.0
# A stream that lived this long was healthy even if it had nothing to deliver.
HEALTHY_STREAM_S: Final = 10.0

# A ping a minute notices a dead connection on an idle stream (NAT timeouts, a collector
# host that vanished) within 80 s; under load the ack timeout notices sooner. The collector
# accepts pings every 10 s (grpc.http2.min_recv_ping_interval_without_data_ms in
# collector/server.py); a gRPC server with default settings would close connections that
# ping more often than every 5 minutes ("too_many_pings").
KEEPALIVE_OPTIONS: Final = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)

# Refusals that retrying alone will not fix: someone must enroll, repair or investigate.
_OPERATOR_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)

ChannelFactory = Callable[[], Any]  # returns a grpc.Channel (grpc has no type hints)
# The generated stub is untyped too; naming its type here keeps mypy --strict quiet.
_IngestStub: Final[Callable[[Any], Any]] = ingest_pb2_grpc.IngestStub


def insecure_channel_factory(target: str) -> ChannelFactory:
    """Plain-text channels to ``target`` ("host:port"), with keepalive."""
    return lambda: grpc.insecure_channel(target, options=KEEPALIVE_OPTIONS)


def secure_channel_factory(
    target: str, credentials: Callable[[], Any], server_name: str = ""
) -> ChannelFactory:
    """TLS channels to ``target``, with keepalive. ``credentials()`` (grpc.ChannelCredentials)
    runs for every channel, so certificate files rotated on disk are used from the next
    reconnect on, and one that cannot be read fails that attempt like a network error.
    ``server_name`` overrides the name expected in the collector's certificate."""
    options: tuple[tuple[str, int | str], ...] = KEEPALIVE_OPTIONS
    if server_name:
        options += (("grpc.ssl_target_name_override", server_name),)
    return lambda: grpc.secure_channel(target, credentials(), options=options)


class ShipperOutbox(Protocol):
    """What the shipper uses of ``agent.outbox.Outbox``."""

    @property
    def last_seq(self) -> int: ...

    @property
    def acked_seq(self) -> int: ...

    @property
    def pruned_through(self) -> int: ...

    def depth(self) -> int: ...

    def batch_after(self, acked_seq: int, max_records: int) -> Batch | None: ...

    def ack(self, seq: int, head_hash: bytes) -> int: ...

    def add_append_listener(self, listener: Callable[[int], None]) -> None: ...

    def remove_append_listener(self, listener: Callable[[int], None]) -> None: ...


class ShipperObserver(Protocol):
    """Hooks for metrics; called from the shipper's threads, so they must be quick."""

    def batch_sent(self, records: int) -> None: ...

    def records_acked(self, records: int, oldest_lag_s: float) -> None:
        """``oldest_lag_s``: from the oldest acked record's append to its ack (wall time)."""
        ...

    def stream_ended(self, outcome: str, detail: str) -> None:
        """``outcome``: "recycled", "transient", "operator" or "stopped"."""
        ...


class NullObserver:
    def batch_sent(self, records: int) -> None:
        pass

    def records_acked(self, records: int, oldest_lag_s: float) -> None:
        pass

    def stream_ended(self, outcome: str, detail: str) -> None:
        pass


class _GuardedObserver:
    """A metrics hook that fails is logged, never allowed to stop delivery."""

    def __init__(self, inner: ShipperObserver) -> None:
        self._inner = inner

    def batch_sent(self, records: int) -> None:
        with self._logged():
            self._inner.batch_sent(records)

    def records_acked(self, records: int, oldest_lag_s: float) -> None:
        with self._logged():
            self._inner.records_acked(records, oldest_lag_s)

    def stream_ended(self, outcome: str, detail: str) -> None:
        with self._logged():
            self._inner.stream_ended(outcome, detail)

    @contextlib.contextmanager
    def _logged(self) -> Iterator[None]:
        try:
            yield
        except Exception:
            log.exception("shipper observer failed")


@dataclass(frozen=True, slots=True)
class ShipperStats:
    """Counters since the shipper was created, for export as metrics."""

    batches_sent: int
    records_acked: int
    stream_attempts: int  # streams started (a refused connection counts too)
    reconnects: int  # stream attempts after the first
    last_error: str  # "" until a stream fails
    last_delivery_lag_s: float | None  # oldest record of the last ack: append -> ack
    connected: bool  # a stream is resumed and open now


class _Outcome(enum.Enum):
    STOPPED = "stopped"  # we ended it: stop requested, drained, or drain deadline
    RECYCLED = "recycled"  # the server ended it cleanly
    TRANSIENT = "transient"  # network, collector restart, ack overdue, local I/O
    IDLE = "idle"  # we ended it: everything acknowledged, nothing new for idle_close_s
    OPERATOR = "operator"  # a refusal that needs a human


@dataclass(slots=True)
class _InFlight:
    last_seq: int
    oldest_created_unix_s: float
    sent_mono_s: float


@dataclass(slots=True)
class _Stream:
    """The state of one stream; guarded by the shipper's condition variable."""

    opened_mono_s: float
    call: Any = None
    acked_mono_s: float = 0.0  # the last ack (or the resume): idleness counts from here
    resumed: bool = False
    closing: bool = False  # the sender must stop: the stream is ending
    ended: bool = False  # the reader saw the end of the call
    outcome: _Outcome | None = None
    detail: str = ""
    progressed: bool = False
    sent_through: int = 0
    in_flight: deque[_InFlight] = field(default_factory=deque)

    def finish(self, outcome: _Outcome, detail: str) -> None:
        """Record why the stream ends; the first reason wins (a cancel shows as CANCELLED)."""
        if self.outcome is None:
            self.outcome, self.detail = outcome, detail
        self.closing = True


class Shipper:
    """Delivers the outbox to the collector. ``run`` until stopped, then ``drain``."""

    def __init__(
        self,
        outbox: ShipperOutbox,
        channel_factory: ChannelFactory,
        agent_id: str,
        *,
        batch_max: int = DEFAULT_BATCH_MAX,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        observer: ShipperObserver | None = None,
        idle_close_s: float | None = None,
        record_wall: Callable[[], float] | None = None,
    ) -> None:
        """``clock`` times the shipper's own waits (backoff, acks, idleness): the host's real
        time even on a simulated host. ``record_wall`` is the clock the records' creation
        times come from (a simulated host's own), for the delivery lag; default the
        ``clock``'s wall time."""
        if batch_max < 1 or max_in_flight < 1 or ack_timeout_s <= 0:
            raise ValueError("batch_max, max_in_flight and ack_timeout_s must be positive")
        if idle_close_s is not None and idle_close_s < 0:
            raise ValueError(f"idle_close_s must be >= 0 or None, got {idle_close_s}")
        self._idle_close_s = idle_close_s
        self._failures = FailureLog(log)
        self._resumed_once = False
        self._channel: Any = None  # kept across idle closes; a failed stream drops it
        self._outbox = outbox
        self._channel_factory = channel_factory
        self._agent_id = agent_id
        self._batch_max = batch_max
        self._max_in_flight = max_in_flight
        self._ack_timeout_s = ack_timeout_s
        self._backoff = backoff if backoff is not None else Backoff()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._record_wall = record_wall if record_wall is not None else self._clock.wall
        self._observer = _GuardedObserver(observer if observer is not None else NullObserver())
        self._cond = threading.Condition()
        self._busy = threading.Lock()  # run and drain never overlap
        self._never = threading.Event()  # drain's backoff waits are bounded by its deadline
        self._batches_sent = 0
        self._records_acked = 0
        self._stream_attempts = 0
        self._last_error = ""
        self._last_lag_s: float | None = None
        self._connected = False

    # -- public -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Deliver records until ``stop`` is set; returns promptly after that."""
        with self._exclusive("run"), self._woken_by_appends():
            relay = threading.Thread(
                target=self._relay_stop, args=(stop,), name="shipper-stop", daemon=True
            )
            relay.start()
            try:
                while not stop.is_set():
                    result = self._stream_guarded(stop.is_set, None, drain=False)
                    if stop.is_set():
                        break
                    if result.outcome is _Outcome.IDLE:
                        self._observer.stream_ended(result.outcome.value, result.detail)
                        self._await_records(stop)
                        continue
                    self._clock.wait(stop, self._retry_delay_s(result))
            finally:
                self._drop_channel()
            relay.join()

    def _await_records(self, stop: threading.Event) -> None:
        """After an idle close: wait, holding no stream, until a record waits to be sent."""
        with self._cond:
            while not stop.is_set() and self._outbox.last_seq <= self._outbox.acked_seq:
                self._cond.wait()

    def drain(self, deadline_s: float) -> bool:
        """Try to deliver everything in the outbox before ``deadline_s``.

        ``deadline_s`` is a point in the clock's monotonic time (``time.monotonic()`` for the
        system clock). For shutdown, after ``run`` returned. True when nothing is left.
        """
        with self._exclusive("drain"), self._woken_by_appends():
            while self._outbox.depth() > 0 and self._clock.monotonic() < deadline_s:
                result = self._stream_guarded(lambda: False, deadline_s, drain=True)
                if self._outbox.depth() == 0:
                    break
                delay_s = self._retry_delay_s(result)
                if self._clock.monotonic() + delay_s >= deadline_s:
                    break
                self._clock.wait(self._never, delay_s)
            self._drop_channel()
        left = self._outbox.depth()
        if left:
            log.warning(
                "shutdown: %d records not yet acknowledged stay in the outbox for the next start",
                left,
            )
        return left == 0

    def stats(self) -> ShipperStats:
        with self._cond:
            return ShipperStats(
                batches_sent=self._batches_sent,
                records_acked=self._records_acked,
                stream_attempts=self._stream_attempts,
                reconnects=max(0, self._stream_attempts - 1),
                last_error=self._last_error,
                last_delivery_lag_s=self._last_lag_s,
                connected=self._connected,
            )

    # -- the loop around streams ---------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"Shipper.{what}: the shipper is already running")
        try:
            yield
        finally:
            self._busy.release()

    @contextlib.contextmanager
    def _woken_by_appends(self) -> Iterator[None]:
        self._outbox.add_append_listener(self._on_append)
        try:
            yield
        finally:
            self._outbox.remove_append_listener(self._on_append)

    def _on_append(self, last_seq: int) -> None:
        with self._cond:
            self._cond.notify_all()

    def _relay_stop(self, stop: threading.Event) -> None:
        """Turn ``stop`` into a wake-up of whatever waits on the condition."""
        stop.wait()
        with self._cond:
            self._cond.notify_all()

    def _stream_guarded(
        self, should_stop: Callable[[], bool], deadline_s: float | None, *, drain: bool
    ) -> _Stream:
        """One stream; a bug in it is logged and retried: the shipper never gives up."""
        try:
            return self._stream(should_stop, deadline_s, drain=drain)
        except Exception as exc:
            log.exception("shipper: unexpected error; reconnecting")
            stream = _Stream(opened_mono_s=self._clock.monotonic())
            stream.finish(_Outcome.TRANSIENT, f"internal error: {exc!r}")
            return stream

    def _retry_delay_s(self, stream: _Stream) -> float:
        """How long to wait before the next stream; logs why the last one ended."""
        outcome = stream.outcome or _Outcome.TRANSIENT
        lived_s = self._clock.monotonic() - stream.opened_mono_s
        if stream.progressed or (stream.resumed and lived_s >= HEALTHY_STREAM_S):
            self._backoff.reset()
        if outcome is _Outcome.STOPPED:
            self._observer.stream_ended(outcome.value, stream.detail)
            return 0.0
        if outcome is _Outcome.RECYCLED and stream.resumed:
            self._backoff.reset()
            log.info("%s; reconnecting at once", stream.detail)
            self._observer.stream_ended(outcome.value, stream.detail)
            return 0.0
        delay_s = self._backoff.next_delay_s()
        with self._cond:
            self._last_error = stream.detail
        if outcome is _Outcome.OPERATOR:
            self._failures.failed(
                logging.ERROR,
                f"{outcome.value}: {stream.detail}",
                f"cannot deliver the records of agent {self._agent_id}: {stream.detail}; they "
                f"stay in the outbox ({self._outbox.depth()} waiting) until an operator acts; "
                f"retrying in {delay_s:.1f} s",
            )
        else:
            self._failures.failed(
                logging.WARNING,
                f"{outcome.value}: {stream.detail}",
                f"stream to the collector failed: {stream.detail}; retrying in {delay_s:.1f} s "
                f"(attempt {self._backoff.attempt})",
            )
        self._observer.stream_ended(outcome.value, stream.detail)
        return delay_s

    # -- one stream ----------------------------------------------------------------------------

    def _stream(
        self, should_stop: Callable[[], bool], deadline_s: float | None, *, drain: bool
    ) -> _Stream:
        stream = _Stream(opened_mono_s=self._clock.monotonic())
        if should_stop():
            stream.finish(_Outcome.STOPPED, "stopped")
            return stream
        with self._cond:
            self._stream_attempts += 1
        try:
            channel = self._channel_or_new()
        except Exception as exc:  # e.g. unreadable TLS files: retried like a network error
            stream.finish(_Outcome.TRANSIENT, f"cannot create the channel: {exc}")
            return stream
        try:
            timeout_s = None if deadline_s is None else max(0.0, deadline_s - stream.opened_mono_s)
            call = _IngestStub(channel).Stream(self._requests(stream), timeout=timeout_s)
            with self._cond:
                stream.call = call
            reader = threading.Thread(
                target=self._read, args=(stream, call), name="shipper-acks", daemon=True
            )
            reader.start()
            self._supervise(stream, should_stop, deadline_s, drain=drain)
            reader.join()
        finally:
            if stream.outcome is not _Outcome.IDLE:
                # A failed or recycled stream gets a fresh channel: a new connection (and
                # certificate files read again), perhaps to another collector behind a
                # balancer. An idle close keeps both: the collector has everything.
                with self._cond:
                    self._connected = False
                self._drop_channel()
        return stream

    def _channel_or_new(self) -> Any:
        if self._channel is None:
            self._channel = self._channel_factory()
        return self._channel

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _supervise(
        self,
        stream: _Stream,
        should_stop: Callable[[], bool],
        deadline_s: float | None,
        *,
        drain: bool,
    ) -> None:
        """Wait for the stream to end, or end it: stop, deadline, drained, ack overdue."""
        cancel = False
        with self._cond:
            while not stream.ended:
                now_s = self._clock.monotonic()
                reason = self._reason_to_end(stream, should_stop, deadline_s, now_s, drain=drain)
                if reason is not None:
                    stream.finish(*reason)
                    self._cond.notify_all()
                    cancel = not self._closed_cleanly(stream, should_stop)
                    break
                self._cond.wait(self._wait_s(stream, deadline_s, now_s, drain=drain))
        if cancel:
            stream.call.cancel()  # outside the lock: the reader takes it when the call ends

    def _closed_cleanly(self, stream: _Stream, should_stop: Callable[[], bool]) -> bool:
        """After an idle close (the sender half-closes the requests), wait for the
        collector's end of the call; False (cancel it) when that takes longer than an ack
        may, or the shipper is stopped meanwhile. Called holding the condition."""
        if stream.outcome is not _Outcome.IDLE:
            return False
        due_s = self._clock.monotonic() + self._ack_timeout_s
        while not stream.ended and not should_stop():
            left_s = due_s - self._clock.monotonic()
            if left_s <= 0:
                return False
            self._cond.wait(left_s)
        return stream.ended

    def _reason_to_end(
        self,
        stream: _Stream,
        should_stop: Callable[[], bool],
        deadline_s: float | None,
        now_s: float,
        *,
        drain: bool,
    ) -> tuple[_Outcome, str] | None:
        if stream.closing:  # the sender or the reader gave up (their reason is recorded)
            return _Outcome.TRANSIENT, "stream closed"
        if should_stop():
            return _Outcome.STOPPED, "stopped"
        if deadline_s is not None and now_s >= deadline_s:
            return _Outcome.STOPPED, "drain deadline reached"
        if drain and self._outbox.depth() == 0:
            return _Outcome.STOPPED, "drained"
        due_s = self._ack_due_s(stream)
        if due_s is not None and now_s >= due_s:
            waiting_for = "the resume ack" if not stream.resumed else "an ack"
            return _Outcome.TRANSIENT, f"no answer for {self._ack_timeout_s:.1f} s ({waiting_for})"
        idle_due_s = self._idle_due_s(stream, drain=drain)
        if idle_due_s is not None and now_s >= idle_due_s:
            return _Outcome.IDLE, "idle: everything acknowledged"
        return None

    def _idle_due_s(self, stream: _Stream, *, drain: bool) -> float | None:
        """When the stream may be closed as idle; None while it has work (or never)."""
        if self._idle_close_s is None or drain or not stream.resumed or stream.in_flight:
            return None
        if self._outbox.last_seq > stream.sent_through:
            return None  # a record waits for the sender
        return stream.acked_mono_s + self._idle_close_s

    def _ack_due_s(self, stream: _Stream) -> float | None:
        if not stream.resumed:
            return stream.opened_mono_s + self._ack_timeout_s
        if stream.in_flight:
            return stream.in_flight[0].sent_mono_s + self._ack_timeout_s
        return None

    def _wait_s(
        self, stream: _Stream, deadline_s: float | None, now_s: float, *, drain: bool
    ) -> float | None:
        candidates = (self._ack_due_s(stream), deadline_s, self._idle_due_s(stream, drain=drain))
        due = [t for t in candidates if t is not None]
        return max(0.0, min(due) - now_s) if due else None

    # -- the sender (gRPC's request thread) -----------------------------------------------------

    def _requests(self, stream: _Stream) -> Iterator[ingest_pb2.IngestRequest]:
        yield ingest_pb2.IngestRequest(hello=ingest_pb2.Hello(agent_id=self._agent_id))
        while (batch := self._next_batch(stream)) is not None:
            self._observer.batch_sent(len(batch.records))
            yield ingest_pb2.IngestRequest(
                batch=ingest_pb2.RecordBatch(
                    agent_id=self._agent_id,
                    records=batch.records,
                    signature=batch.signature,
                    span_signature=batch.span_signature,
                )
            )

    def _next_batch(self, stream: _Stream) -> Batch | None:
        """Wait until a batch may go out, take it from the outbox; None ends the requests."""
        with self._cond:
            while not stream.closing and not self._may_send(stream):
                self._cond.wait()
            if stream.closing:
                return None
            after_seq = stream.sent_through
        try:
            batch = self._outbox.batch_after(after_seq, self._batch_max)
        except OutboxError as exc:
            self._give_up(stream, exc)
            return None
        if batch is None:  # cannot happen while the outbox grows only; end cleanly anyway
            self._give_up(stream, OutboxError(f"no records after seq {after_seq}"))
            return None
        with self._cond:
            stream.in_flight.append(
                _InFlight(batch.last_seq, batch.oldest_created_unix_s, self._clock.monotonic())
            )
            stream.sent_through = batch.last_seq
            self._batches_sent += 1
            self._cond.notify_all()  # the supervisor's ack deadline changed
        return batch

    def _may_send(self, stream: _Stream) -> bool:
        return (
            stream.resumed
            and len(stream.in_flight) < self._max_in_flight
            and self._outbox.last_seq > stream.sent_through
        )

    # -- the reader ------------------------------------------------------------------------------

    def _read(self, stream: _Stream, call: Any) -> None:
        try:
            for response in call:
                self._on_ack(stream, response.ack)
        except grpc.RpcError as exc:
            self._ended(stream, self._status_outcome(exc.code()), _status_text(exc))
        except OutboxError as exc:
            self._give_up(stream, exc)
            call.cancel()
        except Exception as exc:  # a bug must not kill the thread silently
            log.exception("shipper: error while reading acks")
            self._ended(stream, _Outcome.TRANSIENT, f"internal error: {exc!r}")
            call.cancel()
        else:
            self._ended(stream, _Outcome.RECYCLED, "the collector ended the stream (OK)")
        finally:
            with self._cond:
                stream.ended = True
                self._cond.notify_all()

    def _status_outcome(self, code: Any) -> _Outcome:
        if code in _OPERATOR_CODES:
            return _Outcome.OPERATOR
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return self._shrink_batches()
        return _Outcome.TRANSIENT

    def _shrink_batches(self) -> _Outcome:
        """RESOURCE_EXHAUSTED: a message too large (or too many streams): send less at once.

        Halving stops at one segment per batch; refused even then, an operator must raise
        the collector's message limit. Until the agent restarts, batches stay small.
        """
        if self._batch_max == 1:
            return _Outcome.OPERATOR
        self._batch_max = max(1, self._batch_max // 2)
        log.warning(
            "collector refused a batch as too large: batches now hold at most %d "
            "records (or one segment)",
            self._batch_max,
        )
        return _Outcome.TRANSIENT

    def _ended(self, stream: _Stream, outcome: _Outcome, detail: str) -> None:
        with self._cond:
            stream.finish(outcome, detail)
            self._cond.notify_all()

    def _give_up(self, stream: _Stream, exc: OutboxError) -> None:
        """End the stream because of our own side: the outbox or the resume check."""
        serious = isinstance(exc, AckMismatch | AckBeyondHead | RecordsGone)
        outcome = _Outcome.OPERATOR if serious else _Outcome.TRANSIENT
        if not serious:
            log.error("shipper: outbox error: %s", exc)
        with self._cond:
            stream.finish(outcome, str(exc))
            self._cond.notify_all()
            call = stream.call
        if call is not None:
            call.cancel()

    def _on_ack(self, stream: _Stream, ack: ingest_pb2.Ack) -> None:
        if not stream.resumed:
            self._resume(stream, ack)
            return
        newly = self._outbox.ack(ack.acked_seq, ack.head_hash)
        with self._cond:
            done = []
            while stream.in_flight and stream.in_flight[0].last_seq <= ack.acked_seq:
                done.append(stream.in_flight.popleft())
            stream.progressed = stream.progressed or newly > 0
            stream.acked_mono_s = self._clock.monotonic()
            self._records_acked += newly
            lag_s = None
            if done and newly:
                lag_s = self._record_wall() - min(d.oldest_created_unix_s for d in done)
                self._last_lag_s = lag_s
            self._cond.notify_all()
        if lag_s is not None:
            self._observer.records_acked(newly, lag_s)

    def _resume(self, stream: _Stream, ack: ingest_pb2.Ack) -> None:
        """Start from the collector's head. Raises the outbox's errors when it cannot."""
        collector_seq = ack.acked_seq
        acked_seq = self._outbox.acked_seq
        if collector_seq >= acked_seq:
            # Verifies the hash; beyond our last seq it raises AckBeyondHead.
            newly = self._outbox.ack(collector_seq, ack.head_hash)
            if newly:
                log.info(
                    "collector already holds records through seq %d: %d acknowledged locally",
                    collector_seq,
                    newly,
                )
        else:
            self._collector_behind(collector_seq, acked_seq, ack.head_hash)
        with self._cond:
            stream.sent_through = collector_seq
            stream.acked_mono_s = self._clock.monotonic()
            stream.resumed = True
            self._connected = True
            self._records_acked += max(0, self._outbox.acked_seq - acked_seq)
            self._cond.notify_all()
        # Streams open every few seconds (idle_close): only the first and the first after a
        # failure are news.
        if self._failures.failing or not self._resumed_once:
            log.info("stream to the collector open, resuming after seq %d", collector_seq)
        else:
            log.debug("stream to the collector open, resuming after seq %d", collector_seq)
        self._resumed_once = True
        self._failures.recovered()

    def _collector_behind(self, collector_seq: int, acked_seq: int, head_hash: bytes) -> None:
        log.error(
            "the collector holds records of agent %s only through seq %d, but it had "
            "acknowledged seq %d: the collector lost committed records",
            self._agent_id,
            collector_seq,
            acked_seq,
        )
        pruned_through = self._outbox.pruned_through
        if collector_seq < pruned_through:
            raise RecordsGone(
                f"unrecoverable gap at the collector: records {collector_seq + 1}.."
                f"{pruned_through} of agent {self._agent_id} were acknowledged and pruned "
                "here; restore them at the collector"
            )
        self._outbox.ack(collector_seq, head_hash)  # verifies the hash; changes nothing
        log.warning("resending records from seq %d, still held in the outbox", collector_seq + 1)


def _status_text(exc: Any) -> str:
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {exc.details() or 'no details'}"
