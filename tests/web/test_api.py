"""The web API, over real HTTP to a real `creditmeter-collector web` process: scoped like the
gRPC APIs, the same numbers as the CLI, and every answer as the OpenAPI file says."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest

from creditmeter import verify
from creditmeter.collector.web.app import WebApp

from .conftest import XSS, World


def openapi() -> dict[str, Any]:
    text = resources.files("creditmeter.collector.web").joinpath("openapi.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


def test_no_token_is_401_and_a_wrong_one_too(world: World) -> None:
    assert world.get("/api/v1/accounts/acme/balance")[0] == 401
    status, body = world.get("/api/v1/accounts/acme/balance", "acme")
    assert status == 200
    status, body = World(world.db_url, world.base, "").get("/api/v1/agents")
    assert status == 401 and "Bearer" in body["error"]


def test_the_balance_is_the_clis(world: World) -> None:
    status, body = world.get("/api/v1/accounts/acme/balance", "acme")
    assert status == 200
    assert body == json.loads(world.cli("balance", "acme", "--format", "json"))


def test_a_tenant_sees_only_its_own_accounts(world: World) -> None:
    for path in (
        "/api/v1/accounts/globex/balance",
        "/api/v1/accounts/globex/usage",
        "/api/v1/accounts/globex/jobs",
        "/api/v1/accounts/globex/statements",
        "/api/v1/accounts/nosuch/balance",
    ):
        status, body = world.get(path, "acme")
        assert status == 404, path
        assert body == {"error": f"no account {path.split('/')[4]!r}"}  # the same for both
    for path in ("/api/v1/reconcile", "/api/v1/agents"):
        assert world.get(path, "acme")[0] == 403
        assert world.get(path, "charger")[0] == 403
    assert world.get("/api/v1/accounts", "acme") == (200, [{"account": "acme"}])


def test_staff_see_every_account_and_the_fleet(world: World) -> None:
    status, accounts = world.get("/api/v1/accounts", "staff")
    assert status == 200
    assert sorted(a["account"] for a in accounts) == sorted(["acme", "globex", XSS])
    assert world.get("/api/v1/accounts/globex/balance", "staff")[0] == 200
    assert world.get("/api/v1/accounts?offset=1&limit=1", "staff")[1] == [accounts[1]]
    assert world.get("/api/v1/accounts?limit=x", "staff")[0] == 400
    status, agents = world.get("/api/v1/agents", "admin")
    assert status == 200 and [a["agent"] for a in agents] == ["web-host"]


def test_bad_parameters_are_named(world: World) -> None:
    status, body = world.get("/api/v1/accounts/acme/usage?from=yesterday", "acme")
    assert (status, body["error"]) == (
        400,
        "from 'yesterday' is not an ISO date or datetime (2025-06-01, 2025-06-01T14:00Z)",
    )
    status, body = world.get("/api/v1/accounts/acme/usage?group_by=colour", "acme")
    assert status == 400 and "group_by 'colour' is not one of" in body["error"]


def test_a_bundle_from_the_api_verifies(world: World) -> None:
    status, statements = world.get("/api/v1/accounts/acme/statements", "acme")
    assert status == 200 and statements[0]["verifiable"]
    day = statements[0]["period_start"][:10]
    status, bundle = world.get(f"/api/v1/accounts/acme/statements/{day}/bundle", "acme")
    assert status == 200
    summary, report = verify.verify(bundle, world.collector_key_hex)
    assert report.problems == [] and summary.startswith("statement of acme")
    assert world.get(f"/api/v1/accounts/acme/statements/{day}/bundle", "globex")[0] == 404


def test_an_account_named_like_markup_is_just_a_name(world: World) -> None:
    path = f"/api/v1/accounts/{quote(XSS, safe='')}/balance"
    status, body = world.get(path, "xss")
    assert status == 200 and body["account"] == XSS
    assert world.get(path, "acme")[0] == 404


# -- the contract ------------------------------------------------------------------------------


def _concrete(path: str, day: str) -> str:
    return path.replace("{account}", "acme").replace("{period}", day)


def test_every_answer_matches_the_openapi_file(world: World) -> None:
    document = openapi()
    day = world.get("/api/v1/accounts/acme/statements", "acme")[1][0]["period_start"][:10]
    checked = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert method == "get"
            who = "staff" if path in ("/api/v1/reconcile", "/api/v1/agents") else "acme"
            if path == "/api/v1/openapi.json":
                continue
            status, body = world.get(_concrete(path, day), who)
            assert status == 200, (path, body)
            schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
            jsonschema.validate(body, {**schema, "components": document["components"]})
            for code, response in operation["responses"].items():
                if code != "200":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }
            checked += 1
    assert checked == 9
    status, denied = world.get("/api/v1/accounts/globex/balance", "acme")
    jsonschema.validate(denied, document["components"]["schemas"]["Error"])


def test_every_api_route_is_documented_and_every_documented_path_is_routed() -> None:
    app = WebApp(_NoStore(), _no_access())  # type: ignore[arg-type]
    routed = {
        re.sub(r"\{(\w+):path\}", r"{\1}", route.path)  # type: ignore[attr-defined]
        for route in app.app.routes
        if getattr(route, "path", "").startswith("/api/")
    }
    assert routed == set(openapi()["paths"])


class _NoStore:
    """Routes only: nothing is read."""


def _no_access() -> Any:
    from creditmeter.collector.access import ApiAccess

    return ApiAccess()


def test_the_openapi_file_is_served_to_anyone(world: World) -> None:
    status, body = world.get("/api/v1/openapi.json", None)
    assert status == 200 and body == openapi()


def test_a_login_form_larger_than_a_login_is_refused_unread(world: World) -> None:
    import urllib.error
    import urllib.request

    body = b"token=" + b"x" * 5000
    request = urllib.request.Request(world.base + "/login", data=body, method="POST")
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        assert b"at most 4 KiB" in exc.read()


class _RefusingStore:
    """PostgreSQL's answer to a name holding NUL: a store error, whatever the query."""

    def account(self, name: str) -> None:
        from creditmeter.collector.errors import StoreError

        raise StoreError(f"reading account {name!r}: text fields cannot contain NUL")


@pytest.mark.parametrize("name", ["acme\x00", "a\u202eb", " " * 300])
def test_a_name_outside_the_label_law_is_no_account_and_never_reaches_the_store(
    name: str,
) -> None:
    """On PostgreSQL a NUL made the store fail (503, an alert) where the answer is 404."""
    from creditmeter.collector.access import Principal, Role
    from creditmeter.collector.web.app import _Denied

    app = WebApp(_RefusingStore(), _no_access())  # type: ignore[arg-type]
    staff = Principal("token:staff", Role.READER)
    with pytest.raises(_Denied) as denied:
        app._account(staff, name)
    assert denied.value.status == 404
