"""What the agent's log says about a collector it cannot deliver to: one line when the
trouble starts or changes, a summary while it lasts, one line when it ends.

A collector that is down for an hour makes the shipper retry hundreds of times; a line per
try buries everything else in the log (at ``nvml.speed=30`` a simulated host logged 41 in
14 s). Each try is still logged at DEBUG, with the wait that really follows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

SUMMARY_EVERY_S: Final = 60.0


class FailureLog:
    """Called by the shipper after each failed stream and at each successful resume."""

    def __init__(
        self,
        logger: logging.Logger,
        monotonic: Callable[[], float] = time.monotonic,
        summary_every_s: float = SUMMARY_EVERY_S,
    ) -> None:
        self._log = logger
        self._monotonic = monotonic
        self._summary_every_s = summary_every_s
        self._state = ""  # the failing state last reported ("" while delivering)
        self._since_s = 0.0  # when the failures began
        self._failures = 0  # since they began
        self._unreported = 0  # since the last line at WARNING or above
        self._reported_s = 0.0

    @property
    def failing(self) -> bool:
        return bool(self._state)

    def failed(self, level: int, state: str, message: str) -> None:
        """A failed try. ``state`` names the trouble (a status and its detail): a new one is
        logged at ``level``; the same again only at DEBUG, and summarised every minute.
        ``message`` is the whole line, the wait before the next try included."""
        now_s = self._monotonic()
        if not self._failures:
            self._since_s = now_s
        self._failures += 1
        if state != self._state:
            self._state = state
            self._report(level, message, now_s)
        elif now_s - self._reported_s >= self._summary_every_s:
            self._report(
                level,
                f"{message} ({self._unreported + 1} failed tries in the last "
                f"{now_s - self._reported_s:.0f} s, {self._failures} since "
                f"{now_s - self._since_s:.0f} s ago)",
                now_s,
            )
        else:
            self._unreported += 1
            self._log.debug("%s", message)

    def recovered(self) -> None:
        """A stream was resumed: the trouble, if any, is over."""
        if self._failures:
            self._log.info(
                "stream to the collector open again after %d failed tries over %.0f s",
                self._failures,
                self._monotonic() - self._since_s,
            )
        self._state = ""
        self._failures = self._unreported = 0

    def _report(self, level: int, message: str, now_s: float) -> None:
        self._log.log(level, "%s", message)
        self._reported_s = now_s
        self._unreported = 0
