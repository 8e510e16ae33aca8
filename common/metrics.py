"""Prometheus metrics on ``prometheus_client``, and the /metrics endpoint.

Each daemon owns one ``Registry``, creates its metrics at startup and serves them with
``serve_metrics``. Counting, histograms and the text exposition are prometheus_client's;
what is ours is small:

- names follow Prometheus practice and are checked when a metric is made:
  ``creditmeter_<daemon>_<what>_<unit>``, classic characters only, counters end in
  ``_total``, durations in seconds;
- a gauge computed at scrape time (``callback``) that fails drops its sample from that
  scrape and is logged once, instead of failing the whole scrape (prometheus_client's
  ``set_function`` would turn one broken callback into an HTTP 500 for every metric);
- the endpoint answers /metrics only (404 elsewhere), HEAD too, on IPv4 or IPv6, and logs
  scrapes at DEBUG (every 15 s would drown the journal).

No ``_created`` series: they double the exposition and nothing here reads them.
"""

from __future__ import annotations

import http.server
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")

# Latencies from 5 ms to 10 s: the defaults Prometheus clients share.
DEFAULT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Counter = prometheus_client.Counter
Gauge = prometheus_client.Gauge
Histogram = prometheus_client.Histogram


class CallbackGauge(Collector):
    """A gauge whose value ``callback()`` computes at each scrape (in the HTTP server's
    thread: quick and thread-safe), e.g. the records waiting in the outbox."""

    def __init__(self, name: str, help_text: str, callback: Callable[[], float]) -> None:
        self.name = name
        self._help = help_text
        self._callback = callback
        self._failed = False

    def get(self) -> float:
        return float(self._callback())

    def set(self, value: float) -> None:
        raise ValueError(f"gauge {self.name} is computed by its callback; it cannot be set")

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self._help)

    def collect(self) -> Iterator[Metric]:
        try:
            value = self.get()
        except Exception:
            if not self._failed:
                log.warning("metric %s: callback failed; sample omitted", self.name, exc_info=True)
            self._failed = True
            yield GaugeMetricFamily(self.name, self._help)  # the family, without a sample
            return
        self._failed = False
        yield GaugeMetricFamily(self.name, self._help, value=value)


class Registry:
    """The metrics one daemon exports."""

    def __init__(self) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        _check_name(name)
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: counter names end in _total")
        return Counter(name, help_text, labelnames, registry=self.collectors)

    @overload
    def gauge(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), callback: None = None
    ) -> Gauge: ...

    @overload
    def gauge(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        callback: Callable[[], float],
    ) -> CallbackGauge: ...

    def gauge(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        callback: Callable[[], float] | None = None,
    ) -> Gauge | CallbackGauge:
        _check_name(name)
        if callback is None:
            return Gauge(name, help_text, labelnames, registry=self.collectors)
        if labelnames:
            raise ValueError(f"gauge {name!r}: a callback gauge cannot have labels")
        computed = CallbackGauge(name, help_text, callback)
        self.collectors.register(computed)
        return computed

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS_S,
    ) -> Histogram:
        _check_name(name)
        return Histogram(name, help_text, labelnames, registry=self.collectors, buckets=buckets)

    def render(self) -> str:
        """All metrics in the text exposition format."""
        return generate_latest(self.collectors).decode()

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value now (``name`` as exposed, e.g. "x_total"); None if absent."""
        return self.collectors.get_sample_value(name, labels)


def _check_name(name: str) -> None:
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")


class MetricsServer:
    """The /metrics endpoint: a ThreadingHTTPServer served from a daemon thread."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        server_class = _Ipv6Server if ":" in host else _Ipv4Server
        self._server = server_class((host, port), _handler_for(registry))
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"metrics:{self.port}", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        """Stop serving, close the listening socket and wait for the serving thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(registry: Registry, host: str, port: int) -> tuple[MetricsServer, int]:
    """Serve ``registry`` on http://host:port/metrics; port 0 picks a free port (tests).

    Returns the server (call ``shutdown()`` when the daemon stops) and the bound port.
    Raises OSError when the address cannot be bound (in use, bad host): a daemon should fail
    its start on that rather than run unobserved.
    """
    server = MetricsServer(registry, host, port)
    return server, server.port


class _Ipv4Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a hung scraper must not hold up the daemon's exit


class _Ipv6Server(_Ipv4Server):
    address_family = socket.AF_INET6


def _handler_for(registry: Registry) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._respond(send_body=True)

        def do_HEAD(self) -> None:
            self._respond(send_body=False)

        def _respond(self, *, send_body: bool) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                body, status, content_type = b"not found; try /metrics\n", 404, "text/plain"
            else:
                body, status, content_type = registry.render().encode(), 200, CONTENT_TYPE
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics %s: " + format, self.address_string(), *args)

    return Handler
