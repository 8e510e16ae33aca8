"""Fixtures for the collector's tests: a real store (a SQLite file, or PostgreSQL in a fresh
schema), a real server on port 0.

``store`` is SQLite unless a test module parametrizes ``backend`` over ``BACKENDS``
(backends.py): then the same tests run against both stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from creditmeter.collector.server import IngestServer, ServerConfig, create_server
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2_grpc

from .backends import (
    Backend,
    PostgresBackend,
    SQLiteBackend,
    postgres_server,  # noqa: F401  (a fixture: pytest finds it by name)
    postgres_url,  # noqa: F401  (a fixture)
)
from .records import T0_US, AgentChain

NOW_US = T0_US + 86_400_000_000  # the collector's clock in tests: a day after the first record


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(clock_us=lambda: NOW_US)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "collector.db"


@pytest.fixture
def backend(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Backend]:
    """SQLite by default; "postgres" (parametrized, see BACKENDS) gets a fresh schema."""
    chosen: SQLiteBackend | PostgresBackend
    if getattr(request, "param", "sqlite") == "sqlite":
        chosen = SQLiteBackend(db_path, clock_us=lambda: NOW_US)
    else:
        chosen = PostgresBackend(request.getfixturevalue("postgres_url"), clock_us=lambda: NOW_US)
    yield chosen
    chosen.close()  # every store the test opened: no connections outlive the schema


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    opened = backend.open()
    yield opened
    opened.close()


@pytest.fixture
def agent(store: Store) -> AgentChain:
    """An enrolled agent with no records yet."""
    chain = AgentChain("agent-1")
    store.enroll_agent(chain.agent_id, chain.public_key_hex)
    return chain


class RunningServer:
    def __init__(self, server: IngestServer, port: int) -> None:
        self.server = server
        self.port = port
        self.address = f"127.0.0.1:{port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)


def start_server(
    store: Store, verifier: Verifier, config: ServerConfig | None = None
) -> RunningServer:
    server, port = create_server("127.0.0.1:0", store, verifier=verifier, config=config)
    server.start()
    return RunningServer(server, port)


@pytest.fixture
def running(store: Store, verifier: Verifier) -> Iterator[RunningServer]:
    started = start_server(store, verifier)
    yield started
    started.server.stop(grace_s=0)


def ingest_stub(channel: grpc.Channel) -> ingest_pb2_grpc.IngestStub:
    return ingest_pb2_grpc.IngestStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def stub(running: RunningServer) -> Iterator[ingest_pb2_grpc.IngestStub]:
    with running.channel() as channel:
        yield ingest_stub(channel)
