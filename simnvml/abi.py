"""The C side of the fake library: nvmlReturn_t codes, error strings and ctypes marshalling.

pynvml calls each symbol with ctypes objects: ``byref(x)`` arrives as a CArgObject whose
``_obj`` is ``x``; arrays and handles (``POINTER(struct)``) arrive as themselves; NULL
arrives as None; scalars as ``c_uint(…)`` or plain ints. A symbol fails by raising
:class:`NvmlFailure`, which the symbol wrapper turns into its return code.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from typing import Any, NoReturn


class Ret(IntEnum):
    """nvmlReturn_t values (nvml.h)."""

    SUCCESS = 0
    UNINITIALIZED = 1
    INVALID_ARGUMENT = 2
    NOT_SUPPORTED = 3
    NO_PERMISSION = 4
    ALREADY_INITIALIZED = 5
    NOT_FOUND = 6
    INSUFFICIENT_SIZE = 7
    DRIVER_NOT_LOADED = 9
    LIBRARY_NOT_FOUND = 12
    FUNCTION_NOT_FOUND = 13
    GPU_IS_LOST = 15
    LIB_RM_VERSION_MISMATCH = 18
    NO_DATA = 21
    ARGUMENT_VERSION_MISMATCH = 25
    UNKNOWN = 999


# nvmlErrorString's texts: those pynvml also carries, verbatim, plus the few it lacks.
ERROR_STRINGS: dict[int, bytes] = {
    0: b"Success",
    1: b"Uninitialized",
    2: b"Invalid Argument",
    3: b"Not Supported",
    4: b"Insufficient Permissions",
    5: b"Already Initialized",
    6: b"Not Found",
    7: b"Insufficient Size",
    8: b"Insufficient External Power",
    9: b"Driver Not Loaded",
    10: b"Timeout",
    11: b"Interrupt Request Issue",
    12: b"NVML Shared Library Not Found",
    13: b"Function Not Found",
    14: b"Corrupted infoROM",
    15: b"GPU is lost",
    16: b"GPU requires restart",
    17: b"The operating system has blocked the request.",
    18: b"RM has detected an NVML/RM version mismatch.",
    19: b"In use by another client",
    20: b"Insufficient Memory",
    21: b"No data",
    25: b"Argument version mismatch",
    999: b"Unknown Error",
}

NOT_AVAILABLE_ULL = 0xFFFF_FFFF_FFFF_FFFF  # NVML_VALUE_NOT_AVAILABLE for unsigned long long
NO_INSTANCE_ID = 0xFFFF_FFFF  # gpuInstanceId/computeInstanceId of a process not on MIG


class NvmlFailure(Exception):
    def __init__(self, code: Ret) -> None:
        super().__init__(code.name)
        self.code = code


def fail(code: Ret) -> NoReturn:
    raise NvmlFailure(code)


def target(arg: Any) -> Any:
    """What an out-parameter points at: ``x`` for ``byref(x)`` or ``pointer(x)``."""
    if arg is None:
        fail(Ret.INVALID_ARGUMENT)
    obj = getattr(arg, "_obj", None)  # CArgObject (byref) has no public accessor
    if obj is not None:
        return obj
    if isinstance(arg, ctypes._Pointer):
        return arg.contents
    fail(Ret.INVALID_ARGUMENT)


def scalar(arg: Any) -> int:
    """An integer argument passed as ``c_uint(…)``/``c_ulonglong(…)`` or as a plain int."""
    value = getattr(arg, "value", arg)
    if isinstance(value, bool) or not isinstance(value, int):
        fail(Ret.INVALID_ARGUMENT)
    return value


def address(ptr: Any) -> int | None:
    """The address a handle (``POINTER(struct)``) holds; None for NULL."""
    if ptr is None:
        return None
    value: int | None = ctypes.cast(ptr, ctypes.c_void_p).value
    return value


def point(out_arg: Any, struct: ctypes.Structure) -> None:
    """Store a pointer to ``struct`` in the handle that ``out_arg`` refers to."""
    target(out_arg).contents = struct


def write_text(buf: Any, length_arg: Any, text: str) -> None:
    """Copy ``text`` NUL-terminated into a caller's char buffer of ``length_arg`` bytes."""
    data = text.encode()
    if buf is None:
        fail(Ret.INVALID_ARGUMENT)
    if len(data) + 1 > scalar(length_arg):
        fail(Ret.INSUFFICIENT_SIZE)
    buf.value = data


def text_arg(arg: Any) -> str:
    """A ``const char *`` argument: ``c_char_p(b"…")`` or bytes."""
    value = getattr(arg, "value", arg)
    if not isinstance(value, bytes):
        fail(Ret.INVALID_ARGUMENT)
    return value.decode(errors="replace")


# -- result records: laid out as nvml.h lays them out (creditmeter.nvml_abi) ---------------
# The library writes arrays of results into the caller's buffer as raw bytes, as the C
# library does.


def copy_out(buffer: Any, record: type[ctypes.Structure], rows: list[Any]) -> None:
    """Write ``rows`` (records or field tuples) into the caller's array as raw bytes."""
    array = (record * len(rows))(*rows)
    size = ctypes.sizeof(array)
    if ctypes.sizeof(buffer) < size:  # a C library would scribble past the end; refuse
        fail(Ret.INVALID_ARGUMENT)
    ctypes.memmove(buffer, array, size)
