"""The gRPC side: the Ingest servicer and the server around it. With access.py (the guard
of the Query and admin APIs) and creditmeter.tls (TLS credentials), the only modules that
import grpc.

The servicer is thin: it authenticates the stream, hands each batch to an Ingestor (the
verifier and the store, on this thread or in worker processes) and acknowledges after the
store has committed. Every decision lives in those classes; this module only translates
their errors (CollectorError.status) into gRPC statuses and keeps one bad stream from
affecting any other.

Stream protocol (ingest.proto): the client opens with Hello{agent_id}; the server answers
with an Ack of what it holds for the agent (the resume point); then each RecordBatch is
answered by an Ack once committed. Requests are deserialized here rather than by grpc, so
that malformed bytes end the stream with INVALID_ARGUMENT and a reason, not grpc's
generic INTERNAL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from creditmeter import chain
from creditmeter.collector.access import ApiAccess, ApiAuthenticator, ApiAuthInterceptor, Refusal
from creditmeter.collector.admission import Admission, Ticket
from creditmeter.collector.auth import AllowEnrolledAgents, Authenticator, Peer
from creditmeter.collector.errors import (
    AgentMismatch,
    AgentRevoked,
    BadBatchSignature,
    ChainConflict,
    CollectorError,
    KeyMoved,
    ListenError,
    MalformedMessage,
    StoreCorrupt,
    StoreError,
    TooManyStreams,
    UnknownAgent,
)
from creditmeter.collector.ingest import EnrolledAgent, Ingestor, InProcessIngestor
from creditmeter.collector.periods import iso_text
from creditmeter.collector.store import ChainHead, Store
from creditmeter.collector.telemetry import IngestObserver, NullIngestObserver
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name
# Threads beyond max_streams, so that health checks and refusals of surplus streams are
# still answered when every stream slot is taken.
SPARE_WORKERS = 4
# Status details and log lines quote at most this much of an error's text (percent-encoded
# in the grpc-message trailer, a character may take 12 bytes: 6 KiB at most).
MAX_DETAILS_CHARS = 512


@dataclass(frozen=True)
class ServerConfig:
    # Largest request grpc accepts; larger ones end the stream with RESOURCE_EXHAUSTED.
    # A batch of 1000 typical records is ~250 KB.
    max_message_bytes: int = 4 * 1024 * 1024
    # Each stream holds a worker thread for its lifetime. Agents hold one only while they
    # deliver (they close it once everything is acknowledged): about 2 % of 10,000 agents
    # writing every 10 s at once, so 1024 leaves room for bursts after an outage.
    max_streams: int = 1024
    # Streams not yet past their Hello (admission.py): a pool of their own, a share per
    # address, and a deadline after which they are cancelled.
    max_pending: int = 64
    max_pending_per_peer: int = 8
    hello_timeout_s: float = 10.0
    max_streams_per_agent: int = 4
    # An admitted stream that sends nothing this long is cancelled: its slot is the fleet's.
    stream_idle_timeout_s: float = 60.0
    # After this long, a stream ends cleanly after its next Ack and the agent reconnects:
    # gives load balancers a chance to move it.
    max_stream_age_s: float = 300.0
    # grpc's own connection recycling (GOAWAY), for L4 load balancers; after the grace,
    # streams still open on the connection are cut (the agent resends unacked batches).
    max_connection_age_s: float = 600.0
    connection_age_grace_s: float = 30.0


@dataclass(frozen=True)
class _Hello:
    """A stream's Hello, accepted: who speaks, and where the agent resumes."""

    agent: EnrolledAgent
    head: ChainHead


@dataclass(frozen=True)
class _Batch:
    """A batch of the stream's agent, as parsed and as received."""

    batch: ingest_pb2.RecordBatch
    request: bytes


class IngestServicer:
    """creditmeter.v1.Ingest/Stream over a Store (for Hello), an Ingestor (for batches)
    and an Authenticator."""

    def __init__(
        self,
        store: Store,
        ingestor: Ingestor,
        authenticator: Authenticator,
        config: ServerConfig,
        monotonic: Callable[[], float] = time.monotonic,
        observer: IngestObserver | None = None,
    ) -> None:
        self._store = store
        self._ingestor = ingestor
        self._authenticator = authenticator
        self._config = config
        self._monotonic = monotonic
        self._observer: IngestObserver = observer or NullIngestObserver()
        self._admission = Admission(
            config.max_streams,
            config.max_pending,
            config.max_pending_per_peer,
            config.hello_timeout_s,
            max_per_agent=config.max_streams_per_agent,
        )
        self._draining = threading.Event()
        self._seen_agents: set[str] = set()  # ids enrolled: bounded by the fleet
        self._seen_lock = threading.Lock()

    def rpc_handler(self) -> Any:
        """The generic handler to register with a grpc.Server (requests arrive as bytes)."""
        method = grpc.stream_stream_rpc_method_handler(
            self.Stream,
            request_deserializer=None,
            response_serializer=ingest_pb2.IngestResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": method})

    def admission_counts(self) -> tuple[int, int]:
        return self._admission.counts

    def drain(self) -> None:
        """Ends every stream after its next Ack (shutdown)."""
        self._draining.set()

    def cancel_idle_streams(self) -> None:
        """Cancels the agents' streams silent for longer than the idle timeout."""
        for agent_id in self._admission.idle_streams(self._config.stream_idle_timeout_s):
            log.info(
                "cancelled the stream of agent %s: nothing received for %.0f s",
                agent_id,
                self._config.stream_idle_timeout_s,
            )

    def Stream(  # the RPC's name in ingest.proto
        self, requests: Iterator[bytes], context: Any
    ) -> Iterator[ingest_pb2.IngestResponse]:
        try:
            # Cancelled by a timer unless its Hello comes in time (admission.py).
            ticket = self._admission.arrive(context.peer(), context.cancel)
        except TooManyStreams as exc:
            self._abort(context, exc)
        try:
            self._observer.stream_opened()
            yield from self._serve(requests, context, ticket)
        except CollectorError as exc:
            self._abort(context, exc)
        except grpc.RpcError:
            # The client went away (or grpc refused a message, e.g. too large); the stream
            # is over and there is nobody to tell.
            log.info("stream from %s ended by the transport", context.peer())
        except Exception:
            # A bug costs this stream, never the server; the agent retries.
            log.exception("ingest stream from %s failed", context.peer())
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the collector (logged)")
        finally:
            self._observer.stream_closed()
            ticket.leave()

    def _serve(
        self, requests: Iterator[bytes], context: Any, ticket: Ticket
    ) -> Iterator[ingest_pb2.IngestResponse]:
        started = self._monotonic()
        peer = _peer(context)
        agent: EnrolledAgent | None = None
        head = ChainHead(0, b"")
        for raw in requests:
            ticket.touch()
            item = self._read_request(raw, agent, peer)
            if isinstance(item, _Hello):
                ticket.admit(item.agent.agent_id)  # a slot, only now it is authenticated
                agent, head = item.agent, item.head
                yield _ack(item.head)
                continue
            assert agent is not None
            agent, head = self._ingest(agent, item, head)
            yield _ack(head)  # after commit
            if self._draining.is_set() or self._monotonic() - started >= (
                self._config.max_stream_age_s
            ):
                log.debug("recycling the stream of agent %s", agent.agent_id)
                return

    def _ingest(
        self, agent: EnrolledAgent, item: _Batch, head: ChainHead
    ) -> tuple[EnrolledAgent, ChainHead]:
        """Verifies and commits a batch; ``head`` is the agent's head as this stream last
        saw it, so the records beyond it are the ones newly stored (for the metrics).
        Returns the agent as it now is (its keys, after a rotation) and its new head."""
        started = self._monotonic()
        try:
            new_head = self._ingestor.ingest(agent, item.batch, item.request)
        except (BadBatchSignature, KeyMoved):
            # Signed by a key this stream has not heard of: a rotation stored since its
            # Hello (by this stream's last batch, or another's). Once more with the keys as
            # stored now; a batch that fails again is refused for good.
            fresh = self._enrolled(agent.agent_id)
            if fresh.ring == agent.ring:
                raise
            agent = fresh
            new_head = self._ingestor.ingest(agent, item.batch, item.request)
        received = len(item.batch.records)
        stored = min(received, max(0, new_head.seq - head.seq))
        self._observer.batch_committed(received, stored, self._monotonic() - started)
        return agent, new_head

    def _read_request(self, raw: bytes, agent: EnrolledAgent | None, peer: Peer) -> _Hello | _Batch:
        """What one request asks for, checked as far as that needs no store transaction."""
        request = _parse_request(raw)
        kind = request.WhichOneof("body")
        if kind == "hello":
            if agent is not None:
                raise MalformedMessage("a stream says Hello once", agent_id=agent.agent_id)
            return self._open(request.hello.agent_id, peer)
        if kind == "batch":
            if agent is None:
                raise MalformedMessage("a stream must open with Hello, not a batch")
            if request.batch.agent_id != agent.agent_id:
                raise AgentMismatch(
                    f"batch names agent {request.batch.agent_id!r}, the stream's Hello another",
                    agent_id=agent.agent_id,
                    field="agent_id",
                )
            return _Batch(request.batch, raw)
        raise MalformedMessage("request holds neither a Hello nor a batch")

    def _open(self, agent_id: str, peer: Peer) -> _Hello:
        # Authorized first: a peer that may not speak for the id learns nothing of it, not
        # even whether it is enrolled or revoked (under mutual TLS; without it, every peer
        # may claim every id and only the records' signatures bind them).
        self._authenticator.authorize(agent_id, peer)
        enrolled, head = self._enrolled_with_head(agent_id)
        # Agents open a stream for each delivery, every few seconds each: only an agent's
        # first since this collector started is news.
        with self._seen_lock:
            first = agent_id not in self._seen_agents
            self._seen_agents.add(agent_id)
        log.log(
            logging.INFO if first else logging.DEBUG,
            "agent %s connected from %s; it resumes after seq %d",
            agent_id,
            peer.address,
            head.seq,
        )
        return _Hello(enrolled, head)

    def _enrolled(self, agent_id: str) -> EnrolledAgent:
        return self._enrolled_with_head(agent_id)[0]

    def _enrolled_with_head(self, agent_id: str) -> tuple[EnrolledAgent, ChainHead]:
        """The agent with its keys as stored now, and its stored head. Raises UnknownAgent,
        AgentRevoked, or StoreCorrupt for a stored key that is not one."""
        agent = self._store.get_agent(agent_id)
        if agent is None:
            raise UnknownAgent("is not enrolled", agent_id=agent_id)
        if agent.revoked_at_us is not None:
            raise AgentRevoked(f"was revoked at {iso_text(agent.revoked_at_us)}", agent_id=agent_id)
        try:
            public_key = chain.load_public_key_hex(agent.public_key_hex)
            for _, key_hex in agent.ring.entries:
                chain.load_public_key_hex(key_hex)
        except chain.BadKey as exc:
            raise StoreCorrupt(f"enrolled public key unusable: {exc}", agent_id=agent_id) from exc
        enrolled = EnrolledAgent(agent_id, public_key, agent.public_key_hex, agent.ring)
        return enrolled, agent.head

    def _abort(self, context: Any, error: CollectorError) -> None:
        """Logs why a stream ends and ends it with the error's status (raises)."""
        self._observer.refused(error)
        level = logging.ERROR if isinstance(error, ChainConflict | StoreError) else logging.WARNING
        text = _clipped(str(error))
        log.log(level, "refused stream from %s: %s: %s", context.peer(), type(error).__name__, text)
        context.abort(grpc.StatusCode[error.status.name], text)


class IngestServer:
    """A started-or-stoppable collector server: gRPC, the Ingest servicer, health."""

    def __init__(
        self, server: Any, servicer: IngestServicer, health_servicer: Any, idle_check_s: float
    ) -> None:
        self.grpc_server = server
        self._servicer = servicer
        self._health = health_servicer
        self._idle_check_s = idle_check_s
        self._stopping = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap_idle, name="ingest-idle-streams", daemon=True
        )

    def _reap_idle(self) -> None:
        while not self._stopping.wait(self._idle_check_s):
            self._servicer.cancel_idle_streams()

    def admission_counts(self) -> tuple[int, int]:
        """(streams waiting for their Hello, streams of authenticated agents) now."""
        return self._servicer.admission_counts()

    def start(self) -> None:
        self.grpc_server.start()
        self._reaper.start()
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def set_serving(self, serving: bool) -> None:
        """What health checks answer while running (the store may stop answering and come
        back); ignored once ``stop`` began, which answers NOT_SERVING for good."""
        response = health_pb2.HealthCheckResponse
        status = response.SERVING if serving else response.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self._health.set(service, status)

    def stop(self, grace_s: float) -> None:
        """Ordered shutdown: health says NOT_SERVING, streams end after their next Ack, no
        new RPC is accepted; after ``grace_s`` the remaining ones are cancelled (agents
        resend what was not acknowledged). Returns once the server has stopped; the caller
        closes the store afterwards."""
        self._health.enter_graceful_shutdown()
        self._servicer.drain()
        self._stopping.set()
        self.grpc_server.stop(grace_s).wait()
        if self._reaper.is_alive():
            self._reaper.join()


def create_server(
    addr: str,
    store: Store,
    *,
    verifier: Verifier | None = None,
    ingestor: Ingestor | None = None,
    authenticator: Authenticator | None = None,
    config: ServerConfig | None = None,
    credentials: Any = None,
    observer: IngestObserver | None = None,
    api_auth: ApiAuthenticator | None = None,
    on_api_refused: Refusal = lambda method, error: None,
    extra_handlers: Sequence[Any] = (),
) -> tuple[IngestServer, int]:
    """A collector server bound to ``addr`` ("host:port"; port 0 picks a free one), not yet
    started, and the port it is bound to. ``credentials`` (grpc.ServerCredentials) makes
    it listen with TLS. Raises ListenError when the address cannot be bound.

    Every service on the server other than Ingest and health requires an API credential
    checked by ``api_auth`` (see collector/access.py); without ``api_auth`` those services
    refuse every call. Batches are verified and stored by ``ingestor`` (e.g. a WorkerPool),
    by default on the stream's thread with ``verifier``."""
    config = config or ServerConfig()
    servicer = IngestServicer(
        store,
        ingestor or InProcessIngestor(store, verifier or Verifier()),
        authenticator or AllowEnrolledAgents(),
        config,
        observer=observer,
    )
    workers = config.max_streams + config.max_pending + SPARE_WORKERS
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=_options(config),
        maximum_concurrent_rpcs=workers,
        interceptors=(ApiAuthInterceptor(api_auth or ApiAccess(), on_api_refused),),
    )
    # extra_handlers: further services (Query, Charges), guarded by the API interceptor.
    server.add_generic_rpc_handlers((servicer.rpc_handler(), *extra_handlers))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(addr)
        else:
            port = server.add_secure_port(addr, credentials)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {addr}: {exc}") from exc
    if port == 0:  # older grpc reports failure this way
        raise ListenError(f"cannot listen on {addr}")
    idle_check_s = min(1.0, config.stream_idle_timeout_s / 4)
    return IngestServer(server, servicer, health_servicer, idle_check_s), port


def _options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.connection_age_grace_s * 1000)),
        # Notice agents that vanished without closing their connection.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Let agents keep their (often idle) streams alive with pings of their own.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # A second collector on the same port must fail to start, not share the port.
        ("grpc.so_reuseport", 0),
    ]


def _clipped(text: str) -> str:
    """An error's text as the status details and the log show it. Errors quote what the
    peer sent (an agent id, a label); a megabyte of it would flood the log, and details
    beyond grpc's 16 KiB metadata limit reach the peer as RESOURCE_EXHAUSTED instead of
    the real status."""
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return f"{text[:MAX_DETAILS_CHARS]}… ({len(text) - MAX_DETAILS_CHARS} characters cut)"


def _parse_request(raw: bytes) -> ingest_pb2.IngestRequest:
    try:
        return ingest_pb2.IngestRequest.FromString(raw)
    except DecodeError as exc:
        raise MalformedMessage(f"request is not an IngestRequest ({exc})") from exc


def _peer(context: Any) -> Peer:
    return Peer(context.peer(), dict(context.auth_context()))


def _ack(head: ChainHead) -> ingest_pb2.IngestResponse:
    return ingest_pb2.IngestResponse(ack=ingest_pb2.Ack(acked_seq=head.seq, head_hash=head.hash))
