"""``serve`` with the ledger settings: the daemon as a real process on each store answers
Query and Charges at the prices of ``ledger.prices_file``; the settings' precedence."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from creditmeter.collector import pg_store, settings
from creditmeter.collector.errors import ConfigError
from creditmeter.collector.main import main
from creditmeter.v1 import charges_pb2, charges_pb2_grpc, query_pb2, query_pb2_grpc
from tests.collector.backends import Backend
from tests.collector.test_main import wait_for_port

from .conftest import HOUR_US, LedgerTestStore

TOKEN = "s3cret-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TENANT = (("authorization", "Bearer globex-only-0123456789"),)  # a charger scoped to globex
TIMEOUT_S = 10.0
CREDIT = 1_000_000  # µcredits


def write_config(folder: Path, store_url: str) -> Path:
    """collector.toml naming its price list and token file relative to its own folder:
    gpt-4o at 7 credits a request (the test's fixture prices say 4)."""
    (folder / "prices.toml").write_text('[api]\n"gpt-4o" = 7\n')
    tokens = folder / "tokens"
    tokens.write_text(f"platform {TOKEN} admin\nglobex globex-only-0123456789 charger globex\n")
    tokens.chmod(0o640)
    config = folder / "collector.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\npool_size = 2\n'
        '[ledger]\nprices_file = "prices.toml"\n'
        '[api]\ntoken_file = "tokens"\n'
    )
    return config


@pytest.fixture
def daemon(
    tmp_path: Path, backend: Backend, store: LedgerTestStore
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``serve`` on the test's database (migrated by ``store``), configured by file only."""
    config = write_config(tmp_path, backend.url)
    port_file = tmp_path / "port"
    env = {k: v for k, v in os.environ.items() if k not in (settings.DB_ENV, settings.PRICES_ENV)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "creditmeter.collector.main",
            "serve",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--grace-s",
            "1",
            "--metrics-listen",  # off: the default port may be another collector's
            "",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield process, wait_for_port(port_file, process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_serve_answers_query_and_charges_at_the_configured_prices(
    daemon: tuple[subprocess.Popen[str], int], acme: str, tmp_path: Path
) -> None:
    process, port = daemon
    now_us = time.time_ns() // 1000
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        charges: Any = charges_pb2_grpc.ChargesStub(channel)  # type: ignore[no-untyped-call]
        query: Any = query_pb2_grpc.QueryStub(channel)  # type: ignore[no-untyped-call]
        charge = charges_pb2.ApiCharge(
            request_id="req-1", account=acme, model="gpt-4o", count=2, time_unix_us=now_us - HOUR_US
        )
        response = charges.RecordCharge(
            charges_pb2.RecordChargeRequest(charge=charge), metadata=AUTH, timeout=TIMEOUT_S
        )
        assert (response.credits_micro, response.default_price) == (14 * CREDIT, False)
        with pytest.raises(grpc.RpcError) as retry:
            charges.RecordCharge(
                charges_pb2.RecordChargeRequest(charge=charge), metadata=AUTH, timeout=TIMEOUT_S
            )
        assert retry.value.code() == grpc.StatusCode.ALREADY_EXISTS
        # Another tenant's token reads nothing of acme and charges it nothing.
        theft = charges_pb2.ApiCharge(
            request_id="t-1", account=acme, model="gpt-4o", count=10**6, time_unix_us=now_us
        )
        for call, request in [
            (query.GetBalance, query_pb2.GetBalanceRequest(account=acme)),
            (query.GetUsage, query_pb2.GetUsageRequest()),
            (charges.RecordCharge, charges_pb2.RecordChargeRequest(charge=theft)),
        ]:
            with pytest.raises(grpc.RpcError) as denied:
                call(request, metadata=TENANT, timeout=TIMEOUT_S)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        balance = query.GetBalance(
            query_pb2.GetBalanceRequest(account=acme), metadata=AUTH, timeout=TIMEOUT_S
        )
    # The plan grants 36,000 credits a period; two requests at 7 were charged in this one.
    assert (balance.charged_micro, balance.remaining_micro) == (14 * CREDIT, 35_986 * CREDIT)

    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"serving Query and Charges, prices: {tmp_path / 'prices.toml'}" in out
    assert "not serving" not in out


def load_serve(*argv: str, environ: dict[str, str] | None = None) -> Any:
    parser = argparse.ArgumentParser()
    settings.config_args().add_arguments(parser)
    return settings.load_serve(parser.parse_args(list(argv)), environ or {})


def test_the_price_list_and_pool_size_come_from_the_file_env_and_set(tmp_path: Path) -> None:
    config = tmp_path / "collector.toml"
    config.write_text('[store]\npool_size = 9\n[ledger]\nprices_file = "prices.toml"\n')

    loaded = load_serve("--config", str(config))
    assert loaded[settings.PRICES_FILE] == tmp_path / "prices.toml"  # relative to the file
    assert loaded[settings.POOL_SIZE] == 9

    env = {settings.PRICES_ENV: "/etc/env-prices.toml"}
    loaded = load_serve("--config", str(config), environ=env)
    assert loaded[settings.PRICES_FILE] == Path("/etc/env-prices.toml")  # env beats the file
    assert loaded.sources[settings.PRICES_FILE.name] == "$CREDITMETER_PRICES"

    loaded = load_serve("--config", str(config), "--set", "ledger.prices_file=/x.toml", environ=env)
    assert loaded[settings.PRICES_FILE] == Path("/x.toml")  # --set beats the environment

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    defaults = load_serve("--config", str(empty))
    assert (defaults[settings.POOL_SIZE], defaults[settings.PRICES_FILE]) == (4, None)
    assert settings.POOL_SIZE.default == pg_store.DEFAULT_POOL_SIZE  # one default, two places


def test_a_pool_size_below_1_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--set: store\.pool_size: must be >= 1, got 0"):
        load_serve("--set", "store.pool_size=0")


def test_administration_commands_price_as_serve_does(
    capsys: pytest.CaptureFixture[str],
    backend: Backend,
    acme: str,
    store: LedgerTestStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --prices (nor $CREDITMETER_PRICES), ``charge`` and ``balance`` use the
    configuration file's ledger.prices_file, as the daemon does; --prices still wins."""
    monkeypatch.delenv(settings.PRICES_ENV, raising=False)
    config = write_config(tmp_path, backend.url)
    argv = ["--config", str(config)]
    assert main(["charge", *argv, acme, "gpt-4o", "req-9", "--at", "2025-06-10T12:00Z"]) == 0
    assert capsys.readouterr().out == "charged: req-9 7.000000 credits\n"
    balance = [*argv, acme, "--at", "2025-06-20", "--format", "json"]
    assert main(["balance", *balance]) == 0
    assert json.loads(capsys.readouterr().out)["used"] == "7.000000"
    other = tmp_path / "other.toml"
    other.write_text('[api]\n"gpt-4o" = 3\n')
    assert main(["balance", "--prices", str(other), *balance]) == 0
    assert json.loads(capsys.readouterr().out)["used"] == "3.000000"
