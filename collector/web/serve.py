"""Runs the web app on uvicorn: the store opened read-only (the collector's ``serve`` owns
migrations), the API credentials of ``api.token_file``, one listening socket bound here so
that port 0 works and the port can be written for tests. uvicorn handles SIGINT and SIGTERM
itself: it stops taking connections, finishes the requests in flight, then returns; the
store closes after it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import uvicorn

from creditmeter.collector import settings
from creditmeter.collector.access import load_access
from creditmeter.collector.errors import ConfigError, ListenError
from creditmeter.collector.stores import open_store
from creditmeter.collector.web.app import WebApp
from creditmeter.collector.web.views import WebStore
from creditmeter.config import Config

log = logging.getLogger(__name__)


def run(config: Config) -> None:
    """Serves until SIGINT or SIGTERM. Raises ConfigError or ListenError before serving."""
    access = load_access(config[settings.API_TOKEN_FILE], config[settings.API_CLIENTS])
    if not access.tokens:
        raise ConfigError(
            "the web pages and API log in with the tokens of api.token_file: it names none"
        )
    host, _, port = config[settings.WEB_LISTEN].rpartition(":")
    listener = listen(host.strip("[]"), int(port))
    store = open_store(config[settings.STORE_URL], create=False, migrate=False)
    port_file: Path | None = config[settings.WEB_PORT_FILE]
    try:
        app = WebApp(
            cast(WebStore, store), access, session_hours=config[settings.WEB_SESSION_HOURS]
        )
        bound = listener.getsockname()[1]
        if port_file is not None:
            port_file.write_text(f"{bound}\n")
        log.info("web: serving the API and the pages on http://%s:%d/", host, bound)
        server = Server(
            uvicorn.Config(app.app, log_config=None, access_log=False, server_header=False)
        )
        server.run(sockets=[listener])
    finally:
        if port_file is not None:
            port_file.unlink(missing_ok=True)
        store.close()
        listener.close()
        log.info("web: stopped")


class Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM or SIGINT ends it as any daemon here ends: an ordered
    stop and exit status 0 (uvicorn re-raises the signal once stopped, which would make
    systemd record a kill)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # served from a thread (benchmarks): its owner stops it
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ListenError(f"web.listen {host}:{port}: {os.strerror(exc.errno or 0)}") from exc
    listener.listen(128)
    return listener
