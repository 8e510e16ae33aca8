"""``report --reconcile``: per GPU and day, what allocation would bill beside what the GPU
did, what was billed, unattributed and missing, from the stored rollups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from creditmeter.collector.main import main
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2

from .records import BUSY_US, GPU_UUID, T0_US, WALL_US, WINDOW_US, AgentChain, device_books


def gap(rec: usage_pb2.UsageRecord) -> None:
    rec.gaps.add(duration_us=1_500_000, reason=usage_pb2.GAP_REASON_GPU_LOST)


def test_a_gpu_day_shows_held_busy_billed_unattributed_and_gaps(
    store: SQLiteStore, agent: AgentChain, verifier: Verifier, db_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    agent.extend(2)
    agent.append(gap)

    def books(rec: usage_pb2.UsageRecord) -> None:
        device_books(3 * BUSY_US, [(usage_pb2.UNATTRIBUTED_REASON_NO_PROCESS, 250_000)])(rec)
        rec.start_unix_us, rec.end_unix_us = T0_US, T0_US + 3 * WINDOW_US
        # The GPU's own time unmeasured: more than the process's gap says (none was there).
        rec.device.gaps.add(duration_us=4_000_000, reason=usage_pb2.GAP_REASON_GPU_LOST)

    agent.append(books)
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 4), agent.key.public_key()))
    url = f"sqlite://{db_path}"

    assert main(["report", "--db", url, "--reconcile", "--format", "json"]) == 0
    [day] = json.loads(capsys.readouterr().out)
    assert day == {
        "day": "2025-06-15",
        "host": "gpu-host-17",
        "gpu": GPU_UUID,
        "held_seconds": f"{3 * WALL_US / 1e6:.6f}",
        "device_busy_seconds": f"{(3 * BUSY_US + 250_000) / 1e6:.6f}",
        "billed_seconds": f"{3 * BUSY_US / 1e6:.6f}",
        "booked_seconds": f"{3 * BUSY_US / 1e6:.6f}",
        "unattributed_seconds": {"NO_PROCESS": "0.250000"},
        "gap_seconds": {"GPU_LOST": "1.500000"},
        "unmeasured_seconds": {"GPU_LOST": "4.000000"},
        "unexplained_seconds": "0.000000",
    }
    assert main(["report", "--db", url, "--reconcile"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "DAY", "HOST", "GPU", "HELD_S", "DEVICE_BUSY_S", "BILLED_S", "UNATTRIBUTED_S",
        "GAPS_S", "UNMEASURED_S", "UNEXPLAINED_S",
    ]  # fmt: skip
    assert table[1].split()[3:] == [
        "30.000000", "21.620368", "21.370368", "0.250000", "1.500000", "4.000000", "0.000000",
    ]  # fmt: skip
    assert main(["report", "--db", url, "--reconcile", "--from", "2025-06-16"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # the header and the legend only
