"""Every option of the agent, declared once: loader, --help, reference and example file."""

from __future__ import annotations

from pathlib import Path

from creditmeter.config import (
    BOOL,
    DURATION,
    FLOAT,
    INT,
    PATH,
    STR,
    Choice,
    ConfigArgs,
    Option,
)

DEFAULT_CONFIG = Path("/etc/creditmeter/agent.toml")

AGENT_ID = Option("agent.id", STR, "", "Agent id enrolled at the collector; empty: host name.")
HOST = Option("agent.host", STR, "", "Host name written into records; empty: the host's name.")
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
REOPEN_INTERVAL = Option(
    "meter.reopen_interval", DURATION, 5.0, "How often a lost GPU is looked for again.", gt=0
)
ENV_LABELS = Option(
    "meter.environment_labels",
    BOOL,
    True,
    "Read CREDITMETER_* labels from process environments (needs CAP_SYS_PTRACE).",
)

BACKEND = Option(
    "nvml.backend",
    Choice("nvml", "simulated"),
    "nvml",
    "nvml: the host's libnvidia-ml; simulated: a simulated GPU host (demo, tests).",
)
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

COLLECTOR = Option("collector.address", STR, "127.0.0.1:7300", "Collector host:port.")
BATCH_MAX = Option("collector.batch_max", INT, 1000, "Records per batch at most.", ge=1)
ACK_TIMEOUT = Option(
    "collector.ack_timeout", DURATION, 20.0, "A batch not acked this long ends the stream.", gt=0
)
BACKOFF_MAX = Option(
    "collector.backoff_max", DURATION, 30.0, "Longest wait between reconnects.", gt=0
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

METRICS_LISTEN = Option(
    "metrics.listen", STR, "127.0.0.1:9464", "host:port serving /metrics; empty: off."
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
    ENV_LABELS,
    BACKEND,
    SCENARIO,
    SPEED,
    CLOCK_ANCHOR,
    OUTBOX_PATH,
    OUTBOX_MAX_RECORDS,
    OUTBOX_MAX_SEGMENT,
    OUTBOX_KEEP_ACKED,
    MAX_HELD,
    COLLECTOR,
    BATCH_MAX,
    ACK_TIMEOUT,
    BACKOFF_MAX,
    DRAIN_TIMEOUT,
    JOBS_ENABLED,
    JOBS_SOCKET,
    JOBS_MODE,
    JOBS_GROUP,
    METRICS_LISTEN,
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
