"""Who may call the collector's APIs other than Ingest, and what each caller may do.

Every RPC on the collector's gRPC server passes ``ApiAuthInterceptor`` first. Ingest has its
own per-agent check (``collector.auth``) and health checks are for load balancers and
probes, so those two pass untouched; **every other method is refused with UNAUTHENTICATED
unless the caller presents an API credential**, so a service added later is protected
without doing anything. A caller authenticates with either

* a bearer token: gRPC metadata ``authorization: Bearer <token>``, the token listed in
  ``api.token_file`` (lines "NAME TOKEN ROLE [ACCOUNT...]"; "#" starts a comment), or
* a client certificate verified against ``tls.ca_file`` (mutual TLS) whose subject CN is
  listed in ``api.clients`` (entries "CN ROLE [ACCOUNT...]"). An agent's certificate alone
  is not an API credential, and an API client's never speaks for an agent (auth.py).

Each credential carries a **role** and, for a tenant, the **accounts** it is scoped to:

* ``reader``: the Query service (balances, credit checks, usage);
* ``charger``: what a reader may, and RecordCharge;
* ``admin``: every method; never scoped to accounts.

A credential scoped to accounts reads and charges those accounts only: anything else is
PERMISSION_DENIED, the same answer for an account that exists and one that does not. An
account holding a space or "%" is written percent-encoded (``%20``, ``%25``). A line with
no role (the format before roles) is an admin, with a warning at startup.

The interceptor refuses a method outside the role before the servicer runs; a servicer
asks ``caller()`` for the admitted ``Principal`` and checks the accounts of the request
with ``Principal.check_account``.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import hmac
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import unquote

import grpc

from creditmeter.collector.auth import Peer
from creditmeter.collector.errors import ConfigError, NotAuthenticated, PermissionDenied
from creditmeter.labels import label_error
from creditmeter.tls import peer_common_name

log = logging.getLogger(__name__)

# Methods with their own authentication (Ingest) or none by design (health probes).
UNGUARDED_METHODS: Final = frozenset(
    {
        "/creditmeter.v1.Ingest/Stream",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
)
_BEARER = "bearer "
_MAX_TOKEN_FILE_BYTES = 1024 * 1024
_MIN_TOKEN_CHARS = 16  # shorter tokens can be guessed; refuse them at startup


class Role(enum.Enum):
    """What a credential may call: each role may do all the ones before it may."""

    READER = "reader"
    CHARGER = "charger"
    ADMIN = "admin"


_RANK = {Role.READER: 0, Role.CHARGER: 1, Role.ADMIN: 2}
# The least role each service or method needs; a method not named here needs admin, so a
# service added later is an admin's until it is listed.
_NEEDS: Final = {
    "/creditmeter.v1.Query/": Role.READER,
    "/creditmeter.v1.Charges/RecordCharge": Role.CHARGER,
}


def role_needed(method: str) -> Role:
    """The least role that may call ``method`` ("/package.Service/Method")."""
    exact = _NEEDS.get(method)
    if exact is not None:
        return exact
    return _NEEDS.get(method[: method.rfind("/") + 1], Role.ADMIN)


@dataclass(frozen=True, slots=True)
class Principal:
    """An admitted API caller: "token:NAME" or "cert:CN", its role and, for a tenant, the
    accounts it may see and charge (None: every account)."""

    name: str
    role: Role
    accounts: frozenset[str] | None = None

    def __str__(self) -> str:
        scope = "" if self.accounts is None else f" of {', '.join(sorted(self.accounts))}"
        return f"{self.name} ({self.role.value}{scope})"

    def may_call(self, method: str) -> bool:
        return _RANK[self.role] >= _RANK[role_needed(method)]

    @property
    def scoped(self) -> bool:
        return self.accounts is not None

    def check_account(self, account: str) -> None:
        """Raises PermissionDenied unless this caller may see and charge ``account``."""
        if self.accounts is not None and account not in self.accounts:
            raise PermissionDenied(f"{self.name} is not scoped to account {account!r}")


ADMIN_PRINCIPAL = Principal("local", Role.ADMIN)  # in-process callers (the web app, tests)

_caller: contextvars.ContextVar[Principal] = contextvars.ContextVar("creditmeter_api_caller")


class NotPermitted(NotAuthenticated):
    """The caller proved who it is (a verified certificate) but is not an API client."""


class ApiAuthenticator(Protocol):
    def authenticate(self, peer: Peer, bearer_token: str | None) -> Principal:
        """The admitted caller; raises NotAuthenticated (no or a wrong credential) or
        NotPermitted (a known certificate that is not allowed to call the API)."""
        ...


def caller() -> Principal:
    """The principal admitted for the RPC running in this thread (inside a guarded method).

    Raises LookupError outside a guarded RPC, which is a bug in the caller.
    """
    return _caller.get()


@dataclass(frozen=True, slots=True)
class Grant:
    """One credential's role and accounts, as configured."""

    role: Role
    accounts: frozenset[str] | None = None


@dataclass(frozen=True)
class ApiAccess:
    """Tokens (name -> (token, grant)) and certificate CNs (CN -> grant) that may call the
    Query, Charges and admin APIs."""

    tokens: Mapping[str, tuple[str, Grant]] = field(default_factory=dict)
    clients: Mapping[str, Grant] = field(default_factory=dict)

    @classmethod
    def admins(cls, tokens: Mapping[str, str]) -> ApiAccess:
        """Every token an admin: for tests and in-process servers."""
        return cls({name: (token, Grant(Role.ADMIN)) for name, token in tokens.items()})

    @property
    def client_names(self) -> frozenset[str]:
        return frozenset(self.clients)

    @property
    def configured(self) -> bool:
        return bool(self.tokens or self.clients)

    def authenticate(self, peer: Peer, bearer_token: str | None) -> Principal:
        if bearer_token is not None:
            for token_name, (token, grant) in self.tokens.items():
                # Constant time: the comparison must not tell an attacker how much matched.
                if hmac.compare_digest(token.encode(), bearer_token.encode()):
                    return Principal(f"token:{token_name}", grant.role, grant.accounts)
            raise NotAuthenticated("the bearer token is not one of api.token_file")
        name = peer_common_name(peer.auth_properties)
        if name is not None and name in self.clients:
            grant = self.clients[name]
            return Principal(f"cert:{name}", grant.role, grant.accounts)
        if name is not None:
            raise NotPermitted(
                f"certificate {name!r} is not listed in api.clients of the collector"
            )
        if not self.configured:
            raise NotAuthenticated(
                "the Query and admin APIs are closed: the collector has neither api.token_file "
                "nor api.clients"
            )
        raise NotAuthenticated(
            "send 'authorization: Bearer <token>' metadata or a client certificate "
            "listed in api.clients"
        )


def load_access(token_file: Path | None, clients: tuple[str, ...]) -> ApiAccess:
    """``ApiAccess`` from the configuration; raises ConfigError naming the file and line
    (or the api.clients entry)."""
    tokens = read_token_file(token_file) if token_file is not None else {}
    granted: dict[str, Grant] = {}
    for number, entry in enumerate(clients, start=1):
        where = f"api.clients entry {number}"
        words = entry.split()
        if not words:
            raise ConfigError(f"{where}: empty")
        if words[0] in granted:
            raise ConfigError(f"{where}: CN {words[0]!r} appears twice")
        granted[words[0]] = parse_grant(words[1:], where, entry)
    return ApiAccess(tokens, granted)


def parse_grant(words: list[str], where: str, name: str) -> Grant:
    """ROLE [ACCOUNT...] as a Grant. No words: an admin (the format before roles), logged."""
    if not words:
        log.warning("%s: %s has no role: it is an admin; add one of %s", where, name, _ROLES)
        return Grant(Role.ADMIN)
    try:
        role = Role(words[0])
    except ValueError:
        raise ConfigError(f"{where}: role {words[0]!r} is not one of {_ROLES}") from None
    if len(words) == 1:
        return Grant(role)
    if role is Role.ADMIN:
        raise ConfigError(f"{where}: an admin is never scoped to accounts")
    accounts = set()
    for word in words[1:]:
        account = unquote(word, errors="strict") if "%" in word else word
        problem = label_error("account", account)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        accounts.add(account)
    return Grant(role, frozenset(accounts))


_ROLES = ", ".join(r.value for r in Role)


def read_token_file(path: Path) -> dict[str, tuple[str, Grant]]:
    """name -> (token, grant) from lines "NAME TOKEN [ROLE [ACCOUNT...]]". Raises
    ConfigError for an unreadable file, a malformed line, a repeated name, a token shorter
    than 16 characters, an unknown role or an unlawful account."""
    try:
        with path.open("rb") as stream:
            mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
            data = stream.read(_MAX_TOKEN_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(f"api.token_file {path}: cannot read: {exc.strerror or exc}") from None
    if mode & stat.S_IROTH:
        log.warning("api.token_file %s is readable by every user (mode %o)", path, mode)
    tokens: dict[str, tuple[str, Grant]] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"api.token_file {path} line {number}"
        if len(words) < 2:
            raise ConfigError(f"{where}: expected NAME TOKEN ROLE [ACCOUNT...]")
        name, token = words[:2]
        if name in tokens:
            raise ConfigError(f"{where}: name {name!r} appears twice")
        if len(token) < _MIN_TOKEN_CHARS:
            raise ConfigError(f"{where}: token shorter than {_MIN_TOKEN_CHARS} characters")
        tokens[name] = (token, parse_grant(words[2:], where, f"token {name!r}"))
    return tokens


# -- the gRPC interceptor -----------------------------------------------------------------


Refusal = Callable[[str, Exception], None]  # (method, error): for metrics


class ApiAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Authenticates every RPC outside ``UNGUARDED_METHODS`` before its servicer runs.

    gRPC's interceptors see the method name and metadata but not the TLS peer, so the
    check runs in a wrapper around the method's behaviour, where the context is at hand.
    """

    def __init__(
        self, authenticator: ApiAuthenticator, on_refused: Refusal = lambda m, e: None
    ) -> None:
        self._authenticator = authenticator
        self._on_refused = on_refused

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in UNGUARDED_METHODS:
            return handler
        return _guarded(handler, lambda context: self._admit(method, context))

    def _admit(self, method: str, context: Any) -> Principal:
        peer = Peer(context.peer(), dict(context.auth_context()))
        try:
            principal = self._authenticator.authenticate(peer, _bearer_token(context))
        except NotAuthenticated as exc:
            self._on_refused(method, exc)
            log.warning("refused %s from %s: %s", method, peer.address, exc)
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if isinstance(exc, NotPermitted)
                else grpc.StatusCode.UNAUTHENTICATED
            )
            context.abort(code, str(exc))
            raise  # abort raises; this line only satisfies the type checker
        if not principal.may_call(method):
            denied = PermissionDenied(
                f"{principal} may not call {method}: it needs the {role_needed(method).value} role"
            )
            self._on_refused(method, denied)
            log.warning("refused %s from %s: %s", method, peer.address, denied)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(denied))
        return principal


def _bearer_token(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            if value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip()
            return ""  # another scheme: a credential, just not one we accept
    return None


def _guarded(handler: Any, admit: Callable[[Any], Principal]) -> Any:
    """The same RPC handler with ``admit(context)`` run first and ``caller()`` set."""

    def unary(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def run(request: Any, context: Any) -> Any:
            token = _caller.set(admit(context))
            try:
                return behavior(request, context)
            finally:
                _forget(token)

        return run

    def streaming(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Iterator[Any]]:
        def run(request: Any, context: Any) -> Iterator[Any]:
            # A generator: admitted when gRPC starts iterating it, before the first response.
            token = _caller.set(admit(context))
            try:
                yield from behavior(request, context)
            finally:
                _forget(token)

        return run

    kinds = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, unary),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, streaming),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, unary),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, streaming),
    }
    for attribute, (make, wrap) in kinds.items():
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return make(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _forget(token: contextvars.Token[Principal]) -> None:
    """Unset the caller, so a pooled thread's next RPC cannot see this one's."""
    # A response stream abandoned by its client is closed by the garbage collector, possibly
    # in another context (ValueError); this thread's next guarded RPC sets its own caller.
    with contextlib.suppress(ValueError):
        _caller.reset(token)
