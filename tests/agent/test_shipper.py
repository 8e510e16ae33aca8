"""The shipper against a real gRPC server on a real port: a fake collector (outbox_helpers)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from outbox_helpers import (
    FakeCollector,
    FakeStore,
    draft,
    drafts,
    open_outbox,
    parse,
    wait_until,
)

from creditmeter import chain
from creditmeter.agent.backoff import Backoff
from creditmeter.agent.outbox import Outbox
from creditmeter.agent.shipper import Shipper, insecure_channel_factory


@dataclass
class Recorder:
    """A ShipperObserver that remembers what it was told."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: list[int] = field(default_factory=list)
    lags_s: list[float] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)

    def batch_sent(self, records: int) -> None:
        with self.lock:
            self.sent.append(records)

    def records_acked(self, records: int, oldest_lag_s: float) -> None:
        with self.lock:
            self.lags_s.append(oldest_lag_s)

    def stream_ended(self, outcome: str, detail: str) -> None:
        with self.lock:
            self.ended.append((outcome, detail))


class AlwaysTop:
    """Draws the top of the jitter range: every backoff lasts its full ceiling."""

    def random(self) -> float:
        return 0.999


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return chain.generate_key()


@pytest.fixture
def store(key: Ed25519PrivateKey) -> FakeStore:
    return FakeStore(public_key=key.public_key())


@pytest.fixture
def collector(store: FakeStore) -> Iterator[FakeCollector]:
    server = FakeCollector(store)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def outbox(tmp_path: Path, key: Ed25519PrivateKey) -> Iterator[Outbox]:
    # keep_acked: acknowledged records stay readable, so tests compare bytes after delivery.
    with open_outbox(tmp_path / "outbox.db", key, max_segment=2, keep_acked=1000) as box:
        yield box


@pytest.fixture
def pruning_outbox(tmp_path: Path, key: Ed25519PrivateKey) -> Iterator[Outbox]:
    """Prunes as in production (keep_acked=0). List it before ``run``: closed after the stop."""
    with open_outbox(tmp_path / "pruning.db", key, max_segment=2) as box:
        yield box


def fast_backoff() -> Backoff:
    return Backoff(initial_s=0.01, cap_s=0.05, rng=random.Random(3))


def make_shipper(outbox: Outbox, collector: FakeCollector, **options: Any) -> Shipper:
    options.setdefault("backoff", fast_backoff())
    options.setdefault("ack_timeout_s", 5.0)
    return Shipper(outbox, insecure_channel_factory(collector.target), outbox.agent_id, **options)


@pytest.fixture
def run() -> Iterator[Callable[[Shipper], threading.Event]]:
    """Start ``Shipper.run`` in a thread; at teardown stop it and check it ends promptly."""
    running: list[tuple[threading.Thread, threading.Event]] = []

    def start(shipper: Shipper) -> threading.Event:
        stop = threading.Event()
        thread = threading.Thread(target=shipper.run, args=(stop,), name="test-shipper")
        thread.start()
        running.append((thread, stop))
        return stop

    yield start
    for thread, stop in running:
        stop.set()
        thread.join(timeout=5.0)
        assert not thread.is_alive(), "the shipper did not stop within 5 s"


def outbox_bytes(outbox: Outbox) -> list[bytes]:
    batch = outbox.batch_after(outbox.pruned_through, 1_000_000)
    return [] if batch is None else list(batch.records)


def test_records_arrive_in_order_and_are_acknowledged(
    pruning_outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    outbox = pruning_outbox
    recorder = Recorder()
    shipper = make_shipper(outbox, collector, observer=recorder)
    outbox.append(drafts(5))
    expected = outbox_bytes(outbox)
    run(shipper)
    wait_until(lambda: outbox.acked_seq == 5)
    outbox.append(drafts(4, first_busy_us=6))
    wait_until(lambda: outbox.acked_seq == 9 and shipper.stats().records_acked == 9)
    assert outbox.depth() == 0
    assert outbox.pruned_through == 9
    assert store.records[:5] == expected
    assert store.seqs() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [parse(r).busy_us for r in store.records] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert store.duplicates == 0
    stats = shipper.stats()
    assert stats.batches_sent == len(recorder.sent)
    assert sum(recorder.sent) == 9
    assert stats.connected
    assert stats.last_error == ""


def test_batches_hold_whole_segments_up_to_batch_max(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    outbox.append(drafts(10))  # segments of 2 (the fixture's max_segment)
    run(make_shipper(outbox, collector, batch_max=5))
    wait_until(lambda: outbox.acked_seq == 10)
    assert store.batch_sizes == [4, 4, 2]  # 5 would split a segment


def test_a_record_is_durable_at_the_collector_well_within_a_second(
    outbox: Outbox, collector: FakeCollector, run: Any
) -> None:
    recorder = Recorder()
    run(make_shipper(outbox, collector, observer=recorder))
    for i in range(20):
        outbox.append([draft(i + 1)])
        wait_until(lambda i=i: len(recorder.lags_s) == i + 1)
    assert max(recorder.lags_s) < 1.0


def test_resume_acknowledges_what_the_collector_already_holds(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    outbox.append(drafts(10))
    expected = outbox_bytes(outbox)
    store.records.extend(expected[:6])  # committed before, but the acks never arrived
    run(make_shipper(outbox, collector))
    wait_until(lambda: outbox.acked_seq == 10)
    assert store.records == expected
    assert store.duplicates == 0
    assert store.batch_sizes == [4]  # only seqs 7..10 were sent


def test_a_collector_with_other_bytes_for_our_seqs_is_reported_not_fixed(
    outbox: Outbox,
    collector: FakeCollector,
    store: FakeStore,
    run: Any,
    tmp_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with open_outbox(tmp_path / "other.db", key, max_segment=2) as other:
        other.append([draft(999), draft(998)])
        store.records.extend(outbox_bytes(other))
    outbox.append(drafts(3))
    expected = outbox_bytes(outbox)
    with caplog.at_level(logging.ERROR):
        shipper = make_shipper(outbox, collector)
        run(shipper)
        wait_until(lambda: store.hellos >= 3)  # it keeps trying
    assert "collector hash" in shipper.stats().last_error
    assert outbox.acked_seq == 0
    assert outbox_bytes(outbox) == expected  # our records are never rewritten
    assert any("different bytes" in r.message for r in caplog.records if r.levelno == 40)


def test_a_collector_ahead_of_everything_the_outbox_wrote_is_reported(
    outbox: Outbox,
    collector: FakeCollector,
    store: FakeStore,
    run: Any,
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> None:
    # The outbox was lost and recreated: the collector holds seqs 1..4, the new outbox 1..2.
    with open_outbox(tmp_path / "lost.db", key, max_segment=2) as lost:
        lost.append(drafts(4, first_busy_us=100))
        store.records.extend(outbox_bytes(lost))
    outbox.append(drafts(2))
    shipper = make_shipper(outbox, collector)
    run(shipper)
    wait_until(lambda: store.hellos >= 3)
    assert "holds seq 4" in shipper.stats().last_error
    assert (outbox.acked_seq, outbox.depth()) == (0, 2)
    assert store.head_seq == 4


def test_a_collector_that_lost_records_gets_them_again_while_the_outbox_has_them(
    outbox: Outbox,
    collector: FakeCollector,
    store: FakeStore,
    run: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox.append(drafts(6))
    expected = outbox_bytes(outbox)
    run(make_shipper(outbox, collector))
    wait_until(lambda: outbox.acked_seq == 6)
    with caplog.at_level(logging.ERROR):
        store.truncate(2)  # restored from an old backup
        collector.restart()
        outbox.append(drafts(2, first_busy_us=7))
        wait_until(lambda: outbox.acked_seq == 8 and store.head_seq == 8)
    assert store.records[:6] == expected
    assert store.records == outbox_bytes(outbox)
    assert any("lost committed records" in r.message for r in caplog.records)


def test_a_gap_the_outbox_cannot_fill_is_reported_loudly(
    pruning_outbox: Outbox,
    collector: FakeCollector,
    store: FakeStore,
    run: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = pruning_outbox
    outbox.append(drafts(6))
    shipper = make_shipper(outbox, collector)
    run(shipper)
    wait_until(lambda: outbox.acked_seq == 6)
    with caplog.at_level(logging.ERROR):
        store.truncate(2)
        hellos = store.hellos
        collector.restart()
        outbox.append(drafts(2, first_busy_us=7))
        wait_until(lambda: store.hellos >= hellos + 2)
    assert "unrecoverable gap" in shipper.stats().last_error
    assert "records 3..6" in shipper.stats().last_error
    assert store.seqs() == [1, 2]  # nothing sent past the hole
    assert (outbox.acked_seq, outbox.depth()) == (6, 2)
    assert any("unrecoverable gap" in r.message for r in caplog.records if r.levelno == 40)


def test_the_shipper_reconnects_when_the_collector_comes_back_on_the_same_port(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    shipper = make_shipper(outbox, collector)
    run(shipper)
    outbox.append(drafts(2))
    wait_until(lambda: outbox.acked_seq == 2)
    collector.stop()
    outbox.append(drafts(3, first_busy_us=3))
    wait_until(lambda: "UNAVAILABLE" in shipper.stats().last_error)
    collector.start()
    wait_until(lambda: outbox.acked_seq == 5)
    assert store.seqs() == [1, 2, 3, 4, 5]
    assert shipper.stats().reconnects >= 1


def test_dropped_acks_and_restarts_still_store_every_record_once_in_order(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    collector.knobs.drop_acks = 2
    shipper = make_shipper(outbox, collector, batch_max=2, max_in_flight=1, ack_timeout_s=0.3)
    run(shipper)
    outbox.append(drafts(6))
    wait_until(lambda: outbox.acked_seq == 6)
    collector.restart()
    outbox.append(drafts(3, first_busy_us=7))
    collector.knobs.drop_acks = 1
    collector.restart()
    outbox.append(drafts(2, first_busy_us=10))
    wait_until(lambda: outbox.acked_seq == 11)
    assert store.records == outbox_bytes(outbox)
    assert store.seqs() == list(range(1, 12))
    assert shipper.stats().reconnects >= 3


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    ],
)
def test_refusals_are_logged_as_errors_and_retried_until_resolved(
    code: grpc.StatusCode,
    outbox: Outbox,
    collector: FakeCollector,
    store: FakeStore,
    run: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.knobs.refuse_batches = code
    outbox.append(drafts(3))
    recorder = Recorder()
    shipper = make_shipper(outbox, collector, observer=recorder)
    with caplog.at_level(logging.ERROR):
        run(shipper)
        wait_until(lambda: store.hellos >= 3)
    assert outbox.depth() == 3
    assert code.name in shipper.stats().last_error
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert any(code.name in m and "an operator acts" in m for m in errors)
    assert ("operator", f"{code.name}: batch refused by the test") in recorder.ended
    collector.knobs.refuse_batches = None  # the operator fixed it
    wait_until(lambda: outbox.acked_seq == 3)
    assert store.seqs() == [1, 2, 3]


def test_batches_too_large_for_the_collector_shrink_until_they_fit(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    collector.knobs.max_batch_records = 3
    outbox.append(drafts(8))  # segments of 2
    shipper = make_shipper(outbox, collector, batch_max=8)
    run(shipper)
    wait_until(lambda: outbox.acked_seq == 8)
    assert store.batch_sizes == [2, 2, 2, 2]  # batch_max 8 -> 4 -> 2
    assert store.seqs() == list(range(1, 9))
    assert "RESOURCE_EXHAUSTED" in shipper.stats().last_error


def test_a_segment_too_large_for_the_collector_needs_an_operator(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    collector.knobs.max_batch_records = 1
    outbox.append(drafts(2))  # one segment of 2
    recorder = Recorder()
    run(make_shipper(outbox, collector, batch_max=2, observer=recorder))
    wait_until(lambda: any(outcome == "operator" for outcome, _ in recorder.ended))
    assert store.records == []
    assert outbox.depth() == 2


def test_a_stream_the_server_ends_is_replaced_without_backoff(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    # Any backoff would wait 30 s (the draw is always the ceiling): the test would time out.
    slow = Backoff(initial_s=30.0, cap_s=30.0, rng=AlwaysTop())
    collector.knobs.end_after_batches = 1
    shipper = make_shipper(outbox, collector, backoff=slow, batch_max=2)
    run(shipper)
    outbox.append(drafts(8))
    wait_until(lambda: outbox.acked_seq == 8, timeout_s=10.0)
    assert store.seqs() == list(range(1, 9))
    assert shipper.stats().reconnects >= 3
    assert shipper.stats().last_error == ""


def test_stop_is_prompt_even_during_a_long_backoff(
    outbox: Outbox, collector: FakeCollector, store: FakeStore
) -> None:
    collector.knobs.refuse_hello = grpc.StatusCode.UNAVAILABLE
    long_wait = Backoff(initial_s=30.0, cap_s=30.0, rng=AlwaysTop())
    shipper = make_shipper(outbox, collector, backoff=long_wait)
    stop = threading.Event()
    thread = threading.Thread(target=shipper.run, args=(stop,))
    thread.start()
    wait_until(lambda: store.hellos >= 1 and shipper.stats().last_error != "")
    started = time.monotonic()
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0


def test_stop_is_prompt_on_an_idle_stream(outbox: Outbox, collector: FakeCollector) -> None:
    shipper = make_shipper(outbox, collector)
    stop = threading.Event()
    thread = threading.Thread(target=shipper.run, args=(stop,))
    thread.start()
    wait_until(lambda: shipper.stats().connected)
    started = time.monotonic()
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0


def test_drain_delivers_what_is_left_before_the_deadline(
    outbox: Outbox, collector: FakeCollector, store: FakeStore
) -> None:
    outbox.append(drafts(7))
    shipper = make_shipper(outbox, collector)
    assert shipper.drain(time.monotonic() + 10.0) is True
    assert store.seqs() == [1, 2, 3, 4, 5, 6, 7]
    assert outbox.depth() == 0
    assert shipper.drain(time.monotonic() + 10.0) is True  # nothing left: at once


def test_drain_gives_up_at_its_deadline_and_keeps_the_records(
    outbox: Outbox, collector: FakeCollector, store: FakeStore
) -> None:
    collector.knobs.refuse_hello = grpc.StatusCode.UNAVAILABLE
    outbox.append(drafts(3))
    shipper = make_shipper(outbox, collector)
    started = time.monotonic()
    assert shipper.drain(started + 0.5) is False
    assert 0.3 <= time.monotonic() - started < 2.0
    assert outbox.depth() == 3
    assert store.records == []


def test_an_unreachable_collector_is_retried(outbox: Outbox, run: Any) -> None:
    outbox.append(drafts(1))
    shipper = Shipper(
        outbox,
        insecure_channel_factory("127.0.0.1:1"),  # nothing listens on port 1
        outbox.agent_id,
        backoff=fast_backoff(),
    )
    run(shipper)
    wait_until(lambda: shipper.stats().reconnects >= 3)
    assert "UNAVAILABLE" in shipper.stats().last_error
    assert outbox.depth() == 1


def test_run_and_drain_cannot_overlap(outbox: Outbox, collector: FakeCollector, run: Any) -> None:
    shipper = make_shipper(outbox, collector)
    run(shipper)
    wait_until(lambda: shipper.stats().connected)
    with pytest.raises(RuntimeError, match="already running"):
        shipper.drain(time.monotonic() + 1.0)


class BrokenObserver(Recorder):
    def records_acked(self, records: int, oldest_lag_s: float) -> None:
        raise RuntimeError("metrics backend broken")


def test_a_failing_metrics_hook_does_not_stop_delivery(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    run(make_shipper(outbox, collector, observer=BrokenObserver()))
    outbox.append(drafts(2))
    wait_until(lambda: outbox.acked_seq == 2)
    outbox.append(drafts(2, first_busy_us=3))
    wait_until(lambda: outbox.acked_seq == 4)
    assert store.seqs() == [1, 2, 3, 4]


def test_a_channel_factory_that_fails_is_retried(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    failures = [OSError("tls files unreadable"), OSError("tls files unreadable")]
    real = insecure_channel_factory(collector.target)

    def factory() -> Any:
        if failures:
            raise failures.pop()
        return real()

    shipper = Shipper(outbox, factory, outbox.agent_id, backoff=fast_backoff())
    outbox.append(drafts(2))
    run(shipper)
    wait_until(lambda: outbox.acked_seq == 2)
    assert "cannot create the channel: tls files unreadable" in shipper.stats().last_error
    assert shipper.stats().reconnects == 2


def test_an_idle_stream_is_closed_and_the_next_record_opens_another_on_the_same_channel(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    """A collector's slot is held only while there is something to deliver (issue 13)."""
    channels: list[grpc.Channel] = []
    factory = insecure_channel_factory(collector.target)

    def counting_factory() -> grpc.Channel:
        channels.append(factory())
        return channels[-1]

    recorder = Recorder()
    shipper = Shipper(
        outbox,
        counting_factory,
        outbox.agent_id,
        backoff=fast_backoff(),
        observer=recorder,
        idle_close_s=0.05,
    )
    outbox.append(drafts(3))
    run(shipper)
    wait_until(
        lambda: (
            outbox.acked_seq == 3 and ("idle", "idle: everything acknowledged") in recorder.ended
        )
    )
    assert store.hellos == 1
    assert shipper.stats().connected  # the collector has everything: healthy, not disconnected
    outbox.append(drafts(2, first_busy_us=4))
    wait_until(lambda: outbox.acked_seq == 5 and len(recorder.ended) == 2)
    assert store.hellos == 2
    assert len(channels) == 1  # the connection outlives its streams
    assert store.seqs() == [1, 2, 3, 4, 5]
    assert [outcome for outcome, _ in recorder.ended] == ["idle", "idle"]
    assert shipper.stats().last_error == ""


def test_without_idle_close_the_stream_stays_open(
    outbox: Outbox, collector: FakeCollector, store: FakeStore, run: Any
) -> None:
    recorder = Recorder()
    shipper = make_shipper(outbox, collector, observer=recorder)
    outbox.append(drafts(2))
    run(shipper)
    wait_until(lambda: outbox.acked_seq == 2)
    outbox.append(drafts(2, first_busy_us=3))
    wait_until(lambda: outbox.acked_seq == 4)
    assert store.hellos == 1
    assert recorder.ended == []
