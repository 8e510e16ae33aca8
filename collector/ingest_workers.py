"""Verifying and storing batches in worker processes: how one collector uses several cores.

CPython runs one thread's Python at a time, and ingest is mostly Python: about 7 µs a
record to parse, hash and check it and 6 µs to bind it into SQL (`./dev bench ingest`). In
one process a collector therefore stops near 60,000 records/s on any machine. Here each
worker process has its own verifier and its own connection to the same store, and the
server process only reads requests and acknowledges. Which worker takes a batch does not
matter: new, duplicate or conflicting is decided inside the store's transaction, exactly as
for several collectors on one PostgreSQL (store.first_new_index), and SQLite's writers
take its write lock in turn.

A worker answers one request at a time over its pipe: the server's stream threads take an
idle worker, send it (agent id, enrolled key, request bytes) and wait for a ChainHead or
the CollectorError that refused the batch (both pickle).

Workers ignore SIGINT and SIGTERM, which systemd sends to the whole cgroup: the server
process stops them in order, after its streams have drained, by closing their pipes. A
worker whose server process died (SIGKILL) sees the same end of its pipe and exits after
the transaction in progress; the agent resends what was not acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from creditmeter import chain
from creditmeter.collector.errors import (
    CollectorError,
    MalformedMessage,
    StoreClosed,
    StoreCorrupt,
    StoreError,
)
from creditmeter.collector.ingest import EnrolledAgent
from creditmeter.collector.store import ChainHead, Store
from creditmeter.collector.verifier import KeyRing, Limits, Verifier
from creditmeter.logs import setup_logging
from creditmeter.v1 import ingest_pb2

log = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 60.0  # a worker imports, opens the store and says it is ready
STOP_TIMEOUT_S: Final = 30.0  # a worker finishes the transaction in progress
_MAX_CACHED_KEYS: Final = 100_000  # parsed public keys a worker keeps (one per agent)
_READY: Final = "ready"
# A request: (agent_id, its keys as KeyRing entries, IngestRequest bytes). None asks the
# worker to exit.
_Request = tuple[str, tuple[tuple[int, str], ...], bytes]


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process needs to do the server's work (it shares nothing else)."""

    store_url: str
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    log_format: str = "text"


class WorkerPool:
    """An Ingestor whose batches are verified and stored by ``count`` worker processes."""

    def __init__(self, setup: WorkerSetup, count: int) -> None:
        if count < 1:
            raise ValueError(f"a worker pool needs at least one worker, not {count}")
        self._setup = setup
        self._count = count
        self._context = multiprocessing.get_context("spawn")  # never fork gRPC's threads
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []
        self._closed = threading.Event()

    def start(self) -> None:
        """Starts every worker and waits until each has opened the store. Raises the
        CollectorError a worker could not open the store with (StoreError, ConfigError),
        or StoreError when one did not start in time."""
        try:
            for number in range(1, self._count + 1):
                worker = _Worker(number, self._setup, self._context, self._closed)
                worker.start()  # cleans up after itself when it raises
                self._workers.append(worker)
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise
        log.info("%d ingest worker processes ready", self._count)

    @property
    def pids(self) -> list[int | None]:
        return [worker.pid for worker in self._workers]

    def ingest(
        self, agent: EnrolledAgent, batch: ingest_pb2.RecordBatch, request: bytes
    ) -> ChainHead:
        if self._closed.is_set() or not self._workers:
            raise StoreClosed("no ingest worker is running (the collector is stopping)")
        worker = self._idle.get()
        try:
            if self._closed.is_set():  # closed while this call waited for a worker
                raise StoreClosed("the collector is stopping")
            return worker.call((agent.agent_id, agent.ring.entries, request))
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Stops every worker once its request in progress is answered (waiting at most
        STOP_TIMEOUT_S for it); calls waiting for a worker, and later ones, raise
        StoreClosed. Call after the server stopped taking batches."""
        self._closed.set()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        taken: list[_Worker] = []
        for _ in self._workers:  # each one as it becomes idle: none is mid-request then
            try:
                taken.append(self._idle.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                log.error("an ingest worker is still busy after %s s; killing it", STOP_TIMEOUT_S)
                break
        for worker in self._workers:
            if worker in taken:
                worker.stop()
            else:
                worker.kill()
        for worker in taken:
            self._idle.put(worker)  # wakes the calls waiting for one: they see the pool closed


class _Worker:
    """One worker process and the server's end of its pipe. Used by one thread at a time
    (the pool hands out idle workers)."""

    def __init__(
        self,
        number: int,
        setup: WorkerSetup,
        context: multiprocessing.context.SpawnContext,
        pool_closed: threading.Event,
    ) -> None:
        self.number = number
        self._setup = setup
        self._context = context
        self._pool_closed = pool_closed
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_work,
            args=(theirs, self._setup),
            name=f"creditmeter-ingest-{self.number}",
            daemon=True,
        )
        process.start()
        theirs.close()  # only the child holds it now: its exit is our EOF
        self._process, self._conn = process, ours
        if not ours.poll(START_TIMEOUT_S):
            self.kill()
            raise StoreError(f"ingest worker {self.number} did not start in {START_TIMEOUT_S} s")
        try:
            answer = ours.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise StoreError(
                f"ingest worker {self.number} exited while starting "
                f"(exit code {process.exitcode}); see its log lines above"
            ) from exc
        if isinstance(answer, CollectorError):
            self.kill()
            raise answer

    def call(self, request: _Request) -> ChainHead:
        """Sends one request and returns the worker's answer, raising its error.

        A worker found dead before it is sent the request is replaced and the request sent
        to the new one: nothing happened yet. One that dies while working is replaced too, but
        the batch may or may not be committed: StoreError (UNAVAILABLE) has the agent resend
        it, and the store acknowledges the records it already holds.
        """
        if not self._idle_and_alive():
            log.warning("ingest worker %d was gone; starting a new one", self.number)
            self._replace()
        try:
            self._send(request)
            answer = self._receive()
        except (EOFError, OSError) as exc:
            code = self._process.exitcode if self._process is not None else None
            log.error("ingest worker %d died storing a batch (exit code %s)", self.number, code)
            self._replace()
            raise StoreError(
                f"ingest worker died while storing the batch (exit code {code}); resend it"
            ) from exc
        if isinstance(answer, CollectorError):
            raise answer
        assert isinstance(answer, ChainHead)
        return answer

    def stop(self) -> None:
        conn, process = self._conn, self._process
        if conn is None or process is None:
            return
        with contextlib.suppress(OSError, ValueError):  # already gone
            conn.send(None)
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            log.error(
                "ingest worker %d did not stop in %s s; killing it", self.number, STOP_TIMEOUT_S
            )
        self.kill()

    def _idle_and_alive(self) -> bool:
        """False when the process has exited (or its end of the pipe closed): an idle
        worker never writes unasked, so anything readable now is the end of the pipe."""
        if self._process is None or self._conn is None or not self._process.is_alive():
            return False
        try:
            return not self._conn.poll(0)
        except (OSError, ValueError):
            return False

    def _send(self, request: _Request) -> None:
        if self._conn is None:
            raise StoreClosed("ingest worker stopped")
        self._conn.send(request)

    def _receive(self) -> object:
        assert self._conn is not None
        return self._conn.recv()

    def _replace(self) -> None:
        self.kill()
        if self._pool_closed.is_set():  # killed by close(): no new worker
            raise StoreClosed("the collector is stopping")
        self.start()

    def kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None


# -- the worker process ----------------------------------------------------------------------


def _work(conn: Connection, setup: WorkerSetup) -> None:
    """A worker's life: open the store, say ready, answer requests until the pipe ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(setup.log_level, setup.log_format)
    # Imported here: the server process that only starts workers need not load the stores.
    from creditmeter.collector.stores import open_store

    try:
        store = open_store(setup.store_url, create=False, migrate=False, pool_size=1)
    except CollectorError as exc:
        conn.send(exc)
        return
    try:
        conn.send(_READY)
        _serve(conn, _BatchWork(store, Verifier(setup.limits)))
    finally:
        store.close()


def _serve(conn: Connection, work: _BatchWork) -> None:
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the server process is gone
        if request is None:
            return
        try:
            conn.send(work.answer(*request))
        except (BrokenPipeError, OSError):
            return


class _BatchWork:
    """Verifies and stores one request, answering a ChainHead or the CollectorError."""

    def __init__(self, store: Store, verifier: Verifier) -> None:
        self._store = store
        self._verifier = verifier
        self._keys: dict[str, Ed25519PublicKey] = {}

    def answer(self, agent_id: str, keys: tuple[tuple[int, str], ...], request: bytes) -> object:
        try:
            batch = _batch(request)
            capacity = self._store.capacity(agent_id)
            for _, key_hex in keys:
                self._key(agent_id, key_hex)  # a corrupt stored key: StoreCorrupt
            ring = KeyRing(keys)
            return self._store.ingest(agent_id, self._verifier.verify(batch, ring, capacity))
        except CollectorError as exc:
            exc.__traceback__ = None  # the answer crosses a pipe; the stack stays here
            return exc
        except Exception:
            log.exception("ingest worker failed on a batch of agent %s", agent_id)
            return CollectorError("internal error in an ingest worker (logged)", agent_id=agent_id)

    def _key(self, agent_id: str, public_key_hex: str) -> Ed25519PublicKey:
        key = self._keys.get(public_key_hex)
        if key is None:
            try:
                key = chain.load_public_key_hex(public_key_hex)
            except chain.BadKey as exc:
                raise StoreCorrupt(
                    f"enrolled public key unusable: {exc}", agent_id=agent_id
                ) from exc
            if len(self._keys) >= _MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[public_key_hex] = key
        return key


def _batch(request: bytes) -> ingest_pb2.RecordBatch:
    try:
        return ingest_pb2.IngestRequest.FromString(request).batch
    except DecodeError as exc:  # the server parsed it already: only a bug gets here
        raise MalformedMessage(f"request is not an IngestRequest ({exc})") from exc
