"""Every option of the agent, declared once: loader, --help, reference and example file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from creditmeter.config import (
    BOOL,
    DURATION,
    FLOAT,
    INT,
    PATH,
    STR,
    STR_LIST,
    Choice,
    Config,
    ConfigArgs,
    ConfigError,
    Maybe,
    Option,
)
from creditmeter.labels import label_error

DEFAULT_CONFIG = Path("/etc/creditmeter/agent.toml")

AGENT_ID = Option("agent.id", STR, "", "Agent id enrolled at the collector; empty: host name.")
HOST = Option(
    "agent.host",
    STR,
    "",
    "Host name written into records (reports group by it); empty: the agent id.",
)
STATE_DIR = Option(
    "agent.state_dir",
    PATH,
    Path("/var/lib/creditmeter-agent"),
    "Folder of the outbox, the job spans and (by default) the signing key.",
)
KEY_FILE = Option(
    "agent.key_file",
    STR,
    "",
    "Ed25519 signing key (PEM, mode 0600); empty: signing-key.pem in the state folder.",
)

POLL_INTERVAL = Option(
    "meter.poll_interval", DURATION, 1.0, "How often NVML is polled.", gt=0, le=60
)
WINDOW = Option(
    "meter.window", DURATION, 10.0, "Usage windows close this often (and at exits).", gt=0
)
IDLE_RECORD_INTERVAL = Option(
    "meter.idle_record_interval",
    DURATION,
    300.0,
    "A GPU with no busy time, none unattributed and no gap still writes an empty device "
    "record this often, so that the collector tells an idle host from one whose agent is "
    "down or cut off (its agents page: last seen); 0: never.",
    ge=0,
)
REOPEN_INTERVAL = Option(
    "meter.reopen_interval",
    DURATION,
    5.0,
    "The shortest time between two listings of the devices (each a new NVML session). A "
    "lost GPU is looked for this long after its loss, then ever less often (doubling, up to "
    "60 s); a listing that failed is retried the same way.",
    gt=0,
)
ENV_LABELS = Option(
    "meter.environment_labels",
    BOOL,
    True,
    "Read CREDITMETER_* labels from process environments (needs CAP_SYS_PTRACE).",
)

BACKEND = Option(
    "nvml.backend",
    Choice("nvml", "simulated", "replay"),
    "nvml",
    "nvml: the host's libnvidia-ml; simulated: a simulated GPU host (demo, tests); replay: "
    "the answers of a trace (creditmeter-agent trace), to reproduce a host offline.",
)
TRACE = Option("nvml.trace", STR, "", "Replayed host: the trace file to answer from.")
SCENARIO = Option(
    "nvml.scenario", STR, "", "Simulated host: a shipped scenario name or a .toml path."
)
SPEED = Option("nvml.speed", FLOAT, 1.0, "Simulated host: simulated seconds per real second.", gt=0)
CLOCK_ANCHOR = Option(
    "nvml.clock_anchor",
    STR,
    "",
    "Simulated host: file anchoring its timeline, so a restarted agent sees the same GPUs.",
)

OUTBOX_PATH = Option(
    "outbox.path", STR, "", "Outbox database; empty: outbox.db in the state folder."
)
OUTBOX_MAX_RECORDS = Option(
    "outbox.max_records", INT, 1_000_000, "Unacknowledged records the outbox holds at most.", ge=1
)
OUTBOX_MAX_SEGMENT = Option(
    "outbox.max_segment", INT, 256, "Records per signed chain head.", ge=1, le=100_000
)
OUTBOX_KEEP_ACKED = Option(
    "outbox.keep_acked",
    INT,
    10_000,
    "Acknowledged records kept, to resend to a collector restored from a backup.",
    ge=0,
)
MAX_HELD = Option(
    "outbox.max_held",
    INT,
    100_000,
    "Process/job identities held in memory while the outbox cannot take records.",
    ge=1,
)
OUTBOX_MAX_DB_BYTES = Option(
    "outbox.max_db_bytes",
    Maybe(INT),
    None,
    "Largest outbox file (bytes); beyond it writes fail as on a full disk and usage waits "
    "in memory; unset: no cap.",
    ge=65_536,
)

COLLECTOR = Option("collector.address", STR, "127.0.0.1:7300", "Collector host:port.")
BATCH_MAX = Option("collector.batch_max", INT, 1000, "Records per batch at most.", ge=1)
ACK_TIMEOUT = Option(
    "collector.ack_timeout",
    DURATION,
    20.0,
    "A batch not acked this long ends the stream (real seconds, on a simulated host too).",
    gt=0,
)
BACKOFF_MAX = Option(
    "collector.backoff_max",
    DURATION,
    30.0,
    "Longest wait between reconnects (real seconds, on a simulated host too).",
    gt=0,
)
IDLE_CLOSE = Option(
    "collector.idle_close",
    DURATION,
    0.2,
    "A stream with everything acknowledged and nothing new for this long is closed; the "
    "next record opens another (a collector's stream slots are shared by the fleet).",
    ge=0,
    le=3600,
)
DRAIN_TIMEOUT = Option(
    "collector.drain_timeout",
    DURATION,
    10.0,
    "At shutdown, how long to keep delivering the outbox; the rest goes at the next start.",
    ge=0,
)

JOBS_ENABLED = Option("jobs.enabled", BOOL, True, "Serve the local job API for workers.")
JOBS_SOCKET = Option(
    "jobs.socket", PATH, Path("/run/creditmeter/jobs.sock"), "Unix socket of the local job API."
)
JOBS_MODE = Option("jobs.socket_mode", STR, "0660", "File mode of the job API socket, in octal.")
JOBS_GROUP = Option(
    "jobs.socket_group", STR, "", "Group that may connect to the job API; empty: the agent's."
)
JOBS_SUPERVISORS = Option(
    "jobs.supervisors",
    STR_LIST,
    (),
    "Users (names or uids) that may declare jobs for any process, such as a launcher of "
    "workers; others only for their own process, or one of their cgroup and uid.",
)

TLS_ENABLED = Option(
    "tls.enabled", BOOL, False, "Connect to the collector over TLS; off: plain text."
)
TLS_CA = Option(
    "tls.ca_file",
    Maybe(PATH),
    None,
    "CA bundle that issued the collector's certificate; empty: gRPC's default roots.",
)
TLS_CERT = Option(
    "tls.cert_file",
    Maybe(PATH),
    None,
    "Client certificate for mutual TLS, its subject CN the agent id; re-read at reconnects.",
)
TLS_KEY = Option(
    "tls.key_file", Maybe(PATH), None, "Private key of tls.cert_file (PEM, unencrypted, 0600)."
)
TLS_SERVER_NAME = Option(
    "tls.server_name",
    STR,
    "",
    "Name to expect in the collector's certificate; empty: the host of collector.address.",
)

METRICS_LISTEN = Option(
    "metrics.listen", STR, "127.0.0.1:9464", "host:port serving /metrics; empty: off."
)
HEALTH_LISTEN = Option(
    "health.listen",
    STR,
    "",
    "host:port serving gRPC health (grpc.health.v1) for probes; empty: off.",
)
LOG_LEVEL = Option(
    "log.level", Choice("debug", "info", "warning", "error"), "info", "Least severe level logged."
)
LOG_FORMAT = Option("log.format", Choice("text", "json"), "text", "Log line format.")

OPTIONS = (
    AGENT_ID,
    HOST,
    STATE_DIR,
    KEY_FILE,
    POLL_INTERVAL,
    WINDOW,
    REOPEN_INTERVAL,
    IDLE_RECORD_INTERVAL,
    ENV_LABELS,
    BACKEND,
    TRACE,
    SCENARIO,
    SPEED,
    CLOCK_ANCHOR,
    OUTBOX_PATH,
    OUTBOX_MAX_RECORDS,
    OUTBOX_MAX_SEGMENT,
    OUTBOX_KEEP_ACKED,
    MAX_HELD,
    OUTBOX_MAX_DB_BYTES,
    COLLECTOR,
    BATCH_MAX,
    ACK_TIMEOUT,
    BACKOFF_MAX,
    IDLE_CLOSE,
    DRAIN_TIMEOUT,
    JOBS_ENABLED,
    JOBS_SOCKET,
    JOBS_MODE,
    JOBS_GROUP,
    JOBS_SUPERVISORS,
    TLS_ENABLED,
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    TLS_SERVER_NAME,
    METRICS_LISTEN,
    HEALTH_LISTEN,
    LOG_LEVEL,
    LOG_FORMAT,
)


def config_args() -> ConfigArgs:
    return ConfigArgs(
        OPTIONS,
        default_path=DEFAULT_CONFIG,
        flags={
            "--collector": COLLECTOR,
            "--state-dir": STATE_DIR,
            "--agent-id": AGENT_ID,
            "--metrics-listen": METRICS_LISTEN,
        },
    )


def check(config: Config) -> None:
    """What one option's kind and bounds cannot say; raises ConfigError naming the key."""
    for option in (METRICS_LISTEN, HEALTH_LISTEN):
        value = config[option]
        host, _, port = value.rpartition(":")
        if value and (not host or not port.isdigit() or int(port) > 65535):
            raise ConfigError(_where(config, option, f"{value!r} is not HOST:PORT"))
    host_error = label_error(HOST.name, config[HOST])  # in every record: the label law
    if host_error is not None:
        problem = str(host_error).removeprefix(HOST.name + ": ")
        raise ConfigError(_where(config, HOST, problem))
    if (config[TLS_CERT] is None) != (config[TLS_KEY] is None):
        present, absent = (TLS_CERT, TLS_KEY) if config[TLS_KEY] is None else (TLS_KEY, TLS_CERT)
        problem = f"set without {absent.name}; the two go together"
        raise ConfigError(_where(config, present, problem))
    if not config[TLS_ENABLED]:
        for tls_option in (TLS_CA, TLS_CERT, TLS_KEY):
            if config[tls_option] is not None:
                problem = "is set but tls.enabled is false; enable TLS or unset it"
                raise ConfigError(_where(config, tls_option, problem))


def _where(config: Config, option: Option[Any], problem: str) -> str:
    return f"{config.sources.get(option.name, 'default')}: {option.name}: {problem}"
