"""Admission's bookkeeping with a controlled clock and timer: pending, admitted, idle."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from creditmeter.collector.admission import Admission
from creditmeter.collector.errors import TooManyStreams


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def no_timer(seconds: float, fn: Callable[[], None]) -> Callable[[], None]:
    return lambda: None


class Stream:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def admission(clock: Clock, max_streams: int = 2) -> Admission:
    return Admission(max_streams, 4, 2, 10.0, timer=no_timer, monotonic=clock)


def test_only_admitted_streams_silent_for_the_timeout_are_cancelled() -> None:
    clock = Clock()
    slots = admission(clock)
    quiet, busy, pending = Stream(), Stream(), Stream()
    slots.arrive("ipv4:10.0.0.1:1", quiet.cancel).admit("gpu-1")
    busy_ticket = slots.arrive("ipv4:10.0.0.2:1", busy.cancel)
    busy_ticket.admit("gpu-2")
    slots.arrive("ipv4:10.0.0.3:1", pending.cancel)  # the Hello timer's business, not ours
    clock.now_s += 59.0
    busy_ticket.touch()  # a request arrived
    clock.now_s += 1.0
    assert slots.idle_streams(60.0) == ["gpu-1"]
    assert (quiet.cancelled, busy.cancelled, pending.cancelled) == (1, 0, 0)
    assert slots.idle_streams(60.0) == []  # cancelled once; its leave() frees the slot
    clock.now_s += 59.0
    assert slots.idle_streams(60.0) == ["gpu-2"]


def test_a_cancelled_idle_stream_frees_its_slot_when_it_leaves() -> None:
    clock = Clock()
    slots = admission(clock, max_streams=1)
    idle = Stream()
    ticket = slots.arrive("ipv4:10.0.0.1:1", idle.cancel)
    ticket.admit("gpu-1")
    with pytest.raises(TooManyStreams, match="limit of 1 streams"):
        slots.arrive("ipv4:10.0.0.2:1", Stream().cancel).admit("gpu-2")
    clock.now_s += 61.0
    assert slots.idle_streams(60.0) == ["gpu-1"]
    ticket.leave()  # grpc ends the cancelled call: the handler's finally
    assert slots.counts == (1, 0)  # gpu-2's stream is still pending (it was refused a slot)
    slots.arrive("ipv4:10.0.0.3:1", Stream().cancel).admit("gpu-3")
    assert slots.counts == (1, 1)
