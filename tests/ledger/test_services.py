"""The Query and Charges services over a real server on port 0, behind the API token check."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest

from creditmeter.collector.access import ApiAccess
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.prices import PriceBook
from creditmeter.collector.query import ledger_handlers
from creditmeter.collector.server import create_server
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import charges_pb2, charges_pb2_grpc, query_pb2, query_pb2_grpc
from tests.collector.backends import Backend

from .conftest import DAY_US, HOUR_US, JULY_1_US, JUNE_1_US, NOW_US, Clock, Feeder, LedgerTestStore

TOKEN = "s3cret-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT_S = 10.0


@pytest.fixture
def channel(store: LedgerTestStore, ledger: Ledger, clock: Clock) -> Iterator[grpc.Channel]:
    server, port = create_server(
        "127.0.0.1:0",
        store,
        verifier=Verifier(clock_us=clock),
        api_auth=ApiAccess.admins({"platform": TOKEN}),
        extra_handlers=ledger_handlers(ledger, store),
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as opened:
            yield opened
    finally:
        server.stop(grace_s=0)


@pytest.fixture
def charges(channel: grpc.Channel) -> Any:
    return charges_pb2_grpc.ChargesStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def query(channel: grpc.Channel) -> Any:
    return query_pb2_grpc.QueryStub(channel)  # type: ignore[no-untyped-call]


def charge_request(request_id: str = "req-1", count: int = 1) -> charges_pb2.RecordChargeRequest:
    return charges_pb2.RecordChargeRequest(
        charge=charges_pb2.ApiCharge(
            request_id=request_id,
            account="acme",
            model="gpt-4o",
            count=count,
            time_unix_us=NOW_US - HOUR_US,
        )
    )


def status(call: Any, request: Any, metadata: Any = AUTH) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, metadata=metadata, timeout=TIMEOUT_S)
    return caught.value.code(), caught.value.details() or ""


def test_a_charge_is_stored_once_and_billed(
    charges: Any, query: Any, acme: str, backend: Backend, clock: Clock
) -> None:
    response = charges.RecordCharge(charge_request(), metadata=AUTH, timeout=TIMEOUT_S)
    assert (response.credits_micro, response.default_price) == (4_000_000, False)
    code, details = status(charges.RecordCharge, charge_request())  # a retry
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already charged" in details
    code, details = status(charges.RecordCharge, charge_request(count=2))  # another content
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "already charged as account 'acme' model 'gpt-4o' count 1" in details

    balance = query.GetBalance(query_pb2.GetBalanceRequest(account=acme), metadata=AUTH)
    assert (balance.charged_micro, balance.remaining_micro) == (4_000_000, 35_996_000_000)
    assert [(line.kind, line.model, line.quantity) for line in balance.lines] == [
        (query_pb2.LINE_KIND_API, "gpt-4o", 1)
    ]
    # Durable: another store on the same database (a restarted collector) has it; at the
    # default price of 1 credit a request.
    reopened = cast(LedgerTestStore, backend.open())
    try:
        assert Ledger(reopened, PriceBook(), clock).balance(acme).api_micro == 1_000_000
    finally:
        reopened.close()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"request_id": ""}, "request id is empty"),
        ({"account": "x" * 257}, "257 bytes of UTF-8, more than 256"),
        ({"count": 0}, "count 0 is not in"),
        ({"time_unix_us": 0}, "it must be set"),
        ({"time_unix_us": NOW_US + 2 * DAY_US}, "ahead of the collector's clock"),
    ],
)
def test_a_malformed_charge_is_invalid_argument(
    charges: Any, change: dict[str, Any], problem: str
) -> None:
    request = charge_request()
    for field, value in change.items():
        setattr(request.charge, field, value)
    code, details = status(charges.RecordCharge, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and problem in details


def test_callers_need_the_token(charges: Any, query: Any) -> None:
    assert status(charges.RecordCharge, charge_request(), metadata=())[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    wrong = (("authorization", "Bearer not-the-token-at-all"),)
    request = query_pb2.GetBalanceRequest(account="acme")
    assert status(query.GetBalance, request, metadata=wrong)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_check_credits_and_unknown_accounts(query: Any, acme: str, feeder: Feeder) -> None:
    feeder.send(1)
    check = query.CheckCredits(
        query_pb2.CheckCreditsRequest(account=acme, required_micro=35_992_500_000), metadata=AUTH
    )
    assert (check.remaining_micro, check.sufficient) == (35_992_500_000, True)
    check = query.CheckCredits(
        query_pb2.CheckCreditsRequest(account=acme, required_micro=35_992_500_001), metadata=AUTH
    )
    assert not check.sufficient
    code, details = status(query.GetBalance, query_pb2.GetBalanceRequest(account="nobody"))
    assert code == grpc.StatusCode.NOT_FOUND and "no account 'nobody'" in details
    code, _ = status(query.GetBalance, query_pb2.GetBalanceRequest(account=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_past_period_by_time(query: Any, acme: str) -> None:
    balance = query.GetBalance(
        query_pb2.GetBalanceRequest(account=acme, at_unix_us=JULY_1_US), metadata=AUTH
    )
    assert (balance.period_start_unix_us, balance.plan_grant_micro) == (JULY_1_US, 36_000_000_000)


def test_usage_grouped(query: Any, feeder: Feeder) -> None:
    feeder.send(2, start_us=JUNE_1_US + HOUR_US)
    feeder.send(1, account="", busy_us=1_000_000, start_us=JUNE_1_US + DAY_US)
    response = query.GetUsage(
        query_pb2.GetUsageRequest(
            from_unix_us=JUNE_1_US,
            group_by=[query_pb2.DIMENSION_DAY, query_pb2.DIMENSION_ACCOUNT],
        ),
        metadata=AUTH,
    )
    assert [(r.day, r.account, r.model, r.busy_us, r.credits_micro) for r in response.rows] == [
        ("2025-06-01", "acme", "", 15_000_000, 15_000_000),
        ("2025-06-02", "unattributed", "", 1_000_000, 1_000_000),
    ]
    assert response.credits_micro == 16_000_000
    code, details = status(query.GetUsage, query_pb2.GetUsageRequest(from_unix_us=JUNE_1_US + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "whole hour" in details
    code, _ = status(query.GetUsage, query_pb2.GetUsageRequest(group_by=[0]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_serve_registers_both_services_for_a_store_with_a_ledger(
    store: LedgerTestStore, tmp_path: Any
) -> None:
    from creditmeter.collector.admin_cli import serve_handlers
    from creditmeter.collector.errors import PriceFileError

    assert len(serve_handlers(store, None)) == 2  # both stores keep a ledger
    assert serve_handlers(object(), None) == []  # a store without a ledger: not served
    bad = tmp_path / "prices.toml"
    bad.write_text("[self_hosted]\nsdxl = -1\n")
    with pytest.raises(PriceFileError, match="sdxl"):
        serve_handlers(store, bad)
