"""creditmeter-collector: the collector daemon and its administration commands.

    creditmeter-collector serve  --db sqlite:///var/lib/creditmeter/collector.db
                                 [--listen 0.0.0.0:7300] [--port-file PATH] [--grace-s 10]
    creditmeter-collector enroll --db URL AGENT_ID PUBLIC_KEY_HEX
    creditmeter-collector revoke --db URL AGENT_ID
    creditmeter-collector audit  --db URL
    creditmeter-collector report --db URL [--from 2025-06-01] [--to 2025-07-01]
                                 [--format table|csv|json]

--db defaults to $CREDITMETER_COLLECTOR_DB. Exit codes: 0 success; 1 audit findings;
2 bad arguments or configuration; 3 the command failed (database unusable, address in
use). Errors are one line on stderr. ``serve`` logs to stdout; the other commands print
their result to stdout, so that ``report --format json`` can be piped.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from creditmeter.collector.audit import audit
from creditmeter.collector.errors import CollectorError, ConfigError, EnrollmentError
from creditmeter.collector.report import (
    build_report,
    parse_period,
    render_csv,
    render_json,
    render_table,
)
from creditmeter.collector.server import ServerConfig, create_server
from creditmeter.collector.stores import open_store
from creditmeter.collector.verifier import Verifier

PROG = "creditmeter-collector"
DB_ENV = "CREDITMETER_COLLECTOR_DB"
DEFAULT_LISTEN = "0.0.0.0:7300"
SWITCH_INTERVAL_S = 0.0002  # see _switching_threads_every
EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3

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
        if not args.db:
            raise ConfigError(f"no database: pass --db sqlite:///absolute/path or set {DB_ENV}")
        return command(args)
    except (ConfigError, EnrollmentError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CollectorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def main_entry() -> None:
    sys.exit(main())


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Verifies, stores and reports GPU usage records.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    db = _Parser(add_help=False)
    db.add_argument(
        "--db",
        default=os.environ.get(DB_ENV),
        metavar="URL",
        help=f"store URL, sqlite:///absolute/path (default: ${DB_ENV})",
    )

    serve = commands.add_parser("serve", parents=[db], help="run the collector")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT")
    serve.add_argument(
        "--port-file", type=Path, help="write the bound port here while listening (port 0)"
    )
    serve.add_argument("--grace-s", type=float, default=10.0, help="shutdown grace for streams")
    serve.add_argument("--max-stream-age-s", type=float, default=ServerConfig.max_stream_age_s)
    serve.add_argument("--max-streams", type=int, default=ServerConfig.max_streams)
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    serve.set_defaults(command=_serve)

    enroll = commands.add_parser("enroll", parents=[db], help="enroll an agent's public key")
    enroll.add_argument("agent_id", metavar="AGENT_ID")
    enroll.add_argument("public_key_hex", metavar="PUBLIC_KEY_HEX")
    enroll.set_defaults(command=_enroll)

    revoke = commands.add_parser("revoke", parents=[db], help="stop accepting an agent")
    revoke.add_argument("agent_id", metavar="AGENT_ID")
    revoke.set_defaults(command=_revoke)

    audit_cmd = commands.add_parser("audit", parents=[db], help="re-verify every stored record")
    audit_cmd.set_defaults(command=_audit)

    report = commands.add_parser("report", parents=[db], help="busy seconds and credits")
    report.add_argument("--from", dest="from_", metavar="DATE", help="ISO date/datetime, UTC")
    report.add_argument("--to", metavar="DATE", help="ISO date/datetime, UTC, exclusive")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.set_defaults(command=_report)
    return parser


# -- commands --------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    _check_listen(args.listen)
    config = ServerConfig(max_stream_age_s=args.max_stream_age_s, max_streams=args.max_streams)
    stopping = threading.Event()
    with (
        _logging_to_stdout(args.log_level),
        _setting_on_signals(stopping),
        _switching_threads_every(SWITCH_INTERVAL_S),
    ):
        store = open_store(args.db, create=True)
        try:
            server, port = create_server(args.listen, store, config=config)
            server.start()
            try:
                if args.port_file is not None:
                    _write_port_file(args.port_file, port)
                log.info(
                    "collector listening on %s (port %d), store %s", args.listen, port, args.db
                )
                stopping.wait()
                log.info("stopping: refusing new streams, %.0f s grace for open ones", args.grace_s)
            finally:
                server.stop(args.grace_s)
                if args.port_file is not None:
                    args.port_file.unlink(missing_ok=True)  # exists while we listen
        finally:
            store.close()
        log.info("stopped")
    return EXIT_OK


def _enroll(args: argparse.Namespace) -> int:
    store = open_store(args.db, create=True)
    try:
        agent = store.enroll_agent(args.agent_id, args.public_key_hex)
    finally:
        store.close()
    print(f"enrolled {agent.agent_id} (key {agent.public_key_hex})")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    store = open_store(args.db, create=False)
    try:
        agent = store.revoke_agent(args.agent_id)
    finally:
        store.close()
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
    print(
        f"audit: {result.agent_count} agents, {result.record_count} records, "
        f"{len(result.findings)} findings"
    )
    return EXIT_OK if result.clean else EXIT_FINDINGS


def _report(args: argparse.Namespace) -> int:
    period = parse_period(args.from_, args.to)
    store = open_store(args.db, create=False, migrate=False)
    try:
        report = build_report(store, period)
    finally:
        store.close()
    render = {"table": render_table, "csv": render_csv, "json": render_json}[args.format]
    sys.stdout.write(render(report))
    return EXIT_OK


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def _logging_to_stdout(level: str) -> Iterator[None]:
    """Daemon logging for the time ``serve`` runs; main() leaves no global state behind."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
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


def _check_listen(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {listen!r} is not HOST:PORT (e.g. 0.0.0.0:7300)")


def _write_port_file(path: Path, port: int) -> None:
    """Written whole or not at all: a reader polling for the file never sees half a port."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(f"{port}\n")
        os.replace(partial, path)
    except OSError as exc:
        raise ConfigError(f"--port-file {path}: {exc.strerror}") from exc


if __name__ == "__main__":
    main_entry()
