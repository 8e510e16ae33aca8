"""Whole-microsecond time and integer rounding: the simulator never uses floats for state."""

from __future__ import annotations

US_PER_S = 1_000_000


def s_to_us(seconds: float) -> int:
    """Seconds (as written in a scenario) to whole microseconds, to the nearest."""
    return round(seconds * US_PER_S)


def round_half_up(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded to the nearest integer, halves up (both ≥ 0).

    The driver reports whole percents; half-up is the rounding a C ``(x * 100 + 50) / P``
    produces, so it is what the simulator uses everywhere a percent is reported.
    """
    return (2 * numerator + denominator) // (2 * denominator)


def mem_util_for(sm_util: int) -> int:
    """A plausible memory-controller percent for an SM percent: 0.4 × sm, rounded half up."""
    return (4 * sm_util + 5) // 10
