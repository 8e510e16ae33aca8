"""An adversary at the collector's Ingest port: raw bytes on a real stream, and a referee
that checks, after every attempt, that nothing was stored and that the collector still
serves an honest agent.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from creditmeter import chain
from creditmeter.v1 import ingest_pb2
from tests.collector.records import AgentChain, batch_request, hello
from tests.e2e.daemons import Collector

METHOD = "/creditmeter.v1.Ingest/Stream"
STREAM_TIMEOUT_S = 20.0
# What ends a stream because the collector itself failed: never acceptable.
CRASH_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


@dataclass(frozen=True)
class Outcome:
    acks: list[tuple[int, bytes]]
    code: grpc.StatusCode
    details: str


def request_bytes(*requests: ingest_pb2.IngestRequest) -> list[bytes]:
    return [r.SerializeToString() for r in requests]


class RawClient:
    """Sends serialized requests as they are: grpc does not check them on our side."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self._stream = self.channel.stream_stream(
            METHOD,
            request_serializer=lambda b: b,
            response_deserializer=ingest_pb2.IngestResponse.FromString,
        )

    def exchange(self, requests: Sequence[bytes]) -> Outcome:
        acks = []
        try:
            for response in self._stream(iter(list(requests)), timeout=STREAM_TIMEOUT_S):
                acks.append((response.ack.acked_seq, response.ack.head_hash))
        except grpc.RpcError as exc:
            return Outcome(acks, exc.code(), exc.details() or "")
        return Outcome(acks, grpc.StatusCode.OK, "")

    def close(self) -> None:
        self.channel.close()


def stored_rows(db_path: Path) -> int:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        count: int = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    return count


@dataclass
class Referee:
    """Keeps the score: cases tried, their statuses, rows stored, crashes."""

    collector: Collector
    client: RawClient
    honest: AgentChain  # the enrolled agent whose valid batches must keep working
    db_path: Path
    expected_rows: int = 0
    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    stored_by_attacks: int = 0
    crashes: list[str] = field(default_factory=list)

    def head(self) -> tuple[int, bytes]:
        seq = len(self.honest.records)
        return (seq, chain.record_hash(self.honest.records[-1]) if seq else b"")

    def attempt(self, name: str, requests: Sequence[bytes]) -> Outcome:
        """One hostile exchange, then the checks every case shares."""
        outcome = self.client.exchange(requests)
        self.cases += 1
        self.statuses[outcome.code.name] += 1
        if outcome.code in CRASH_CODES or not self.collector.alive():
            self.crashes.append(f"{name}: {outcome.code.name} {outcome.details}")
        rows = stored_rows(self.db_path)
        self.stored_by_attacks += rows - self.expected_rows
        self.expected_rows = rows
        self.honest_batch_works(name)
        return outcome

    def honest_batch_works(self, after: str) -> None:
        """The server is up and serves the honest agent: its next batch is acked and stored."""
        before = self.head()
        batch = self.honest.extend(2)
        outcome = self.client.exchange(
            request_bytes(hello(self.honest.agent_id), batch_request(batch))
        )
        assert outcome.code is grpc.StatusCode.OK, (after, outcome)
        assert outcome.acks == [before, self.head()], (after, outcome)
        self.expected_rows += 2
        assert stored_rows(self.db_path) == self.expected_rows, after
