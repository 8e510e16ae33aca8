"""Opens the store a URL names. The one place that knows which URL means which database."""

from __future__ import annotations

import re
from pathlib import Path

from creditmeter.collector.errors import ConfigError
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.store import Store

SQLITE_PREFIX = "sqlite://"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def open_store(
    url: str, *, create: bool, migrate: bool = True, pool_size: int | None = None
) -> Store:
    """Opens ``sqlite:///absolute/path`` or ``postgresql://user@host:port/dbname`` (any
    libpq URI; ``?options=-csearch_path%3Dschema`` selects a schema). ``pool_size``: the
    PostgreSQL store's connections (None: its default). Raises ConfigError for a URL it
    cannot use and StoreError when the database cannot be opened (see SQLiteStore and
    PostgresStore)."""
    if url.startswith(SQLITE_PREFIX):
        return SQLiteStore(sqlite_path(url), create=create, migrate=migrate)
    if url.startswith(POSTGRES_PREFIXES):
        # Imported here: a SQLite deployment never loads psycopg and libpq.
        from creditmeter.collector.pg_store import DEFAULT_POOL_SIZE, PostgresStore

        return PostgresStore(
            url, create=create, migrate=migrate, pool_size=pool_size or DEFAULT_POOL_SIZE
        )
    raise ConfigError(
        f"store URL {redacted(url)!r} is not sqlite:///absolute/path or postgresql://…"
    )


def sqlite_path(url: str) -> Path:
    path = url[len(SQLITE_PREFIX) :]
    if not path.startswith("/"):
        raise ConfigError(
            f"store URL {url!r}: the path must be absolute (sqlite:///var/lib/creditmeter/db)"
        )
    if not Path(path).parent.is_dir():
        raise ConfigError(f"store URL {url!r}: directory {Path(path).parent} does not exist")
    return Path(path)


def redacted(url: str) -> str:
    """``url`` without a password, for logs and messages: scheme://user:***@host/… and
    ?password=*** (libpq takes it in either place)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        url = f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)
