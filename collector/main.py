"""creditmeter-collector: the collector daemon and its administration commands.

    creditmeter-collector serve  [--config /etc/creditmeter/collector.toml] [--set KEY=VALUE]
                                 [--db URL] [--listen 0.0.0.0:7300] [--port-file PATH]
                                 [--grace-s 10] [--metrics-listen HOST:PORT] [--log-level L]
    creditmeter-collector enroll --db URL AGENT_ID PUBLIC_KEY_HEX
    creditmeter-collector revoke --db URL AGENT_ID
    creditmeter-collector audit  --db URL
    creditmeter-collector report --db URL [--from 2025-06-01] [--to 2025-07-01]
                                 [--group-by account,model] [--format table|csv|json]
    creditmeter-collector plan|account|top-up|grant|adjust|entries|balance|period|charge|export
                                 (credits: see collector/admin_cli.py)

``serve`` reads every option from collector.toml (collector/settings.py declares them); the
flags override the file. --db defaults to $CREDITMETER_COLLECTOR_DB, then to store.url of
the configuration file (``--config``, or /etc/creditmeter/collector.toml when it exists), so
on the collector host the administration commands find the daemon's database by themselves.
Exit codes: 0 success; 1 audit findings;
2 bad arguments or configuration; 3 the command failed (database unusable, address in
use). Errors are one line on stderr. ``serve`` logs to stdout; the other commands print
their result to stdout, so that ``report --format json`` can be piped.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import getpass
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NoReturn

from creditmeter import __version__
from creditmeter.collector import admin_cli, health_cli, quarantine, settings
from creditmeter.collector.access import ApiAccess, load_access
from creditmeter.collector.audit import audit
from creditmeter.collector.auth import AllowEnrolledAgents, Authenticator, CertificateBoundAgents
from creditmeter.collector.clock import wall_clock_us
from creditmeter.collector.errors import (
    CollectorError,
    ConfigError,
    EnrollmentError,
    ListenError,
    Status,
)
from creditmeter.collector.ingest_workers import WorkerPool, WorkerSetup
from creditmeter.collector.periods import iso_text
from creditmeter.collector.serve_lock import hold_serve_lock
from creditmeter.collector.server import IngestServer, ServerConfig, create_server
from creditmeter.collector.store import Store, canonical_public_key_hex, check_agent_id
from creditmeter.collector.stores import SQLITE_PREFIX, open_store, redacted, sqlite_path
from creditmeter.collector.telemetry import CollectorTelemetry, HealthWatchdog
from creditmeter.collector.verifier import Verifier
from creditmeter.config import Config
from creditmeter.files import exit_quietly_on_broken_pipe
from creditmeter.labels import label_error
from creditmeter.logs import setup_logging
from creditmeter.metrics import Registry, serve_metrics
from creditmeter.sdnotify import Notifier
from creditmeter.tls import ReloadingServerCredentials, TlsError, TlsFiles, describe

PROG = "creditmeter-collector"
DB_ENV = settings.DB_ENV
SWITCH_INTERVAL_S = 0.0002  # see _switching_threads_every
SIGNAL_POLL_S = 0.5
# Every command: 0 done (or nothing to do, which it says), 1 failed (audit: findings),
# 2 bad input (arguments, configuration, a refused value), 3 not found (an account, plan,
# agent, record or database that does not exist).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
EXIT_FINDINGS = EXIT_FAILED

log = logging.getLogger("creditmeter.collector")

Command = Callable[[argparse.Namespace], int]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Reports bad arguments as one line (by raising) instead of usage text and exit(2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()  # "serve" for a subcommand's parser
        raise _UsageError(f"{command}: {message}" if command else message)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Command = args.command
    try:
        if hasattr(args, "db"):  # an administration command; serve reads store.url itself
            args.db = settings.admin_store_url(getattr(args, "config", None), args.db)
            if not args.db:
                raise ConfigError(
                    f"no database: pass --db sqlite:///absolute/path or set {DB_ENV} "
                    f"(or store.url in {settings.DEFAULT_CONFIG})"
                )
        return command(args)
    except (ConfigError, EnrollmentError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CollectorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND if exc.status is Status.NOT_FOUND else EXIT_FAILED
    except TlsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def main_entry() -> None:
    exit_quietly_on_broken_pipe(main)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Verifies, stores and reports GPU usage records.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    db = _Parser(add_help=False)
    db.add_argument(
        "--db",
        default=os.environ.get(DB_ENV),
        metavar="URL",
        help=f"store URL, sqlite:///absolute/path (default: ${DB_ENV}, then store.url of "
        "the configuration file)",
    )
    db.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"collector.toml to take store.url from (default: {settings.DEFAULT_CONFIG}, "
        "if present)",
    )

    serve = commands.add_parser("serve", help="run the collector (the daemon)")
    settings.config_args().add_arguments(serve)
    serve.set_defaults(command=_serve)

    web = commands.add_parser("web", help="serve the JSON API and the pages (a daemon)")
    settings.web_config_args().add_arguments(web)
    web.set_defaults(command=_web)

    enroll = commands.add_parser("enroll", parents=[db], help="enroll an agent's public key")
    enroll.add_argument("agent_id", metavar="AGENT_ID")
    enroll.add_argument("public_key_hex", metavar="PUBLIC_KEY_HEX")
    enroll.add_argument(
        "--replace",
        action="store_true",
        help="the agent's old key is lost: this key signs its records after the stored head "
        "(audit notes it; with the old key, rotate on the agent instead)",
    )
    enroll.add_argument("--reason", help="why the key is replaced (with --replace)")
    enroll.add_argument("--by", default=None, help="who approves it (default: login name)")
    enroll.set_defaults(command=_enroll)

    revoke = commands.add_parser("revoke", parents=[db], help="stop accepting an agent")
    revoke.add_argument("agent_id", metavar="AGENT_ID")
    revoke.set_defaults(command=_revoke)

    audit_cmd = commands.add_parser("audit", parents=[db], help="re-verify every stored record")
    audit_cmd.set_defaults(command=_audit)

    held = commands.add_parser(
        "quarantine", help="records kept unbilled because a field broke the checks"
    )
    held_commands = held.add_subparsers(title="actions", required=True, metavar="ACTION")
    held_list = held_commands.add_parser("list", parents=[db], help="list quarantined records")
    held_list.add_argument("--all", action="store_true", help="released ones too")
    held_list.set_defaults(command=_quarantine_list)
    held_release = held_commands.add_parser(
        "release", parents=[db], help="bill a quarantined record that passes the checks now"
    )
    held_release.add_argument("agent_id", metavar="AGENT_ID")
    held_release.add_argument("seq", type=int, metavar="SEQ")
    held_release.add_argument("--by", default=os.environ.get("USER", "operator"), metavar="WHO")
    held_release.set_defaults(command=_quarantine_release)

    health_cli.add_command(commands)
    admin_cli.add_commands(commands, db)  # credits: plans, accounts, balances, report, export
    return parser


# -- commands --------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    config = settings.load_serve(args)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): how to see
    # where a collector that does not stop is stuck. (Only where stderr is a file: serve
    # run in-process under a test's captured output has none.)
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    stopping = threading.Event()
    notifier = Notifier.from_environment()
    with (
        _logging_to_stdout(config[settings.LOG_LEVEL], config[settings.LOG_FORMAT]),
        _setting_on_signals(stopping),
        _switching_threads_every(SWITCH_INTERVAL_S),
    ):
        try:
            _run_server(config, notifier, stopping)
        finally:
            notifier.close()
        log.info("stopped")
    return EXIT_OK


def _web(args: argparse.Namespace) -> int:
    config = settings.load_web(args)
    from creditmeter.collector.web import serve as web_serve  # Starlette only where served

    with _logging_to_stdout(config[settings.LOG_LEVEL], config[settings.LOG_FORMAT]):
        web_serve.run(config)
    return EXIT_OK


def _run_server(config: Config, notifier: Notifier, stopping: threading.Event) -> None:
    """Starts in order (TLS and API credentials, store, ingest workers, the gRPC port,
    metrics, health watchdog, then READY=1) and unwinds the other way on SIGTERM:
    STOPPING=1, the server refuses new streams and lets open ones commit their batch
    (``server.grace``), then the workers stop and the store closes.
    """
    telemetry = CollectorTelemetry(Registry())
    access = _api_access(config)
    credentials, authenticator = _transport_security(config, access.client_names)
    listen = config[settings.LISTEN]
    with ExitStack() as stack:
        url = config[settings.STORE_URL]
        if url.startswith(SQLITE_PREFIX):
            stack.callback(os.close, hold_serve_lock(sqlite_path(url)))
        store = _open_store(config)
        stack.callback(store.close)
        telemetry.watch_quarantine(lambda: quarantine.held_count(store))
        silent_after_s = config[settings.AGENT_SILENT_AFTER]
        telemetry.watch_agents(store.agent_status, wall_clock_us, silent_after_s)
        ingestor = _start_ingest_workers(stack, config)
        server, port = create_server(
            listen,
            store,
            ingestor=ingestor,
            config=ServerConfig(
                max_stream_age_s=config[settings.MAX_STREAM_AGE],
                max_streams=config[settings.MAX_STREAMS],
                max_pending=config[settings.MAX_PENDING],
                max_pending_per_peer=config[settings.MAX_PENDING_PER_PEER],
                hello_timeout_s=config[settings.HELLO_TIMEOUT],
                max_streams_per_agent=config[settings.MAX_STREAMS_PER_AGENT],
                stream_idle_timeout_s=config[settings.STREAM_IDLE_TIMEOUT],
            ),
            credentials=credentials,
            authenticator=authenticator,
            observer=telemetry,
            api_auth=access,
            on_api_refused=telemetry.api_refused,
            extra_handlers=admin_cli.serve_handlers(
                store, config[settings.PRICES_FILE], open_to_callers=access.configured
            ),
        )
        # The agents' port first: when it is taken, that is the error worth reporting. The
        # server is stopped after the metrics (LIFO), so /metrics shows the drain too.
        try:
            _serve_metrics(stack, config, telemetry.registry)
        except BaseException:
            server.stop(0)
            raise
        stack.callback(_stop_server, server, config)
        server.start()
        port_file = config[settings.PORT_FILE]
        if port_file is not None:
            _write_port_file(port_file, port)
        url = redacted(config[settings.STORE_URL])
        with _watchdog(store, notifier, server, telemetry):
            notifier.ready(f"listening on {listen} (port {port})")
            log.info("collector listening on %s (port %d), store %s", listen, port, url)
            # Waits in steps: Python runs a signal's handler only in the main thread, once it
            # is back in the interpreter; a wait without a timeout may never come back when
            # the kernel hands SIGTERM to another of the many threads.
            while not stopping.wait(SIGNAL_POLL_S):
                pass
            notifier.stopping("refusing new streams; draining open ones")
            log.info(
                "stopping: refusing new streams, %.0f s grace for open ones",
                config[settings.GRACE],
            )


def _start_ingest_workers(stack: ExitStack, config: Config) -> WorkerPool | None:
    """The worker processes (after the store: it has migrated the database they open),
    stopped after the server (LIFO) so that draining streams still commit. None when
    ``server.ingest_workers`` is 0."""
    count = config[settings.INGEST_WORKERS]
    if count == 0:
        return None
    setup = WorkerSetup(
        config[settings.STORE_URL],
        log_level=config[settings.LOG_LEVEL],
        log_format=config[settings.LOG_FORMAT],
    )
    pool = WorkerPool(setup, count)
    pool.start()
    stack.callback(pool.close)
    return pool


def _stop_server(server: IngestServer, config: Config) -> None:
    server.stop(config[settings.GRACE])
    port_file = config[settings.PORT_FILE]
    if port_file is not None:
        port_file.unlink(missing_ok=True)  # exists while we listen


@contextmanager
def _watchdog(
    store: Store, notifier: Notifier, server: IngestServer, telemetry: CollectorTelemetry
) -> Iterator[None]:
    """The store is probed (and systemd's watchdog fed) while the body runs."""
    stop = threading.Event()
    # A write, not a read: health must say NOT_SERVING while every batch would fail to
    # commit (disk full), not only while the store cannot be reached.
    watchdog = HealthWatchdog(store.probe_write, notifier, server, telemetry)
    watchdog.check()  # the first verdict before READY=1, so health never starts wrong
    watchdog.start(stop)
    try:
        yield
    finally:
        stop.set()
        watchdog.join()


def _transport_security(
    config: Config, api_clients: frozenset[str]
) -> tuple[object, Authenticator]:
    """(grpc server credentials or None, the Ingest authenticator). Raises TlsError."""
    if not config[settings.TLS_ENABLED]:
        log.warning("serving without TLS (tls.enabled = false): only for a trusted network")
        return None, AllowEnrolledAgents()
    files = TlsFiles(config[settings.TLS_CA], config[settings.TLS_CERT], config[settings.TLS_KEY])
    mutual = files.ca_file is not None
    tls = ReloadingServerCredentials(files, require_client_cert=mutual)
    assert tls.material.leaf is not None
    log.info("TLS certificate %s", describe(tls.material.leaf))
    if not mutual:
        log.warning(
            "no tls.ca_file: agents present no certificate; their ids are bound only to "
            "their signing keys"
        )
        return tls.credentials(), AllowEnrolledAgents()
    log.info("mutual TLS: an agent's certificate CN must be its agent id")
    return tls.credentials(), CertificateBoundAgents(api_clients)


def _api_access(config: Config) -> ApiAccess:
    access = load_access(config[settings.API_TOKEN_FILE], config[settings.API_CLIENTS])
    if access.tokens and not config[settings.TLS_ENABLED]:
        log.warning("API bearer tokens would travel in plain text: enable TLS")
    return access


def _open_store(config: Config) -> Store:
    try:
        return open_store(
            config[settings.STORE_URL], create=True, pool_size=config[settings.POOL_SIZE]
        )
    except ConfigError as exc:
        source = config.sources.get(settings.STORE_URL.name, "default")
        raise ConfigError(f"{source}: {settings.STORE_URL.name}: {exc}") from None


def _serve_metrics(stack: ExitStack, config: Config, registry: Registry) -> None:
    listen = config[settings.METRICS_LISTEN]
    if not listen:
        return
    host, _, port = listen.rpartition(":")
    try:
        server, bound = serve_metrics(registry, host.strip("[]"), int(port))
    except OSError as exc:
        problem = exc.strerror or str(exc)
        raise ListenError(f"metrics.listen {listen}: cannot listen: {problem}") from None
    stack.callback(server.shutdown)
    log.info("metrics on http://%s:%d/metrics", host, bound)


def _quarantine_list(args: argparse.Namespace) -> int:
    store = open_store(args.db, create=False, migrate=False)
    try:
        entries = store.quarantined()
    finally:
        store.close()
    shown = [e for e in entries if args.all or e.released_at_us is None]
    if not shown:
        print("nothing in quarantine" if not entries else "nothing held (--all: released too)")
    for entry in shown:
        print(quarantine.describe(entry))
    return EXIT_OK


def _quarantine_release(args: argparse.Namespace) -> int:
    store = open_store(args.db, create=False)
    try:
        entry = quarantine.release(store, Verifier(), args.agent_id, args.seq, args.by)
    finally:
        store.close()
    print(f"released: {quarantine.describe(entry)}")
    return EXIT_OK


def _enroll(args: argparse.Namespace) -> int:
    # Bad arguments are refused before any database is opened or created: the error names
    # the argument, not whatever happens to sit at the store URL.
    check_agent_id(args.agent_id)
    canonical_public_key_hex(args.public_key_hex)
    if args.replace:
        return _replace_key(args)
    if args.reason is not None:
        raise ConfigError("--reason goes with --replace")
    store = open_store(args.db, create=True)
    try:
        before = store.get_agent(args.agent_id)
        agent = store.enroll_agent(args.agent_id, args.public_key_hex)
    finally:
        store.close()
    if before is not None and before == agent:
        print(f"{agent.agent_id} is enrolled with this key already (nothing changed)")
    else:
        print(f"enrolled {agent.agent_id} (key {agent.public_key_hex})")
    return EXIT_OK


def _replace_key(args: argparse.Namespace) -> int:
    if not args.reason:
        raise ConfigError("--replace needs --reason: the audit shows why the key was replaced")
    by = args.by or getpass.getuser()
    for what, text in (("--reason", args.reason), ("--by", by)):
        error = label_error(what, text)
        if error is not None:
            raise ConfigError(str(error))
    store = open_store(args.db, create=False)
    try:
        before = store.get_agent(args.agent_id)
        agent = store.replace_agent_key(
            args.agent_id, args.public_key_hex, by=by, reason=args.reason
        )
    finally:
        store.close()
    if before == agent:
        print(f"{agent.agent_id} signs with this key already (nothing changed)")
        return EXIT_OK
    print(
        f"replaced the key of {agent.agent_id}: key {agent.public_key_hex} signs its records "
        f"after seq {agent.head.seq}; audit notes the replacement (by {by}: {args.reason})"
    )
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    store = open_store(args.db, create=False)
    try:
        before = store.get_agent(args.agent_id)
        agent = store.revoke_agent(args.agent_id)
    finally:
        store.close()
    if before is not None and before.revoked_at_us is not None:
        when = iso_text(before.revoked_at_us)
        print(f"{agent.agent_id} was revoked already, at {when} (nothing changed)")
    else:
        print(f"revoked {agent.agent_id}")
    return EXIT_OK


def _audit(args: argparse.Namespace) -> int:
    store = open_store(args.db, create=False, migrate=False)
    try:
        result = audit(store, Verifier())
    finally:
        store.close()
    for finding in result.findings:
        print(finding)
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"audit: {result.agent_count} agents, {result.record_count} records, "
        f"{len(result.findings)} findings"
    )
    return EXIT_OK if result.clean else EXIT_FINDINGS


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def _logging_to_stdout(level: str, fmt: str) -> Iterator[None]:
    """Daemon logging (creditmeter.logs: levels, journald priorities, text or JSON) for the
    time ``serve`` runs; main() leaves no global state behind."""
    root = logging.getLogger()
    previous_level, previous_handlers = root.level, list(root.handlers)
    setup_logging(level, fmt)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in previous_handlers]:
            root.removeHandler(handler)
        root.setLevel(previous_level)


@contextmanager
def _switching_threads_every(interval_s: float) -> Iterator[None]:
    """While one stream's thread verifies (pure Python, holding the GIL), another may be in
    a store transaction that needs the GIL back after every SQLite step; with Python's
    default 5 ms switch interval it waits up to 5 ms each time, and measured ingest fell
    from ~140,000 to ~20,000 records/s next to a busy verifier. At 0.2 ms it kept ~85,000
    while the verifier kept working."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@contextmanager
def _setting_on_signals(event: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``event`` (the serve loop's cue for an ordered shutdown)."""
    previous = {
        signum: signal.signal(signum, lambda *_: event.set())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _write_port_file(path: Path, port: int) -> None:
    """Written whole or not at all: a reader polling for the file never sees half a port."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(f"{port}\n")
        os.replace(partial, path)
    except OSError as exc:
        raise ConfigError(f"server.port_file {path}: {exc.strerror}") from exc


if __name__ == "__main__":
    main_entry()
