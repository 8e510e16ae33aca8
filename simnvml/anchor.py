"""The anchor file of a shared sim timeline: real CLOCK_MONOTONIC and wall time at sim t=0.

Created atomically by the first process (written aside, then hard-linked into place, which
fails if another process won the race); later processes read it and continue the timeline.
Wall-clock jumps are appended under an flock and the file replaced atomically, so readers
never see half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from creditmeter.simnvml.units import s_to_us


@dataclass(frozen=True, slots=True)
class Anchor:
    monotonic_ns: int  # CLOCK_MONOTONIC at sim t=0
    start_wall_us: int  # wall clock at sim t=0
    speed: float
    wall_jumps: tuple[tuple[int, int], ...]  # (sim µs, delta µs)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "monotonic_ns": self.monotonic_ns,
                "start_wall_us": self.start_wall_us,
                "speed": self.speed,
                "wall_jumps": [list(j) for j in self.wall_jumps],
            }
        )

    @classmethod
    def from_json(cls, text: str, path: Path) -> Anchor:
        try:
            data = json.loads(text)
            return cls(
                int(data["monotonic_ns"]),
                int(data["start_wall_us"]),
                float(data["speed"]),
                tuple((int(a), int(d)) for a, d in data["wall_jumps"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a sim clock anchor: {exc}") from exc


class AnchorFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def open_or_create(
        self, speed: float, start_wall_s: float | None, *, starts_in_s: float = 0.0
    ) -> Anchor:
        """The timeline in the file, or a new one whose sim t=0 is ``starts_in_s`` from now
        (before then sim time is negative: the driver is loading, nothing has run)."""
        wall_s = time.time() + starts_in_s if start_wall_s is None else start_wall_s
        fresh = Anchor(time.monotonic_ns() + round(starts_in_s * 1e9), s_to_us(wall_s), speed, ())
        if self._create(fresh):
            return fresh
        return self.read()

    def read(self) -> Anchor:
        return Anchor.from_json(self.path.read_text(encoding="utf-8"), self.path)

    def version(self) -> tuple[int, int]:
        """Changes whenever the file is replaced."""
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns

    def add_jump(self, at_us: int, delta_us: int) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            anchor = self.read()
            jumps = (*anchor.wall_jumps, (at_us, delta_us))
            updated = Anchor(anchor.monotonic_ns, anchor.start_wall_us, anchor.speed, jumps)
            tmp = self._write_aside(updated)
            os.replace(tmp, self.path)

    def _create(self, anchor: Anchor) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_aside(anchor)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _write_aside(self, anchor: Anchor) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{time.monotonic_ns()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(anchor.to_json())
            f.flush()
            os.fsync(f.fileno())
        return tmp
