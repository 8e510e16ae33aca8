"""How the evidence reader settles whether a driver's per-process rows are means."""

from __future__ import annotations

from creditmeter.agent.evidence import EvidenceReader, EvidenceStats, RowReading
from creditmeter.agent.gpu import Device

GPU = Device(0, "GPU-5ab2e4b1-7c3f-4d1a-9f0e-2b6c8d4e1a37", "NVIDIA H100", False)


def reader() -> EvidenceReader:
    return EvidenceReader(nvml=None, device=GPU, stats=EvidenceStats(), state=None)  # type: ignore[arg-type]


def test_two_means_settle_that_rows_are_means_whatever_rows_alike_come_between() -> None:
    # On a steady load a mean's last sample often reads as the mean itself: such a row
    # proves nothing, and once a mean was seen it must not stand between two that do.
    r = reader()
    r.vote(RowReading.AVERAGED)
    r.vote(RowReading.PER_SAMPLE)
    assert r.reading is RowReading.UNKNOWN
    r.vote(RowReading.AVERAGED)
    assert r.reading is RowReading.AVERAGED
    r.vote(RowReading.PER_SAMPLE)
    r.vote(RowReading.PER_SAMPLE)
    assert r.reading is RowReading.AVERAGED


def test_rows_alike_settle_one_sample_a_row_where_no_mean_was_seen() -> None:
    r = reader()
    r.vote(RowReading.PER_SAMPLE)
    r.vote(RowReading.PER_SAMPLE)
    assert r.reading is RowReading.PER_SAMPLE
    r.vote(RowReading.AVERAGED)  # a mean after all: two settle it
    r.vote(RowReading.AVERAGED)
    assert r.reading is RowReading.AVERAGED
