"""``serve`` with the ledger settings: the daemon as a real process on each store migrates
``ledger.prices_file`` into the price book and answers Query and Charges at its prices;
every administration command prices from the same book; the settings' precedence."""

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
from creditmeter.collector.admin_cli import migrate_prices_file
from creditmeter.collector.errors import ConfigError
from creditmeter.collector.main import main
from creditmeter.v1 import charges_pb2, charges_pb2_grpc, query_pb2, query_pb2_grpc
from tests.collector.backends import Backend
from tests.collector.test_main import wait_for_port

from .conftest import HOUR_US, JUNE_1_US, LedgerTestStore

NOW_US = JUNE_1_US + 40 * 24 * HOUR_US

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
    out, err = stopped(process)
    assert process.returncode == 0, err
    logged = out + err
    assert f"imported ledger.prices_file {tmp_path / 'prices.toml'} into the price book" in logged
    assert "serving Query and Charges, prices: price book (1 version" in logged
    assert "not serving" not in logged


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


def test_administration_commands_price_from_the_book_serve_migrated_the_file_into(
    capsys: pytest.CaptureFixture[str],
    backend: Backend,
    acme: str,
    store: LedgerTestStore,
    tmp_path: Path,
) -> None:
    """Nothing reads a price file but the migration: ``charge`` and ``balance`` price from
    the store, and a file that disagrees with the book stops ``serve`` with one line."""
    config = write_config(tmp_path, backend.url)
    migrate_prices_file(store, tmp_path / "prices.toml", NOW_US)  # what serve does at start
    argv = ["--db", backend.url]
    assert main(["charge", *argv, acme, "gpt-4o", "req-9", "--at", "2025-06-10T12:00Z"]) == 0
    assert capsys.readouterr().out == "charged: req-9 7.000000 credits\n"
    balance = [*argv, acme, "--at", "2025-06-20", "--format", "json"]
    assert main(["balance", *balance]) == 0
    assert json.loads(capsys.readouterr().out)["used"] == "7.000000"
    assert main(["balance", "--prices", str(tmp_path / "prices.toml"), *balance]) == 2
    assert "unrecognized arguments: --prices" in capsys.readouterr().err

    migrate_prices_file(store, tmp_path / "prices.toml", NOW_US)  # a restart: ignored
    assert [v.effective_us for v in store.price_versions()] == [0]
    (tmp_path / "prices.toml").write_text('[api]\n"gpt-4o" = 3\n')
    with pytest.raises(ConfigError, match="differs from the prices in force in the price book"):
        migrate_prices_file(store, tmp_path / "prices.toml", NOW_US)
    assert main(["serve", "--config", str(config), "--listen", "127.0.0.1:0"]) == 2
    assert "differs from the prices in force" in capsys.readouterr().err


def stopped(process: subprocess.Popen[str], timeout_s: float = 30.0) -> tuple[str, str]:
    """The daemon's output once it exits; if it does not within ``timeout_s``, every
    thread's stack (SIGUSR1, faulthandler) is in the failure, to show where it hung."""
    try:
        return process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        try:
            _, err = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        raise AssertionError(f"serve did not stop within {timeout_s} s:\n{err[-20000:]}") from None
