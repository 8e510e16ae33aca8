"""The anchor file of a shared sim timeline: real CLOCK_MONOTONIC and wall time at sim t=0.

A timeline may be created *held*: sim time stands at t=0 until someone releases it, so a
test starts the simulated work when the agent under test says it is ready, not a guessed
number of real seconds after launching it (a loaded machine outlasts any guess).

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from creditmeter.simnvml.units import s_to_us


@dataclass(frozen=True, slots=True)
class Anchor:
    monotonic_ns: int | None  # CLOCK_MONOTONIC at sim t=0; None while held at t=0
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
            mono_ns = data["monotonic_ns"]
            return cls(
                None if mono_ns is None else int(mono_ns),
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
        self, speed: float, start_wall_s: float | None, *, held: bool = False
    ) -> Anchor:
        """The timeline in the file, or a new one whose sim t=0 is now or, ``held``, one
        standing at t=0 until :meth:`release`."""
        wall_s = time.time() if start_wall_s is None else start_wall_s
        fresh = Anchor(None if held else time.monotonic_ns(), s_to_us(wall_s), speed, ())
        if self._create(fresh):
            return fresh
        return self.read()

    def release(self) -> Anchor:
        """Starts a held timeline now (sim t=0 = this moment); a running one is left as it
        is. The wall clock at t=0 stays the one written at creation: moving it would
        restamp what the driver already stamped."""
        with self._locked():
            anchor = self.read()
            if anchor.monotonic_ns is not None:
                return anchor
            started = Anchor(
                time.monotonic_ns(), anchor.start_wall_us, anchor.speed, anchor.wall_jumps
            )
            os.replace(self._write_aside(started), self.path)
            return started

    def read(self) -> Anchor:
        return Anchor.from_json(self.path.read_text(encoding="utf-8"), self.path)

    def version(self) -> tuple[int, int]:
        """Changes whenever the file is replaced."""
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns

    def add_jump(self, at_us: int, delta_us: int) -> None:
        with self._locked():
            anchor = self.read()
            jumps = (*anchor.wall_jumps, (at_us, delta_us))
            updated = Anchor(anchor.monotonic_ns, anchor.start_wall_us, anchor.speed, jumps)
            os.replace(self._write_aside(updated), self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serializes read-modify-replace of the file between processes."""
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

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
