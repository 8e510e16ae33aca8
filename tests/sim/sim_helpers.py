"""Shared constants and types for the simulator's tests (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from creditmeter.simnvml import DEFAULT_START_WALL_S, FakeNvmlLibrary, ManualClock, SimHost

W0_US = int(DEFAULT_START_WALL_S * 1_000_000)  # wall µs at sim t=0 in every test host
S = 1_000_000  # µs per second, for readable expectations

# One H100 with a 1 s sample period on the wall-second grid: easy to compute by hand.
ONE_GPU = """
[host]
seed = 7
[[gpu]]
product = "H100"
sample_period_us = 1_000_000
phase_us = 0
"""


@dataclass
class Sim:
    host: SimHost
    clock: ManualClock
    lib: FakeNvmlLibrary
