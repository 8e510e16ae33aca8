"""Metrics: the exposition text, read back by Prometheus's own parser, and /metrics over HTTP."""

from __future__ import annotations

import http.client
import logging
import math
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from creditmeter.agent.meter import MeterStats
from creditmeter.agent.telemetry import AgentTelemetry
from creditmeter.metrics import CONTENT_TYPE, Registry, serve_metrics

HTTP_DEADLINE_S = 5.0


def _families(text: str) -> dict[str, tuple[str, str, list[Sample]]]:
    """family name -> (type, help, samples)."""
    return {
        f.name: (f.type, f.documentation, f.samples) for f in text_string_to_metric_families(text)
    }


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, (name, labels, samples)
    return matches[0]


def test_counter_gauge_histogram_render_as_prometheus_reads_them() -> None:
    registry = Registry()
    records = registry.counter(
        "creditmeter_agent_records_total", "Records written.", labelnames=["gpu"]
    )
    records.labels(gpu="GPU-0").inc()
    records.labels(gpu="GPU-0").inc(2)
    records.labels(gpu="GPU-1").inc(0.5)
    errors = registry.counter("creditmeter_agent_errors_total", "Errors.")
    backlog = registry.gauge("creditmeter_agent_backlog_records", "Unacked records.")
    backlog.set(42)
    backlog.dec(2)
    registry.gauge("creditmeter_agent_up", "Computed at scrape.", callback=lambda: 7.0)
    latency = registry.histogram(
        "creditmeter_agent_ship_seconds", "Ship latency.", buckets=[0.1, 1.0]
    )
    for seconds in (0.05, 0.1, 0.5, 3.0):  # 0.1 sits on a bound: le is inclusive
        latency.observe(seconds)

    families = _families(registry.render())

    kind, doc, samples = families["creditmeter_agent_records"]
    assert (kind, doc) == ("counter", "Records written.")
    assert _value(samples, "creditmeter_agent_records_total", gpu="GPU-0") == 3.0
    assert _value(samples, "creditmeter_agent_records_total", gpu="GPU-1") == 0.5
    # An unlabelled counter is exported before its first event, so rate() works at once.
    assert registry.value("creditmeter_agent_errors_total") == 0.0
    assert errors is not None
    assert _value(families["creditmeter_agent_errors"][2], "creditmeter_agent_errors_total") == 0
    assert families["creditmeter_agent_backlog_records"][0] == "gauge"
    assert (
        _value(
            families["creditmeter_agent_backlog_records"][2], "creditmeter_agent_backlog_records"
        )
        == 40
    )
    assert _value(families["creditmeter_agent_up"][2], "creditmeter_agent_up") == 7.0

    kind, _, samples = families["creditmeter_agent_ship_seconds"]
    assert kind == "histogram"
    name = "creditmeter_agent_ship_seconds"
    assert _value(samples, f"{name}_bucket", le="0.1") == 2
    assert _value(samples, f"{name}_bucket", le="1.0") == 3
    assert _value(samples, f"{name}_bucket", le="+Inf") == 4
    assert _value(samples, f"{name}_sum") == pytest.approx(3.65)
    assert _value(samples, f"{name}_count") == 4


def test_histogram_with_labels_and_default_buckets() -> None:
    registry = Registry()
    rpc = registry.histogram("creditmeter_collector_rpc_seconds", "RPC time.", ["method"])
    rpc.labels(method="Ship").observe(0.003)
    rpc.labels(method="Ship").observe(60.0)  # beyond every default bucket: +Inf only
    samples = _families(registry.render())["creditmeter_collector_rpc_seconds"][2]
    buckets = [s for s in samples if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in buckets][-1] == "+Inf"
    assert all(s.labels["method"] == "Ship" for s in samples)
    assert (
        _value(samples, "creditmeter_collector_rpc_seconds_bucket", method="Ship", le="0.005") == 1
    )
    assert (
        _value(samples, "creditmeter_collector_rpc_seconds_bucket", method="Ship", le="+Inf") == 2
    )


def test_label_values_and_help_are_escaped() -> None:
    registry = Registry()
    tricky = 'a "quoted" \\ back\nslash'
    registry.counter("odd_total", 'Help with \\ and\nnewline and "quotes".', ["v"]).labels(
        v=tricky
    ).inc()
    _, doc, samples = _families(registry.render())["odd"]
    assert doc == 'Help with \\ and\nnewline and "quotes".'
    assert samples[0].labels == {"v": tricky}


def test_exposition_lines() -> None:
    registry = Registry()
    registry.counter("a_total", "A.", ["x"]).labels(x="1").inc()
    registry.gauge("b", "B.").set(math.inf)
    assert registry.render() == (
        "# HELP a_total A.\n"
        "# TYPE a_total counter\n"
        'a_total{x="1"} 1.0\n'
        "# HELP b B.\n"
        "# TYPE b gauge\n"
        "b +Inf\n"
    )
    assert Registry().render() == ""


def test_failing_callback_drops_its_sample_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()

    def broken() -> float:
        raise RuntimeError("outbox closed")

    registry.gauge("broken", "Broken.", callback=broken)
    registry.gauge("fine", "Fine.").set(1)
    with caplog.at_level(logging.WARNING, logger="creditmeter.metrics"):
        first, second = registry.render(), registry.render()
    assert first == second
    families = _families(first)
    assert families["broken"][2] == []
    assert _value(families["fine"][2], "fine") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "metric broken: callback failed; sample omitted"
    ]


def test_mistakes_are_refused_with_the_metric_named() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match="end in _total"):
        registry.counter("records", "No suffix.")
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.gauge("2fast", "Bad name.")
    # The rest is prometheus_client's own checking, in its words.
    with pytest.raises(ValueError, match="Reserved label"):
        registry.gauge("g", "Bad label.", ["__reserved"])
    with pytest.raises(ValueError, match="Reserved label"):
        registry.histogram("h", "Bad label.", ["le"])
    with pytest.raises(ValueError, match="sorted order"):
        registry.histogram("h2", "Bad buckets.", buckets=[1.0, 0.5])
    counter = registry.counter("c_total", "C.", ["gpu"])
    with pytest.raises(ValueError, match="Incorrect label names"):
        counter.labels(pid="1")
    with pytest.raises(ValueError, match="missing label values"):
        counter.inc()
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels(gpu="0").inc(-1)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.counter("c_total", "Again.")
    computed = registry.gauge("computed", "C.", callback=lambda: 1.0)
    with pytest.raises(ValueError, match="cannot be set"):
        computed.set(2)
    with pytest.raises(ValueError, match="cannot have labels"):
        registry.gauge("computed2", "C.", ["x"], callback=lambda: 1.0)


def test_removed_label_combination_disappears() -> None:
    registry = Registry()
    util = registry.gauge("gpu_util_ratio", "Utilisation.", ["gpu"])
    util.labels(gpu="GPU-0").set(0.5)
    util.labels(gpu="GPU-1").set(0.25)
    util.remove("GPU-0")
    samples = _families(registry.render())["gpu_util_ratio"][2]
    assert [s.labels for s in samples] == [{"gpu": "GPU-1"}]


def test_concurrent_updates_are_not_lost() -> None:
    registry = Registry()
    counter = registry.counter("hits_total", "Hits.", ["worker"])
    histogram = registry.histogram("lat_seconds", "Latency.")
    threads_n, per_thread = 8, 5000
    start = threading.Barrier(threads_n)

    def work() -> None:
        child = counter.labels(worker="all")
        start.wait()
        for _ in range(per_thread):
            child.inc()
            histogram.observe(0.01)

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.value("hits_total", worker="all") == threads_n * per_thread
    samples = _families(registry.render())["lat_seconds"][2]
    assert _value(samples, "lat_seconds_count") == threads_n * per_thread


@pytest.fixture
def served() -> Iterator[tuple[Registry, int]]:
    registry = Registry()
    server, port = serve_metrics(registry, "127.0.0.1", 0)
    yield registry, port
    server.shutdown()


def test_metrics_endpoint_over_http(served: tuple[Registry, int]) -> None:
    registry, port = served
    registry.counter("scraped_total", "Scraped.").inc(3)
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=HTTP_DEADLINE_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        body = response.read().decode()
    assert _value(_families(body)["scraped"][2], "scraped_total") == 3

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=HTTP_DEADLINE_S)
    assert caught.value.code == 404
    caught.value.close()

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_DEADLINE_S)
    connection.request("HEAD", "/metrics?name[]=x")
    head = connection.getresponse()
    assert head.status == 200 and head.read() == b""
    assert int(head.headers["Content-Length"]) > 0
    connection.close()


def test_shutdown_closes_the_port() -> None:
    server, port = serve_metrics(Registry(), "127.0.0.1", 0)
    server.shutdown()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=HTTP_DEADLINE_S).close()


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback on this host")
def test_serves_on_ipv6() -> None:
    server, port = serve_metrics(Registry(), "::1", 0)
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=HTTP_DEADLINE_S) as r:
            assert r.status == 200
    finally:
        server.shutdown()


def test_the_agents_requery_counters_follow_the_meter() -> None:
    registry = Registry()
    telemetry = AgentTelemetry(registry)
    stats = MeterStats()
    stats.evidence_requeries["left_out_rows"] = 3
    stats.evidence_requery_rows["left_out_rows"] = 1
    telemetry.after_cycle(stats, 0)
    stats.evidence_requeries["left_out_rows"] += 2
    stats.evidence_requeries["ambiguous_rows"] += 1
    telemetry.after_cycle(stats, 0)
    families = _families(registry.render())
    _, _, asked = families["creditmeter_agent_evidence_requeries"]
    _, _, shown = families["creditmeter_agent_evidence_requery_rows"]
    name = "creditmeter_agent_evidence_requeries_total"
    assert _value(asked, name, reason="left_out_rows") == 5
    assert _value(asked, name, reason="ambiguous_rows") == 1
    assert (
        _value(shown, "creditmeter_agent_evidence_requery_rows_total", reason="left_out_rows") == 1
    )


@pytest.mark.parametrize("name", ["fits_cut_short", "series_catch_ups"])
def test_the_meters_plain_counts_are_counters(name: str) -> None:
    registry = Registry()
    telemetry = AgentTelemetry(registry)
    stats = MeterStats()
    telemetry.after_cycle(stats, 0)
    setattr(stats, name, 2)
    telemetry.after_cycle(stats, 0)
    setattr(stats, name, 3)
    telemetry.after_cycle(stats, 0)
    _, _, samples = _families(registry.render())[f"creditmeter_agent_{name}"]
    assert _value(samples, f"creditmeter_agent_{name}_total") == 3
