"""When the meter lists the driver's devices afresh, in a new NVML session, and why.

An NVML session lists the devices of its nvmlInit only, so finding a lost GPU again, or a
MIG instance made since, takes a new one: nvmlShutdown, then nvmlInit over every GPU of
the host. That costs seconds on a large host without persistence mode, and on some drivers
a hang after hours of them (NVIDIA/go-nvml#152, driver 570.x). So a listing is at most one
per reopen interval, and a search that keeps finding nothing, or a driver that keeps
failing, backs off.

All times are monotonic seconds: the schedule reads no clock of its own, so a meter replayed
from a trace asks for listings at the same polls.
"""

from __future__ import annotations

from creditmeter.agent.backoff import ceiling_s

# The devices are listed afresh at least this often: a device created since the last
# listing where no process shows it yet (a MIG instance made for a job still to come, MIG
# mode turned off) is found at the latest then.
RELIST_INTERVAL_S = 300.0
# A lost GPU is looked for a reopen interval after its loss, then ever less often, doubling
# up to this. A GPU that fell off the bus does not come back by itself: it needs a GPU reset
# (Xid 79), after which its ring holds what ran since, so a late find costs at most this
# less the ring.
LOST_SEARCH_MAX_S = 60.0


class ListingSchedule:
    """Says at each poll whether to list the devices again (``due``), and learns from how
    each listing went."""

    def __init__(self, now_s: float, reopen_interval_s: float) -> None:
        self._reopen_interval_s = reopen_interval_s
        self._next_reopen_s = 0.0  # no new session before this
        self._next_search_s = 0.0  # lost GPUs are looked for again from this
        self._next_periodic_s = now_s + RELIST_INTERVAL_S
        self._searches = 0  # listings that left a lost GPU lost, since the last loss
        self._failures = 0  # listings that failed, in a row
        self._changed = False  # a device may have been made or destroyed

    @property
    def change_pending(self) -> bool:
        """A listing is wanted for a device made or destroyed (or the last one failed)."""
        return self._changed

    def changed(self) -> None:
        """Evidence that a device was made or destroyed since the last listing."""
        self._changed = True

    def lost(self, search_at_s: float) -> None:
        """A GPU was just lost: look for it at ``search_at_s`` and often at first (a driver
        that recovers by itself is back within seconds), whatever the backoff had reached."""
        self._searches = 0
        self._next_search_s = search_at_s
        self._next_reopen_s = min(self._next_reopen_s, search_at_s)

    def due(self, now_s: float, *, lost: bool) -> str | None:
        """Why to list the devices now ("retry", "changed", "lost", "periodic"), or None."""
        if now_s < self._next_reopen_s:
            return None
        if self._failures:
            return "retry"
        if self._changed:
            return "changed"
        if lost and now_s >= self._next_search_s:
            return "lost"
        return "periodic" if now_s >= self._next_periodic_s else None

    def failed(self, now_s: float) -> None:
        """The listing begun at ``now_s`` failed (no session, or a partial listing: a driver
        reloading). Every device waits on the next try, not on the next periodic listing; a
        driver that stays unusable (a library/driver version mismatch after an upgrade lasts
        until the reboot) is tried less and less often."""
        self._failures += 1
        self._changed = True
        self._next_periodic_s = now_s + RELIST_INTERVAL_S
        self._next_reopen_s = now_s + self._backoff_s(self._failures)

    def listed(self, now_s: float, *, still_lost: bool) -> None:
        """The listing begun at ``now_s`` succeeded; ``still_lost``: a lost GPU was not in
        it."""
        self._failures = 0
        self._changed = False
        self._next_periodic_s = now_s + RELIST_INTERVAL_S
        self._next_reopen_s = now_s + self._reopen_interval_s
        if still_lost:
            self._searches += 1
            self._next_search_s = now_s + self._backoff_s(self._searches)

    def _backoff_s(self, tries: int) -> float:
        """The wait after ``tries`` fruitless tries in a row: the reopen interval, doubling."""
        return ceiling_s(
            tries - 1,
            initial_s=self._reopen_interval_s,
            cap_s=max(LOST_SEARCH_MAX_S, self._reopen_interval_s),
        )
