"""The collector's clocks: the wall clock labels things, the monotonic clock times things.

Code that needs the wall clock takes a ``WallClock`` through its constructor, so that tests
can put the collector at any date.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WallClock = Callable[[], int]  # returns µs since the epoch


def wall_clock_us() -> int:
    return time.time_ns() // 1000
