"""Databases of records, jobs and the ledger are created 0600 whatever the umask (SQLite
gives its -wal and -shm files the database's own mode)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from creditmeter import chain
from creditmeter.agent.jobs import JobRegistry
from creditmeter.agent.outbox import Outbox
from creditmeter.collector.sqlite_store import SQLiteStore


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The widest umask: a file is as private as its creator makes it, no more."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def modes(path: Path) -> dict[str, int]:
    found = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in found if p.exists()}


def test_the_collector_database_is_private(tmp_path: Path, open_umask: None) -> None:
    store = SQLiteStore(tmp_path / "collector.db")
    try:
        store.enroll_agent("agent-1", chain.public_key_hex(chain.generate_key()))
        assert set(modes(tmp_path / "collector.db").values()) == {0o600}
    finally:
        store.close()


def test_the_job_database_is_private(tmp_path: Path, open_umask: None) -> None:
    registry = JobRegistry(tmp_path / "jobs.db")
    try:
        assert set(modes(tmp_path / "jobs.db").values()) == {0o600}
    finally:
        registry.close()


def test_the_outbox_is_private(tmp_path: Path, open_umask: None) -> None:
    outbox = Outbox.open(tmp_path / "state" / "outbox.db", "agent-1", chain.generate_key())
    try:
        assert set(modes(tmp_path / "state" / "outbox.db").values()) == {0o600}
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    finally:
        outbox.close()
