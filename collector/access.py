"""Who may call the collector's APIs other than Ingest: the Query and admin authentication seam.

Every RPC on the collector's gRPC server passes ``ApiAuthInterceptor`` first. Ingest has its
own per-agent check (``collector.auth``) and health checks are for load balancers and
probes, so those two pass untouched; **every other method is refused with UNAUTHENTICATED
unless the caller presents an API credential**, so a service added later is protected
without doing anything. A caller authenticates with either

* a bearer token: gRPC metadata ``authorization: Bearer <token>``, the token listed in
  ``api.token_file`` (lines "NAME TOKEN"; "#" starts a comment), or
* a client certificate verified against ``tls.ca_file`` (mutual TLS) whose subject CN is
  listed in ``api.clients``. An agent's certificate alone is not an API credential.

A servicer that wants to know who called (for its log or per-caller rules) calls
``caller()`` inside the RPC; it returns the principal the interceptor admitted, e.g.
"token:billing-export" or "cert:reporting".
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import grpc

from creditmeter.collector.auth import Peer
from creditmeter.collector.errors import ConfigError, NotAuthenticated
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

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("creditmeter_api_caller")


class NotPermitted(NotAuthenticated):
    """The caller proved who it is (a verified certificate) but is not an API client."""


class ApiAuthenticator(Protocol):
    def authenticate(self, peer: Peer, bearer_token: str | None) -> str:
        """The caller's principal name; raises NotAuthenticated (no or a wrong credential)
        or NotPermitted (a known certificate that is not allowed to call the API)."""
        ...


def caller() -> str:
    """The principal admitted for the RPC running in this thread (inside a guarded method).

    Raises LookupError outside a guarded RPC, which is a bug in the caller.
    """
    return _caller.get()


@dataclass(frozen=True)
class ApiAccess:
    """Tokens (name -> token) and certificate CNs that may call the Query and admin APIs."""

    tokens: Mapping[str, str] = field(default_factory=dict)
    client_names: frozenset[str] = frozenset()

    @property
    def configured(self) -> bool:
        return bool(self.tokens or self.client_names)

    def authenticate(self, peer: Peer, bearer_token: str | None) -> str:
        if bearer_token is not None:
            for token_name, token in self.tokens.items():
                # Constant time: the comparison must not tell an attacker how much matched.
                if hmac.compare_digest(token.encode(), bearer_token.encode()):
                    return f"token:{token_name}"
            raise NotAuthenticated("the bearer token is not one of api.token_file")
        name = peer_common_name(peer.auth_properties)
        if name is not None and name in self.client_names:
            return f"cert:{name}"
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


def load_access(token_file: Path | None, client_names: tuple[str, ...]) -> ApiAccess:
    """``ApiAccess`` from the configuration; raises ConfigError naming the file and line."""
    tokens = read_token_file(token_file) if token_file is not None else {}
    return ApiAccess(tokens, frozenset(client_names))


def read_token_file(path: Path) -> dict[str, str]:
    """name -> token from lines "NAME TOKEN". Raises ConfigError for an unreadable file, a
    malformed line, a repeated name or a token shorter than 16 characters."""
    try:
        with path.open("rb") as stream:
            mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
            data = stream.read(_MAX_TOKEN_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(f"api.token_file {path}: cannot read: {exc.strerror or exc}") from None
    if mode & stat.S_IROTH:
        log.warning("api.token_file %s is readable by every user (mode %o)", path, mode)
    tokens: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"api.token_file {path} line {number}"
        if len(words) != 2:
            raise ConfigError(f"{where}: expected NAME TOKEN")
        name, token = words
        if name in tokens:
            raise ConfigError(f"{where}: name {name!r} appears twice")
        if len(token) < _MIN_TOKEN_CHARS:
            raise ConfigError(f"{where}: token shorter than {_MIN_TOKEN_CHARS} characters")
        tokens[name] = token
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

    def _admit(self, method: str, context: Any) -> str:
        peer = Peer(context.peer(), dict(context.auth_context()))
        try:
            return self._authenticator.authenticate(peer, _bearer_token(context))
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


def _bearer_token(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            if value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip()
            return ""  # another scheme: a credential, just not one we accept
    return None


def _guarded(handler: Any, admit: Callable[[Any], str]) -> Any:
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


def _forget(token: contextvars.Token[str]) -> None:
    """Unset the caller, so a pooled thread's next RPC cannot see this one's."""
    # A response stream abandoned by its client is closed by the garbage collector, possibly
    # in another context (ValueError); this thread's next guarded RPC sets its own caller.
    with contextlib.suppress(ValueError):
        _caller.reset(token)
