"""Typed, key-tracking reads of one TOML table, so every scenario error names its key."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any


class ScenarioError(ValueError):
    """A scenario is malformed. ``key`` is the dotted path of the offending key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        # key "": the whole file (unreadable, not TOML, not a shipped name).
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


class Table:
    """One TOML table being read: each getter marks its key seen; :meth:`finish` rejects
    the keys nobody asked for (a typo must not silently fall back to a default)."""

    def __init__(self, data: object, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(data, Mapping):
            raise ScenarioError(source, path, f"must be a table, not {type(data).__name__}")
        self._data: Mapping[str, Any] = data
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ScenarioError:
        return ScenarioError(self.source, self.key(name), problem)

    def names(self) -> list[str]:
        return list(self._data)

    def has(self, name: str) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        self._seen.add(name)
        return self._data.get(name)

    def string(self, name: str, default: str | None = None) -> str:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required")
            return default
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, not {value!r}")
        return value

    def opt_string(self, name: str) -> str | None:
        return self.string(name) if self.has(name) else self.raw(name)

    def integer(self, name: str, default: int | None = None, minimum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be ≥ {minimum}, not {value}")
        return value

    def opt_integer(self, name: str, minimum: int | None = None) -> int | None:
        return self.integer(name, minimum=minimum) if self.has(name) else self.raw(name)

    def number(
        self, name: str, default: float | None = None, minimum: float | None = None
    ) -> float:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be ≥ {minimum}, not {value}")
        return float(value)

    def opt_number(self, name: str, minimum: float | None = None) -> float | None:
        return self.number(name, minimum=minimum) if self.has(name) else self.raw(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, not {value!r}")
        return value

    def opt_boolean(self, name: str) -> bool | None:
        return self.boolean(name, False) if self.has(name) else None

    def tables(self, name: str) -> list[Table]:
        """An array of tables (``[[name]]``), each wrapped for reading."""
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(name, "must be an array of tables")
        return [Table(item, f"{self.key(name)}[{i}]", self.source) for i, item in enumerate(value)]

    def sub_table(self, name: str) -> Table:
        value = self.raw(name)
        return Table({} if value is None else value, self.key(name), self.source)

    def epoch_seconds(self, name: str) -> float | None:
        """A wall instant: a TOML offset date-time or seconds since the epoch."""
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                raise self.error(name, "needs a UTC offset (e.g. 2025-01-01T00:00:00Z)")
            return value.timestamp()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise self.error(name, f"must be a date-time or epoch seconds, not {value!r}")

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")
