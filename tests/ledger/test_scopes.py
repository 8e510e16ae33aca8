"""Scoped credentials over a real server on port 0: a tenant's token sees and charges its
own accounts only, a reader charges nothing, and the answer about another tenant's account
is the same as about one that does not exist (issue 13, finding 6)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from creditmeter.collector.access import ApiAccess, Grant, Role
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.query import ledger_handlers
from creditmeter.collector.server import create_server
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import charges_pb2, charges_pb2_grpc, query_pb2, query_pb2_grpc

from .conftest import JUNE_1_US, NOW_US, Clock, LedgerTestStore

TIMEOUT_S = 10.0
ADMIN, GLOBEX, BOARD = "admin-token-0123456789", "globex-token-0123456789", "board-token-012345"
ACCESS = ApiAccess(
    {
        "ops": (ADMIN, Grant(Role.ADMIN)),
        "globex": (GLOBEX, Grant(Role.CHARGER, frozenset({"globex"}))),
        "board": (BOARD, Grant(Role.READER)),
    }
)


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def stubs(store: LedgerTestStore, ledger: Ledger, clock: Clock) -> Iterator[tuple[Any, Any]]:
    ledger.define_plan("pro", by="ops", hours=10)
    for account in ("acme", "globex"):
        ledger.open_account(account, "pro", by="ops", anchor_day=1, since_us=JUNE_1_US)
    server, port = create_server(
        "127.0.0.1:0",
        store,
        verifier=Verifier(clock_us=clock),
        api_auth=ACCESS,
        extra_handlers=ledger_handlers(ledger, store),
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield (
                query_pb2_grpc.QueryStub(channel),  # type: ignore[no-untyped-call]
                charges_pb2_grpc.ChargesStub(channel),  # type: ignore[no-untyped-call]
            )
    finally:
        server.stop(grace_s=0)


def charge(account: str, request_id: str = "r-1") -> charges_pb2.RecordChargeRequest:
    return charges_pb2.RecordChargeRequest(
        charge=charges_pb2.ApiCharge(
            request_id=request_id,
            account=account,
            model="gpt-4o",
            count=1_000_000,
            time_unix_us=NOW_US - 1,
        )
    )


def refusal(call: Any, request: Any, token: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, metadata=auth(token), timeout=TIMEOUT_S)
    return caught.value.code(), caught.value.details() or ""


def test_a_tenant_token_sees_and_charges_its_own_account(stubs: tuple[Any, Any]) -> None:
    query, charges = stubs
    own = query.GetBalance(query_pb2.GetBalanceRequest(account="globex"), metadata=auth(GLOBEX))
    assert own.account == "globex"
    charges.RecordCharge(charge("globex"), metadata=auth(GLOBEX), timeout=TIMEOUT_S)
    usage = query.GetUsage(query_pb2.GetUsageRequest(account="globex"), metadata=auth(GLOBEX))
    assert usage.requests == 1_000_000


def test_a_tenant_token_cannot_read_or_charge_another_account(stubs: tuple[Any, Any]) -> None:
    query, charges = stubs
    calls = [
        (query.GetBalance, query_pb2.GetBalanceRequest(account="acme")),
        (query.CheckCredits, query_pb2.CheckCreditsRequest(account="acme", required_micro=1)),
        (query.GetUsage, query_pb2.GetUsageRequest(account="acme")),
        (query.GetUsage, query_pb2.GetUsageRequest()),  # everyone's usage
        (charges.RecordCharge, charge("acme")),
    ]
    for call, request in calls:
        code, details = refusal(call, request, GLOBEX)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (request, details)
    # acme was never charged, and is untouched.
    balance = query.GetBalance(query_pb2.GetBalanceRequest(account="acme"), metadata=auth(ADMIN))
    assert balance.charged_micro == 0


def test_another_tenants_account_and_a_missing_one_get_the_same_answer(
    stubs: tuple[Any, Any],
) -> None:
    query, _ = stubs
    answers = [
        refusal(query.GetBalance, query_pb2.GetBalanceRequest(account=name), GLOBEX)
        for name in ("acme", "nosuch")
    ]
    assert [
        (code, details.replace(name, "X"))
        for (code, details), name in zip(answers, ("acme", "nosuch"), strict=True)
    ] == [(grpc.StatusCode.PERMISSION_DENIED, "token:globex is not scoped to account 'X'")] * 2


def test_a_reader_reads_every_account_and_charges_none(stubs: tuple[Any, Any]) -> None:
    query, charges = stubs
    for account in ("acme", "globex"):
        query.GetBalance(query_pb2.GetBalanceRequest(account=account), metadata=auth(BOARD))
    code, details = refusal(charges.RecordCharge, charge("acme"), BOARD)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs the charger role" in details


def test_an_admin_may_do_everything(stubs: tuple[Any, Any]) -> None:
    query, charges = stubs
    charges.RecordCharge(charge("acme"), metadata=auth(ADMIN), timeout=TIMEOUT_S)
    usage = query.GetUsage(query_pb2.GetUsageRequest(), metadata=auth(ADMIN))
    assert usage.requests == 1_000_000
