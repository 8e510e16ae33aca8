"""GPM entry points (Hopper and newer): samples of a GPU or a GPU instance, and metrics
computed between two samples.

A sample records only its scope and sim time: the GPU's activity is a pure function of
time, so the metric between two samples is the exact integral between their times.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml

from creditmeter.simnvml.abi import Ret, address, fail, point, scalar, target
from creditmeter.simnvml.driver import DriverCore, GpmRecord

GPM_SUPPORT_VERSION = 1  # NVML_GPM_SUPPORT_VERSION
GPM_METRICS_GET_VERSION = 1  # NVML_GPM_METRICS_GET_VERSION
GPM_METRIC_MAX = 477  # NVML_GPM_METRIC_MAX
GRAPHICS_UTIL = 1  # NVML_GPM_METRIC_GRAPHICS_UTIL: % of time any kernel ran
SM_UTIL = 2  # NVML_GPM_METRIC_SM_UTIL: % of SMs busy
# Kernels seldom fill every SM: SM_UTIL is GRAPHICS_UTIL scaled by this, so it never exceeds it.
SM_FILL = 0.9
METRIC_INFO = {
    GRAPHICS_UTIL: (b"gr_util", b"graphics utilization", b"%"),
    SM_UTIL: (b"sm_util", b"SM utilization", b"%"),
}


def query_support(core: DriverCore, handle: Any, out: Any) -> int:
    ref = core.device(handle, core.now_us())
    support = target(out)
    if support.version != GPM_SUPPORT_VERSION:
        fail(Ret.ARGUMENT_VERSION_MISMATCH)
    support.isSupportedDevice = int(ref.gpu.spec.gpm_supported)
    return Ret.SUCCESS


def sample_alloc(core: DriverCore, out: Any) -> int:
    core.require_init()
    struct = pynvml.struct_c_nvmlGpmSample_t()
    point(out, struct)
    key = ctypes.addressof(struct)
    core.gpm_structs[key] = struct
    core.gpm_samples[key] = None
    return Ret.SUCCESS


def sample_free(core: DriverCore, sample: Any) -> int:
    core.require_init()
    key = _sample_key(core, sample)
    del core.gpm_samples[key], core.gpm_structs[key]
    return Ret.SUCCESS


def _sample_key(core: DriverCore, sample: Any) -> int:
    key = address(sample)
    if key is None or key not in core.gpm_samples:
        fail(Ret.INVALID_ARGUMENT)
    return key


def sample_get(core: DriverCore, handle: Any, sample: Any) -> int:
    """The whole GPU; a MIG instance handle is NOT_SUPPORTED (use nvmlGpmMigSampleGet)."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.mig is not None or not ref.gpu.spec.gpm_supported:
        fail(Ret.NOT_SUPPORTED)
    core.gpm_samples[_sample_key(core, sample)] = GpmRecord(ref.gpu.index, None, now_us)
    return Ret.SUCCESS


def mig_sample_get(core: DriverCore, handle: Any, gpu_instance_id: Any, sample: Any) -> int:
    """One GPU instance of a MIG-enabled parent, named by its GPU instance id."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.mig is not None:
        fail(Ret.INVALID_ARGUMENT)
    if not ref.gpu.spec.gpm_supported or not ref.gpu.mig_enabled:
        fail(Ret.NOT_SUPPORTED)
    gi = scalar(gpu_instance_id)
    if gi not in ref.gpu.gpu_instance_ids(now_us):
        fail(Ret.INVALID_ARGUMENT)
    core.gpm_samples[_sample_key(core, sample)] = GpmRecord(ref.gpu.index, gi, now_us)
    return Ret.SUCCESS


def metrics_get(core: DriverCore, request: Any) -> int:
    core.require_init()
    m = target(request)
    if m.version != GPM_METRICS_GET_VERSION:
        fail(Ret.ARGUMENT_VERSION_MISMATCH)
    if not 0 < m.numMetrics <= GPM_METRIC_MAX:
        fail(Ret.INVALID_ARGUMENT)
    first = core.gpm_samples.get(_sample_key(core, m.sample1))
    second = core.gpm_samples.get(_sample_key(core, m.sample2))
    if (
        first is None
        or second is None
        or (first.gpu_index, first.gi) != (second.gpu_index, second.gi)
    ):
        fail(Ret.INVALID_ARGUMENT)
    if second.t_us <= first.t_us:
        fail(Ret.INVALID_ARGUMENT)
    graphics = _graphics_util(core, first, second)
    for i in range(m.numMetrics):
        _fill_metric(m.metrics[i], graphics)
    return Ret.SUCCESS


def _graphics_util(core: DriverCore, first: GpmRecord, second: GpmRecord) -> float:
    activity, full_scale = core.host.gpu(first.gpu_index).scope_activity(first.gi)
    busy = activity.integral(first.t_us, second.t_us)
    return 100.0 * busy / (full_scale * (second.t_us - first.t_us))


def _fill_metric(metric: Any, graphics_util: float) -> None:
    metric_id = metric.metricId
    values = {GRAPHICS_UTIL: graphics_util, SM_UTIL: graphics_util * SM_FILL}
    if metric_id not in values:
        metric.nvmlReturn = (
            Ret.NOT_SUPPORTED if metric_id < GPM_METRIC_MAX else Ret.INVALID_ARGUMENT
        )
        metric.value = 0.0
        return
    metric.nvmlReturn = Ret.SUCCESS
    metric.value = values[metric_id]
    info = metric.metricInfo
    info.shortName, info.longName, info.unit = METRIC_INFO[metric_id]


SYMBOLS: dict[str, Callable[..., object]] = {
    "nvmlGpmQueryDeviceSupport": query_support,
    "nvmlGpmSampleAlloc": sample_alloc,
    "nvmlGpmSampleFree": sample_free,
    "nvmlGpmSampleGet": sample_get,
    "nvmlGpmMigSampleGet": mig_sample_get,
    "nvmlGpmMetricsGet": metrics_get,
}
