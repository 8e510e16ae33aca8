"""Fixtures for the simulator's tests: hosts on a ManualClock, installed under pynvml."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sim_helpers import Sim

from creditmeter.simnvml import Scenario, SimHost, install, uninstall


@pytest.fixture
def sim() -> Iterator[Callable[[str], Sim]]:
    """Build a host from TOML text on a ManualClock at t=0 and install it under pynvml."""

    def build(toml_text: str) -> Sim:
        host, clock = SimHost.manual(Scenario.from_toml(toml_text, "test.toml"))
        return Sim(host, clock, install(host))

    yield build
    uninstall()
