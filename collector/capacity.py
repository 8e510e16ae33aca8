"""A GPU's physical limit across records: it cannot be busy longer than time passes.

Each record is bounded on its own (busy ≤ its window + a tolerance), but a compromised agent
can send many records for the same time: 1,000 zero-length windows with 2 s busy each, or
overlapping week-long windows for one process (issue 13, finding 4). So the collector keeps,
per agent and GPU, a budget of busy time:

- the *frontier*: the latest window end seen on the GPU;
- the *room*: busy time not yet claimed. A record whose window ends past the frontier adds
  the time it moves the frontier on, up to ``max_backlog_us`` (so idle time cannot be saved
  up without limit); its busy time is then taken from the room.

A record that needs more than the room plus ``tolerance_us`` (a sample straddling a window
edge) claims time that did not pass: it is quarantined (kept as evidence, never billed) and
the budget is left as it was. Honest records never come near it: the processes of one GPU
share its busy time (agent/apportion.py), so over any run of windows their busy time is at
most the windows' length. Device records (the GPU's books) are not billed and claim nothing.
A MIG instance is its own GPU here (its own UUID).

The state is stored with the agent (``Capacity.encode``) and advanced with the records in
the same transaction; ``through_seq`` says which records it has counted, so that a batch
resent with records already stored counts none of them twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DEFAULT_MAX_BACKLOG_US = 86_400_000_000  # a day of idle time, at most, counts as room


@dataclass(slots=True)
class Capacity:
    """One agent's budgets: GPU UUID -> [frontier_us, room_us], through record seq."""

    through_seq: int = 0
    gpus: dict[str, list[int]] = field(default_factory=dict)

    def encode(self) -> str:
        return json.dumps({"seq": self.through_seq, "gpus": self.gpus}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str, head_seq: int) -> Capacity:
        """The stored state; none stored yet (an agent from before this check): a fresh
        budget from the agent's head on, which counts no stored record again."""
        if not text:
            return cls(head_seq)
        data = json.loads(text)
        return cls(int(data["seq"]), {k: [int(v[0]), int(v[1])] for k, v in data["gpus"].items()})

    def copy(self) -> Capacity:
        return Capacity(self.through_seq, {k: list(v) for k, v in self.gpus.items()})


class Budget:
    """Claims records' busy time against their GPUs' budgets (one agent, in seq order)."""

    def __init__(
        self,
        state: Capacity,
        *,
        tolerance_us: int,
        max_backlog_us: int = DEFAULT_MAX_BACKLOG_US,
    ) -> None:
        self.state = state
        self._gpus = state.gpus
        self._tolerance_us = tolerance_us
        self._max_backlog_us = max_backlog_us

    def claim(self, gpu_uuid: str, start_us: int, end_us: int, busy_us: int) -> str | None:
        """Takes ``busy_us`` on ``gpu_uuid`` for the window [start_us, end_us): None, or
        the problem (then nothing is taken). Called for every record at ingest, so it
        updates the budget in place and calls nothing on the way (0.3 µs)."""
        budget = self._gpus.get(gpu_uuid)
        frontier_us, room_us = (start_us, 0) if budget is None else budget
        if end_us > frontier_us:
            room_us += end_us - frontier_us
            if room_us > self._max_backlog_us:
                room_us = self._max_backlog_us
            frontier_us = end_us
        if busy_us > room_us + self._tolerance_us:
            return (
                f"{busy_us} µs busy on GPU {gpu_uuid} in a window ending at {end_us}, but "
                f"only {max(0, room_us)} µs of its time had passed unclaimed: the GPU's "
                "records claim more busy time than elapsed"
            )
        if budget is None:
            self._gpus[gpu_uuid] = [frontier_us, room_us - busy_us]
        else:
            budget[0] = frontier_us
            budget[1] = room_us - busy_us
        return None
