"""Used, billed and allocated, per GPU and day (``report --reconcile``).

For each GPU and UTC day, from the hourly rollups the store keeps with the records:

- ``held``: the seconds processes held a context (the records' wall time), what allocation
  billing (Slurm, OpenCost, DCGM job stats) would charge;
- ``device busy``: the GPU's own busy seconds, from its device records (its books);
- ``billed``: the busy seconds of its process records, what accounts are charged;
- ``unattributed``: busy seconds no process could take, by reason (reported, never billed);
- ``gaps``: seconds of processes nobody could measure, by reason (never billed, never
  filled in), summed over the processes that carry them;
- ``unmeasured``: seconds of the GPU's own time nobody measured, by reason (the agent down
  past the ring, the GPU lost, samples dropped, a clock step), from its device records:
  whether any process ran then is unknown, so a process record may carry none of it;
- ``unexplained``: device busy − billed − unattributed, 0 where the books add up (hours before
  agents wrote device records have no books: their device busy is 0 and this is negative).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from creditmeter.collector.ledger_store import DeviceRollup, GpuRollup
from creditmeter.collector.periods import iso_text
from creditmeter.collector.report import Period, seconds_text
from creditmeter.collector.rollup import ATTRIBUTED, DEVICE_BUSY, GAP, UNATTRIBUTED, UNMEASURED
from creditmeter.labels import MAX_LABEL_BYTES, printable


@dataclass
class GpuDay:
    day: str  # "2026-06-15"
    host: str
    gpu_uuid: str
    held_us: int = 0
    device_busy_us: int = 0
    billed_us: int = 0
    booked_us: int = 0  # what the books say was attributed (equals billed when they add up)
    unattributed_us: dict[str, int] = field(default_factory=dict)
    gaps_us: dict[str, int] = field(default_factory=dict)
    unmeasured_us: dict[str, int] = field(default_factory=dict)

    @property
    def unexplained_us(self) -> int:
        return self.device_busy_us - self.billed_us - sum(self.unattributed_us.values())


def reconcile(
    device_rollups: Iterable[DeviceRollup], gpu_rollups: Iterable[GpuRollup], period: Period
) -> list[GpuDay]:
    """Per (day, host, gpu), ordered so."""
    days: dict[tuple[str, str, str], GpuDay] = {}

    def day_of(hour_us: int, host: str, gpu: str) -> GpuDay | None:
        if period.from_us is not None and hour_us < period.from_us:
            return None
        if period.to_us is not None and hour_us >= period.to_us:
            return None
        key = (iso_text(hour_us)[:10], host, gpu)
        if key not in days:
            days[key] = GpuDay(*key)
        return days[key]

    for r in device_rollups:
        d = day_of(r.hour_start_us, r.host, r.gpu_uuid)
        if d is not None:
            d.held_us += r.wall_us
            d.billed_us += r.busy_us
    for g in gpu_rollups:
        d = day_of(g.hour_start_us, g.host, g.gpu_uuid)
        if d is not None:
            _add_kind(d, g.kind, g.amount_us)
    return [days[k] for k in sorted(days)]


def _add_kind(d: GpuDay, kind: str, amount_us: int) -> None:
    if kind == DEVICE_BUSY:
        d.device_busy_us += amount_us
    elif kind == ATTRIBUTED:
        d.booked_us += amount_us
    elif kind.startswith(UNATTRIBUTED):
        name = kind.removeprefix(UNATTRIBUTED)
        d.unattributed_us[name] = d.unattributed_us.get(name, 0) + amount_us
    elif kind.startswith(GAP):
        name = kind.removeprefix(GAP)
        d.gaps_us[name] = d.gaps_us.get(name, 0) + amount_us
    elif kind.startswith(UNMEASURED):
        name = kind.removeprefix(UNMEASURED)
        d.unmeasured_us[name] = d.unmeasured_us.get(name, 0) + amount_us


_HEADER = ("DAY", "HOST", "GPU", "HELD_S", "DEVICE_BUSY_S", "BILLED_S", "UNATTRIBUTED_S",
           "GAPS_S", "UNMEASURED_S", "UNEXPLAINED_S")  # fmt: skip


def render_reconcile_table(rows: list[GpuDay]) -> str:
    lines = [_HEADER] + [
        (
            r.day,
            printable(r.host, limit=MAX_LABEL_BYTES),
            printable(r.gpu_uuid, limit=MAX_LABEL_BYTES),
            seconds_text(r.held_us),
            seconds_text(r.device_busy_us),
            seconds_text(r.billed_us),
            seconds_text(sum(r.unattributed_us.values())),
            seconds_text(sum(r.gaps_us.values())),
            seconds_text(sum(r.unmeasured_us.values())),
            seconds_text(r.unexplained_us),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
    out = [
        "  ".join(
            cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ).rstrip()
        for line in lines
    ]
    out.append(
        "held: contexts open (allocation billing's view); billed + unattributed = device busy"
    )
    return "\n".join(out) + "\n"


def reconcile_json(rows: list[GpuDay]) -> list[dict[str, object]]:
    return [
        {
            "day": r.day,
            "host": r.host,
            "gpu": r.gpu_uuid,
            "held_seconds": seconds_text(r.held_us),
            "device_busy_seconds": seconds_text(r.device_busy_us),
            "billed_seconds": seconds_text(r.billed_us),
            "booked_seconds": seconds_text(r.booked_us),
            "unattributed_seconds": {k: seconds_text(v) for k, v in r.unattributed_us.items()},
            "gap_seconds": {k: seconds_text(v) for k, v in r.gaps_us.items()},
            "unmeasured_seconds": {k: seconds_text(v) for k, v in r.unmeasured_us.items()},
            "unexplained_seconds": seconds_text(r.unexplained_us),
        }
        for r in rows
    ]
