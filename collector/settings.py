"""Every option of ``creditmeter-collector serve``, declared once: loader, --help, the README's
reference and the example file ``systemd/collector.toml.example`` all come from here.

Precedence, lowest first: the defaults, ``/etc/creditmeter/collector.toml`` (or ``--config``),
``$CREDITMETER_COLLECTOR_DB`` and ``$CREDITMETER_PRICES``, ``--set KEY=VALUE``, then the flags
(``--db``, ``--listen``, …). The administration commands (``enroll``, ``report``, …) read only
``store.url`` and ``ledger.prices_file`` from the same file, so that on the collector host they
find the daemon's database and price it as the daemon does by themselves.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from creditmeter import config as cfg
from creditmeter.collector.errors import ConfigError
from creditmeter.config import (
    BOOL,
    DURATION,
    INT,
    PATH,
    STR,
    STR_LIST,
    Choice,
    Config,
    ConfigArgs,
    Maybe,
    Option,
    Override,
)

DEFAULT_CONFIG = Path("/etc/creditmeter/collector.toml")
DEFAULT_STATEMENT_KEY = Path("/var/lib/creditmeter-collector/statement-key.pem")
DB_ENV = "CREDITMETER_COLLECTOR_DB"
PRICES_ENV = "CREDITMETER_PRICES"

STORE_URL = Option(
    "store.url",
    STR,
    "sqlite:///var/lib/creditmeter-collector/collector.db",
    "Where records are stored: sqlite:///absolute/path, or postgresql://user@host/db "
    "(its password in a ?passfile=, not here).",
)

POOL_SIZE = Option(
    "store.pool_size",
    INT,
    4,  # pg_store.DEFAULT_POOL_SIZE (not imported here: SQLite hosts never load psycopg)
    "PostgreSQL: connections the server process keeps, shared by streams' Hellos and API calls "
    "(plus one per audit or export, and one per ingest worker); see docs/capacity.md. SQLite: "
    "unused.",
    ge=1,
    le=1000,
)

LISTEN = Option("server.listen", STR, "0.0.0.0:7300", "host:port the agents connect to.")
PORT_FILE = Option(
    "server.port_file",
    Maybe(PATH),
    None,
    "Write the bound port here while listening (for port 0 in tests); removed at exit.",
)
GRACE = Option(
    "server.grace",
    DURATION,
    10.0,
    "At shutdown, how long open streams may finish their batch; keep below TimeoutStopSec=.",
    ge=0,
)
MAX_STREAM_AGE = Option(
    "server.max_stream_age",
    DURATION,
    300.0,
    "A stream older than this ends after its next ack and the agent reconnects (balancing).",
    gt=0,
)
MAX_STREAMS = Option(
    "server.max_streams",
    INT,
    1024,
    "Concurrent agent streams at most (one thread each); more are refused with UNAVAILABLE. "
    "Agents hold one only while they deliver.",
    ge=1,
    le=100_000,
)
MAX_PENDING = Option(
    "server.max_pending_streams",
    INT,
    64,
    "Streams not yet past their Hello at most (they never take an agent's slot).",
    ge=1,
    le=10_000,
)
MAX_PENDING_PER_PEER = Option(
    "server.max_pending_per_peer",
    INT,
    8,
    "Of those, at most this many from one address.",
    ge=1,
    le=10_000,
)
MAX_STREAMS_PER_AGENT = Option(
    "server.max_streams_per_agent",
    INT,
    4,
    "Streams one agent id may hold at once (one, plus reconnects overlapping it).",
    ge=1,
    le=1000,
)
STREAM_IDLE_TIMEOUT = Option(
    "server.stream_idle_timeout",
    DURATION,
    60.0,
    "An agent's stream that sends nothing this long is cancelled (agents close their own "
    "once everything is acknowledged).",
    gt=0,
    le=86_400,
)
AGENT_SILENT_AFTER = Option(
    "server.agent_silent_after",
    DURATION,
    900.0,
    "An enrolled agent whose last batch arrived longer ago than this counts as silent "
    "(creditmeter_collector_agents_silent): an agent writes at least every "
    "meter.idle_record_interval (300 s) even when its GPUs idle, so a silent one is down, "
    "cut off or never delivered.",
    gt=0,
)
HELLO_TIMEOUT = Option(
    "server.hello_timeout",
    DURATION,
    10.0,
    "A stream that has not said Hello by then is cancelled.",
    gt=0,
    le=300,
)

INGEST_WORKERS = Option(
    "server.ingest_workers",
    INT,
    2,
    "Processes that verify and store batches: each adds a core's worth of ingest (about "
    "60,000 records/s). 0: the server process does it on each stream's thread.",
    ge=0,
    le=256,
)

TLS_ENABLED = Option(
    "tls.enabled", BOOL, False, "Serve TLS; off: plain text (only on a trusted network)."
)
TLS_CERT = Option(
    "tls.cert_file",
    Maybe(PATH),
    None,
    "The collector's certificate chain (PEM), leaf first; re-read when it changes.",
)
TLS_KEY = Option(
    "tls.key_file", Maybe(PATH), None, "The private key of tls.cert_file (PEM, unencrypted)."
)
TLS_CA = Option(
    "tls.ca_file",
    Maybe(PATH),
    None,
    "CA bundle that issues agent certificates; set: mutual TLS, and an agent's certificate "
    "CN must equal its agent id.",
)

API_TOKEN_FILE = Option(
    "api.token_file",
    Maybe(PATH),
    None,
    'Bearer tokens for the Query, Charges and admin APIs, one per line: "NAME TOKEN ROLE '
    '[ACCOUNT...]", ROLE one of reader, charger, admin; accounts scope a tenant (mode 0640).',
)
API_CLIENTS = Option(
    "api.clients",
    STR_LIST,
    (),
    "Client certificates (issued by tls.ca_file) that may call the Query, Charges and admin "
    'APIs: "CN ROLE [ACCOUNT...]" each, as in api.token_file.',
)

PRICES_FILE = Option(
    "ledger.prices_file",
    Maybe(PATH),
    None,
    f"Retired: a price list (TOML) imported into the price book at start when it holds no "
    f"version; ${PRICES_ENV} overrides it. Use: prices set FILE --effective HOUR.",
)

STATEMENT_KEY = Option(
    "ledger.statement_key",
    Maybe(PATH),
    None,
    "The collector's Ed25519 key (PEM) that signs each statement at period close; created, "
    "mode 0600, by the first close. Unset: statement-key.pem beside a SQLite database, "
    "/var/lib/creditmeter-collector/statement-key.pem with PostgreSQL.",
)

WEB_LISTEN = Option(
    "web.listen",
    STR,
    "127.0.0.1:7380",
    "host:port of creditmeter-collector web (the JSON API and the pages); put TLS in front of "
    "it (a reverse proxy) when it leaves the host.",
)
WEB_PORT_FILE = Option(
    "web.port_file",
    Maybe(PATH),
    None,
    "Write the web server's bound port here while listening (for port 0 in tests).",
)
WEB_SESSION_HOURS = Option(
    "web.session_hours",
    INT,
    8,
    "A page login lasts this long (sessions are held in memory: a restart ends them).",
    ge=1,
    le=24 * 30,
)

METRICS_LISTEN = Option(
    "metrics.listen", STR, "127.0.0.1:9465", "host:port serving /metrics; empty: off."
)
LOG_LEVEL = Option(
    "log.level", Choice("debug", "info", "warning", "error"), "info", "Least severe level logged."
)
LOG_FORMAT = Option("log.format", Choice("text", "json"), "text", "Log line format.")

OPTIONS = (
    STORE_URL,
    POOL_SIZE,
    LISTEN,
    PORT_FILE,
    GRACE,
    MAX_STREAM_AGE,
    MAX_STREAMS,
    MAX_PENDING,
    MAX_PENDING_PER_PEER,
    MAX_STREAMS_PER_AGENT,
    HELLO_TIMEOUT,
    STREAM_IDLE_TIMEOUT,
    AGENT_SILENT_AFTER,
    INGEST_WORKERS,
    TLS_ENABLED,
    TLS_CERT,
    TLS_KEY,
    TLS_CA,
    API_TOKEN_FILE,
    API_CLIENTS,
    PRICES_FILE,
    STATEMENT_KEY,
    WEB_LISTEN,
    WEB_PORT_FILE,
    WEB_SESSION_HOURS,
    METRICS_LISTEN,
    LOG_LEVEL,
    LOG_FORMAT,
)

# The flags ``serve`` has always had, kept so that scripts and the demo keep working.
FLAGS: dict[str, Option[Any]] = {
    "--db": STORE_URL,
    "--listen": LISTEN,
    "--port-file": PORT_FILE,
    "--grace-s": GRACE,
    "--max-stream-age-s": MAX_STREAM_AGE,
    "--max-streams": MAX_STREAMS,
    "--ingest-workers": INGEST_WORKERS,
    "--metrics-listen": METRICS_LISTEN,
    "--log-level": LOG_LEVEL,
}


def config_args() -> ConfigArgs:
    return ConfigArgs(OPTIONS, default_path=DEFAULT_CONFIG, flags=FLAGS)


# ``web`` reads the same file; its own flags.
WEB_FLAGS: dict[str, Option[Any]] = {
    "--db": STORE_URL,
    "--listen": WEB_LISTEN,
    "--port-file": WEB_PORT_FILE,
    "--log-level": LOG_LEVEL,
}


def web_config_args() -> ConfigArgs:
    return ConfigArgs(OPTIONS, default_path=DEFAULT_CONFIG, flags=WEB_FLAGS)


def load_web(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """``web``'s configuration (the same file and environment as serve's); raises
    ConfigError."""
    config = _load(web_config_args(), args, environ, with_prices=False)
    _check_host_port(config, WEB_LISTEN, config[WEB_LISTEN])
    return config


def load_serve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """The daemon's configuration; raises ConfigError (one line naming source, key, problem)."""
    config = _load(config_args(), args, environ, with_prices=True)
    check(config)
    return config


def _load(
    cli: ConfigArgs,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None,
    *,
    with_prices: bool,
) -> Config:
    env = os.environ if environ is None else environ
    overrides: list[Override] = []
    if env.get(DB_ENV):
        overrides.append(Override(f"${DB_ENV}", STORE_URL.name, env[DB_ENV]))
    if with_prices and env.get(PRICES_ENV):
        overrides.append(Override(f"${PRICES_ENV}", PRICES_FILE.name, env[PRICES_ENV]))
    try:
        overrides += cli.overrides(args)
        return cfg.load(OPTIONS, args.config, default_path=DEFAULT_CONFIG, overrides=overrides)
    except cfg.ConfigError as exc:
        raise ConfigError(str(exc)) from None


def admin_store_url(config_path: Path | None, db: str | None) -> str | None:
    """The store an administration command opens: ``--db`` (or ``$CREDITMETER_COLLECTOR_DB``),
    else ``store.url`` from the configuration file when there is one; None if neither."""
    if db:
        return db
    config = _admin_config(config_path)
    return None if config is None else config[STORE_URL]


def admin_statement_key(config_path: Path | None, store_url: str) -> Path:
    """Where ``period close`` finds (or creates) the key that signs statements."""
    config = _admin_config(config_path)
    configured = None if config is None else config[STATEMENT_KEY]
    if configured is not None:
        return configured
    if store_url.startswith("sqlite://"):
        return Path(store_url.removeprefix("sqlite://")).parent / "statement-key.pem"
    return DEFAULT_STATEMENT_KEY


def _admin_config(config_path: Path | None) -> Config | None:
    """``config_path``, else the default file if present; None when there is neither."""
    if config_path is None and not DEFAULT_CONFIG.exists():
        return None
    try:
        return cfg.load(OPTIONS, config_path, default_path=DEFAULT_CONFIG)
    except cfg.ConfigError as exc:
        raise ConfigError(str(exc)) from None


# -- checks across options ----------------------------------------------------------------


def check(config: Config) -> None:
    """What one option's kind and bounds cannot say. Raises ConfigError naming the key."""
    _check_host_port(config, LISTEN, config[LISTEN])
    if config[METRICS_LISTEN]:
        _check_host_port(config, METRICS_LISTEN, config[METRICS_LISTEN])
    if config[TLS_ENABLED]:
        missing = [option.name for option in (TLS_CERT, TLS_KEY) if config[option] is None]
        if missing:
            raise ConfigError(_where(config, TLS_ENABLED, f"true needs {' and '.join(missing)}"))
    else:
        for path_option in (TLS_CERT, TLS_KEY, TLS_CA):
            if config[path_option] is not None:
                problem = "is set but tls.enabled is false; enable TLS or unset it"
                raise ConfigError(_where(config, path_option, problem))
    if config[API_CLIENTS] and config[TLS_CA] is None:
        raise ConfigError(
            _where(config, API_CLIENTS, "client certificates need tls.ca_file (mutual TLS)")
        )


def _check_host_port(config: Config, option: Option[str], value: str) -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            _where(config, option, f"{value!r} is not HOST:PORT (e.g. {option.default})")
        )


def _where(config: Config, option: Option[Any], problem: str) -> str:
    """The message "<source>: <key>: <problem>"; the source is the file or flag."""
    source = config.sources.get(option.name, "default")
    return f"{source}: {option.name}: {problem}"
