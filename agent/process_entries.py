"""The process list that nvmlDeviceGetComputeRunningProcesses writes, read in entries of the
size the driver wrote, which is not always the size nvml.h gives.

nvml.h lays an entry out in 24 bytes (nvmlProcessInfo_t, the same as v2). Drivers have
written other sizes from the _v3 call:

- 32 bytes on R535, 535.43 to 535.86: nvmlProcessInfo_v3_t with usedGpuCcProtectedMemory
  appended, without a version bump (XuehaiPan/nvitop PR #79 and #89; "an inadvertent ABI
  break in the 535 driver", gpuopenanalytics/pynvml PR #48);
- 16 bytes, nvmlProcessInfo_v1_t, on 550.127.08 (XuehaiPan/nvitop PR #226).

Read as 24, the first process comes out right and the rest are garbage
(wookayin/gpustat#161 and NVIDIA/go-nvml#75 on 535.54.03). For a meter that is worse than
no list: the processes it misses leave their neighbour alone on the GPU, and the neighbour is
billed their time.

Which symbols a driver exports does not tell the size: nvitop's guess from them chose 24 where
a driver wrote another size (XuehaiPan/nvitop#181: pids out of range), and has no place for
16. So the size is measured in every answer, as nvitop PR #226 measures it. The buffer is
filled with a byte that no entry ends in, and the size is the smallest known one whose entries
reach as far as the driver wrote. Rows that still do not read as processes make the answer
unreadable (BadAnswer), never a guess.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

from creditmeter.agent.errors import BadAnswer
from creditmeter.agent.gpu import ComputeProcess
from creditmeter.nvml_abi import PROCESS_INFO_BY_SIZE, ProcessInfo, row_struct

NVML_H_ENTRY_BYTES = ctypes.sizeof(ProcessInfo)
LAYOUTS = PROCESS_INFO_BY_SIZE
LARGEST_ENTRY_BYTES = max(LAYOUTS)
# Every entry ends in a field no driver fills with this byte: memory in bytes (16), a compute
# instance id, 0xFFFFFFFF outside MIG (24), confidential computing memory, 0 outside it (32).
UNWRITTEN = 0xA5
_UNWRITTEN_BYTE = bytes([UNWRITTEN])
# Each layout's fields that make a ComputeProcess (pid, memory[, gi, ci]), unpacked at C speed
# from the raw entries.
_FIELDS = ("pid", "usedGpuMemory", "gpuInstanceId", "computeInstanceId")
_ROWS = {
    size: row_struct(layout, [f[0] for f in layout._fields_ if f[0] in _FIELDS])
    for size, layout in LAYOUTS.items()
}
_SIZES = sorted(_ROWS)
PID_LIMIT = 4_194_304  # PID_MAX_LIMIT on 64-bit Linux: /proc/sys/kernel/pid_max goes no higher
_NOT_MIG = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of a process outside MIG
_NOT_AVAILABLE = 0xFFFF_FFFF_FFFF_FFFF  # NVML_VALUE_NOT_AVAILABLE for unsigned long long
_LARGEST_INSTANCE_ID = 0xFFFF  # far above any MIG instance id; a misread one is memory bytes


def blank_buffer(capacity: int) -> ctypes.Array[ctypes.c_char]:
    """Room for ``capacity`` entries of the largest size a driver writes, every byte unwritten."""
    size = capacity * LARGEST_ENTRY_BYTES
    return ctypes.create_string_buffer(_UNWRITTEN_BYTE * size, size)


def entry_bytes(answer: bytes, count: int) -> int | None:
    """The size of the ``count`` entries the driver wrote into ``answer`` (a buffer from
    :func:`blank_buffer`); None when it wrote past the largest (it cleared more than its
    entries, and the answer cannot tell)."""
    written = len(answer.rstrip(_UNWRITTEN_BYTE))
    for size in _SIZES:
        if size * count >= written:
            return size
    return None


def processes(answer: bytes, count: int, size: int) -> list[ComputeProcess]:
    """The ``count`` entries of ``size`` bytes in ``answer``. Raises BadAnswer for a size no
    driver writes and for rows that are no process: a pid of 0 or past the kernel's limit,
    instance ids that are no instance's (where the entries were read at the wrong size)."""
    layout = _ROWS.get(size)
    if layout is None:
        raise BadAnswer(f"process entries of {size} bytes: no driver writes that size")
    if count * size > len(answer):
        raise BadAnswer(f"{count} process entries of {size} bytes overrun the buffer")
    rows: Iterable[tuple[int, ...]] = layout.iter_unpack(answer[: count * size])
    if size == 16:  # nvmlProcessInfo_v1_t has no instance ids: outside MIG, as far as it says
        rows = ((pid, memory, _NOT_MIG, _NOT_MIG) for pid, memory in rows)
    out = []
    # One loop, no call per row: this list is read for every device at every poll.
    for pid, memory, gi, ci in rows:
        if not 0 < pid <= PID_LIMIT or not (
            gi == ci == _NOT_MIG or (gi <= _LARGEST_INSTANCE_ID and ci <= _LARGEST_INSTANCE_ID)
        ):
            raise _no_process(size, pid, gi, ci)
        out.append(
            ComputeProcess(
                pid,
                None if memory == _NOT_AVAILABLE else memory,
                None if gi == _NOT_MIG else gi,
                None if ci == _NOT_MIG else ci,
            )
        )
    return out


def _no_process(size: int, pid: int, gi: int, ci: int) -> BadAnswer:
    """Why a row is no process's: outside MIG both instance ids are 0xFFFFFFFF, on it both an
    instance's (nvml.h)."""
    if not 0 < pid <= PID_LIMIT:
        return BadAnswer(f"a process entry ({size} bytes) with pid {pid}: no such pid can exist")
    return BadAnswer(f"pid {pid}: instance ids {gi:#x}/{ci:#x} are no MIG instance's")
