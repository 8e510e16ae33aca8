"""Moments as text: µs since the epoch, for messages and reports (agent and collector)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_text(time_us: int) -> str:
    """ "2025-06-15T00:00:00Z" (µs shown only when there are any), for messages and reports."""
    moment = _EPOCH + timedelta(microseconds=time_us)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
