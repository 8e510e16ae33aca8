"""The store backends the collector's tests run against: SQLite in tmp_path and the real
PostgreSQL, one fresh schema per test.

``BACKENDS`` parametrizes the ``backend`` fixture (conftest.py) over both; tests reach the
database behind a store through ``Backend`` (``rows``, ``execute``), written with ``?``
placeholders, which the PostgreSQL backend turns into psycopg's ``%s``.

PostgreSQL is found at $CREDITMETER_TEST_POSTGRES_URL (default: the local ``test``
database). When it cannot be reached its tests skip, saying why, unless
$CREDITMETER_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest

from creditmeter.collector import pg_store, sqlite_store
from creditmeter.collector.pg_store import PostgresStore
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.store import Store

POSTGRES_URL_ENV = "CREDITMETER_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "CREDITMETER_REQUIRE_POSTGRES"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


class Backend(Protocol):
    name: str
    url: str  # what `creditmeter-collector --db` takes
    migrations: Sequence[Any]

    def open(self, **options: Any) -> Store:
        """A store on this backend's database (closed at the end of the test)."""
        ...

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]: ...

    def execute(self, sql: str, *params: object) -> None: ...


@dataclass
class SQLiteBackend:
    path: Path
    clock_us: Any
    name: str = "sqlite"
    migrations: Sequence[Any] = sqlite_store.MIGRATIONS
    opened: list[SQLiteStore] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"sqlite://{self.path}"

    def open(self, **options: Any) -> SQLiteStore:
        store = SQLiteStore(self.path, **{"clock_us": self.clock_us, **options})
        self.opened.append(store)
        return store

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path)) as conn, conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, sql: str, *params: object) -> None:
        with closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute(sql, params)

    def close(self) -> None:
        for store in self.opened:
            store.close()


@dataclass
class PostgresBackend:
    url: str
    clock_us: Any
    name: str = "postgres"
    migrations: Sequence[Any] = pg_store.MIGRATIONS
    opened: list[PostgresStore] = field(default_factory=list)
    _conn: psycopg.Connection[Any] | None = None

    def open(self, **options: Any) -> PostgresStore:
        store = PostgresStore(self.url, **{"clock_us": self.clock_us, **options})
        self.opened.append(store)
        return store

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        return self._connection().execute(_pg(sql), params).fetchall()

    def execute(self, sql: str, *params: object) -> None:
        self._connection().execute(_pg(sql), params)

    def close(self) -> None:
        for store in self.opened:
            store.close()
        if self._conn is not None:
            self._conn.close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            self._conn = psycopg.connect(self.url, autocommit=True)
        return self._conn


def _pg(sql: str) -> Any:
    return sql.replace("%", "%%").replace("?", "%s")


def chosen_backend(
    request: pytest.FixtureRequest, db_path: Path, clock_us: Any
) -> SQLiteBackend | PostgresBackend:
    """The backend a parametrized ``backend`` fixture asks for (``request.param``: "sqlite",
    the default, or "postgres", which gets a fresh schema), on the test's clock."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return SQLiteBackend(db_path, clock_us=clock_us)
    return PostgresBackend(request.getfixturevalue("postgres_url"), clock_us=clock_us)


# -- PostgreSQL fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of a reachable PostgreSQL; skips (or fails in CI) when there is none."""
    url = os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = (
            f"PostgreSQL at {url} is unreachable ({str(exc).strip().splitlines()[0]}); "
            f"set {POSTGRES_URL_ENV} to a database the tests may create schemas in"
        )
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_POSTGRES_ENV}=1: required here)")
        pytest.skip(reason)
    return url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL selecting a fresh, empty schema of its own, dropped after the test: tests stay
    isolated and may run in parallel."""
    with fresh_schema(postgres_server) as url:
        yield url


@contextmanager
def fresh_schema(server_url: str) -> Iterator[str]:
    """Creates schema test_<random>, yields a URL whose connections use it (search_path),
    and drops it with everything in it."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(server_url, schema)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"
