"""``creditmeter-agent``: the daemon (``run``), its last run on a host leaving service
(``retire``) and its tools (``keygen``, ``outbox``, ``rotate-key``).

Startup is ordered so that nothing meters before its records have somewhere durable to go:
NVML, key, outbox (with the meter's saved state), meter, shipper, metrics, then READY=1.
Shutdown runs the other way: the loop closes every open window into the outbox, the
shipper gets a bounded drain, then the outbox and NVML are closed. Periods still waiting
for late per-process evidence stay in the saved state for the next start; ``retire``, run
with the daemon stopped, is that start for a host that will have no other.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from creditmeter import __version__
from creditmeter.agent import key_rotation, keys, outbox_repair, settings
from creditmeter.agent.attribution import RecordBuilder
from creditmeter.agent.backoff import Backoff
from creditmeter.agent.errors import AgentError, NvmlUnavailable, ProcessGone, ScenarioUnusable
from creditmeter.agent.gpu import Clock, Nvml, ProcessTable, SystemClock
from creditmeter.agent.health import AgentHealth, serve_health
from creditmeter.agent.jobapi import CallerResolver, JobServer, create_server, supervisor_uids
from creditmeter.agent.jobs import JobRegistry, Owner
from creditmeter.agent.loop import MeterLoop, Retired
from creditmeter.agent.meter import Meter
from creditmeter.agent.nvml import PynvmlNvml
from creditmeter.agent.outbox import Outbox
from creditmeter.agent.payers import LabelsAndJobs
from creditmeter.agent.pidns import (
    OwnNamespace,
    PidResolver,
    ProcessTableResolver,
    require_host_pid_namespace,
)
from creditmeter.agent.procfs import ProcFs, PsutilProcessTable
from creditmeter.agent.records import STATE_KEY, Flusher
from creditmeter.agent.shipper import (
    ChannelFactory,
    Shipper,
    insecure_channel_factory,
    secure_channel_factory,
)
from creditmeter.agent.telemetry import AgentTelemetry
from creditmeter.config import FLOAT, Config, ConfigArgs, ConfigError, Option, option_argument
from creditmeter.logs import setup_logging
from creditmeter.metrics import Registry, serve_metrics
from creditmeter.sdnotify import Notifier
from creditmeter.times import iso_text
from creditmeter.tls import TlsError, TlsFiles, client_credentials, common_name, load_material

log = logging.getLogger("creditmeter.agent")

EXIT_OK = 0
EXIT_FAILURE = 1
DEFAULT_SCENARIO = "demo"
EXIT_CONFIG = 2  # as creditmeter.config exits: the unit's RestartPreventExitStatus=2
EVIDENCE_WAIT = Option("retire.evidence_wait", FLOAT, 30.0, "seconds", ge=0, le=86_400)
DELIVERY_TIMEOUT = Option("retire.delivery_timeout", FLOAT, 300.0, "seconds", ge=0, le=86_400)


@dataclass(frozen=True)
class Host:
    """What the agent meters: the real host, or a simulated one standing in under pynvml."""

    clock: Clock
    processes: ProcessTable
    callers: CallerResolver  # maps job API callers' PIDs to host processes
    nvml: Nvml | None = None  # None: the host's libnvidia-ml (real, or simulated under it)
    meter_clock: Clock | None = None  # None: ``clock``; a replayed host's own readings
    # The real host's /proc, whose PID namespace must be the host's for NVML's PIDs to name
    # its processes; None: a simulated or replayed host, whose PIDs are its own.
    proc: OwnNamespace | None = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="creditmeter-agent",
        description="Meters this host's GPUs in measured compute seconds and ships signed "
        "usage records to the collector.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="meter this host's GPUs (the daemon)")
    cli = settings.config_args()
    cli.add_arguments(run_parser)
    run_parser.add_argument(
        "--simulate",
        nargs="?",
        const=DEFAULT_SCENARIO,
        metavar="SCENARIO",
        help="meter a simulated host instead of this one's GPUs: a shipped scenario "
        f"(creditmeter-agent scenarios; default {DEFAULT_SCENARIO}) or a .toml file",
    )
    commands.add_parser("scenarios", help="list the shipped simulated hosts")
    commands.add_parser("keygen", help="create the signing key", add_help=False)
    commands.add_parser("trace", help="record the NVML answers the meter uses", add_help=False)
    commands.add_parser("replay", help="meter a trace offline", add_help=False)
    outbox_parser = commands.add_parser(
        "outbox", help="check the outbox's unacknowledged records, or repair it"
    )
    outbox_parser.add_argument("action", choices=("check", "repair"))
    cli.add_arguments(outbox_parser)
    rotate_parser = commands.add_parser(
        "rotate-key", help="hand the record chain to a new signing key (agent stopped)"
    )
    cli.add_arguments(rotate_parser)
    retire_parser = commands.add_parser(
        "retire",
        help="settle and deliver the last usage of a host leaving service (agent stopped)",
    )
    cli.add_arguments(retire_parser)
    retire_parser.add_argument(
        "--evidence-wait",
        type=option_argument(EVIDENCE_WAIT),
        default=EVIDENCE_WAIT.default,
        metavar="SECONDS",
        help="how long to wait for processes' late per-process samples (default 30)",
    )
    retire_parser.add_argument(
        "--delivery-timeout",
        type=option_argument(DELIVERY_TIMEOUT),
        default=DELIVERY_TIMEOUT.default,
        metavar="SECONDS",
        help="how long to keep delivering the outbox to the collector (default 300)",
    )
    # Dispatched by agent.cli before this module is imported; listed here for --help.
    commands.add_parser("selftest", help="measure known GPU work (CUDA) through NVML")
    args, rest = parser.parse_known_args(argv)
    if args.command == "keygen":
        return _keygen(cli, rest)
    if args.command in ("trace", "replay"):
        from creditmeter.agent import trace_cli

        return (
            trace_cli.trace_main(rest) if args.command == "trace" else trace_cli.replay_main(rest)
        )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "scenarios":
        return _list_scenarios()
    if getattr(args, "simulate", None) is not None:
        args.config_set += ["nvml.backend=simulated", f"nvml.scenario={args.simulate}"]
    config = cli.load_or_exit(args)
    if args.command == "outbox":
        return _outbox_command(config, args.action)
    if args.command == "rotate-key":
        return _rotate_key(config)
    try:
        settings.check(config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # retire's stdout is its summary, for the operator (and scripts) to read: logs go beside.
    stream = sys.stderr if args.command == "retire" else None
    setup_logging(config[settings.LOG_LEVEL], config[settings.LOG_FORMAT], stream)
    try:
        if args.command == "retire":
            return retire(config, args.evidence_wait, args.delivery_timeout)
        return run(config)
    except NvmlUnavailable as exc:
        print(f"creditmeter-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except ScenarioUnusable as exc:
        print(f"creditmeter-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"creditmeter-agent {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _keygen(cli: ConfigArgs, argv: list[str]) -> int:
    """``keygen`` writes where the configuration says (agent.key_file, else the state
    folder's signing-key.pem), for the configuration's agent id."""
    config_options = argparse.ArgumentParser(add_help=False)
    cli.add_arguments(config_options)

    def defaults(args: argparse.Namespace) -> tuple[Path, str]:
        config = cli.load_or_exit(args)
        key_file = config[settings.KEY_FILE] or config[settings.STATE_DIR] / "signing-key.pem"
        return Path(key_file), config[settings.AGENT_ID] or socket.gethostname()

    return keys.keygen_main(argv, parents=(config_options,), defaults=defaults)


def _list_scenarios() -> int:
    from creditmeter.simnvml.scenario import scenario_summary, shipped_scenarios

    names = shipped_scenarios()
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:<{width}}  {scenario_summary(name)}")
    print(f"\nrun one: creditmeter-agent run --simulate NAME (default {DEFAULT_SCENARIO})")
    return EXIT_OK


def main_entry() -> None:
    sys.exit(main())


@dataclass
class Metering:
    """What metering needs, opened in start-up order: the daemon's and ``retire``'s."""

    agent_id: str
    host: Host
    nvml: Nvml
    outbox: Outbox
    meter: Meter
    flusher: Flusher
    registry: JobRegistry
    telemetry: AgentTelemetry
    shipper: Shipper
    damaged: int  # unacknowledged records found damaged at start


def open_metering(stack: ExitStack, config: Config) -> Metering:
    """NVML, key, outbox (with the meter's saved state), meter and shipper; closed by
    ``stack`` the other way round."""
    agent_id = config[settings.AGENT_ID] or socket.gethostname()
    host = stack.enter_context(open_host(config))
    nvml = host.nvml or open_nvml(host)
    stack.callback(nvml.shutdown)
    log.info(
        "agent %s: metering %d GPUs of %s (driver %s); shipping to %s",
        agent_id,
        len(nvml.devices()),
        _backend_text(config),
        nvml.driver_version(),
        config[settings.COLLECTOR],
    )
    outbox = stack.enter_context(_outbox(config, agent_id, host.clock))
    damaged = _damaged(outbox)
    registry = stack.enter_context(_job_registry(config))
    meter = Meter(
        nvml,
        host.processes,
        host.meter_clock or host.clock,
        state=outbox.state().get(STATE_KEY),
        reopen_interval_s=config[settings.REOPEN_INTERVAL],
        payers=LabelsAndJobs(registry),
        idle_record_s=config[settings.IDLE_RECORD_INTERVAL],
    )
    flusher = Flusher(outbox, max_pending=config[settings.MAX_HELD])
    telemetry = AgentTelemetry(Registry())
    shipper = Shipper(
        outbox,
        _channel_factory(config, agent_id),
        agent_id,
        batch_max=config[settings.BATCH_MAX],
        ack_timeout_s=config[settings.ACK_TIMEOUT],
        backoff=Backoff(cap_s=config[settings.BACKOFF_MAX]),
        # A simulated host's clock may run 30 times faster: waits for the collector are
        # real seconds all the same (the logs said 24.8 s and retried after 0.8).
        record_wall=host.clock.wall,
        observer=telemetry,
        idle_close_s=config[settings.IDLE_CLOSE],
    )
    return Metering(
        agent_id, host, nvml, outbox, meter, flusher, registry, telemetry, shipper, damaged
    )


def run(config: Config) -> int:
    stop = threading.Event()
    _on_signals(stop)
    notifier = Notifier.from_environment()
    with ExitStack() as stack:
        m = open_metering(stack, config)
        if config[settings.JOBS_ENABLED]:
            jobs = _serve_jobs(stack, config, m.registry, m.host)
            m.telemetry.follow_jobs(jobs.servicer.outcomes)
        _gauges(m.telemetry, m.outbox, m.flusher)
        m.telemetry.gauge(
            "creditmeter_agent_outbox_damaged_records",
            "Unacknowledged records found damaged at start (creditmeter-agent outbox repair).",
            lambda: m.damaged,
        )
        _metrics_server(stack, config, m.telemetry.registry)
        cycle_done = _health_server(stack, config, lambda: m.shipper.stats().connected)
        loop = _meter_loop(config, m, notifier, cycle_done)
        ship_stop = threading.Event()
        shipping = threading.Thread(target=m.shipper.run, args=(ship_stop,), name="shipper")
        shipping.start()
        devices = len(m.nvml.devices())

        def ready() -> None:
            notifier.ready(f"metering {devices} devices as {m.agent_id}")
            log.info("metering as agent %s: ready", m.agent_id)

        loop.run(stop, ready)
        notifier.stopping("windows closed; delivering the outbox")
        ship_stop.set()
        shipping.join()
        deadline = time.monotonic() + config[settings.DRAIN_TIMEOUT]
        if not m.shipper.drain(deadline):
            log.warning("%d records wait in the outbox for the next start", m.outbox.depth())
    return 0


def retire(config: Config, evidence_wait_s: float, delivery_timeout_s: float) -> int:
    """The last metering of a host leaving service, with its daemon stopped: what the stop
    left waiting for late evidence is settled and written, and the outbox delivered."""
    with ExitStack() as stack:
        m = open_metering(stack, config)
        loop = _meter_loop(config, m, Notifier(None), lambda: None)
        retired = loop.retire(m.host.clock.monotonic() + evidence_wait_s)
        if not retired.written:
            print(
                "creditmeter-agent retire: the outbox took nothing (see the log); the saved "
                "state is unchanged, so running retire again loses nothing",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        delivered = m.shipper.drain(time.monotonic() + delivery_timeout_s)
        print_retired(m.meter, retired, evidence_wait_s)
        if not delivered:
            print(
                f"creditmeter-agent retire: {m.outbox.depth()} records wait in the outbox "
                f"{m.outbox.path}: run retire again once the collector takes them",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        print(f"# agent {m.agent_id}: retired; every record acknowledged by the collector")
    return EXIT_OK


def print_retired(meter: Meter, retired: Retired, evidence_wait_s: float) -> None:
    """What a retirement metered, per device, and what it could not."""
    for uuid, through_us in sorted(meter.read_through_us().items()):
        print(f"{uuid}: metered and settled through {iso_text(through_us)}")
    for uuid, lost_us in sorted(meter.lost_since_us().items()):
        print(
            f"{uuid}: lost since {iso_text(lost_us)} (not listed by the driver): what it ran "
            "since its records end is a GAP_REASON_GPU_LOST gap"
        )
    for reason, us in sorted(meter.stats.gaps_us.items()):
        print(f"gap {reason}: {us / 1e6:.6f} s (recorded with the usage it interrupts)")
    for name, us in sorted(meter.stats.unattributed_us.items()):
        print(f"unattributed {name}: {us / 1e6:.6f} s (on the GPUs' device records, not billed)")
    if not retired.evidence_complete:
        print(
            f"# some processes' evidence did not come within {evidence_wait_s:g} s: their "
            "shared busy time since is unattributed (no evidence), never billed to a guess"
        )


def _backend_text(config: Config) -> str:
    """Which GPUs these are, for the first log line: the operator must never mistake a
    simulated host for a real one."""
    backend = config[settings.BACKEND]
    if backend == "simulated":
        return (
            f"a SIMULATED host (scenario {config[settings.SCENARIO]}, {config[settings.SPEED]:g}x)"
        )
    if backend == "replay":
        return "a REPLAYED trace"
    return "this host (NVML)"


def _on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: closing windows and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@contextmanager
def open_host(config: Config) -> Iterator[Host]:
    """The host ``nvml.backend`` names: this machine, a simulated one, or a replayed trace."""
    if config[settings.BACKEND] == "replay":
        yield _replayed_host(config)
        return
    if config[settings.BACKEND] == "nvml":
        read_env = config[settings.ENV_LABELS]
        proc = ProcFs()
        yield Host(
            SystemClock(),
            PsutilProcessTable(read_environment=read_env),
            PidResolver(proc),
            proc=proc,
        )
        return
    # The simulator is imported only here: the agent gets it the way it gets the real library.
    from creditmeter.simnvml import Scenario, ScenarioError, SimClock, SimHost, installed

    name = config[settings.SCENARIO]
    if not name:
        raise ScenarioUnusable(
            "nvml.backend = simulated needs nvml.scenario (or: run --simulate [SCENARIO])"
        )
    try:
        scenario = Scenario.load(name)
    except ScenarioError as exc:
        raise ScenarioUnusable(f"nvml.scenario: {exc}") from exc
    except OSError as exc:
        raise ScenarioUnusable(f"nvml.scenario: {name}: {exc.strerror}") from exc
    speed = config[settings.SPEED]
    anchor = config[settings.CLOCK_ANCHOR]
    clock = SimClock.shared(Path(anchor), speed) if anchor else SimClock(speed)
    sim = SimHost(scenario, clock)
    with installed(sim):
        table = sim.process_table()
        yield Host(clock, table, ProcessTableResolver(table))


def _replayed_host(config: Config) -> Host:
    from creditmeter.simnvml.replay import ReplayHost

    if not config[settings.TRACE]:
        raise AgentError("nvml.backend = replay needs nvml.trace")
    replay = ReplayHost.load(Path(config[settings.TRACE]))
    table = replay.processes
    return Host(SystemClock(), table, ProcessTableResolver(table), replay.nvml, replay.clock)


def open_nvml(host: Host) -> Nvml:
    """The host's NVML; on the real host, for an agent in the host's PID namespace (checked
    once NVML opens: without a driver, that is the error to name)."""
    nvml = PynvmlNvml.open()
    if host.proc is not None:
        try:
            require_host_pid_namespace(host.proc)
        except AgentError:
            nvml.shutdown()
            raise
    return nvml


def _key_path(config: Config) -> Path:
    return Path(config[settings.KEY_FILE] or config[settings.STATE_DIR] / "signing-key.pem")


def _signing_key(config: Config) -> Ed25519PrivateKey:
    return keys.load(_key_path(config))


@contextmanager
def _outbox(config: Config, agent_id: str, clock: Clock) -> Iterator[Outbox]:
    state_dir = config[settings.STATE_DIR]
    path = Path(config[settings.OUTBOX_PATH] or state_dir / "outbox.db")
    outbox = Outbox.open(
        path,
        agent_id,
        _signing_key(config),
        max_records=config[settings.OUTBOX_MAX_RECORDS],
        max_segment=config[settings.OUTBOX_MAX_SEGMENT],
        keep_acked=config[settings.OUTBOX_KEEP_ACKED],
        max_db_bytes=config[settings.OUTBOX_MAX_DB_BYTES],
        clock=clock,
    )
    try:
        key_rotation.finish_pending(_key_path(config), outbox)
        yield outbox
    finally:
        outbox.close()


def _damaged(outbox: Outbox) -> int:
    """Checks the unacknowledged records at start: damage found now is named before the
    collector refuses it at delivery, where the chain would stop for good."""
    found = outbox_repair.damage(outbox, outbox.public_key)
    if found:
        log.error(
            "outbox %s: %d unacknowledged records are damaged (%s); the collector will refuse "
            "them and delivery stops there: stop the agent and run `creditmeter-agent outbox "
            "repair`",
            outbox.path,
            len(found),
            "; ".join(f"seq {d.seq}: {d.problem}" for d in found[:10]),
        )
    return len(found)


def _outbox_command(config: Config, action: str) -> int:
    agent_id = config[settings.AGENT_ID] or socket.gethostname()
    try:
        with _outbox(config, agent_id, SystemClock()) as outbox:
            if action == "check":
                return outbox_repair.check_command(outbox, outbox.public_key)
            return outbox_repair.repair_command(outbox, outbox.public_key)
    except AgentError as exc:
        print(f"creditmeter-agent outbox {action}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _rotate_key(config: Config) -> int:
    agent_id = config[settings.AGENT_ID] or socket.gethostname()
    key_path = _key_path(config)
    try:
        with _outbox(config, agent_id, SystemClock()) as outbox:
            seq, public_hex = key_rotation.rotate(
                key_path, outbox, config[settings.HOST] or agent_id
            )
    except AgentError as exc:
        print(f"creditmeter-agent rotate-key: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(public_hex)
    print(
        f"# agent {agent_id} signs with this key from record {seq} on: the old key endorsed "
        f"it in the chain, and {key_path} now holds the new one (the old is gone)"
    )
    print("# nothing to enroll: the collector takes the new key from that record")
    return EXIT_OK


def _gauges(telemetry: AgentTelemetry, outbox: Outbox, flusher: Flusher) -> None:
    telemetry.gauge(
        "creditmeter_agent_outbox_records", "Records not yet acknowledged.", outbox.depth
    )
    telemetry.gauge(
        "creditmeter_agent_outbox_oldest_age_seconds",
        "Age of the oldest record not yet acknowledged.",
        outbox.oldest_unacked_age_s,
    )
    telemetry.gauge(
        "creditmeter_agent_held_records",
        "Records held in memory because the outbox cannot take them.",
        lambda: flusher.pending,
    )


def _metrics_server(stack: ExitStack, config: Config, registry: Registry) -> None:
    listen = config[settings.METRICS_LISTEN]
    if not listen:
        return
    host, _, port = listen.rpartition(":")
    try:
        server, bound = serve_metrics(registry, host.strip("[]") or "127.0.0.1", int(port))
    except OSError as exc:
        raise AgentError(f"metrics.listen {listen}: cannot listen: {exc.strerror or exc}") from None
    stack.callback(server.shutdown)
    log.info("metrics on http://%s:%d/metrics", host, bound)


def _health_server(
    stack: ExitStack, config: Config, connected: Callable[[], bool]
) -> Callable[[], None]:
    """Serves gRPC health when ``health.listen`` is set; returns the per-cycle hook."""
    listen = config[settings.HEALTH_LISTEN]
    if not listen:
        return lambda: None
    # Three missed polls, but never less than 10 s: one slow NVML call is not a failure.
    servicer = AgentHealth(connected, stale_after_s=max(10.0, 3 * config[settings.POLL_INTERVAL]))
    server = serve_health(listen, servicer)
    stack.callback(server.stop)
    log.info("gRPC health on %s:%d", listen.rpartition(":")[0], server.port)
    return servicer.cycle_done


def _channel_factory(config: Config, agent_id: str) -> ChannelFactory:
    """Plain-text or TLS channels to the collector. TLS files that cannot be used are
    logged, not fatal: metering goes on, records wait in the outbox, and every reconnect
    reads the files again until they are fixed."""
    target = config[settings.COLLECTOR]
    if not config[settings.TLS_ENABLED]:
        return insecure_channel_factory(target)
    files = TlsFiles(config[settings.TLS_CA], config[settings.TLS_CERT], config[settings.TLS_KEY])
    _check_client_certificate(files, agent_id)
    return secure_channel_factory(
        target, lambda: client_credentials(files), config[settings.TLS_SERVER_NAME]
    )


def _check_client_certificate(files: TlsFiles, agent_id: str) -> None:
    """Says at startup what the collector would refuse on every connection."""
    try:
        material = load_material(files)
    except TlsError as exc:
        log.error("TLS to the collector will fail until this is fixed: %s", exc)
        return
    if material.leaf is None:
        log.info("TLS without a client certificate (the collector may require one)")
        return
    name = common_name(material.leaf)
    if name != agent_id:
        log.error(
            "tls.cert_file %s names %r (subject CN), not this agent's id %r: a collector "
            "with mutual TLS refuses its records",
            files.cert_file,
            name,
            agent_id,
        )


def _meter_loop(
    config: Config, m: Metering, notifier: Notifier, cycle_done: Callable[[], None]
) -> MeterLoop:
    # The agent id by default: what the operator enrolled, so that a report by host names
    # the hosts as `enroll` and `revoke` do (the id is itself the host name unless set).
    drafts = RecordBuilder(config[settings.HOST] or m.agent_id, m.registry)
    processes = m.host.processes

    def written(through_us: int) -> None:
        m.registry.prune_before(through_us)
        m.registry.reap(lambda owner: _alive(processes, owner), through_us)

    def observe(seconds: float) -> None:
        m.telemetry.poll_seconds.observe(seconds)
        m.telemetry.after_cycle(m.meter.stats, m.flusher.dropped_busy_us)
        cycle_done()

    return MeterLoop(
        m.meter,
        m.flusher,
        drafts,
        m.host.clock,
        poll_interval_s=config[settings.POLL_INTERVAL],
        window_s=config[settings.WINDOW],
        heartbeat=_watchdog(notifier),
        observe_cycle=observe,
        on_written=written,
    )


def _alive(processes: ProcessTable, owner: Owner) -> bool:
    try:
        return round(processes.create_time(owner.pid) * 1_000_000) == owner.create_time_us
    except ProcessGone:
        return False


@contextmanager
def _job_registry(config: Config) -> Iterator[JobRegistry]:
    registry = JobRegistry(config[settings.STATE_DIR] / "jobs.db")
    try:
        yield registry
    finally:
        registry.close()


def _serve_jobs(stack: ExitStack, config: Config, registry: JobRegistry, host: Host) -> JobServer:
    text = config[settings.JOBS_MODE]
    try:
        mode = int(text, 8)
    except ValueError:
        raise AgentError(f"jobs.socket_mode: not an octal file mode: {text!r}") from None
    server = create_server(
        config[settings.JOBS_SOCKET],
        registry,
        mode=mode,
        group=config[settings.JOBS_GROUP] or None,
        resolver=host.callers,
        clock=host.clock,
        supervisors=supervisor_uids(config[settings.JOBS_SUPERVISORS]),
    )
    stack.callback(server.stop, 5.0)
    log.info("job API on %s", server.socket_path)
    return server


def _watchdog(notifier: Notifier) -> Callable[[], None]:
    """Pings systemd's watchdog from the metering loop, at most every half interval."""
    interval = notifier.watchdog_interval_s()
    if interval is None:
        return lambda: None
    next_ping = 0.0

    def ping() -> None:
        nonlocal next_ping
        now = time.monotonic()  # real time: the watchdog is systemd's, not the simulation's
        if now >= next_ping:
            notifier.watchdog()
            next_ping = now + interval

    return ping
