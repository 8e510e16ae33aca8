"""The Query and Charges gRPC services (query.proto, charges.proto): thin over the Ledger.

Callers are authenticated before a method runs, by the server's API interceptor
(collector/access.py: a bearer token or a client certificate); these servicers only parse
requests, call the Ledger or the report, and turn our errors into their statuses
(CollectorError.status). An API charge is committed to the store before its response is
sent, so an acknowledged charge survives a crash, and a retry of it is answered
ALREADY_EXISTS without being stored twice.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from creditmeter.collector.access import caller
from creditmeter.collector.errors import (
    CollectorError,
    DuplicateCharge,
    InvalidRequest,
    PermissionDenied,
)
from creditmeter.collector.ledger import Balance, Ledger
from creditmeter.collector.ledger_store import ApiCharge, Dimension, LedgerStore, LineKind
from creditmeter.collector.report import DEFAULT_GROUP_BY, Period, build_report
from creditmeter.collector.rollup import HOUR_US
from creditmeter.v1 import charges_pb2, query_pb2

log = logging.getLogger(__name__)

QUERY_SERVICE = query_pb2.DESCRIPTOR.services_by_name["Query"].full_name
CHARGES_SERVICE = charges_pb2.DESCRIPTOR.services_by_name["Charges"].full_name

_LINE_KINDS = {
    LineKind.USAGE: query_pb2.LINE_KIND_USAGE,
    LineKind.API: query_pb2.LINE_KIND_API,
    LineKind.LATE_USAGE: query_pb2.LINE_KIND_LATE_USAGE,
    LineKind.LATE_API: query_pb2.LINE_KIND_LATE_API,
}
_DIMENSIONS = {
    query_pb2.DIMENSION_ACCOUNT: Dimension.ACCOUNT,
    query_pb2.DIMENSION_MODEL: Dimension.MODEL,
    query_pb2.DIMENSION_DAY: Dimension.DAY,
    query_pb2.DIMENSION_HOST: Dimension.HOST,
    query_pb2.DIMENSION_GPU: Dimension.GPU,
}
_ROW_FIELDS = {
    Dimension.ACCOUNT: "account",
    Dimension.MODEL: "model",
    Dimension.DAY: "day",
    Dimension.HOST: "host",
    Dimension.GPU: "gpu",
}

Response = TypeVar("Response")


def _answering(
    method: Callable[[Any, Any, Any], Response],
) -> Callable[[Any, Any, Any], Response]:
    """Ends the RPC with the status of a CollectorError (a bug: INTERNAL, logged)."""

    @functools.wraps(method)
    def run(self: Any, request: Any, context: Any) -> Response:
        try:
            return method(self, request, context)
        except CollectorError as exc:
            level = (
                logging.INFO
                if exc.status.name in ("ALREADY_EXISTS", "NOT_FOUND")
                else (logging.WARNING)
            )
            log.log(level, "%s from %s: %s", method.__name__, context.peer(), exc)
            context.abort(grpc.StatusCode[exc.status.name], str(exc))
            raise  # abort raised already
        except Exception:
            log.exception("%s from %s failed", method.__name__, context.peer())
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the collector (logged)")
            raise

    return run


class QueryServicer:
    """creditmeter.v1.Query over a Ledger and the usage report."""

    def __init__(self, ledger: Ledger, store: LedgerStore) -> None:
        self._ledger = ledger
        self._store = store

    def rpc_handler(self) -> Any:
        methods = {
            "GetBalance": _unary(self.GetBalance, query_pb2.GetBalanceRequest, query_pb2.Balance),
            "CheckCredits": _unary(
                self.CheckCredits, query_pb2.CheckCreditsRequest, query_pb2.CheckCreditsResponse
            ),
            "GetUsage": _unary(
                self.GetUsage, query_pb2.GetUsageRequest, query_pb2.GetUsageResponse
            ),
        }
        return grpc.method_handlers_generic_handler(QUERY_SERVICE, methods)

    @_answering
    def GetBalance(self, request: query_pb2.GetBalanceRequest, context: Any) -> query_pb2.Balance:
        _require("account", request.account)
        caller().check_account(request.account)
        balance = self._ledger.balance(request.account, request.at_unix_us or None)
        return balance_message(balance)

    @_answering
    def CheckCredits(
        self, request: query_pb2.CheckCreditsRequest, context: Any
    ) -> query_pb2.CheckCreditsResponse:
        _require("account", request.account)
        caller().check_account(request.account)
        check = self._ledger.check_credits(request.account, request.required_micro)
        return query_pb2.CheckCreditsResponse(
            remaining_micro=check.remaining_micro, sufficient=check.sufficient
        )

    @_answering
    def GetUsage(
        self, request: query_pb2.GetUsageRequest, context: Any
    ) -> query_pb2.GetUsageResponse:
        _check_usage_scope(request.account)
        period = _period(request.from_unix_us, request.to_unix_us)
        group_by = _group_by(request.group_by)
        report = build_report(
            self._store, period, group_by, self._ledger.prices, request.account or None
        )
        response = query_pb2.GetUsageResponse(
            busy_us=report.busy_us, requests=report.requests, credits_micro=report.credits_micro
        )
        for row in report.rows:
            fields = {_ROW_FIELDS[d]: key for d, key in zip(group_by, row.keys, strict=True)}
            response.rows.add(
                busy_us=row.busy_us,
                requests=row.requests,
                credits_micro=row.credits_micro,
                records=row.record_count,
                default_price=row.default_price,
                **fields,
            )
        return response


class ChargesServicer:
    """creditmeter.v1.Charges over a Ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def rpc_handler(self) -> Any:
        method = _unary(
            self.RecordCharge, charges_pb2.RecordChargeRequest, charges_pb2.RecordChargeResponse
        )
        return grpc.method_handlers_generic_handler(CHARGES_SERVICE, {"RecordCharge": method})

    @_answering
    def RecordCharge(
        self, request: charges_pb2.RecordChargeRequest, context: Any
    ) -> charges_pb2.RecordChargeResponse:
        sent = request.charge
        caller().check_account(sent.account)
        charge = ApiCharge(sent.request_id, sent.account, sent.model, sent.count, sent.time_unix_us)
        receipt = self._ledger.record_charge(charge)
        if not receipt.new:
            raise DuplicateCharge(
                f"request id {charge.request_id!r} is already charged with this content"
            )
        return charges_pb2.RecordChargeResponse(
            credits_micro=receipt.credits_micro, default_price=receipt.default_price
        )


def ledger_handlers(ledger: Ledger, store: LedgerStore) -> list[Any]:
    """The generic handlers of both services, to register with the collector's server."""
    return [QueryServicer(ledger, store).rpc_handler(), ChargesServicer(ledger).rpc_handler()]


def balance_message(balance: Balance) -> query_pb2.Balance:
    return query_pb2.Balance(
        account=balance.account,
        plan=balance.plan,
        period_start_unix_us=balance.period.start_us,
        period_end_unix_us=balance.period.end_us,
        period_closed=balance.closed,
        plan_grant_micro=balance.plan_grant_micro,
        lot_credits_micro=balance.lot_credits_micro,
        adjustments_micro=balance.adjustments_micro,
        charged_micro=balance.charged_micro,
        used_micro=balance.used_micro,
        remaining_micro=balance.remaining_micro,
        lines=[
            query_pb2.BalanceLine(
                kind=_LINE_KINDS[line.kind],
                model=line.model,
                quantity=line.quantity,
                credits_micro=line.credits_micro,
                default_price=line.default_price,
            )
            for line in balance.lines
        ],
    )


def _unary(behaviour: Callable[[Any, Any], Any], request_type: Any, response_type: Any) -> Any:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )


def _check_usage_scope(account: str) -> None:
    """A tenant's credential sees usage of its own accounts only, one at a time."""
    principal = caller()
    if principal.scoped and not account:
        raise PermissionDenied(
            f"{principal.name} is scoped to accounts: name one of them in the request's account"
        )
    if account:
        principal.check_account(account)


def _require(field: str, value: str) -> None:
    if not value:
        raise InvalidRequest(f"{field} is empty")


def _period(from_us: int, to_us: int) -> Period:
    for name, value in (("from_unix_us", from_us), ("to_unix_us", to_us)):
        if value % HOUR_US:
            raise InvalidRequest(f"{name} {value} is not on a whole hour (rollups are hourly)")
    if from_us and to_us and from_us >= to_us:
        raise InvalidRequest("from_unix_us is not before to_unix_us")
    return Period(from_us or None, to_us or None)


def _group_by(values: Any) -> tuple[Dimension, ...]:
    if not values:
        return DEFAULT_GROUP_BY
    dimensions = []
    for value in values:
        if value not in _DIMENSIONS:
            raise InvalidRequest(f"group_by holds an unknown or unspecified dimension ({value})")
        dimensions.append(_DIMENSIONS[value])
    if len(set(dimensions)) != len(dimensions):
        raise InvalidRequest("group_by names a dimension twice")
    return tuple(dimensions)
