"""The nvml.h structures NVML fills in bulk, as plain ctypes structures.

One definition serves the agent, which reads the arrays the driver fills at every poll, and
the simulated library, which fills them as the C library does (raw bytes into the caller's
buffer). pynvml has its own copies, but they override __getattribute__/__setattr__ to
convert strings, which makes each field access cost Python code: too slow for the per-poll
path. A test checks these layouts against pynvml's field by field.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any


class ProcessInfo(ctypes.Structure):
    """nvmlProcessInfo_v2_t, which is also nvmlProcessInfo_t (v3)."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class ProcessInfoV1(ctypes.Structure):
    """nvmlProcessInfo_v1_t: what nvmlDeviceGetComputeRunningProcesses_v3 writes on at least
    one driver (550.127.08 on Hopper, XuehaiPan/nvitop PR #226), 16 bytes an entry."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
    ]


class ProcessInfoCc(ctypes.Structure):
    """nvmlProcessInfo_t as R535's nvml.h had it (535.43 to 535.86): v2 and the confidential
    computing memory, 32 bytes an entry, written by nvmlDeviceGetComputeRunningProcesses_v3
    without a version bump (XuehaiPan/nvitop PR #79 and #89). Later headers moved it to
    nvmlProcessDetail_v1_t."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
        ("usedGpuCcProtectedMemory", ctypes.c_ulonglong),
    ]


# The entries drivers have written from nvmlDeviceGetComputeRunningProcesses, by size: 16 (v1),
# 24 (nvml.h's), 32 (R535's).
PROCESS_INFO_BY_SIZE: dict[int, type[ctypes.Structure]] = {
    ctypes.sizeof(layout): layout for layout in (ProcessInfoV1, ProcessInfo, ProcessInfoCc)
}


class ProcessUtilizationSample(ctypes.Structure):
    """nvmlProcessUtilizationSample_t."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("timeStamp", ctypes.c_ulonglong),
        ("smUtil", ctypes.c_uint),
        ("memUtil", ctypes.c_uint),
        ("encUtil", ctypes.c_uint),
        ("decUtil", ctypes.c_uint),
    ]


class ProcessUtilizationInfo(ctypes.Structure):
    """nvmlProcessUtilizationInfo_v1_t: one row of nvmlDeviceGetProcessesUtilizationInfo."""

    _fields_ = [
        ("timeStamp", ctypes.c_ulonglong),
        ("pid", ctypes.c_uint),
        ("smUtil", ctypes.c_uint),
        ("memUtil", ctypes.c_uint),
        ("encUtil", ctypes.c_uint),
        ("decUtil", ctypes.c_uint),
        ("jpgUtil", ctypes.c_uint),
        ("ofaUtil", ctypes.c_uint),
    ]


class ProcessesUtilizationInfo(ctypes.Structure):
    """nvmlProcessesUtilizationInfo_v1_t: the request and answer of that call."""

    _fields_ = [
        ("version", ctypes.c_uint),
        ("processSamplesCount", ctypes.c_uint),
        ("lastSeenTimeStamp", ctypes.c_ulonglong),
        ("procUtilArray", ctypes.POINTER(ProcessUtilizationInfo)),
    ]


class AccountingStatsV2(ctypes.Structure):
    """nvmlAccountingStats_v2_t: ``sumGpuUtil`` (percent × 100) and ``sampleCount`` count
    every sample since the process started, a counter the per-process calls lack."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("isRunning", ctypes.c_uint),
        ("gpuUtilization", ctypes.c_uint),
        ("memoryUtilization", ctypes.c_uint),
        ("maxMemoryUsage", ctypes.c_ulonglong),
        ("sampleCount", ctypes.c_uint),
        ("sumGpuUtil", ctypes.c_ulonglong),
        ("sumFbUtil", ctypes.c_ulonglong),
        ("time", ctypes.c_ulonglong),
        ("startTime", ctypes.c_ulonglong),
    ]


class Value(ctypes.Union):
    """nvmlValue_t."""

    _fields_ = [
        ("dVal", ctypes.c_double),
        ("uiVal", ctypes.c_uint),
        ("ulVal", ctypes.c_ulong),
        ("ullVal", ctypes.c_ulonglong),
        ("sllVal", ctypes.c_longlong),
        ("siVal", ctypes.c_int),
        ("usVal", ctypes.c_ushort),
    ]


class Sample(ctypes.Structure):
    """nvmlSample_t."""

    _fields_ = [("timeStamp", ctypes.c_ulonglong), ("sampleValue", Value)]


_UNSIGNED: dict[Any, str] = {ctypes.c_uint: "I", ctypes.c_ulonglong: "Q"}  # the rows' fields


def row_struct(structure: type[ctypes.Structure], names: Sequence[str]) -> struct.Struct:
    """Reads the fields ``names`` of one ``structure`` from its raw bytes, in the order they
    lie there. A padded answer holds a hundred rows: unpacked at C speed, they cost half of
    what reading each field of each ctypes row costs (measured: 24 against 44 µs)."""
    types = {field[0]: field[1] for field in structure._fields_}
    fmt, at = "=", 0
    for name in sorted(names, key=lambda n: getattr(structure, n).offset):
        field = getattr(structure, name)
        fmt += "x" * (field.offset - at) + _UNSIGNED[types[name]]
        at = field.offset + field.size
    return struct.Struct(fmt + "x" * (ctypes.sizeof(structure) - at))
