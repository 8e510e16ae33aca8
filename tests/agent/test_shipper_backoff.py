"""The shipper's retry delays: capped exponential ceilings with full jitter, as pure functions."""

from __future__ import annotations

import random

import pytest

from creditmeter.agent.backoff import Backoff, ceiling_s, full_jitter_s


class FixedRng:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_ceilings_double_from_the_initial_delay_up_to_the_cap() -> None:
    ceilings = [ceiling_s(attempt, initial_s=0.2, cap_s=30.0) for attempt in range(10)]
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0])


def test_a_huge_attempt_count_stays_at_the_cap() -> None:
    assert ceiling_s(100_000, initial_s=0.2, cap_s=30.0) == 30.0


def test_full_jitter_scales_the_ceiling_by_the_random_draw() -> None:
    assert full_jitter_s(3, FixedRng(0.5), initial_s=0.2, cap_s=30.0) == pytest.approx(0.8)
    assert full_jitter_s(3, FixedRng(0.0), initial_s=0.2, cap_s=30.0) == 0.0
    assert full_jitter_s(20, FixedRng(0.999), initial_s=0.2, cap_s=30.0) == pytest.approx(29.97)


def test_a_seeded_backoff_grows_is_capped_and_resets() -> None:
    backoff = Backoff(initial_s=0.2, cap_s=30.0, rng=random.Random(7))
    delays = [backoff.next_delay_s() for _ in range(12)]
    assert backoff.attempt == 12
    draws = random.Random(7)
    ceilings = [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0, 30.0]
    assert delays == pytest.approx([draws.random() * c for c in ceilings])
    assert all(0.0 <= d < c for d, c in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay_s() < 0.2


def test_draws_spread_over_the_whole_range() -> None:
    # Full jitter: agents restarting together do not reconnect together.
    rng = random.Random(11)
    draws = [full_jitter_s(8, rng, initial_s=0.2, cap_s=30.0) for _ in range(1000)]
    assert min(draws) < 3.0
    assert max(draws) > 27.0
    assert all(0.0 <= d < 30.0 for d in draws)


@pytest.mark.parametrize(("initial_s", "cap_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_nonsense_settings_are_refused(initial_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s=initial_s, cap_s=cap_s)
