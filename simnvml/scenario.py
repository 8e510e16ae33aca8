"""Scenarios: what a simulated GPU host has and what its processes do, loaded from TOML.

A scenario is plain, validated, immutable data; :mod:`hardware` turns it into a running
model. See ``simnvml/scenarios/README.md`` for the file format.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from creditmeter.simnvml.bursts import BusySpan
from creditmeter.simnvml.parse import parse, reading
from creditmeter.simnvml.profiles import find_profile, profile_names
from creditmeter.simnvml.specs import (
    FAULT_KINDS,
    GPU_FAULTS,
    INIT_FAULTS,
    READINGS,
    DriverSpec,
    FaultSpec,
    GpuSpec,
    HostSpec,
    MigSpec,
    ProcessSpec,
    SampleReading,
)
from creditmeter.simnvml.toml_table import ScenarioError, Table

__all__ = [
    "FAULT_KINDS",
    "GPU_FAULTS",
    "INIT_FAULTS",
    "READINGS",
    "BusySpan",
    "DriverSpec",
    "FaultSpec",
    "GpuSpec",
    "HostSpec",
    "MigSpec",
    "ProcessSpec",
    "SampleReading",
    "Scenario",
    "ScenarioError",
    "shipped_scenarios",
]


@dataclass(frozen=True)
class Scenario:
    """A validated scenario. Build with :meth:`load`, :meth:`from_file` or :meth:`from_toml`."""

    source: str
    description: str
    host: HostSpec
    gpus: tuple[GpuSpec, ...]
    processes: tuple[ProcessSpec, ...]
    faults: tuple[FaultSpec, ...] = field(default=())

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> Scenario:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(source, "", f"not valid TOML: {exc}") from exc
        return cls(source, *parse(Table(data, "", source)))

    @classmethod
    def from_file(cls, path: str | Path) -> Scenario:
        path = Path(path)
        return cls.from_toml(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def load(cls, name: str) -> Scenario:
        """A scenario shipped in ``simnvml/scenarios`` by name (``"demo"``), or a file path."""
        if name.endswith(".toml") or "/" in name:
            return cls.from_file(name)
        return cls.from_toml(shipped_text(name), f"scenarios/{name}.toml")

    def with_overrides(
        self,
        *,
        sample_period_us: int | None = None,
        sample_reading: str | None = None,
        ring_periods: int | None = None,
        phase_us: int | None = None,
        profile: str | None = None,
    ) -> Scenario:
        """The same scenario with every GPU's sampling changed (benchmarks sweep these):
        ``profile`` replaces every GPU's driver by a named profile, then ``sample_reading``
        sets its process reading."""
        if sample_period_us is not None and sample_period_us <= 0:
            raise ScenarioError(self.source, "sample_period_us", "must be > 0")
        if ring_periods is not None and ring_periods <= 0:
            raise ScenarioError(self.source, "ring_periods", "must be > 0")
        new_reading = None
        if sample_reading is not None:
            new_reading = reading(self.source, "sample_reading", sample_reading)
        gpus = tuple(
            dataclasses.replace(
                g,
                sample_period_us=sample_period_us or g.sample_period_us,
                driver=self._driver(g.driver, profile, new_reading),
                ring_periods=ring_periods or g.ring_periods,
                phase_us=g.phase_us if phase_us is None else phase_us,
            )
            for g in self.gpus
        )
        for g in gpus:
            if g.phase_us is not None and not 0 <= g.phase_us < g.sample_period_us:
                raise ScenarioError(self.source, "phase_us", "must be in [0, sample period)")
        return dataclasses.replace(self, gpus=gpus)

    def _driver(
        self, driver: DriverSpec, profile: str | None, process_reading: SampleReading | None
    ) -> DriverSpec:
        if profile is not None:
            found = find_profile(profile)
            if found is None:
                known = ", ".join(profile_names())
                raise ScenarioError(self.source, "profile", f"no profile {profile!r} ({known})")
            driver = found.driver
        if process_reading is not None:
            driver = dataclasses.replace(driver, process_reading=process_reading)
        return driver


def shipped_text(name: str) -> str:
    """The TOML text of a shipped scenario: a starting point for variations in tests."""
    resource = importlib.resources.files("creditmeter.simnvml") / "scenarios" / f"{name}.toml"
    if not resource.is_file():
        known = ", ".join(shipped_scenarios())
        raise ScenarioError(
            name, "", f"no shipped scenario of that name (creditmeter-agent scenarios: {known})"
        )
    return resource.read_text(encoding="utf-8")


def scenario_summary(name: str) -> str:
    """The first sentence of a shipped scenario's description, on one line."""
    text = Scenario.load(name).description
    first = " ".join(text.split()).split(". ")[0].rstrip(".")
    return first + "."


def shipped_scenarios() -> list[str]:
    folder = importlib.resources.files("creditmeter.simnvml") / "scenarios"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))
