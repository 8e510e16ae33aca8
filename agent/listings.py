"""When the meter lists the driver's devices afresh, in a new NVML session, and why.

An NVML session lists the devices of its nvmlInit only, so finding a lost GPU again, or a
MIG instance made since, takes a new one: nvmlShutdown, then nvmlInit over every GPU of
the host. That costs seconds on a large host without persistence mode, and on some drivers
a hang after hours of them (NVIDIA/go-nvml#152, driver 570.x). So a listing is at most one
per reopen interval, and a search that keeps finding nothing, a driver that keeps
failing, or evidence of a change that listings keep failing to explain, backs off.

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
        # What showed, since the last listing, that a device may have been made or destroyed.
        self._evidence: set[str] = set()
        # Evidence that asked for listings: how many in a row it outlived, and from when it
        # may ask again.
        self._outlived: dict[str, int] = {}
        self._evidence_due_s: dict[str, float] = {}

    @property
    def change_pending(self) -> bool:
        """A listing is wanted for a device made or destroyed (or the last one failed)."""
        return bool(self._evidence) or self._failures > 0

    def changed(self, evidence: str) -> None:
        """Evidence that a device was made or destroyed since the last listing, named by
        what showed it (a MIG instance's ids, a device's UUID). Evidence that listings did
        not explain, shown again, asks for the next one later each time (a reopen interval,
        doubling up to LOST_SEARCH_MAX_S): a listing that finds nothing new will not find it
        at the next poll either, and each is an nvmlInit over every GPU. New evidence asks
        at once."""
        self._evidence.add(evidence)

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
        if self._evidence and now_s >= self._change_due_s():
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
        self._next_periodic_s = now_s + RELIST_INTERVAL_S
        self._next_reopen_s = now_s + self._backoff_s(self._failures)

    def listed(self, now_s: float, *, still_lost: bool) -> None:
        """The listing begun at ``now_s`` succeeded; ``still_lost``: a lost GPU was not in
        it."""
        self._failures = 0
        self._settle_evidence(now_s)
        self._next_periodic_s = now_s + RELIST_INTERVAL_S
        self._next_reopen_s = now_s + self._reopen_interval_s
        if still_lost:
            self._searches += 1
            self._next_search_s = now_s + self._backoff_s(self._searches)

    def _change_due_s(self) -> float:
        """When the evidence shown since the last listing may ask for the next: at once if
        any of it is new."""
        return min(self._evidence_due_s.get(e, 0.0) for e in self._evidence)

    def _settle_evidence(self, now_s: float) -> None:
        """After a listing: each piece of evidence shown since has outlived one more (if it
        shows again); evidence not shown since was explained, and is forgotten."""
        self._outlived = {e: self._outlived.get(e, 0) + 1 for e in self._evidence}
        self._evidence.clear()
        self._evidence_due_s = {e: now_s + self._backoff_s(n) for e, n in self._outlived.items()}

    def _backoff_s(self, tries: int) -> float:
        """The wait after ``tries`` fruitless tries in a row: the reopen interval, doubling."""
        return ceiling_s(
            tries - 1,
            initial_s=self._reopen_interval_s,
            cap_s=max(LOST_SEARCH_MAX_S, self._reopen_interval_s),
        )
