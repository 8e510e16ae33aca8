"""``creditmeter-collector web``: the JSON API and the pages, one ASGI app (Starlette).

Who may see what is the API credentials' rule (access.py), for both halves:

* the **API** takes ``Authorization: Bearer <token>`` (a token of ``api.token_file``);
* the **pages** take a login form with the same token, then a session cookie (random, held
  in this process's memory only, HttpOnly, SameSite=Strict, Secure over HTTPS) that expires
  after ``web.session_hours``.

A tenant (a credential scoped to accounts) sees its own accounts only: any other account's
URL answers **404**, exactly as an account that does not exist (a tenant learns nothing of
other tenants' names). The staff pages and API (accounts, reconciliation, agents) need an
unscoped reader or admin; anyone else gets **403**. No credential: 401 (API) or the login
page (pages).

Every number comes from ``views``, i.e. from the code the CLI prints from. Endpoints are
plain functions: Starlette runs them in its thread pool, so a slow store blocks one thread,
never the event loop.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from creditmeter.collector.access import ApiAccess, Principal, Role
from creditmeter.collector.auth import Peer
from creditmeter.collector.clock import WallClock, wall_clock_us
from creditmeter.collector.errors import (
    CollectorError,
    ConfigError,
    InvalidRequest,
    NoStatement,
    NotAuthenticated,
    UnknownAccount,
)
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import Dimension
from creditmeter.collector.periods import iso_text, period_containing
from creditmeter.collector.report import Period, parse_group_by, parse_period, parse_time_us
from creditmeter.collector.statements import bundle
from creditmeter.collector.web import charts, views
from creditmeter.collector.web.views import WebStore
from creditmeter.labels import label_error

SESSION_COOKIE = "creditmeter_session"
ACCOUNTS_PER_PAGE = 25  # each row is a balance, as `balance` computes it
_MAX_FORM_BYTES = 4096
_SECURITY_HEADERS = {
    # No script at all: charts are SVG drawn here, forms post plainly.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class _Session:
    principal: Principal
    expires_s: float  # monotonic


class Sessions:
    """Logged-in browsers: a random id (the cookie) to the credential it proved. In memory:
    a restart logs everyone out, and nothing about a session is stored or signed."""

    def __init__(self, ttl_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._by_id: dict[str, _Session] = {}

    def start(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            now = self._monotonic()
            self._by_id = {k: v for k, v in self._by_id.items() if v.expires_s > now}
            self._by_id[session_id] = _Session(principal, now + self._ttl_s)
        return session_id

    def principal(self, session_id: str | None) -> Principal | None:
        if not session_id:
            return None
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None or session.expires_s <= self._monotonic():
                return None
            return session.principal

    def end(self, session_id: str | None) -> None:
        with self._lock:
            self._by_id.pop(session_id or "", None)


class _Denied(Exception):
    """The caller may not see this: 401 (no credential), 403 (role) or 404 (account)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WebApp:
    """The endpoints over one store; ``app`` is the ASGI application."""

    def __init__(
        self,
        store: WebStore,
        access: ApiAccess,
        *,
        clock_us: WallClock = wall_clock_us,
        session_hours: float = 8.0,
    ) -> None:
        self._store = store
        self._access = access
        self._clock_us = clock_us
        self._sessions = Sessions(session_hours * 3600)
        environment = jinja2.Environment(
            loader=jinja2.PackageLoader("creditmeter.collector.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        environment.filters["credits"] = _credits_filter
        environment.filters["segment"] = _quote
        self._templates = Jinja2Templates(env=environment)
        self.app = Starlette(
            routes=self._routes(),
            middleware=[Middleware(_SecurityHeaders)],
            exception_handlers={HTTPException: _http_error},
        )

    def _routes(self) -> list[BaseRoute]:
        api: list[BaseRoute] = [
            Route("/api/v1/openapi.json", self.openapi),
            Route("/api/v1/accounts", self.api_accounts),
            # {account:path}: an account name may hold "/" (sent as %2F).
            Route("/api/v1/accounts/{account:path}/balance", self.api_balance),
            Route("/api/v1/accounts/{account:path}/usage", self.api_usage),
            Route("/api/v1/accounts/{account:path}/jobs", self.api_jobs),
            Route("/api/v1/accounts/{account:path}/typical", self.api_typical),
            Route("/api/v1/accounts/{account:path}/statements", self.api_statements),
            Route(
                "/api/v1/accounts/{account:path}/statements/{period}/bundle",
                self.api_bundle,
            ),
            Route("/api/v1/reconcile", self.api_reconcile),
            Route("/api/v1/agents", self.api_agents),
        ]
        pages: list[BaseRoute] = [
            Route("/", self.home),
            Route("/healthz", lambda _request: Response("ok\n", media_type="text/plain")),
            Route("/favicon.ico", lambda _request: Response(status_code=204)),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            # The longer routes first: {account:path} would take their tails too.
            Route("/accounts/{account:path}/statements/{period}/bundle", self.bundle_download),
            Route("/accounts/{account:path}/jobs", self.jobs_page),
            Route("/accounts/{account:path}", self.account_page),
            Route("/staff/accounts", self.staff_accounts),
            Route("/staff/reconcile", self.staff_reconcile),
            Route("/staff/agents", self.staff_agents),
            Mount(
                "/static",
                StaticFiles(packages=[("creditmeter.collector.web", "static")]),
                name="static",
            ),
        ]
        return [*api, *pages]

    # -- who is asking ----------------------------------------------------------------------

    def _api_principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise _Denied(401, "send 'Authorization: Bearer <token>' (a token of api.token_file)")
        return self._authenticate(header[len("bearer ") :].strip())

    def _authenticate(self, token: str) -> Principal:
        try:
            return self._access.authenticate(_NO_PEER, token)
        except NotAuthenticated as exc:
            raise _Denied(401, exc.problem) from exc

    def _account(self, principal: Principal, account: str) -> str:
        """``account`` if the caller may see it and it is open; 404 alike otherwise. A name
        outside the label law (a NUL, which PostgreSQL cannot even compare) is no account:
        it never reaches the store."""
        if label_error("account", account) is not None:
            raise _Denied(404, f"no account {account!r}")
        if principal.accounts is not None and account not in principal.accounts:
            raise _Denied(404, f"no account {account!r}")
        if self._store.account(account) is None:
            raise _Denied(404, f"no account {account!r}")
        return account

    @staticmethod
    def _staff(principal: Principal) -> None:
        if principal.accounts is not None or principal.role is Role.CHARGER:
            raise _Denied(403, "the staff pages need an unscoped reader or admin credential")

    def _ledger(self) -> Ledger:
        return Ledger(self._store, clock_us=self._clock_us)

    # -- the API ----------------------------------------------------------------------------

    def openapi(self, request: Request) -> Response:
        text = resources.files("creditmeter.collector.web").joinpath("openapi.json").read_text()
        return Response(text, media_type="application/json")

    def api_accounts(self, request: Request) -> Response:
        def answer(principal: Principal) -> object:
            if principal.accounts is not None:
                return [{"account": name} for name in sorted(principal.accounts)]
            self._staff(principal)
            offset, limit = _slice(request)
            return views.accounts(self._ledger(), self._store, offset, limit)

        return self._api(request, answer)

    def api_balance(self, request: Request) -> Response:
        return self._api_account(request, lambda account: views.balance(self._ledger(), account))

    def api_usage(self, request: Request) -> Response:
        def answer(account: str) -> object:
            group_by = _group_by(request.query_params.get("group_by", "model"))
            period = _period(request)
            return views.usage(self._store, self._ledger(), account, period, group_by)

        return self._api_account(request, answer)

    def api_jobs(self, request: Request) -> Response:
        def answer(account: str) -> object:
            rows = views.jobs(self._store, self._ledger(), account, _period(request))
            model = request.query_params.get("model")
            return views.jobs_document([j for j in rows if model is None or j.model == model])

        return self._api_account(request, answer)

    def api_typical(self, request: Request) -> Response:
        return self._api_account(
            request,
            lambda account: views.typical_document(
                views.jobs(self._store, self._ledger(), account, _period(request))
            ),
        )

    def api_statements(self, request: Request) -> Response:
        return self._api_account(request, lambda account: views.statements(self._store, account))

    def api_bundle(self, request: Request) -> Response:
        return self._api_account(request, lambda account: self._bundle(account, request))

    def api_reconcile(self, request: Request) -> Response:
        def answer(principal: Principal) -> object:
            self._staff(principal)
            return views.reconciliation(self._store, _period(request))

        return self._api(request, answer)

    def api_agents(self, request: Request) -> Response:
        def answer(principal: Principal) -> object:
            self._staff(principal)
            return views.agents(self._store, self._clock_us())

        return self._api(request, answer)

    def _api(self, request: Request, answer: Callable[[Principal], object]) -> Response:
        try:
            return JSONResponse(answer(self._api_principal(request)))
        except _Denied as exc:
            return _json_error(exc.status, str(exc))
        except (ConfigError, InvalidRequest) as exc:
            return _json_error(400, _problem(exc))
        except (UnknownAccount, NoStatement) as exc:
            return _json_error(404, _problem(exc))
        except CollectorError as exc:
            return _json_error(503, _problem(exc))

    def _api_account(self, request: Request, answer: Callable[[str], object]) -> Response:
        return self._api(
            request,
            lambda principal: answer(self._account(principal, request.path_params["account"])),
        )

    def _bundle(self, account: str, request: Request) -> dict[str, object]:
        opened = self._store.account(account)
        assert opened is not None  # _account checked it
        at_us = parse_time_us("period", request.path_params["period"])
        return bundle(self._store, account, period_containing(opened.anchor_day, at_us).start_us)

    # -- the pages --------------------------------------------------------------------------

    def home(self, request: Request) -> Response:
        principal = self._page_principal(request)
        if principal is None:
            return RedirectResponse("/login", status_code=303)
        if principal.accounts is not None:
            return RedirectResponse(f"/accounts/{min(principal.accounts)}", status_code=303)
        return RedirectResponse("/staff/accounts", status_code=303)

    def login_page(self, request: Request) -> Response:
        return self._render(request, "login.html", None, {"problem": None}, status=200)

    async def login(self, request: Request) -> Response:
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > _MAX_FORM_BYTES:
            # A login form is a few dozen bytes; nothing larger (or unsized) is read.
            problem = "Send the login form with a Content-Length of at most 4 KiB."
            return self._render(request, "login.html", None, {"problem": problem}, 400)
        form = await request.form()
        token = str(form.get("token", ""))
        try:
            principal = self._access.authenticate(_NO_PEER, token)
        except NotAuthenticated:
            problem = "That token is not one of this collector's."
            return self._render(request, "login.html", None, {"problem": problem}, 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            self._sessions.start(principal),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    def logout(self, request: Request) -> Response:
        self._sessions.end(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def account_page(self, request: Request) -> Response:
        def context(principal: Principal) -> dict[str, Any]:
            account = self._account(principal, request.path_params["account"])
            ledger = self._ledger()
            burn = views.burn_down(self._store, ledger, account, self._clock_us())
            period = Period(burn.period_start_us, burn.period_end_us)
            usage = views.usage(
                self._store, ledger, account, period, (Dimension.DAY, Dimension.MODEL)
            )
            daily = [(day, micro) for day, micro in burn.used_by_day_micro]
            return {
                "account": account,
                "balance": views.balance(ledger, account),
                "burn": burn,
                "burn_chart": charts.burn_down(
                    f"credits used in the period by {account}",
                    burn.curve,
                    burn.granted_micro,
                    burn.projected_micro,
                ),
                "usage": usage,
                "usage_chart": charts.bars(f"credits per day for {account}", daily),
                "statements": views.statements(self._store, account),
            }

        return self._page(request, "account.html", context)

    def jobs_page(self, request: Request) -> Response:
        def context(principal: Principal) -> dict[str, Any]:
            account = self._account(principal, request.path_params["account"])
            ledger = self._ledger()
            now = ledger.balance(account).period
            period = _period(request, default=Period(now.start_us, now.end_us))
            rows = views.jobs(self._store, ledger, account, period)
            model = request.query_params.get("model") or None
            shown = [j for j in rows if model is None or j.model == model]
            return {
                "account": account,
                "jobs": views.jobs_document(shown),
                "typical": views.typical_document(rows),
                "models": sorted({j.model for j in rows}),
                "model": model,
                "from": iso_text(period.from_us) if period.from_us is not None else "",
                "to": iso_text(period.to_us) if period.to_us is not None else "",
            }

        return self._page(request, "jobs.html", context)

    def bundle_download(self, request: Request) -> Response:
        principal = self._page_principal(request)
        if principal is None:
            return RedirectResponse("/login", status_code=303)
        try:
            account = self._account(principal, request.path_params["account"])
            document = self._bundle(account, request)
        except _Denied as exc:
            return self._render(request, "error.html", principal, {"problem": str(exc)}, exc.status)
        except (ConfigError, NoStatement) as exc:
            return self._render(request, "error.html", principal, {"problem": _problem(exc)}, 404)
        except CollectorError as exc:
            return self._render(request, "error.html", principal, {"problem": _problem(exc)}, 503)
        name = f"{account}-{request.path_params['period']}-statement.json"
        return Response(
            json.dumps(document, sort_keys=True, indent=1, ensure_ascii=False),
            media_type="application/json",
            headers={"Content-Disposition": f"attachment; filename*=UTF-8''{_quote(name)}"},
        )

    def staff_accounts(self, request: Request) -> Response:
        def context(principal: Principal) -> dict[str, Any]:
            self._staff(principal)
            page = _page_number(request)
            total = len(self._store.accounts())
            rows = views.accounts(
                self._ledger(), self._store, (page - 1) * ACCOUNTS_PER_PAGE, ACCOUNTS_PER_PAGE
            )
            pages = max(1, -(-total // ACCOUNTS_PER_PAGE))
            return {"accounts": rows, "page": page, "pages": pages, "total": total}

        return self._page(request, "staff_accounts.html", context)

    def staff_reconcile(self, request: Request) -> Response:
        def context(principal: Principal) -> dict[str, Any]:
            self._staff(principal)
            now_us = self._clock_us()
            today = now_us - now_us % views.DAY_US
            period = _period(request, default=Period(today, today + views.DAY_US))
            return {
                "rows": views.reconciliation(self._store, period),
                "from": iso_text(period.from_us) if period.from_us is not None else "",
                "to": iso_text(period.to_us) if period.to_us is not None else "",
            }

        return self._page(request, "staff_reconcile.html", context)

    def staff_agents(self, request: Request) -> Response:
        def context(principal: Principal) -> dict[str, Any]:
            self._staff(principal)
            return {"agents": views.agents(self._store, self._clock_us())}

        return self._page(request, "staff_agents.html", context)

    def _page_principal(self, request: Request) -> Principal | None:
        return self._sessions.principal(request.cookies.get(SESSION_COOKIE))

    def _page(
        self, request: Request, template: str, context: Callable[[Principal], dict[str, Any]]
    ) -> Response:
        principal = self._page_principal(request)
        if principal is None:
            return RedirectResponse("/login", status_code=303)
        try:
            return self._render(request, template, principal, context(principal), 200)
        except _Denied as exc:
            return self._render(request, "error.html", principal, {"problem": str(exc)}, exc.status)
        except (ConfigError, InvalidRequest) as exc:
            return self._render(request, "error.html", principal, {"problem": _problem(exc)}, 400)
        except UnknownAccount as exc:
            return self._render(request, "error.html", principal, {"problem": _problem(exc)}, 404)
        except CollectorError as exc:  # the store failed: as the API answers it
            return self._render(request, "error.html", principal, {"problem": _problem(exc)}, 503)

    def _render(
        self,
        request: Request,
        template: str,
        principal: Principal | None,
        context: dict[str, Any],
        status: int,
    ) -> Response:
        staff = principal is not None and principal.accounts is None
        accounts = sorted(principal.accounts) if principal and principal.accounts else []
        return self._templates.TemplateResponse(
            request,
            template,
            {"principal": principal, "staff": staff, "my_accounts": accounts, **context},
            status_code=status,
        )


class _SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


_NO_PEER = Peer("web", {})  # bearer tokens only: the web app sees no client certificate


def _period(request: Request, default: Period | None = None) -> Period:
    """``from``/``to`` query parameters (ISO dates or whole UTC hours); ``default`` when
    neither is given. Raises ConfigError naming the parameter."""
    from_text = request.query_params.get("from") or None
    to_text = request.query_params.get("to") or None
    if from_text is None and to_text is None and default is not None:
        return default
    return parse_period(from_text, to_text, ("from", "to"))


def _slice(request: Request) -> tuple[int, int | None]:
    """``offset`` and ``limit`` query parameters (a balance is computed per account)."""
    values = []
    for name in ("offset", "limit"):
        text = request.query_params.get(name)
        if text is not None and not text.isdigit():
            raise ConfigError(f"{name} {text!r} is not a whole number")
        values.append(None if text is None else int(text))
    return values[0] or 0, values[1]


def _page_number(request: Request) -> int:
    text = request.query_params.get("page", "1")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"page {text!r} is not a page number (1, 2, ...)")
    return int(text)


def _group_by(text: str) -> tuple[Dimension, ...]:
    try:
        return parse_group_by(text)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--group-by", "group_by")) from None


def _problem(exc: CollectorError) -> str:
    return exc.problem if exc.problem else str(exc)


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        return _json_error(exc.status_code, str(exc.detail))
    return HTMLResponse(f"{exc.status_code}\n", status_code=exc.status_code)


def _credits_filter(text: object) -> str:
    """ "1234.500000" -> "1,234.50": credits as a person reads them (pages only; the API
    keeps the exact decimal text)."""
    value = str(text)
    sign = "-" if value.startswith("-") else ""
    whole, _, fraction = value.lstrip("-").partition(".")
    return f"{sign}{int(whole):,}.{(fraction + '00')[:2]}"


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
