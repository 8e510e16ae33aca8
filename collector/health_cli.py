"""``creditmeter-collector health``: asks a running collector whether it serves, over the
standard gRPC health service (grpc.health.v1) that load balancers and monitors use, so that
the first check after an install needs no outside probe (grpc_health_probe)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from creditmeter.collector import settings
from creditmeter.collector.errors import CollectorError, ConfigError
from creditmeter.collector.server import SERVICE_NAME

EXIT_SERVING, EXIT_NOT_SERVING = 0, 1
ASK_TIMEOUT_S = 5.0


class CollectorUnreachable(CollectorError):
    """Nothing answered at the address in time: no collector runs there, a firewall drops
    the port, or the TLS settings disagree (plain text against TLS)."""


def add_command(commands: Any) -> None:
    health = commands.add_parser(
        "health", help="ask a running collector whether it serves (exit 0: SERVING)"
    )
    settings.config_args().add_arguments(health)
    health.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="default: server.listen of the configuration (0.0.0.0 asks 127.0.0.1)",
    )
    health.add_argument("--ca-file", type=Path, help="TLS: the CA of the collector's certificate")
    health.add_argument("--cert-file", type=Path, help="mutual TLS: a client certificate")
    health.add_argument("--key-file", type=Path, help="mutual TLS: its private key")
    health.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep asking until SERVING or this long has passed (a collector starting)",
    )
    health.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    config = settings.load_serve(args)
    address = args.address or _local(config[settings.LISTEN])
    deadline_s = time.monotonic() + args.wait
    with _channel(address, args) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while True:
            # Waiting: the call itself waits for the connection (no fast UNAVAILABLE while
            # grpc backs off from a port that was not listening yet).
            left_s = deadline_s - time.monotonic()
            status, problem = _ask(stub, max(left_s, ASK_TIMEOUT_S), waiting=left_s > 0)
            if status == "SERVING" or time.monotonic() >= deadline_s:
                break
            time.sleep(min(0.2, max(0.0, deadline_s - time.monotonic())))
    if problem:
        raise CollectorUnreachable(f"no health answer from {address}: {problem}")
    print(f"{address}: {status}")
    return EXIT_SERVING if status == "SERVING" else EXIT_NOT_SERVING


def _ask(stub: Any, timeout_s: float, *, waiting: bool) -> tuple[str, str]:
    """(status name, "") or ("", why there was no answer)."""
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    try:
        answer = stub.Check(request, timeout=timeout_s, wait_for_ready=waiting)
    except grpc.RpcError as exc:
        return "", f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status), ""


def _local(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "", "[::]", "::") else listen


def _channel(address: str, args: argparse.Namespace) -> Any:
    if args.ca_file is None and args.cert_file is None:
        return grpc.insecure_channel(address)
    if (args.cert_file is None) != (args.key_file is None):
        raise ConfigError("--cert-file and --key-file go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca_file),
        private_key=_read(args.key_file),
        certificate_chain=_read(args.cert_file),
    )
    return grpc.secure_channel(address, credentials)


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
