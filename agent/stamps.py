"""The clock a driver stamps a device's utilization series with, and that series placed on
the wall clock.

nvml.h calls the stamps of ``nvmlDeviceGetSamples`` a "CPU timestamp in microseconds". The
meter places them against the wall clock: the processes' presence, their own samples (µs
since the epoch: Syllo/nvtop#110, NVIDIA/go-nvml#51), the times a GPU was lost or a window
closed. Some drivers count the series from boot instead: on a DGX Spark its stamps were
CLOCK_BOOTTIME, so that on a host up 58 days the samples "landed in February 1970"
(polarsignals/gpu-metrics-agent#36). Taken as they are, such periods overlap nothing a
process did, and a process alone on its GPU would be billed nothing.

So the clock is learnt per device from the stamps of each answer: a newest stamp within a
year of the wall clock is on the wall clock (no host is up for 55 years); one no later than
the boot clock counts from boot. A boot-stamped series is moved onto the wall clock by
wall − boot time read at the call, so that it follows a step of the wall clock as a
wall-stamped driver's series does (the meter's step handling applies unchanged). The
cursor handed back to the driver (lastSeenTimeStamp) is the raw stamp the meter's cursor
was read from, never one worked back: a step between two calls would otherwise make the
driver answer periods already read, now stamped as new.
"""

from __future__ import annotations

import enum
import logging

from creditmeter.agent.gpu import Clock, Device, DeviceSample, Nvml

log = logging.getLogger(__name__)

US_PER_S = 1_000_000
# A stamp on the wall clock is within this of it: a ring holds minutes, and the wall clock
# has no plausible reading this far past a boot-clock stamp (55 years since the epoch).
WALL_NEAR_US = 365 * 86_400 * US_PER_S
# A boot stamp is no later than the boot clock read after the answer; this much later still
# passes (the clock is read as a float of seconds).
BOOT_SLACK_US = 1_000


class StampClock(enum.Enum):
    WALL = "wall"  # µs since the epoch, stepping with the wall clock
    BOOT = "boot"  # µs since boot (CLOCK_BOOTTIME)


class SeriesStamps:
    """One device's series as the meter reads it: stamped in wall µs, whatever the driver's
    clock. ``clock`` is the one the meter reads; no clock is read for a wall-stamped series
    (so a trace of one replays as before)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.stamped: StampClock | None = None  # None: no answer has shown it yet
        # (wall µs, raw µs) of the newest sample answered: the meter's cursor, and the
        # driver's stamp it came from.
        self._newest: tuple[int, int] | None = None

    def samples(self, nvml: Nvml, device: Device, since_us: int, now_us: int) -> list[DeviceSample]:
        """The samples after ``since_us`` (wall µs; 0: the whole ring), stamped in wall µs.
        ``now_us``: the wall clock of this poll. Raises what ``nvml.device_samples`` does."""
        raw = nvml.device_samples(device, self._driver_since_us(since_us))
        if not raw:
            return raw
        newest_us = raw[-1].timestamp_us
        if newest_us >= now_us - WALL_NEAR_US:
            self._learnt(device, StampClock.WALL)
            return raw
        # Read after the answer, so that no stamp in it can be later (on a loaded host a
        # call lasts long enough for periods to close in it).
        boot_us = self._boot_us()
        if newest_us > boot_us + BOOT_SLACK_US:
            self._learnt(device, StampClock.WALL)  # a stale wall stamp: a step, if anything
            return raw
        self._learnt(device, StampClock.BOOT)
        offset_us = self._wall_us() - boot_us
        placed = [DeviceSample(s.timestamp_us + offset_us, s.util) for s in raw]
        self._newest = (placed[-1].timestamp_us, newest_us)
        return placed

    def _driver_since_us(self, since_us: int) -> int:
        """The driver's lastSeenTimeStamp for the wall cursor ``since_us``. Until the clock
        is known, the whole ring: a wall cursor is far in a boot clock's future, so the
        driver would answer nothing at all (the meter drops what it has read)."""
        if since_us == 0 or self.stamped is None:
            return 0
        if self.stamped is StampClock.WALL:
            return since_us
        if self._newest is not None and self._newest[0] == since_us:
            return self._newest[1]
        # A cursor this meter did not read (restored at a start): worked back, as exactly as
        # two clock readings allow.
        boot_us = self._boot_us()
        return max(0, since_us - (self._wall_us() - boot_us))

    def _learnt(self, device: Device, stamped: StampClock) -> None:
        if stamped is self.stamped:
            return
        if stamped is StampClock.BOOT or self.stamped is not None:
            log.warning(
                "%s: the driver stamps its utilization samples on the %s clock: placed on "
                "the wall clock from here on",
                device.uuid,
                stamped.value,
            )
        self.stamped = stamped

    def _boot_us(self) -> int:
        return round(self._clock.boottime() * US_PER_S)

    def _wall_us(self) -> int:
        return round(self._clock.wall() * US_PER_S)
