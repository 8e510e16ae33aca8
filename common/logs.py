"""Structured logs on stdout, for journald and for humans.

Both daemons log to stdout and let systemd collect it: no files to rotate, and
``journalctl -u creditmeter-agent`` shows everything. A line reads::

    WARNING creditmeter.agent.shipper: collector unreachable attempt=3 retry_in_s=8.0

with a UTC ISO-8601 timestamp in front when *not* writing to the journal (journald stamps
every line itself). Under journald each line also starts with the syslog priority, e.g.
``<4>``, which journald strips and stores, so ``journalctl -p warning`` works.
``fmt="json"`` writes one JSON object per line instead, for log shippers.

Key/value fields travel in ``extra={"fields": {...}}`` or through ``log_fields``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

FORMATS = ("text", "json")

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# syslog(3) priorities, which journald reads from a "<N>" line prefix.
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_JSON_RESERVED = ("ts", "level", "logger", "msg", "exc")


def parse_level(level: str | int) -> int:
    """A logging level from a name (any case) or a number; ValueError naming a bad one."""
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        known = ", ".join(LEVELS)
        raise ValueError(f"unknown log level {level!r}: expected one of {known}") from None


def under_journald(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected us to.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for the stream it connected; comparing
    it with the stream's own device and inode (as sd_journal_stream_fd(3) advises) stays
    correct when a child inherited the variable but writes elsewhere.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # no file descriptor (e.g. io.StringIO): certainly not the journal
    return stat.st_dev == int(device) and stat.st_ino == int(inode)


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, journald: bool) -> None:
        super().__init__()
        self._fmt_name = fmt
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields = _record_fields(record)
        exc = self.formatException(record.exc_info) if record.exc_info else None
        if record.stack_info:
            exc = (exc + "\n" if exc else "") + self.formatStack(record.stack_info)
        if self._fmt_name == "json":
            text = self._json(record, fields, exc)
        else:
            text = self._text(record, fields, exc)
        if not self._journald:
            return text
        # Every line of a traceback gets the prefix too: journald stores lines separately.
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.split("\n"))

    def _text(
        self, record: logging.LogRecord, fields: Mapping[str, object], exc: str | None
    ) -> str:
        parts = [] if self._journald else [_timestamp(record)]
        parts.append(f"{record.levelname} {record.name}: {record.getMessage()}")
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        line = " ".join(parts)
        return f"{line}\n{exc}" if exc else line

    def _json(
        self, record: logging.LogRecord, fields: Mapping[str, object], exc: str | None
    ) -> str:
        obj: dict[str, object] = {} if self._journald else {"ts": _timestamp(record)}
        obj.update(level=record.levelname, logger=record.name, msg=record.getMessage())
        for key, value in fields.items():
            # A field never overwrites the envelope: it is renamed instead of lost.
            obj[f"{key}_" if key in _JSON_RESERVED else key] = value
        if exc:
            obj["exc"] = exc
        return json.dumps(obj, default=str, ensure_ascii=False)


def _record_fields(record: logging.LogRecord) -> Mapping[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text_value(value: object) -> str:
    """key=value text that stays one token: quoted (JSON-style) when it would not."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=\\' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


_HANDLER_MARK = "_creditmeter_handler"


def setup_logging(
    level: str | int = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    *,
    journald: bool | None = None,
) -> None:
    """Send every logger's records at ``level`` and above to ``stream`` (stdout by default).

    ``journald`` None detects it from ``JOURNAL_STREAM``. Calling again replaces the
    handler this function installed (e.g. after a configuration reload); handlers others
    installed (pytest's caplog) are left alone.
    """
    levelno = parse_level(level)
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected text or json")
    out = sys.stdout if stream is None else stream
    on_journal = under_journald(out) if journald is None else journald
    handler = logging.StreamHandler(out)
    handler.setFormatter(_Formatter(fmt, on_journal))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    remove_handler(root)
    root.addHandler(handler)
    root.setLevel(levelno)


def log_fields(logger: logging.Logger, level: str | int, msg: str, /, **fields: object) -> None:
    """``logger.log(level, msg)`` with fields: ``log_fields(log, "info", "sent", records=3)``."""
    levelno = parse_level(level)
    # stacklevel=2: the record names the caller, not this helper.
    logger.log(levelno, msg, extra={"fields": fields}, stacklevel=2)


def remove_handler(logger: logging.Logger) -> None:
    """Take off ``logger`` the handler ``setup_logging`` installed, if any."""
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(old)
