"""Opens the store a URL names. The one place that knows which URL means which database."""

from __future__ import annotations

from pathlib import Path

from creditmeter.collector.errors import ConfigError
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.store import Store

SQLITE_PREFIX = "sqlite://"


def open_store(url: str, *, create: bool, migrate: bool = True) -> Store:
    """Opens ``sqlite:///absolute/path``. Raises ConfigError for a URL it cannot use and
    StoreError when the database cannot be opened (see SQLiteStore)."""
    if url.startswith(SQLITE_PREFIX):
        return SQLiteStore(sqlite_path(url), create=create, migrate=migrate)
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"store URL {url!r}: the PostgreSQL store is not implemented yet")
    raise ConfigError(f"store URL {url!r} is not sqlite:///absolute/path")


def sqlite_path(url: str) -> Path:
    path = url[len(SQLITE_PREFIX) :]
    if not path.startswith("/"):
        raise ConfigError(
            f"store URL {url!r}: the path must be absolute (sqlite:///var/lib/creditmeter/db)"
        )
    if not Path(path).parent.is_dir():
        raise ConfigError(f"store URL {url!r}: directory {Path(path).parent} does not exist")
    return Path(path)
