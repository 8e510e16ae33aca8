"""Retry delays: capped exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads the reconnects of
a fleet of agents after a collector restart, instead of having them all arrive in lockstep.
"""

from __future__ import annotations

import random
from typing import Protocol


class Rng(Protocol):
    """The part of ``random.Random`` the backoff uses: a float in [0, 1)."""

    def random(self) -> float: ...


def ceiling_s(attempt: int, *, initial_s: float, cap_s: float) -> float:
    """The largest delay of retry number ``attempt`` (0 for the first retry)."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    # Stop doubling once past the cap: 2.0**attempt overflows a float near attempt 1024.
    ceiling = initial_s
    for _ in range(attempt):
        ceiling *= 2.0
        if ceiling >= cap_s:
            return cap_s
    return min(ceiling, cap_s)


def full_jitter_s(attempt: int, rng: Rng, *, initial_s: float, cap_s: float) -> float:
    """A delay drawn uniformly from [0, ceiling_s(attempt)): a pure function of its inputs."""
    return rng.random() * ceiling_s(attempt, initial_s=initial_s, cap_s=cap_s)


class Backoff:
    """Counts consecutive failures and hands out the next delay; ``reset`` after a success."""

    def __init__(
        self, *, initial_s: float = 0.2, cap_s: float = 30.0, rng: Rng | None = None
    ) -> None:
        if not 0 < initial_s <= cap_s:
            raise ValueError(f"need 0 < initial_s <= cap_s, got {initial_s} and {cap_s}")
        self._initial_s = initial_s
        self._cap_s = cap_s
        self._rng: Rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Failures since the last reset."""
        return self._attempt

    def next_delay_s(self) -> float:
        delay = full_jitter_s(
            self._attempt, self._rng, initial_s=self._initial_s, cap_s=self._cap_s
        )
        self._attempt += 1
        return delay

    def reset(self) -> None:
        self._attempt = 0
