"""The schedule of new NVML sessions, on its own: the meter's polls are simulated by asking
``due`` every second and reporting how each listing went."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from creditmeter.agent.listings import LOST_SEARCH_MAX_S, RELIST_INTERVAL_S, ListingSchedule

REOPEN_S = 5.0


def listings(
    schedule: ListingSchedule,
    from_s: int,
    to_s: int,
    *,
    lost: bool = False,
    outcome: Callable[[float], str] = lambda _: "listed",
) -> list[tuple[float, str]]:
    """Each second from ``from_s`` to ``to_s``: when a listing was due, and why. Each
    fails or succeeds by ``outcome``; a lost GPU stays lost."""
    out = []
    for t in range(from_s, to_s + 1):
        why = schedule.due(float(t), lost=lost)
        if why is None:
            continue
        out.append((float(t), why))
        if outcome(t) == "failed":
            schedule.failed(float(t))
        else:
            schedule.listed(float(t), still_lost=lost)
    return out


def test_the_devices_are_listed_every_relist_interval_and_no_more() -> None:
    schedule = ListingSchedule(0.0, REOPEN_S)
    got = listings(schedule, 1, 1000)
    assert got == [(RELIST_INTERVAL_S * k, "periodic") for k in (1, 2, 3)]


def test_a_change_is_listed_at_once_but_no_sooner_than_a_reopen_interval_after_the_last() -> None:
    schedule = ListingSchedule(0.0, REOPEN_S)
    schedule.changed("MIG-a")
    assert schedule.change_pending
    assert listings(schedule, 10, 10) == [(10.0, "changed")]
    assert not schedule.change_pending
    schedule.changed("MIG-a")
    assert listings(schedule, 11, 20) == [(15.0, "changed")]


def test_a_lost_gpu_is_looked_for_ever_less_often_up_to_the_cap() -> None:
    schedule = ListingSchedule(0.0, REOPEN_S)
    schedule.lost(26.0)
    got = [t for t, why in listings(schedule, 21, 400, lost=True)]
    # Waits after each fruitless search: 5, 10, 20, 40, then the cap.
    assert got[:6] == [26.0, 31.0, 41.0, 61.0, 101.0, 161.0]
    waits = {b - a for a, b in pairwise(got[5:])}
    assert waits == {LOST_SEARCH_MAX_S}


def test_a_new_loss_is_looked_for_at_once_whatever_the_backoff_reached() -> None:
    schedule = ListingSchedule(0.0, REOPEN_S)
    schedule.lost(5.0)
    listings(schedule, 1, 600, lost=True)
    schedule.lost(605.0)  # another GPU lost at 600 s
    assert listings(schedule, 601, 611, lost=True) == [(605.0, "lost"), (610.0, "lost")]


def test_a_failing_driver_is_retried_ever_less_often_and_then_as_usual() -> None:
    schedule = ListingSchedule(0.0, REOPEN_S)
    got = listings(schedule, 1, 700, outcome=lambda t: "failed" if t < 500 else "listed")
    assert got[:7] == [
        (300.0, "periodic"),
        (305.0, "retry"),
        (315.0, "retry"),
        (335.0, "retry"),
        (375.0, "retry"),
        (435.0, "retry"),
        (495.0, "retry"),
    ]
    # The try at 555 s succeeds: from then on, the periodic listing as before.
    assert got[7:] == [(555.0, "retry")]
    assert listings(schedule, 701, 900) == [(855.0, "periodic")]


def evidence_listings(
    schedule: ListingSchedule, from_s: int, to_s: int, shown: Callable[[int], list[str]]
) -> list[float]:
    """Each second: the evidence ``shown`` then, and when a listing was due for a change."""
    out = []
    for t in range(from_s, to_s + 1):
        for evidence in shown(t):
            schedule.changed(evidence)
        if schedule.due(float(t), lost=False) == "changed":
            out.append(float(t))
            schedule.listed(float(t), still_lost=False)
    return out


def test_evidence_that_listings_do_not_explain_asks_ever_less_often() -> None:
    """A process on an instance no listing finds, shown at every poll."""
    schedule = ListingSchedule(0.0, REOPEN_S)
    got = evidence_listings(schedule, 10, 300, lambda t: ["GPU-a gi 3 ci 0"])
    assert got[:6] == [10.0, 15.0, 25.0, 45.0, 85.0, 145.0]
    assert {b - a for a, b in pairwise(got[5:])} == {LOST_SEARCH_MAX_S}


def test_new_evidence_asks_at_once_and_explained_evidence_is_forgotten() -> None:
    schedule = ListingSchedule(0.0, REOPEN_S)

    def shown(t: int) -> list[str]:
        old = ["GPU-a gi 3 ci 0"] if t < 100 else []  # explained by a listing from 100 s
        return old + (["MIG-b"] if t == 52 else []) + (["GPU-a gi 3 ci 0"] if t == 200 else [])

    got = evidence_listings(schedule, 10, 210, shown)
    # 10, 15, 25, 45 for the first; MIG-b at 52 at once, a listing the first outlives
    # too, so its next is 60 s on (shown until 99 s, it still asks then); at 200 s the
    # first shows again after a listing without it: at once.
    assert got == [10.0, 15.0, 25.0, 45.0, 52.0, 112.0, 200.0]
