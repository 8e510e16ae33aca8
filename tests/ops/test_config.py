"""Configuration: declared once, loaded strictly, overridden from the command line, documented."""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from creditmeter import config
from creditmeter.config import (
    BOOL,
    DURATION,
    FLOAT,
    INT,
    PATH,
    STR,
    STR_LIST,
    Choice,
    ConfigArgs,
    ConfigError,
    Maybe,
    Option,
    Override,
)

AGENT_ID = Option("agent_id", STR, "", "Name of this agent; empty means the host name.")
POLL = Option("meter.poll_interval", DURATION, 1.0, "How often NVML is sampled.", gt=0, le=3600)
MAX_RECORDS = Option("outbox.max_records", INT, 1_000_000, "Backlog cap.", ge=1)
OUTBOX = Option("outbox.path", PATH, Path("/var/lib/creditmeter-agent/outbox.db"), "Outbox file.")
RATE = Option("collector.rate", FLOAT, 1.0, "Credits per busy second.", ge=0)
TLS = Option("collector.tls", BOOL, True, "Use TLS.")
LISTEN = Option("collector.listen", STR, "0.0.0.0:7443", "Address (100% of agents use it).")
CERT = Option("collector.tls_cert", Maybe(PATH), None, "Certificate chain (PEM).")
LABELS = Option(
    "attribution.env_labels", STR_LIST, ("CREDITMETER_ACCOUNT",), "Environment labels read."
)
LEVEL = Option("log.level", Choice("debug", "info", "warning", "error"), "info", "Log level.")
DEEP = Option("collector.store.pool_size", INT, 4, "Connections.", ge=1)
OPTIONS = (AGENT_ID, POLL, MAX_RECORDS, OUTBOX, RATE, TLS, LISTEN, CERT, LABELS, LEVEL, DEEP)


def _write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(OPTIONS, path)
    message = str(caught.value)
    assert "\n" not in message
    return message.replace(str(path), "agent.toml")


def test_defaults_when_the_default_file_is_absent(tmp_path: Path) -> None:
    loaded = config.load(OPTIONS, default_path=tmp_path / "absent.toml")
    assert loaded.path is None
    assert dict(loaded.items()) == {option.name: option.default for option in OPTIONS}
    assert set(loaded.sources.values()) == {"default"}
    assert loaded[POLL] == 1.0


def test_an_explicit_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "agent.toml"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(missing))}: cannot read: No such file"):
        config.load(OPTIONS, missing, default_path=tmp_path / "other.toml")


def test_file_values_of_every_kind(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
agent_id = "gpu-07"
[meter]
poll_interval = "1m30s"
[outbox]
max_records = 5
path = "state/outbox.db"
[collector]
rate = 2          # an integer is a fine float
tls = false
tls_cert = "/etc/creditmeter/tls.pem"
store.pool_size = 8
[attribution]
env_labels = ["A", "B"]
[log]
level = "debug"
""",
    )
    loaded = config.load(OPTIONS, path)
    assert loaded.path == path
    assert loaded[AGENT_ID] == "gpu-07"
    assert loaded[POLL] == 90.0
    assert loaded[MAX_RECORDS] == 5
    assert loaded[OUTBOX] == tmp_path / "state/outbox.db"  # relative to the file's folder
    assert loaded[RATE] == 2.0 and isinstance(loaded[RATE], float)
    assert loaded[TLS] is False
    assert loaded[CERT] == Path("/etc/creditmeter/tls.pem")
    assert loaded[DEEP] == 8
    assert loaded[LABELS] == ("A", "B")
    assert loaded[LEVEL] == "debug"
    assert loaded.sources["meter.poll_interval"] == str(path)
    assert loaded.sources["collector.listen"] == "default"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0.5", 0.5), ('"250ms"', 0.25), ('"30s"', 30), ('"5m"', 300), ('"2min"', 120),
     ('"1h30m"', 5400), ('"1.5h"', 5400), ('"1d"', 86400), ('" 2 s "', 2)],
)  # fmt: skip
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    options = (Option("d", DURATION, 1.0, "A duration.", ge=0),)
    loaded = config.load(options, _write(tmp_path, f"d = {text}\n"))
    assert loaded.get("d") == seconds


# (file text, the error after "agent.toml: ")
BAD_FILES = [
    ("[meter]\npoll_interval = -1", "meter.poll_interval: must be > 0, got -1"),
    ("[meter]\npoll_interval = 3601", "meter.poll_interval: must be <= 3600, got 3601"),
    (
        '[meter]\npoll_interval = "soon"',
        'meter.poll_interval: expected a duration (seconds, or e.g. "30s", "5m"), got "soon"',
    ),
    ("[outbox]\nmax_records = 1.5", "outbox.max_records: expected an integer, got 1.5"),
    ("[outbox]\nmax_records = true", "outbox.max_records: expected an integer, got true"),
    ("[outbox]\nmax_records = 0", "outbox.max_records: must be >= 1, got 0"),
    ("[collector]\ntls = 1", "collector.tls: expected true or false, got 1"),
    ('[collector]\nrate = "x"', 'collector.rate: expected a number, got "x"'),
    ("[collector]\nrate = inf", "collector.rate: must be a finite number, got inf"),
    ("agent_id = 7", "agent_id: expected a string, got 7"),
    ('[outbox]\npath = ""', 'outbox.path: expected a path, got ""'),
    (
        "[attribution]\nenv_labels = [1]",
        "attribution.env_labels: expected an array of strings, got an array",
    ),
    (
        '[log]\nlevel = "verbose"',
        'log.level: expected one of debug, info, warning, error, got "verbose"',
    ),
    ("[meter.poll_interval]\nx = 1", "meter.poll_interval: expected a duration, got a table"),
    (
        "[meter]\npol_interval = 1",
        "meter.pol_interval: unknown key; did you mean meter.poll_interval?",
    ),
    (
        "[metre]\npoll_interval = 1",
        "metre.poll_interval: unknown key; did you mean meter.poll_interval?",
    ),
    ("[metre]", "metre: unknown key; did you mean meter?"),
    ("zzz = 1", "zzz: unknown key"),
    (
        "[meter",
        "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_files_name_file_key_and_problem(tmp_path: Path, text: str, message: str) -> None:
    assert _error(tmp_path, text + "\n") == "agent.toml: " + message


def test_first_problem_in_file_order_is_reported(tmp_path: Path) -> None:
    message = _error(tmp_path, "[outbox]\nmax_records = 0\n[meter]\npoll_interval = -1\n")
    assert message == "agent.toml: outbox.max_records: must be >= 1, got 0"


def test_overrides_apply_in_order_after_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[meter]\npoll_interval = 5\n[collector]\nlisten = '[::]:7443'\n")
    loaded = config.load(
        OPTIONS,
        path,
        overrides=[
            config.parse_set("meter.poll_interval=2s"),
            config.parse_set("attribution.env_labels=A, B,,C"),
            config.parse_set("collector.tls_cert="),  # empty: unset
            config.parse_set("collector.tls=no"),
            config.parse_set("collector.listen=127.0.0.1:1=2"),  # only the first = splits
            Override("--poll-interval", "meter.poll_interval", "3"),
        ],
    )
    assert loaded[POLL] == 3.0
    assert loaded.sources["meter.poll_interval"] == "--poll-interval"
    assert loaded[LABELS] == ("A", "B", "C")
    assert loaded[CERT] is None
    assert loaded[TLS] is False
    assert loaded[LISTEN] == "127.0.0.1:1=2"
    assert loaded.sources["collector.listen"] == "--set"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("meter.poll_interval=-1", "--set: meter.poll_interval: must be > 0, got -1"),
        ("outbox.max_records=many", '--set: outbox.max_records: expected an integer, got "many"'),
        (
            "meter.pollinterval=1",
            "--set: meter.pollinterval: unknown key; did you mean meter.poll_interval?",
        ),
        ("collector.tls=maybe", '--set: collector.tls: expected true or false, got "maybe"'),
        ("collector.rate=nan", "--set: collector.rate: must be a finite number, got nan"),
        ("outbox.path=", '--set: outbox.path: expected a path, got an empty string'),
        ("log.level", "--set: log.level: expected KEY=VALUE"),
    ],
)  # fmt: skip
def test_bad_overrides_name_the_flag(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(OPTIONS, overrides=[config.parse_set(override)])
    assert str(caught.value) == message


def test_result_is_frozen_and_typed() -> None:
    loaded = config.load(OPTIONS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.path = Path("x")  # type: ignore[misc]
    with pytest.raises(TypeError):
        loaded.values["meter.poll_interval"] = 2.0  # type: ignore[index]
    poll_interval_s: float = loaded[POLL]  # mypy checks this line: Option[float] -> float
    assert poll_interval_s == 1.0
    with pytest.raises(KeyError, match=r"other\.key is not an option"):
        loaded[Option("other.key", INT, 1, "Not declared.")]


def _parser(cli: ConfigArgs) -> argparse.ArgumentParser:
    return _parsers(cli)[0]


def _parsers(cli: ConfigArgs) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The daemon's parser and its ``run`` subcommand, which carries the config arguments."""
    parser = argparse.ArgumentParser(prog="creditmeter-agent", exit_on_error=False)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    cli.add_arguments(run)
    return parser, run


def test_command_line_through_argparse(tmp_path: Path) -> None:
    default = _write(tmp_path, "[meter]\npoll_interval = 4\n[log]\nlevel = 'error'\n")
    other = _write(tmp_path, "[outbox]\nmax_records = 9\n", name="other.toml")
    cli = ConfigArgs(
        OPTIONS, default_path=default, flags={"--poll-interval": POLL, "--listen": LISTEN}
    )
    parser, run = _parsers(cli)

    loaded = cli.load(parser.parse_args(["run"]))
    assert (loaded.path, loaded[POLL], loaded[LEVEL]) == (default, 4.0, "error")

    args = parser.parse_args(
        ["run", "--config", str(other), "--poll-interval", "7", "--set", "meter.poll_interval=8",
         "--set", "log.level=debug"]
    )  # fmt: skip
    loaded = cli.load(args)
    assert loaded.path == other
    assert loaded[MAX_RECORDS] == 9
    assert loaded[POLL] == 7.0  # a flag beats --set, whatever the order on the line
    assert loaded[LEVEL] == "debug"
    assert loaded[LISTEN] == LISTEN.default  # flag not given: untouched

    help_text = " ".join(run.format_help().split())
    assert "How often NVML is sampled. (meter.poll_interval, default 1)" in help_text
    assert "Address (100% of agents use it)." in help_text


def test_flag_errors_name_the_flag(tmp_path: Path) -> None:
    cli = ConfigArgs(OPTIONS, flags={"--poll-interval": POLL})
    args = _parser(cli).parse_args(["run", "--poll-interval", "0"])
    with pytest.raises(ConfigError, match=r"^--poll-interval: meter.poll_interval: must be > 0"):
        cli.load(args)


def test_load_or_exit_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = _write(tmp_path, "[meter]\npoll_interval = -1\n")
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as caught:
        config.load_or_exit(OPTIONS, path, stderr=stderr)
    assert caught.value.code == 2
    assert stderr.getvalue() == (
        f"configuration error: {path}: meter.poll_interval: must be > 0, got -1\n"
    )

    cli = ConfigArgs(OPTIONS)
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as caught:
        cli.load_or_exit(_parser(cli).parse_args(["run", "--set", "nonsense"]), stderr=stderr)
    assert caught.value.code == 2
    assert stderr.getvalue() == "configuration error: --set: nonsense: expected KEY=VALUE\n"
    assert cli.load_or_exit(_parser(cli).parse_args(["run"]))[POLL] == 1.0


def test_declaration_mistakes_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="default must be > 0, got 0"):
        Option("meter.poll_interval", DURATION, 0.0, "Doc.", gt=0)
    with pytest.raises(ValueError, match="lower_case words"):
        Option("Meter.Poll", INT, 1, "Doc.")
    with pytest.raises(ValueError, match="declared twice"):
        config.check_options((POLL, POLL))
    with pytest.raises(ValueError, match="lies under another option"):
        config.check_options((Option("meter", INT, 1, "Doc."), POLL))
    with pytest.raises(ValueError, match="not one of these options"):
        ConfigArgs(OPTIONS, flags={"--other": Option("other", INT, 1, "Doc.")})


def test_reference_lists_every_option() -> None:
    reference = config.render_reference(OPTIONS)
    rows = reference.splitlines()
    assert rows[0] == "| option | type | default | description |"
    assert len(rows) == 2 + len(OPTIONS)
    assert (
        "| `meter.poll_interval` | duration (s), > 0, <= 3600 | `1` | How often NVML is sampled. |"
        in rows
    )
    assert "| `collector.tls_cert` | path, optional | unset | Certificate chain (PEM). |" in rows
    assert '| `log.level` | one of: debug, info, warning, error | `"info"` | Log level. |' in rows
    pipe = Option("x", STR, "a|b", "Left | right.")
    escaped = '| `x` | string | `"a\\|b"` | Left \\| right. |'
    assert config.render_reference((pipe,)).splitlines()[2] == escaped


TRICKY = Option("tricky", STR, 'quote " back \\ tab \t del \x7f é', "Escapes survive.")


def test_example_loads_to_the_defaults_commented_or_not(tmp_path: Path) -> None:
    options: tuple[Option[Any], ...] = (*OPTIONS, TRICKY)
    example = config.render_example(options, title="creditmeter-agent configuration")
    assert example.startswith("# creditmeter-agent configuration\n")
    tomllib.loads(example)  # valid TOML as shipped
    assert config.load(options, _write(tmp_path, example)).values == {
        option.name: option.default for option in options
    }
    # Uncommenting every setting ("#key = value", no space) keeps every default.
    uncommented = re.sub(r"(?m)^#(?=\S)", "", example)
    assert uncommented.count("\n[") == 6  # meter, outbox, collector, attribution, log, store
    loaded = config.load(options, _write(tmp_path, uncommented, name="all.toml"))
    for option in options:
        assert loaded.sources[option.name] != "default", option.name  # it was in the file
        assert loaded[option] == option.default, option.name
    assert "[collector.store]" in example
    assert example.index("#agent_id") < example.index("[meter]")  # top-level keys come first
