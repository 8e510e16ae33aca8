"""Fixtures for the collector's tests: a real SQLite file, a real server on port 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from creditmeter.collector.server import IngestServer, ServerConfig, create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2_grpc

from .records import T0_US, AgentChain

NOW_US = T0_US + 86_400_000_000  # the collector's clock in tests: a day after the first record


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(clock_us=lambda: NOW_US)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "collector.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(db_path, clock_us=lambda: NOW_US)
    yield opened
    opened.close()


@pytest.fixture
def agent(store: SQLiteStore) -> AgentChain:
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
    store: SQLiteStore, verifier: Verifier, config: ServerConfig | None = None
) -> RunningServer:
    server, port = create_server("127.0.0.1:0", store, verifier=verifier, config=config)
    server.start()
    return RunningServer(server, port)


@pytest.fixture
def running(store: SQLiteStore, verifier: Verifier) -> Iterator[RunningServer]:
    started = start_server(store, verifier)
    yield started
    started.server.stop(grace_s=0)


def ingest_stub(channel: grpc.Channel) -> ingest_pb2_grpc.IngestStub:
    return ingest_pb2_grpc.IngestStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def stub(running: RunningServer) -> Iterator[ingest_pb2_grpc.IngestStub]:
    with running.channel() as channel:
        yield ingest_stub(channel)
