"""Logging: the text and JSON lines, journald detection, fields and levels."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from creditmeter.logs import log_fields, parse_level, setup_logging, under_journald

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _journal_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> io.TextIOWrapper:
    """A real file posing as the journal stream systemd would have connected."""
    stream = (tmp_path / "journal").open("w+", encoding="utf-8")
    stat = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    return stream


def test_text_line_with_timestamp_and_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", "text", out)
    log = logging.getLogger("creditmeter.test")
    log.info(
        "window closed",
        extra={"fields": {"gpu": "GPU-0", "busy_s": 1.5, "note": 'two "words"', "ok": True}},
    )
    log.debug("not shown")
    line = out.getvalue()
    assert re.fullmatch(
        TIMESTAMP + r" INFO creditmeter.test: window closed gpu=GPU-0 busy_s=1.5 "
        r'note="two \\"words\\"" ok=true\n',
        line,
    ), line


def test_under_journald_lines_carry_priority_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = _journal_file(tmp_path, monkeypatch)
    with stream:
        assert under_journald(stream)
        setup_logging("debug", "text", stream)
        log = logging.getLogger("creditmeter.agent")
        log.warning("collector unreachable")
        log_fields(log, "debug", "poll", gpus=4)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("ship failed")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[0] == "<4>WARNING creditmeter.agent: collector unreachable"
    assert lines[1] == "<7>DEBUG creditmeter.agent: poll gpus=4"
    assert lines[2] == "<3>ERROR creditmeter.agent: ship failed"
    # The traceback follows, every line at the record's priority (journald splits lines).
    assert lines[3] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in lines[2:])


def test_journal_stream_of_another_file_is_not_journald(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _journal_file(tmp_path, monkeypatch)
    with journal, (tmp_path / "elsewhere").open("w+", encoding="utf-8") as elsewhere:
        assert not under_journald(elsewhere)
        setup_logging("info", "text", elsewhere)
        logging.getLogger("x").info("hello")
        elsewhere.seek(0)
        assert re.fullmatch(TIMESTAMP + r" INFO x: hello\n", elsewhere.read())
    assert not under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    assert not under_journald(io.StringIO(), {"JOURNAL_STREAM": "garbage"})


def test_json_one_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("INFO", "json", out)
    log = logging.getLogger("creditmeter.collector")
    log_fields(log, logging.INFO, "batch stored", records=120, agent="gpu-07", level="x")
    try:
        raise ValueError("bad\nrecord")
    except ValueError:
        log.exception("ingest failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert re.fullmatch(TIMESTAMP, first.pop("ts"))
    assert first == {
        "level": "INFO",
        "logger": "creditmeter.collector",
        "msg": "batch stored",
        "records": 120,
        "agent": "gpu-07",
        "level_": "x",  # a field never overwrites the envelope
    }
    assert second["level"] == "ERROR"
    assert second["exc"].endswith("ValueError: bad\nrecord")


def test_json_under_journald_has_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = _journal_file(tmp_path, monkeypatch)
    with stream:
        setup_logging("info", "json", stream)
        logging.getLogger("j").info("up")
        stream.seek(0)
        line = stream.read()
    assert line.startswith("<6>{")
    assert json.loads(line[3:]) == {"level": "INFO", "logger": "j", "msg": "up"}


def test_log_fields_names_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    setup_logging("info", "text", io.StringIO())
    log_fields(logging.getLogger("c"), "info", "hello", n=1)
    record = caplog.records[-1]
    assert record.funcName == "test_log_fields_names_the_caller"
    assert record.fields == {"n": 1}  # type: ignore[attr-defined]


def test_setup_again_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", first)
    setup_logging("warning", "text", second)
    assert len(root.handlers) == before + 1
    logging.getLogger("y").warning("once")
    assert first.getvalue() == ""
    assert "WARNING y: once" in second.getvalue()
    assert root.level == logging.WARNING


def test_bad_level_or_format_is_named() -> None:
    with pytest.raises(ValueError, match="unknown log level 'verbose': expected one of debug"):
        setup_logging("verbose")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        setup_logging("info", "xml")
    assert parse_level(" Warning ") == logging.WARNING
    assert parse_level(15) == 15
