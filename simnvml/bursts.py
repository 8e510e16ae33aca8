"""Busy spans, and the generator that expands a ``[[process.bursts]]`` table into them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from creditmeter.simnvml.toml_table import Table
from creditmeter.simnvml.units import s_to_us


@dataclass(frozen=True, slots=True)
class BusySpan:
    """Kernels of the process run ``sm`` percent of the time on ``[start_us, end_us)``."""

    start_us: int
    end_us: int
    sm: int


def expand_bursts(t: Table, seed: int, pid: int, ordinal: int, group: int) -> list[BusySpan]:
    """``count`` bursts, the i-th starting at ``start_s + i·every_s`` plus up to ``jitter_s``,
    lasting ``length_s`` ± ``length_jitter_s``.

    The jitter comes from a generator seeded with the host seed, the pid, the process's
    position and the group's, so a scenario always expands to the same spans.
    """
    start_s = t.number("start_s", minimum=0.0)
    count = t.integer("count", 1, minimum=1)
    every_s = t.number("every_s", 0.0 if count == 1 else None, minimum=0.0)
    length_s = t.number("length_s")
    sm = t.integer("sm", minimum=0)
    jitter_s = t.number("jitter_s", 0.0, minimum=0.0)
    length_jitter_s = t.number("length_jitter_s", 0.0, minimum=0.0)
    t.finish()
    if sm > 100:
        raise t.error("sm", f"must be a whole percent in 0..100, not {sm}")
    if length_s - length_jitter_s <= 0:
        raise t.error("length_s", "bursts must last longer than length_jitter_s")
    rng = random.Random(f"{seed}:{pid}:{ordinal}:{group}")
    spans = []
    for i in range(count):
        begin_s = start_s + i * every_s + rng.uniform(0.0, jitter_s)
        end_s = begin_s + length_s + rng.uniform(-length_jitter_s, length_jitter_s)
        spans.append(BusySpan(s_to_us(begin_s), s_to_us(end_s), sm))
    return spans
