"""The metering loop's order of work: what is durable before the first poll."""

from __future__ import annotations

import threading

from creditmeter.agent.gpu import SystemClock
from creditmeter.agent.loop import MeterLoop
from creditmeter.agent.records import Flusher
from creditmeter.agent.usage import WindowUsage
from tests.agent.outbox_helpers import StateLog


class OnePoll:
    """A meter that notes what the outbox held at its first poll, then asks to stop."""

    def __init__(self, outbox: StateLog, stop: threading.Event) -> None:
        self.outbox, self.stop = outbox, stop
        self.durable_at_first_poll: list[bytes] | None = None

    def poll(self) -> list[WindowUsage]:
        if self.durable_at_first_poll is None:
            self.durable_at_first_poll = list(self.outbox.states)
        self.stop.set()
        return []

    def close_window(self) -> list[WindowUsage]:
        return []

    def state(self) -> bytes:
        return b"cursors where metering starts"

    def written_through_us(self) -> int:
        return 0

    def read_through_us(self) -> dict[str, int]:
        return {}

    def settle_now(self) -> None:
        pass

    def settled_through(self, read_us: dict[str, int]) -> bool:
        return True

    def retire(self) -> list[WindowUsage]:
        return []


def test_where_metering_starts_is_durable_before_the_first_poll() -> None:
    """Found by the SIGKILL end-to-end test (seed 34759661): an agent killed before its
    first window close had written nothing, so its restart was a first start and metered
    from the driver's newest period. The busy time between the two starts (0.8 s there)
    was billed to nobody and reported nowhere. Now the state is written before the first
    poll: the restart resumes from the first start's cursors and reads the ring back."""
    outbox, stop = StateLog(), threading.Event()
    meter = OnePoll(outbox, stop)
    loop = MeterLoop(meter, Flusher(outbox), lambda usages: [], SystemClock(), window_s=60)
    durable_when_ready: list[bytes] = []
    loop.run(stop, ready=lambda: durable_when_ready.extend(outbox.states))
    assert meter.durable_at_first_poll == [b"cursors where metering starts"]
    # READY=1 (and the log line saying so) only once it is durable: the SIGKILL e2e test
    # kills the agent as soon as it says it is ready, and once killed it in between.
    assert durable_when_ready == [b"cursors where metering starts"]
