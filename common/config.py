"""Typed TOML configuration, declared once as data, shared by both daemons.

A daemon declares its options as a sequence of ``Option`` values (name, kind, default,
bounds, one-line doc). From that one declaration come:

* the loader: TOML file, then ``--set key=value`` overrides, then the per-option flags the
  daemon exposes; unknown keys, wrong types and out-of-range values are refused with one
  line naming the file, the key and the problem, e.g.
  ``agent.toml: meter.poll_interval: must be > 0, got -1``;
* the documentation: ``render_reference`` (a markdown table for the README) and
  ``render_example`` (a commented TOML file for ``/etc/creditmeter/``).

Dotted names map onto TOML tables: ``outbox.max_records`` is ``max_records`` in ``[outbox]``.
Relative paths in a file are relative to that file's folder, so a config and the files it
names can move together; on the command line they are relative to the working directory.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import operator
import re
import sys
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, NoReturn, TextIO, TypeVar, cast

T = TypeVar("T")

_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\Z")


class ConfigError(Exception):
    """The configuration is unusable; the message is one line naming source, key and problem."""


class _Invalid(Exception):
    """A value does not fit its option; the loader adds the source and the key."""


# -- kinds: how one type of value is read and written -------------------------------------


class Kind(ABC, Generic[T]):
    """How values of one type are read from TOML and the command line, and written back."""

    name: str  # as the reference documents it, e.g. "int" or "duration (s)"

    @abstractmethod
    def from_toml(self, value: object, base_dir: Path | None) -> T:
        """Convert a value tomllib produced; ``base_dir`` is the file's folder."""

    @abstractmethod
    def from_text(self, text: str) -> T:
        """Convert a command-line value."""

    @abstractmethod
    def to_toml(self, value: T) -> str:
        """The TOML literal for ``value`` (read back by ``from_toml`` to the same value)."""


class _Str(Kind[str]):
    name = "string"

    def from_toml(self, value: object, base_dir: Path | None) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_describe(value)}")
        return value

    def from_text(self, text: str) -> str:
        return text

    def to_toml(self, value: str) -> str:
        return _toml_string(value)


class _Int(Kind[int]):
    name = "int"

    def from_toml(self, value: object, base_dir: Path | None) -> int:
        # bool is an int subclass in Python; `true` is not a number in a config file.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"expected an integer, got {_describe(value)}")
        return value

    def from_text(self, text: str) -> int:
        try:
            return int(text.strip())
        except ValueError:
            raise _Invalid(f"expected an integer, got {_describe(text)}") from None

    def to_toml(self, value: int) -> str:
        return str(value)


class _Float(Kind[float]):
    name = "float"

    def from_toml(self, value: object, base_dir: Path | None) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _Invalid(f"expected a number, got {_describe(value)}")
        return _finite(float(value))

    def from_text(self, text: str) -> float:
        try:
            return _finite(float(text.strip()))
        except ValueError:
            raise _Invalid(f"expected a number, got {_describe(text)}") from None

    def to_toml(self, value: float) -> str:
        return repr(float(value))


_BOOL_TEXT = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_TEXT |= {"false": False, "no": False, "off": False, "0": False}


class _Bool(Kind[bool]):
    name = "bool"

    def from_toml(self, value: object, base_dir: Path | None) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(f"expected true or false, got {_describe(value)}")
        return value

    def from_text(self, text: str) -> bool:
        try:
            return _BOOL_TEXT[text.strip().lower()]
        except KeyError:
            raise _Invalid(f"expected true or false, got {_describe(text)}") from None

    def to_toml(self, value: bool) -> str:
        return "true" if value else "false"


class _Path(Kind[Path]):
    name = "path"

    def from_toml(self, value: object, base_dir: Path | None) -> Path:
        if not isinstance(value, str) or not value:
            raise _Invalid(f"expected a path, got {_describe(value)}")
        path = Path(value)
        return base_dir / path if base_dir is not None and not path.is_absolute() else path

    def from_text(self, text: str) -> Path:
        if not text:
            raise _Invalid("expected a path, got an empty string")
        return Path(text)

    def to_toml(self, value: Path) -> str:
        return _toml_string(str(value))


class _StrList(Kind[tuple[str, ...]]):
    """A list of strings; a tuple once loaded, since the result is frozen."""

    name = "list of strings"

    def from_toml(self, value: object, base_dir: Path | None) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise _Invalid(f"expected an array of strings, got {_describe(value)}")
        return tuple(value)

    def from_text(self, text: str) -> tuple[str, ...]:
        """Comma-separated; empty text is the empty list."""
        return tuple(item.strip() for item in text.split(",") if item.strip())

    def to_toml(self, value: tuple[str, ...]) -> str:
        return "[" + ", ".join(_toml_string(item) for item in value) + "]"


_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)")


class _Duration(Kind[float]):
    """Seconds, as a number, or a string such as "500ms", "30s", "5m", "1h30m"."""

    name = "duration (s)"

    def from_toml(self, value: object, base_dir: Path | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _finite(float(value))
        if isinstance(value, str):
            return self.from_text(value)
        raise _Invalid(f"expected a duration, got {_describe(value)}")

    def from_text(self, text: str) -> float:
        try:
            return _finite(float(text.strip()))  # a bare number: seconds (negatives reach bounds)
        except ValueError:
            pass
        total_s, position, stripped = 0.0, 0, text.strip()
        while position < len(stripped):
            match = _DURATION_PART.match(stripped, position)
            if match is None:
                raise _Invalid(
                    f'expected a duration (seconds, or e.g. "30s", "5m"), got {_describe(text)}'
                )
            total_s += float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
            position = match.end()
        if not stripped:
            raise _Invalid("expected a duration, got an empty string")
        return total_s

    def to_toml(self, value: float) -> str:
        return _number(value)


class Choice(Kind[str]):
    """One of a fixed set of strings (an enum)."""

    def __init__(self, *choices: str) -> None:
        if not choices:
            raise ValueError("Choice needs at least one choice")
        self.choices = choices
        self.name = "one of: " + ", ".join(choices)

    def from_toml(self, value: object, base_dir: Path | None) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected one of {', '.join(self.choices)}, got {_describe(value)}")
        return self.from_text(value)

    def from_text(self, text: str) -> str:
        if text not in self.choices:
            raise _Invalid(f"expected one of {', '.join(self.choices)}, got {_describe(text)}")
        return text

    def to_toml(self, value: str) -> str:
        return _toml_string(value)


class Maybe(Kind[T | None], Generic[T]):
    """An optional value: unset (None) by default, or when given as the empty string."""

    def __init__(self, inner: Kind[T]) -> None:
        self.inner = inner
        self.name = f"{inner.name}, optional"

    def from_toml(self, value: object, base_dir: Path | None) -> T | None:
        return None if value == "" else self.inner.from_toml(value, base_dir)

    def from_text(self, text: str) -> T | None:
        return None if text == "" else self.inner.from_text(text)

    def to_toml(self, value: T | None) -> str:
        return '""' if value is None else self.inner.to_toml(value)


STR: Kind[str] = _Str()
INT: Kind[int] = _Int()
FLOAT: Kind[float] = _Float()
BOOL: Kind[bool] = _Bool()
PATH: Kind[Path] = _Path()
STR_LIST: Kind[tuple[str, ...]] = _StrList()
DURATION: Kind[float] = _Duration()


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option(Generic[T]):
    """One configuration option. Bounds (``gt``, ``ge``, ``lt``, ``le``) apply to numbers."""

    name: str  # dotted: "meter.poll_interval" is poll_interval in [meter]
    kind: Kind[T]
    default: T
    doc: str  # one line, shown in the reference, the example file and --help
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"option name {self.name!r}: use lower_case words joined by dots")
        try:
            self.check(self.default)
        except _Invalid as err:
            raise ValueError(f"option {self.name}: default {err}") from None

    def check(self, value: T) -> T:
        """``value`` if within bounds; raises _Invalid otherwise."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            return value
        number = float(value)
        for op, bound in self._bound_pairs():
            if bound is not None and not _COMPARE[op](number, bound):
                raise _Invalid(f"must be {op} {_number(bound)}, got {_number(value)}")
        return value

    def _bound_pairs(self) -> tuple[tuple[str, float | None], ...]:
        return ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))

    @property
    def bounds(self) -> str:
        """The bounds as the reference shows them, e.g. "> 0, <= 3600"."""
        pairs = self._bound_pairs()
        return ", ".join(f"{op} {_number(bound)}" for op, bound in pairs if bound is not None)


Options = Sequence[Option[Any]]


def option_argument(option: Option[T]) -> Callable[[str], T]:
    """An argparse ``type`` reading a command's flag as ``option``: its kind, its bounds."""

    def read(text: str) -> T:
        try:
            return option.check(option.kind.from_text(text))
        except _Invalid as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    return read


def check_options(options: Options) -> dict[str, Option[Any]]:
    """The options by name; ValueError for a declaration that cannot work (a bug, not config)."""
    by_name: dict[str, Option[Any]] = {}
    for option in options:
        if option.name in by_name:
            raise ValueError(f"option {option.name} is declared twice")
        by_name[option.name] = option
    for name in by_name:
        if _sections(name) & by_name.keys():
            raise ValueError(f"option {name} lies under another option, which cannot be a table")
    return by_name


# -- the result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The loaded configuration: every declared option's value, frozen.

    ``config[POLL_INTERVAL]`` gives the option's value with its declared type.
    """

    values: Mapping[str, object]
    sources: Mapping[str, str]  # option name -> "default", the file, "--set" or the flag
    path: Path | None  # the file that was read, if any

    def __getitem__(self, option: Option[T]) -> T:
        try:
            return cast(T, self.values[option.name])
        except KeyError:
            raise KeyError(f"{option.name} is not an option of this configuration") from None

    def get(self, name: str) -> object:
        """A value by dotted name, untyped: for logging and tests."""
        return self.values[name]

    def items(self) -> Iterator[tuple[str, object]]:
        """(name, value) for every option, in declaration order."""
        return iter(self.values.items())


# -- loading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """One command-line value: ``source`` is how the operator gave it ("--set", "--listen")."""

    source: str
    name: str
    text: str


def parse_set(text: str) -> Override:
    """An override from ``--set KEY=VALUE``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--set: {text}: expected KEY=VALUE")
    return Override("--set", name.strip(), value)


def load(
    options: Options,
    path: Path | None = None,
    *,
    default_path: Path | None = None,
    overrides: Sequence[Override] = (),
) -> Config:
    """Defaults, then the file, then ``overrides`` in order; raises ConfigError.

    ``path`` is a file the operator named: it must exist. Otherwise ``default_path`` is read
    if present, and the defaults stand if not (a host may run on defaults alone).
    """
    by_name = check_options(options)
    values: dict[str, object] = {name: option.default for name, option in by_name.items()}
    sources = dict.fromkeys(by_name, "default")
    file = path if path is not None else default_path
    if file is not None and path is None and not file.exists():
        file = None  # the default file is optional
    if file is not None:
        for name, value in _read_file(file, by_name).items():
            values[name], sources[name] = value, str(file)
    for override in overrides:
        option = by_name.get(override.name)
        if option is None:
            raise ConfigError(_unknown(override.source, override.name, by_name))
        try:
            values[option.name] = option.check(option.kind.from_text(override.text))
        except _Invalid as err:
            raise ConfigError(f"{override.source}: {option.name}: {err}") from None
        sources[option.name] = override.source
    return Config(MappingProxyType(values), MappingProxyType(sources), file)


def load_or_exit(
    options: Options,
    path: Path | None = None,
    *,
    default_path: Path | None = None,
    overrides: Sequence[Override] = (),
    stderr: TextIO | None = None,
) -> Config:
    """``load``, or print the one-line error to stderr and exit with status 2 (usage error).

    The unit's ``RestartPreventExitStatus=2`` keeps systemd from restarting a daemon whose
    configuration cannot work until an operator fixes it.
    """
    try:
        return load(options, path, default_path=default_path, overrides=overrides)
    except ConfigError as err:
        _exit_on(err, stderr)


def _exit_on(err: ConfigError, stderr: TextIO | None) -> NoReturn:
    print(f"configuration error: {err}", file=sys.stderr if stderr is None else stderr)
    raise SystemExit(2) from None


def _read_file(file: Path, by_name: Mapping[str, Option[Any]]) -> dict[str, object]:
    try:
        with file.open("rb") as stream:
            document = tomllib.load(stream)
    except OSError as err:
        raise ConfigError(f"{file}: cannot read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{file}: invalid TOML: {err}") from None
    values: dict[str, object] = {}
    base_dir = file.absolute().parent  # stays right if the daemon changes directory later
    sections = {section for name in by_name for section in _sections(name)}
    for name, raw in _flatten(document, by_name, sections):
        option = by_name.get(name)
        if option is None:
            raise ConfigError(_unknown(str(file), name, by_name))
        try:
            values[name] = option.check(option.kind.from_toml(raw, base_dir))
        except _Invalid as err:
            raise ConfigError(f"{file}: {name}: {err}") from None
    return values


def _flatten(
    table: Mapping[str, object],
    by_name: Mapping[str, Option[Any]],
    sections: set[str],
    prefix: str = "",
) -> Iterator[tuple[str, object]]:
    """(dotted name, value) pairs of the leaves, in file order.

    A table that is not an option is descended into, even an unknown one, so that
    ``[metre] poll_interval = 1`` is reported as ``metre.poll_interval`` with a suggestion.
    """
    for key, value in table.items():
        name = prefix + key
        if name in by_name or not isinstance(value, dict):
            yield name, value
        elif value or name in sections:
            yield from _flatten(value, by_name, sections, name + ".")
        else:
            yield name, value  # an empty unknown table: still a mistake worth reporting


def _sections(name: str) -> set[str]:
    """The tables enclosing an option: "a.b.c" -> {"a", "a.b"}."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _unknown(source: str, name: str, by_name: Mapping[str, Option[Any]]) -> str:
    known = list(by_name) + sorted({s for option in by_name for s in _sections(option)})
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{source}: {name}: unknown key{hint}"


# -- the command line ---------------------------------------------------------------------


class ConfigArgs:
    """The configuration's command-line arguments: ``--config``, ``--set`` and chosen flags.

    ``flags`` maps a flag a daemon chooses to expose (e.g. ``"--listen"``) to its option; the
    flag takes the option's text form and overrides both the file and ``--set``.
    """

    def __init__(
        self,
        options: Options,
        *,
        default_path: Path | None = None,
        flags: Mapping[str, Option[Any]] | None = None,
    ) -> None:
        by_name = check_options(options)
        self.options = tuple(options)
        self.default_path = default_path
        self.flags = dict(flags or {})
        for flag, option in self.flags.items():
            if by_name.get(option.name) is not option:
                raise ValueError(f"flag {flag}: {option.name} is not one of these options")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        where = f"default: {self.default_path}, if present" if self.default_path else "optional"
        parser.add_argument(
            "--config", type=Path, default=None, metavar="PATH", help=f"TOML file ({where})"
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            dest="config_set",
            metavar="KEY=VALUE",
            help="override one option, e.g. --set log.level=debug (repeatable)",
        )
        for flag, option in self.flags.items():
            default = option.kind.to_toml(option.default)
            parser.add_argument(
                flag,
                dest=_flag_dest(option),
                default=None,
                metavar=option.name.rsplit(".", 1)[-1].upper(),
                # argparse %-formats help text: a literal "%" in a doc must be doubled.
                help=f"{option.doc} ({option.name}, default {default})".replace("%", "%%"),
            )

    def overrides(self, args: argparse.Namespace) -> list[Override]:
        """--set values in order, then the flags that were given."""
        result = [parse_set(text) for text in args.config_set]
        for flag, option in self.flags.items():
            text = getattr(args, _flag_dest(option))
            if text is not None:
                result.append(Override(flag, option.name, text))
        return result

    def load(self, args: argparse.Namespace) -> Config:
        return load(
            self.options,
            args.config,
            default_path=self.default_path,
            overrides=self.overrides(args),
        )

    def load_or_exit(self, args: argparse.Namespace, stderr: TextIO | None = None) -> Config:
        """``load``, or print the one-line error and exit 2, as ``load_or_exit`` does."""
        try:
            return self.load(args)
        except ConfigError as err:
            _exit_on(err, stderr)


def _flag_dest(option: Option[Any]) -> str:
    return "config_flag__" + option.name.replace(".", "__")


# -- documentation ------------------------------------------------------------------------


def render_reference(options: Options) -> str:
    """A markdown table of every option: name, type (with bounds), default and doc."""
    check_options(options)
    lines = ["| option | type | default | description |", "|---|---|---|---|"]
    for option in options:
        kind = option.kind.name + (f", {option.bounds}" if option.bounds else "")
        default = "unset" if option.default is None else f"`{option.kind.to_toml(option.default)}`"
        cells = (f"`{option.name}`", kind, default, option.doc)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def render_example(options: Options, title: str = "creditmeter configuration") -> str:
    """A TOML file listing every option, commented out at its default, with its doc.

    Commented-out defaults (as in systemd's own /etc files) mean an operator uncomments only
    what they change, and a better default in a new release reaches every host that kept it.
    """
    check_options(options)
    lines = [
        f"# {title}",
        "#",
        "# Every option is shown commented out, at its default: uncomment a line to change it.",
        '# Durations are seconds, or strings such as "500ms", "30s", "5m", "1h".',
    ]
    by_section: dict[str, list[Option[Any]]] = {}
    for option in options:
        section, _, _ = option.name.rpartition(".")
        by_section.setdefault(section, []).append(option)
    # Top-level keys must come before the first table in TOML.
    for section in sorted(by_section, key=lambda s: s != ""):
        lines.append("")
        if section:
            lines.append(f"[{section}]")
        for option in by_section[section]:
            kind = option.kind.name + (f", {option.bounds}" if option.bounds else "")
            key = option.name.rpartition(".")[2]
            lines.append(f"# {option.doc} ({kind})")
            lines.append(f"#{key} = {option.kind.to_toml(option.default)}")
    return "\n".join(lines) + "\n"


# -- formatting helpers -------------------------------------------------------------------


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise _Invalid(f"must be a finite number, got {value}")
    return value


def _number(value: float) -> str:
    """A number as an operator wrote it: 1 rather than 1.0, 0.5 as 0.5."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _toml_string(text: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "an array" if any(not isinstance(v, str) for v in value) else json.dumps(value)
    if isinstance(value, float):
        return _number(value)
    return str(value)
