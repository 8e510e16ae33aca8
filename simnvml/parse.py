"""Reading a scenario's TOML into specs, checking every key on the way."""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

from creditmeter.nvml_abi import PROCESS_INFO_BY_SIZE
from creditmeter.simnvml.bursts import BusySpan, expand_bursts
from creditmeter.simnvml.products import find_product
from creditmeter.simnvml.profiles import find_profile, profile_names
from creditmeter.simnvml.specs import (
    DEFAULT_CONTEXT_MEMORY_BYTES,
    DEFAULT_RING_PERIODS,
    FAULT_KINDS,
    GPU_FAULTS,
    MAX_PID,
    READINGS,
    DriverSpec,
    FaultSpec,
    GpuSpec,
    HostSpec,
    MigSpec,
    ProcessSpec,
    SampleReading,
)
from creditmeter.simnvml.toml_table import ScenarioError, Table
from creditmeter.simnvml.units import s_to_us


class ScenarioParts(NamedTuple):
    description: str
    host: HostSpec
    gpus: tuple[GpuSpec, ...]
    processes: tuple[ProcessSpec, ...]
    faults: tuple[FaultSpec, ...]


def parse(top: Table) -> ScenarioParts:
    """Read and validate a whole scenario document; raises ScenarioError naming the key."""
    description = top.string("description", "")
    host = _parse_host(top.sub_table("host"))
    gpu_tables = top.tables("gpu")
    if not gpu_tables:
        raise top.error("gpu", "a scenario needs at least one [[gpu]]")
    driver = parse_driver(top.sub_table("driver"), DriverSpec())
    gpus = tuple(_parse_gpu(t, i, driver) for i, t in enumerate(gpu_tables))
    processes = tuple(
        _parse_process(t, i, gpus, host.seed) for i, t in enumerate(top.tables("process"))
    )
    _check_pid_lives(top.source, processes)
    faults = tuple(_parse_fault(t, len(gpus)) for t in top.tables("fault"))
    top.finish()
    return ScenarioParts(description, host, gpus, processes, faults)


def _parse_host(t: Table) -> HostSpec:
    driver = t.string("driver_version", "570.124.06")
    has_v2 = t.boolean("has_v2_symbol", True)
    spec = HostSpec(
        name=t.string("name", "sim-host"),
        seed=t.integer("seed", 0),
        driver_version=driver,
        nvml_version=t.string("nvml_version", f"12.{driver}"),
        cuda_driver_version=t.integer("cuda_driver_version", 12080, minimum=1000),
        start_wall_s=t.epoch_seconds("start_wall"),
        has_v3_symbol=t.boolean("has_v3_symbol", has_v2),
        privileged=t.boolean("privileged", True),
        has_v2_symbol=has_v2,
    )
    if spec.has_v3_symbol and not has_v2:
        raise t.error("has_v3_symbol", "no driver has _v3 without _v2 (has_v2_symbol = false)")
    t.finish()
    return spec


def reading(source: str, key: str, value: str) -> SampleReading:
    """``value`` as a SampleReading, or a ScenarioError."""
    if value not in READINGS:
        raise ScenarioError(source, key, f"must be one of {', '.join(READINGS)}, not {value!r}")
    return value


def parse_driver(t: Table, base: DriverSpec) -> DriverSpec:
    """A ``[driver]`` table: a named profile (default: ``base``), then keys overriding it."""
    name = t.opt_string("profile")
    if name is not None:
        profile = find_profile(name)
        if profile is None:
            known = ", ".join(profile_names())
            raise t.error("profile", f"no driver profile {name!r} (known: {known})")
        base = profile.driver
    period = t.opt_integer("process_period_us", minimum=1)
    phase = t.opt_integer("process_phase_us", minimum=0)
    if phase is not None and phase >= (period or base.process_period_us or phase + 1):
        raise t.error("process_phase_us", "must be below process_period_us")
    spec = dataclasses.replace(
        base,
        process_period_us=period or base.process_period_us,
        process_phase_us=base.process_phase_us if phase is None else phase,
        process_reading=reading(
            t.source,
            t.key("process_reading"),
            t.string("process_reading", base.process_reading),
        ),
        stale_max_us=s_to_us(t.number("stale_max_s", base.stale_max_us / 1e6, minimum=0.0)),
        padded_rows=t.integer("padded_rows", base.padded_rows, minimum=0),
        duplicates_at_zero=t.boolean("duplicates_at_zero", base.duplicates_at_zero),
        legacy_sm_zero=t.boolean("legacy_sm_zero", base.legacy_sm_zero),
        legacy_process_utilization=t.boolean(
            "legacy_process_utilization", base.legacy_process_utilization
        ),
        utilization_info=t.boolean("utilization_info", base.utilization_info),
        not_found_below_pct=t.integer("not_found_below_pct", base.not_found_below_pct, minimum=0),
        device_series=t.boolean("device_series", base.device_series),
        series_boot_stamps=t.boolean("series_boot_stamps", base.series_boot_stamps),
        series_dry_when_idle=t.boolean("series_dry_when_idle", base.series_dry_when_idle),
        accounting=t.boolean("accounting", base.accounting),
        accounting_v2=t.boolean("accounting_v2", base.accounting_v2),
        mps=t.boolean("mps", base.mps),
        process_entry_bytes=t.integer("process_entry_bytes", base.process_entry_bytes),
        graphics_list=t.boolean("graphics_list", base.graphics_list),
    )
    if spec.process_entry_bytes not in PROCESS_INFO_BY_SIZE:
        raise t.error("process_entry_bytes", "must be 16, 24 or 32")
    if spec.stale_max_us and spec.stale_max_us < 1_000_000:
        raise t.error("stale_max_s", "must be 0 (off) or at least 1 s")
    if spec.not_found_below_pct > 100:
        raise t.error("not_found_below_pct", "must be a percent in 0..100")
    t.finish()
    return spec


def _parse_gpu(t: Table, position: int, host_driver: DriverSpec) -> GpuSpec:
    index = t.integer("index", position)
    if index != position:
        raise t.error("index", f"GPUs must be listed in index order: expected {position}")
    product_name = t.string("product")
    product = find_product(product_name)
    if product is None:
        for needed in ("memory_total_bytes", "idle_w", "busy_w"):
            if not t.has(needed):
                raise t.error(needed, f"is required: unknown product {product_name!r}")
        if not (t.has("sample_period_us") or t.has("sample_period_s")):
            raise t.error("sample_period_us", f"is required: unknown product {product_name!r}")
    period_us = _sample_period(t, product.sample_period_us if product else None)
    phase_us = t.opt_integer("phase_us", minimum=0)
    if phase_us is not None and phase_us >= period_us:
        raise t.error("phase_us", f"must be below the sample period ({period_us} µs)")
    idle_w = t.number("idle_w", product.idle_w if product else None, minimum=0.0)
    busy_w = t.number("busy_w", product.busy_w if product else None, minimum=idle_w)
    max_mig = t.integer("max_mig_devices", product.max_mig_devices if product else 0, minimum=0)
    mig_slices = product.mig_slices if product else 7
    mig = _parse_migs(t, max_mig, mig_slices)
    mig_enabled = t.boolean("mig_enabled", bool(mig))
    if mig and not mig_enabled:
        raise t.error("mig_enabled", "is false but [[gpu.mig]] instances are listed")
    if mig_enabled and max_mig == 0:
        raise t.error("mig_enabled", f"product {product_name!r} has no MIG")
    spec = GpuSpec(
        index=index,
        product=product.name if product else product_name,
        uuid=_opt_uuid(t, "uuid", "GPU-"),
        sample_period_us=period_us,
        ring_periods=t.integer("ring_periods", DEFAULT_RING_PERIODS, minimum=1),
        driver=_gpu_driver(t, host_driver),
        phase_us=phase_us,
        idle_w=idle_w,
        busy_w=busy_w,
        energy_supported=t.boolean("energy_supported", True),
        gpm_supported=t.boolean("gpm_supported", product.gpm_supported if product else False),
        memory_total_bytes=t.integer(
            "memory_total_bytes", product.memory_total_bytes if product else None, minimum=1
        ),
        max_mig_devices=max_mig,
        mig_slices=mig_slices,
        mig_enabled=mig_enabled,
        mig_pending=t.boolean("mig_pending", mig_enabled),
        mig=mig,
        host_vgpu=t.boolean("host_vgpu", False),
    )
    t.finish()
    return spec


def _gpu_driver(t: Table, host_driver: DriverSpec) -> DriverSpec:
    """The host's ``[driver]``, then the GPU's ``[gpu.driver]``; ``sample_reading`` on the
    GPU itself is the older spelling of ``process_reading``."""
    driver = parse_driver(t.sub_table("driver"), host_driver)
    old = t.opt_string("sample_reading")
    if old is None:
        return driver
    return dataclasses.replace(
        driver, process_reading=reading(t.source, t.key("sample_reading"), old)
    )


def _sample_period(t: Table, default_us: int | None) -> int:
    if t.has("sample_period_us") and t.has("sample_period_s"):
        raise t.error("sample_period_s", "give sample_period_us or sample_period_s, not both")
    if t.has("sample_period_s"):
        period_us = s_to_us(t.number("sample_period_s"))
    else:
        period_us = t.integer("sample_period_us", default_us)
    if period_us <= 0:
        raise t.error("sample_period_us", "must be > 0")
    return period_us


def _opt_uuid(t: Table, key: str, prefix: str) -> str | None:
    value = t.opt_string(key)
    if value is not None and not value.startswith(prefix):
        raise t.error(key, f"must start with {prefix!r}")
    return value


def _parse_migs(t: Table, max_mig: int, total_slices: int) -> tuple[MigSpec, ...]:
    migs: list[MigSpec] = []
    gi_slices: dict[int, int] = {}
    for position, m in enumerate(t.tables("mig")):
        spec = _parse_mig(m, position, max_mig)
        if any((x.gi, x.ci) == (spec.gi, spec.ci) for x in migs):
            raise m.error("ci", f"gi {spec.gi} ci {spec.ci} is listed twice")
        if any(x.slot == spec.slot for x in migs):
            raise m.error("slot", f"slot {spec.slot} is listed twice")
        if gi_slices.setdefault(spec.gi, spec.gpu_slices) != spec.gpu_slices:
            raise m.error("profile", f"GPU instance {spec.gi} has another size elsewhere")
        if sum(gi_slices.values()) > total_slices:
            raise m.error("profile", f"GPU instances use more than the {total_slices} slices")
        migs.append(spec)
    if migs and max_mig == 0:
        raise t.error("mig", "this product has no MIG")
    return tuple(migs)


def _parse_mig(m: Table, position: int, max_mig: int) -> MigSpec:
    profile = m.string("profile")
    parts = profile.split(".")
    try:
        gpu_slices = int(parts[-2].removesuffix("g"))
        memory_gb = int(parts[-1].removesuffix("gb"))
        ok = len(parts) in (2, 3) and parts[-2].endswith("g") and parts[-1].endswith("gb")
    except (IndexError, ValueError):
        ok = False
    if not ok or not 1 <= gpu_slices <= 8:
        raise m.error("profile", f"must look like '3g.40gb' or '1c.3g.40gb', not {profile!r}")
    slot = m.integer("slot", position, minimum=0)
    if slot >= max(max_mig, 1):
        raise m.error("slot", f"must be below max_mig_devices ({max_mig})")
    spec = MigSpec(
        slot=slot,
        gi=m.integer("gi", minimum=0),
        ci=m.integer("ci", 0, minimum=0),
        profile=profile,
        gpu_slices=gpu_slices,
        memory_total_bytes=memory_gb * 1000 * 1024**2,
        uuid=_opt_uuid(m, "uuid", "MIG-"),
        created_us=s_to_us(m.number("created_s", 0.0, minimum=0.0)),
        destroyed_us=_opt_us(m, "destroyed_s"),
    )
    if spec.destroyed_us is not None and spec.destroyed_us <= spec.created_us:
        raise m.error("destroyed_s", "must be after created_s")
    m.finish()
    return spec


def _opt_us(t: Table, key: str) -> int | None:
    value = t.opt_number(key)
    return None if value is None else s_to_us(value)


def _parse_process(t: Table, ordinal: int, gpus: tuple[GpuSpec, ...], seed: int) -> ProcessSpec:
    pid = t.integer("pid", minimum=1)
    if pid > MAX_PID:
        raise t.error("pid", f"must be ≤ {MAX_PID}")
    gpu_index = t.integer("gpu", minimum=0)
    if gpu_index >= len(gpus):
        raise t.error("gpu", f"no GPU {gpu_index} (the scenario has {len(gpus)})")
    gi, ci = _process_instance(t, gpus[gpu_index])
    start_us = s_to_us(t.number("start_s", 0.0, minimum=0.0))
    exit_s = t.opt_number("exit_s")
    exit_us = None if exit_s is None else s_to_us(exit_s)
    if exit_us is not None and exit_us <= start_us:
        raise t.error("exit_s", "must be after start_s")
    _within_instance(t, gpus[gpu_index], gi, ci, start_us, exit_us)
    lead_us = s_to_us(t.number("proc_exit_lead_s", 0.0, minimum=0.0))
    if lead_us and (exit_us is None or lead_us > exit_us - start_us):
        raise t.error("proc_exit_lead_s", "needs exit_s and must not exceed the process's life")
    spec = ProcessSpec(
        ordinal=ordinal,
        pid=pid,
        gpu=gpu_index,
        gi=gi,
        ci=ci,
        name=t.string("name", "python3"),
        start_us=start_us,
        exit_us=exit_us,
        memory_bytes=_memory(t),
        env=_env(t),
        container_id=t.string("container_id", ""),
        pod_uid=t.string("pod_uid", ""),
        busy=(),
        proc_exit_lead_us=lead_us,
        context=_context(t, gpus[gpu_index]),
    )
    busy = _busy(t, spec, seed)
    t.finish()
    return dataclasses.replace(spec, busy=busy)


CONTEXTS = ("compute", "graphics", "both")


def _context(t: Table, gpu: GpuSpec) -> str:
    context = t.string("context", "compute")
    if context not in CONTEXTS:
        raise t.error("context", f"must be one of {', '.join(CONTEXTS)}, not {context!r}")
    if context != "compute" and gpu.mig_enabled:
        # The MIG user guide: graphics contexts are not supported on MIG instances.
        raise t.error("context", f"GPU {gpu.index} is in MIG mode: no graphics contexts")
    return context


def _process_instance(t: Table, gpu: GpuSpec) -> tuple[int | None, int | None]:
    gi = t.opt_integer("gi", minimum=0)
    ci = t.opt_integer("ci", minimum=0)
    if not gpu.mig_enabled:
        if gi is not None or ci is not None:
            raise t.error("gi", f"GPU {gpu.index} is not in MIG mode")
        return None, None
    if gi is None:
        raise t.error("gi", f"is required: GPU {gpu.index} is in MIG mode")
    ci = 0 if ci is None else ci
    if not any((m.gi, m.ci) == (gi, ci) for m in gpu.mig):
        raise t.error("gi", f"GPU {gpu.index} has no MIG instance gi {gi} ci {ci}")
    return gi, ci


def _within_instance(
    t: Table, gpu: GpuSpec, gi: int | None, ci: int | None, start_us: int, exit_us: int | None
) -> None:
    """A process runs within its MIG instance's life: an instance is created before anything
    can run on it, and cannot be destroyed while in use ("in use by another client",
    NVIDIA/DCGM#95)."""
    mig = next((m for m in gpu.mig if (m.gi, m.ci) == (gi, ci)), None)
    if mig is None:
        return
    if start_us < mig.created_us:
        raise t.error("start_s", f"is before MIG instance gi {gi} ci {ci} is created")
    if mig.destroyed_us is not None and (exit_us is None or exit_us > mig.destroyed_us):
        raise t.error("exit_s", f"must be no later than MIG instance gi {gi} ci {ci} is destroyed")


def _memory(t: Table) -> int | None:
    value = t.raw("memory_bytes")
    if value is None:
        return DEFAULT_CONTEXT_MEMORY_BYTES
    if value == "unknown":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise t.error("memory_bytes", f'must be a byte count or "unknown", not {value!r}')
    return value


def _env(t: Table) -> dict[str, str]:
    env = t.sub_table("env")
    out = {name: env.string(name) for name in env.names()}
    env.finish()
    return out


def _busy(t: Table, spec: ProcessSpec, seed: int) -> tuple[BusySpan, ...]:
    spans: list[tuple[str, BusySpan]] = []
    raw = t.raw("busy")
    if raw is not None and not isinstance(raw, list):
        raise t.error("busy", "must be an array of [start_s, end_s, sm]")
    for i, item in enumerate(raw or []):
        spans.append((f"{t.key('busy')}[{i}]", _busy_item(t, i, item)))
    for i, bt in enumerate(t.tables("bursts")):
        spans.extend((bt.path, span) for span in expand_bursts(bt, seed, spec.pid, spec.ordinal, i))
    spans.sort(key=lambda ks: ks[1].start_us)
    for key, span in spans:
        _check_in_life(t, key, span, spec)
    for (_, a), (key, b) in itertools.pairwise(spans):
        if b.start_us < a.end_us:
            raise ScenarioError(t.source, key, f"overlaps another busy interval of pid {spec.pid}")
    return tuple(s for _, s in spans if s.sm > 0)


def _busy_item(t: Table, i: int, item: object) -> BusySpan:
    key = f"{t.key('busy')}[{i}]"
    ok = isinstance(item, list) and len(item) == 3
    values = item if isinstance(item, list) else []
    if not ok or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise ScenarioError(t.source, key, f"must be [start_s, end_s, sm], not {item!r}")
    start_s, end_s, sm = values
    if not isinstance(sm, int) or not 0 <= sm <= 100:
        raise ScenarioError(t.source, key, f"sm must be a whole percent in 0..100, not {sm!r}")
    span = BusySpan(s_to_us(start_s), s_to_us(end_s), sm)
    if span.end_us <= span.start_us:
        raise ScenarioError(t.source, key, "end must be after start")
    return span


def _check_in_life(t: Table, key: str, span: BusySpan, spec: ProcessSpec) -> None:
    if span.start_us < spec.start_us or (spec.exit_us is not None and span.end_us > spec.exit_us):
        raise ScenarioError(t.source, key, "busy interval outside the process's life")


def _check_pid_lives(source: str, processes: tuple[ProcessSpec, ...]) -> None:
    by_pid: dict[int, list[ProcessSpec]] = {}
    for p in processes:
        for other in by_pid.setdefault(p.pid, []):
            if _lives_overlap(p, other):
                raise ScenarioError(
                    source,
                    f"process[{p.ordinal}].pid",
                    f"pid {p.pid} is also process[{other.ordinal}] and their lives overlap",
                )
        by_pid[p.pid].append(p)


def _lives_overlap(a: ProcessSpec, b: ProcessSpec) -> bool:
    a_before_b = a.exit_us is not None and a.exit_us <= b.start_us
    b_before_a = b.exit_us is not None and b.exit_us <= a.start_us
    return not (a_before_b or b_before_a)


def _parse_fault(t: Table, gpu_count: int) -> FaultSpec:
    kind = t.string("kind")
    if kind not in FAULT_KINDS:
        raise t.error("kind", f"must be one of {', '.join(FAULT_KINDS)}, not {kind!r}")
    gpu = t.opt_integer("gpu", minimum=0)
    if kind in GPU_FAULTS and gpu is None:
        raise t.error("gpu", f"is required for {kind}")
    if kind not in GPU_FAULTS and gpu is not None:
        raise t.error("gpu", f"{kind} is not about one GPU")
    if gpu is not None and gpu >= gpu_count:
        raise t.error("gpu", f"no GPU {gpu}")
    start_us = s_to_us(t.number("start_s", 0.0, minimum=0.0))
    end_s = t.opt_number("end_s")
    end_us = None if end_s is None else s_to_us(end_s)
    if end_us is not None and end_us <= start_us:
        raise t.error("end_s", "must be after start_s")
    jump_us = _fault_jump(t, kind, end_us)
    ring_cleared = t.boolean("ring_cleared", False)
    if ring_cleared and kind != "gpu_lost":
        raise t.error("ring_cleared", "only a gpu_lost fault clears the ring")
    t.finish()
    return FaultSpec(kind, gpu, start_us, end_us, jump_us, ring_cleared)


def _fault_jump(t: Table, kind: str, end_us: int | None) -> int:
    if kind != "wall_jump":
        if t.has("jump_s"):
            raise t.error("jump_s", "only a wall_jump has jump_s")
        return 0
    if end_us is not None:
        raise t.error("end_s", "a wall_jump happens at start_s; it has no end")
    jump_us = s_to_us(t.number("jump_s"))
    if jump_us == 0:
        raise t.error("jump_s", "must not be 0")
    return jump_us
