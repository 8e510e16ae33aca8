"""Simulated time: a monotonic sim timeline (µs since the driver loaded) and a wall clock
that may jump.

Both clocks satisfy ``agent.gpu.Clock`` (``monotonic``, ``wall``, ``boottime``, ``wait``) for
the agent, and :class:`SimTime` for the simulated host, which reads ``now_us`` and stamps
samples with ``wall_us_at``: the driver stamps a sample with the CPU's wall clock when it
records it, so a wall-clock jump shifts the stamps of periods that end after it, and only
those. A driver that stamps with the boot clock instead (``series_boot_stamps``) stamps
``UPTIME_AT_T0_US`` + sim time, which no wall jump moves.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from pathlib import Path
from typing import Protocol

from creditmeter.simnvml.anchor import Anchor, AnchorFile
from creditmeter.simnvml.units import US_PER_S, s_to_us

DEFAULT_START_WALL_S = 1_750_000_000.0  # 2025-06-15T15:06:40Z: fixed, so tests are repeatable
# The host's uptime at sim t=0: CLOCK_BOOTTIME, which some drivers stamp the device series
# with, is this plus sim time. 58 days, the uptime of the host in
# polarsignals/gpu-metrics-agent#36, where those stamps landed in February 1970.
UPTIME_AT_T0_US = 58 * 86_400 * US_PER_S
HELD_POLL_S = 0.01  # how soon a wait on a held timeline notices its release (real seconds)


class SimTime(Protocol):
    """What the simulated host needs of a clock."""

    @property
    def start_wall_us(self) -> int:
        """Wall µs at sim t=0, before any jump."""
        ...

    def now_us(self) -> int:
        """Sim µs since the driver loaded. Never decreases."""
        ...

    def wall_us_at(self, sim_us: int) -> int:
        """The wall clock (µs since the epoch) at sim time ``sim_us``, jumps included."""
        ...

    def wall_jumps_between(self, start_us: int, end_us: int) -> bool:
        """Whether the wall clock jumps at some sim time in ``(start_us, end_us]``."""
        ...

    def schedule_wall_jump(self, at_us: int, delta_us: int) -> None:
        """Idempotently add a jump from a scenario (each host re-adds its scenario's)."""
        ...


class WallTimeline:
    """Wall µs as a function of sim µs: start + elapsed + the jumps made so far."""

    def __init__(self, start_wall_us: int) -> None:
        self.start_wall_us = start_wall_us
        self._scheduled: set[tuple[int, int]] = set()
        self._made: list[tuple[int, int]] = []
        self._times: list[int] = []
        self._offsets: list[int] = []  # cumulative delta from _times[i] on

    def schedule(self, at_us: int, delta_us: int) -> None:
        if (at_us, delta_us) not in self._scheduled:
            self._scheduled.add((at_us, delta_us))
            self._rebuild()

    def set_made(self, jumps: list[tuple[int, int]]) -> None:
        """Replace the programmatic jumps (a shared clock reloads them from its anchor)."""
        self._made = list(jumps)
        self._rebuild()

    def add_made(self, at_us: int, delta_us: int) -> None:
        self._made.append((at_us, delta_us))
        self._rebuild()

    @property
    def made(self) -> list[tuple[int, int]]:
        return list(self._made)

    def wall_us_at(self, sim_us: int) -> int:
        i = bisect_right(self._times, sim_us)
        return self.start_wall_us + sim_us + (self._offsets[i - 1] if i else 0)

    def jumps_between(self, start_us: int, end_us: int) -> bool:
        return bisect_right(self._times, start_us) != bisect_right(self._times, end_us)

    def _rebuild(self) -> None:
        jumps = sorted([*self._scheduled, *self._made])
        self._times = [at for at, _ in jumps]
        self._offsets = []
        total = 0
        for _, delta in jumps:
            total += delta
            self._offsets.append(total)


class ManualClock:
    """A clock that moves only when told: ``advance``, or ``wait`` (which advances at once).

    For tests: everything the simulated host shows is then a function of what the test did.
    """

    def __init__(self, start_wall_s: float = DEFAULT_START_WALL_S, start_us: int = 0) -> None:
        self._lock = threading.Lock()
        self._now_us = start_us
        self._wall = WallTimeline(s_to_us(start_wall_s))

    @property
    def start_wall_us(self) -> int:
        return self._wall.start_wall_us

    def now_us(self) -> int:
        return self._now_us

    def advance(self, seconds: float) -> None:
        self.advance_us(s_to_us(seconds))

    def advance_us(self, us: int) -> None:
        if us < 0:
            raise ValueError("a monotonic clock cannot go back")
        with self._lock:
            self._now_us += us

    def advance_to_us(self, sim_us: int) -> None:
        """Move to sim time ``sim_us`` (no-op if already there or later)."""
        with self._lock:
            self._now_us = max(self._now_us, sim_us)

    def monotonic(self) -> float:
        return self._now_us / US_PER_S

    def wall(self) -> float:
        return self._wall.wall_us_at(self._now_us) / US_PER_S

    def boottime(self) -> float:
        return (UPTIME_AT_T0_US + self._now_us) / US_PER_S

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if event.is_set():
            return True
        self.advance(max(0.0, seconds))
        return event.is_set()

    def jump_wall(self, seconds: float) -> None:
        """Step the wall clock (and the driver's stamps from now on) by ``seconds``."""
        with self._lock:
            self._wall.add_made(self._now_us, s_to_us(seconds))

    def wall_us_at(self, sim_us: int) -> int:
        return self._wall.wall_us_at(sim_us)

    def wall_jumps_between(self, start_us: int, end_us: int) -> bool:
        return self._wall.jumps_between(start_us, end_us)

    def schedule_wall_jump(self, at_us: int, delta_us: int) -> None:
        with self._lock:
            self._wall.schedule(at_us, delta_us)


class SimClock:
    """Accelerated real time: sim seconds = real CLOCK_MONOTONIC seconds elapsed × ``speed``.

    :meth:`shared` anchors the timeline in a file so that processes started later (an agent
    restarted after SIGKILL) continue it: CLOCK_MONOTONIC is system-wide on Linux.
    """

    def __init__(self, speed: float = 1.0, start_wall_s: float | None = None) -> None:
        wall_s = time.time() if start_wall_s is None else start_wall_s
        self._setup(Anchor(time.monotonic_ns(), s_to_us(wall_s), speed, ()), None)

    @classmethod
    def shared(
        cls, anchor_file: str | Path, speed: float, start_wall: float | None = None
    ) -> SimClock:
        """The timeline in ``anchor_file``, creating it (sim t=0 = now) if it does not exist.

        An existing anchor wins over ``start_wall``; a different ``speed`` is an error.
        """
        file = AnchorFile(Path(anchor_file))
        anchor = file.open_or_create(speed, start_wall)
        if anchor.speed != speed:
            raise ValueError(f"{anchor_file} runs at speed {anchor.speed}, not {speed}")
        clock = cls.__new__(cls)
        clock._setup(anchor, file)
        return clock

    def _setup(self, anchor: Anchor, file: AnchorFile | None) -> None:
        if anchor.speed <= 0:
            raise ValueError("speed must be > 0")
        self._lock = threading.Lock()
        self._anchor_ns = anchor.monotonic_ns
        self.speed = anchor.speed
        self._file = file
        self._file_version = file.version() if file else None
        self._wall = WallTimeline(anchor.start_wall_us)
        self._wall.set_made(list(anchor.wall_jumps))

    @property
    def start_wall_us(self) -> int:
        return self._wall.start_wall_us

    def now_us(self) -> int:
        self._reload()
        anchor_ns = self._anchor_ns
        if anchor_ns is None:
            return 0  # held: the timeline stands at t=0 until released
        return int((time.monotonic_ns() - anchor_ns) * self.speed) // 1000

    def held(self) -> bool:
        """Whether the timeline still stands at t=0, waiting for its release."""
        if self._anchor_ns is not None:
            return False  # released for good: no stat of the file in a running loop's waits
        self._reload()
        return self._anchor_ns is None

    def monotonic(self) -> float:
        return self.now_us() / US_PER_S

    def wall(self) -> float:
        return self._wall.wall_us_at(self.now_us()) / US_PER_S

    def boottime(self) -> float:
        return (UPTIME_AT_T0_US + self.now_us()) / US_PER_S

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Waits ``seconds`` of sim time. None passes on a held timeline, so a positive wait
        lasts until the release and then its full length: a loop on sim deadlines neither
        spins nor runs ahead of the simulation while it is held."""
        if seconds > 0:
            while self.held():
                if event.wait(HELD_POLL_S):
                    return True
        return event.wait(max(0.0, seconds) / self.speed)

    def jump_wall(self, seconds: float) -> None:
        """Step the wall clock by ``seconds`` now; a shared clock records it in its anchor,
        where every process on that timeline sees it."""
        at_us, delta_us = self.now_us(), s_to_us(seconds)
        with self._lock:
            if self._file is None:
                self._wall.add_made(at_us, delta_us)
                return
            self._file.add_jump(at_us, delta_us)
        self._reload()

    def wall_us_at(self, sim_us: int) -> int:
        return self._wall.wall_us_at(sim_us)

    def wall_jumps_between(self, start_us: int, end_us: int) -> bool:
        return self._wall.jumps_between(start_us, end_us)

    def schedule_wall_jump(self, at_us: int, delta_us: int) -> None:
        with self._lock:
            self._wall.schedule(at_us, delta_us)

    def _reload(self) -> None:
        # One stat per read: cheap, and it lets a jump made or a release done by another
        # process show here. Only a held timeline takes its start from the file: a
        # running one never moves.
        if self._file is None:
            return
        version = self._file.version()
        if version == self._file_version:
            return
        anchor = self._file.read()
        with self._lock:
            self._file_version = version
            self._wall.set_made(list(anchor.wall_jumps))
            if self._anchor_ns is None:
                self._anchor_ns = anchor.monotonic_ns
