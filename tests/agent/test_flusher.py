"""The flusher while the outbox cannot write (a full disk): usage is held in memory,
coalesced per process and job, and written in an order audit can check: each GPU's books
after every process record they account for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from creditmeter.agent.errors import AgentError
from creditmeter.agent.records import Flusher, is_device
from creditmeter.v1 import usage_pb2

GPU = "GPU-19b952a9-e831-249f-f6aa-0340a7633915"


class FlakyOutbox:
    """Refuses every append while ``full``; remembers what it took."""

    def __init__(self) -> None:
        self.full = False
        self.written: list[usage_pb2.UsageRecord] = []

    def append(
        self, drafts: Sequence[usage_pb2.UsageRecord], state: Mapping[str, bytes] | None = None
    ) -> list[int]:
        if self.full:
            raise AgentError("database or disk is full")
        self.written += drafts
        return list(range(len(drafts)))


def process(pid: int, busy_us: int, window: int) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        gpu=usage_pb2.GpuRef(uuid=GPU),
        process=usage_pb2.ProcessRef(pid=pid, create_time_us=1),
        attribution=usage_pb2.Attribution(account=f"tenant-{pid}"),
        start_unix_us=window * 2_000_000,
        end_unix_us=(window + 1) * 2_000_000,
        busy_us=busy_us,
        quality=usage_pb2.QUALITY_EXACT,
    )


def books(attributed_us: int, window: int) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        gpu=usage_pb2.GpuRef(uuid=GPU),
        start_unix_us=window * 2_000_000,
        end_unix_us=(window + 1) * 2_000_000,
        quality=usage_pb2.QUALITY_UNATTRIBUTED,
        device=usage_pb2.DeviceBooks(
            device_busy_us=attributed_us, attributed_busy_us=attributed_us
        ),
    )


def test_held_books_go_after_every_process_record_they_account_for() -> None:
    """Seen under load in tests/faults/test_host_faults.py: a process first seen while the
    books were held was written after them, and audit found the GPU's books short by its
    busy time in one span and long by as much in the next."""
    outbox = FlakyOutbox()
    flusher = Flusher(outbox)
    outbox.full = True
    assert not flusher.write([process(1, 700, 0), books(700, 0)], b"", 0.0)
    # Window 1: pid 1 again, and pid 2 for the first time, after the books were held.
    assert not flusher.write([process(1, 500, 1), process(2, 300, 1), books(800, 1)], b"", 1.0)
    outbox.full = False
    assert flusher.write([], b"", 2.0)
    kinds = ["books" if is_device(r) else r.process.pid for r in outbox.written]
    assert kinds == [1, 2, "books"]
    (held_books,) = [r for r in outbox.written if is_device(r)]
    carried = sum(r.busy_us for r in outbox.written if not is_device(r))
    assert held_books.device.attributed_busy_us == carried == 1500
