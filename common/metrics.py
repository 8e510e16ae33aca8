"""Prometheus metrics without prometheus_client: counters, gauges, histograms and /metrics.

Each daemon owns one ``Registry``, creates its metrics at startup and serves them with
``serve_metrics``. The output is the text exposition format 0.0.4, which every Prometheus
version scrapes. Updating a metric takes one lock held for an addition, so the meter's hot
loop can count freely; rendering copies values under the same locks.

Naming follows Prometheus practice: ``creditmeter_<daemon>_<what>_<unit>``, counters end in
``_total``, and durations are in seconds (``_seconds``).
"""

from __future__ import annotations

import bisect
import http.server
import itertools
import logging
import math
import re
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Generic, TypeVar

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# Latencies from 5 ms to 10 s: the defaults Prometheus clients share.
DEFAULT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

LabelValues = tuple[str, ...]


class _Value:
    """One float behind a lock."""

    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def add(self, amount: float) -> None:
        with self._lock:
            self._value += amount

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def get(self) -> float:
        with self._lock:
            return self._value


class CounterChild:
    """A counter for one combination of label values."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = _Value()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; cannot add {amount}")
        self._value.add(amount)

    def get(self) -> float:
        return self._value.get()


class GaugeChild:
    """A gauge for one combination of label values."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = _Value()

    def set(self, value: float) -> None:
        self._value.set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._value.add(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._value.add(-amount)

    def get(self) -> float:
        return self._value.get()


class HistogramChild:
    """A histogram for one combination of label values."""

    __slots__ = ("_bucket_counts", "_count", "_lock", "_sum", "_upper_bounds")

    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self._upper_bounds = upper_bounds  # ascending, ends with +Inf
        self._lock = threading.Lock()
        self._bucket_counts = [0] * len(upper_bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        last = len(self._upper_bounds) - 1  # +Inf
        # The first bucket whose upper bound is >= value (le is inclusive); NaN counts in +Inf.
        index = last if math.isnan(value) else bisect.bisect_left(self._upper_bounds, value)
        with self._lock:
            self._bucket_counts[index] += 1
            self._sum += value
            self._count += 1

    def snapshot(self) -> tuple[list[int], float, int]:
        """(cumulative count per bucket, sum, count), consistent with each other."""
        with self._lock:
            counts, total, count = list(self._bucket_counts), self._sum, self._count
        return list(itertools.accumulate(counts)), total, count


Child = TypeVar("Child", CounterChild, GaugeChild, HistogramChild)


class _Metric(ABC, Generic[Child]):
    """A named metric family: one child per combination of label values."""

    type_name: ClassVar[str]

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"{name}: duplicate label names in {list(labelnames)}")
        self.name = name
        self.help_text = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[LabelValues, Child] = {}
        if not self.labelnames:
            # An unlabelled metric exists from the start, so it is exported as 0 before any
            # event: a rate() over it then works from the first scrape.
            self._children[()] = self._new_child()

    def labels(self, **labels: str) -> Child:
        """The child for these label values, created on first use (keep cardinality small)."""
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        key = tuple(str(labels[name]) for name in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def remove(self, **labels: str) -> None:
        """Forget one label combination, e.g. a GPU that left the host."""
        key = tuple(str(labels[name]) for name in self.labelnames)
        with self._lock:
            self._children.pop(key, None)

    def _unlabelled(self) -> Child:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels()")
        return self._children[()]

    @abstractmethod
    def _new_child(self) -> Child:
        """A child for one combination of label values, at zero."""

    def _items(self) -> list[tuple[LabelValues, Child]]:
        with self._lock:
            return sorted(self._children.items())

    def samples(self) -> Iterable[tuple[str, LabelValues, LabelValues, float]]:
        """(sample name, label names, label values, value) for exposition."""
        for key, child in self._items():
            yield self.name, self.labelnames, key, self._child_value(child)

    def _child_value(self, child: Child) -> float:
        """The one value a child exposes. Histograms expose several and override ``samples``
        instead, so they never get here."""
        raise NotImplementedError(f"{type(self).__name__} has no single value per child")


class Counter(_Metric[CounterChild]):
    """Something that only goes up: records written, bytes sent, errors by kind."""

    type_name = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: counter names end in _total")
        super().__init__(name, help_text, labelnames)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def get(self) -> float:
        return self._unlabelled().get()

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _child_value(self, child: CounterChild) -> float:
        return child.get()


class Gauge(_Metric[GaugeChild]):
    """A value that goes up and down, set when it changes or computed at scrape time.

    With ``callback`` the gauge has no stored value: ``callback()`` runs on every scrape
    (in the HTTP server's thread, so it must be quick and thread-safe), e.g. the number of
    unacknowledged records in the outbox. A callback that raises drops the sample from that
    scrape and is logged, once, at WARNING.
    """

    type_name = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        callback: Callable[[], float] | None = None,
    ) -> None:
        if callback is not None and labelnames:
            raise ValueError(f"gauge {name!r}: a callback gauge cannot have labels")
        super().__init__(name, help_text, labelnames)
        self._callback = callback
        self._callback_failed = False

    def set(self, value: float) -> None:
        self._settable().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._settable().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._settable().dec(amount)

    def get(self) -> float:
        if self._callback is not None:
            return float(self._callback())
        return self._unlabelled().get()

    def samples(self) -> Iterable[tuple[str, LabelValues, LabelValues, float]]:
        if self._callback is None:
            yield from super().samples()
            return
        try:
            value = float(self._callback())
        except Exception:
            if not self._callback_failed:
                log.warning("metric %s: callback failed; sample omitted", self.name, exc_info=True)
            self._callback_failed = True
            return
        self._callback_failed = False
        yield self.name, (), (), value

    def _settable(self) -> GaugeChild:
        if self._callback is not None:
            raise ValueError(f"gauge {self.name} is computed by its callback; it cannot be set")
        return self._unlabelled()

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _child_value(self, child: GaugeChild) -> float:
        return child.get()


class Histogram(_Metric[HistogramChild]):
    """A distribution in fixed buckets: exported as ``_bucket{le=…}``, ``_sum`` and ``_count``."""

    type_name = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS_S,
    ) -> None:
        if "le" in labelnames:
            raise ValueError(f"histogram {name!r}: 'le' is reserved for bucket bounds")
        bounds = [float(b) for b in buckets]
        if not bounds or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"histogram {name!r}: buckets must be non-empty and ascending")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.upper_bounds = tuple(bounds)
        super().__init__(name, help_text, labelnames)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.upper_bounds)

    def samples(self) -> Iterable[tuple[str, LabelValues, LabelValues, float]]:
        bucket_labels = (*self.labelnames, "le")
        for key, child in self._items():
            cumulative, total, count = child.snapshot()
            for bound, n in zip(self.upper_bounds, cumulative, strict=True):
                yield f"{self.name}_bucket", bucket_labels, (*key, _format_float(bound)), n
            yield f"{self.name}_sum", self.labelnames, key, total
            yield f"{self.name}_count", self.labelnames, key, count


Metric = Counter | Gauge | Histogram


class Registry:
    """The metrics one daemon exports, in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, Metric] = {}

    def register(self, metric: Metric) -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name!r} is already registered")
            self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labelnames)
        self.register(metric)
        return metric

    def gauge(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        callback: Callable[[], float] | None = None,
    ) -> Gauge:
        metric = Gauge(name, help_text, labelnames, callback)
        self.register(metric)
        return metric

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS_S,
    ) -> Histogram:
        metric = Histogram(name, help_text, labelnames, buckets)
        self.register(metric)
        return metric

    def render(self) -> str:
        """All metrics in the text exposition format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help_text)}")
            lines.append(f"# TYPE {metric.name} {metric.type_name}")
            for name, labelnames, labelvalues, value in metric.samples():
                labels = _format_labels(labelnames, labelvalues)
                lines.append(f"{name}{labels} {_format_float(value)}")
        return "\n".join(lines) + "\n" if lines else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: LabelValues, values: LabelValues) -> str:
    if not names:
        return ""
    pairs = ",".join(
        f'{name}="{_escape_label_value(value)}"' for name, value in zip(names, values, strict=True)
    )
    return "{" + pairs + "}"


def _format_float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


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
            # Scrapes every 15 s would drown the journal; keep them at DEBUG.
            log.debug("metrics %s: " + format, self.address_string(), *args)

    return Handler
