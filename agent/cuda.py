"""Known GPU work through the CUDA driver API: libcuda through ctypes and a PTX kernel that
spins for a given number of nanoseconds, timed by the GPU's own ``%globaltimer``.

No toolkit and no torch: the driver JIT-compiles the PTX (``cuModuleLoadData``), so this runs
on any host with an NVIDIA driver. The one module that talks to libcuda; its errors are
translated to CudaUnavailable (no driver, no GPU) and CudaFailed (a call failed).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple

LIBCUDA = "libcuda.so.1"
CUDA_SUCCESS = 0
CUDA_ERROR_NO_DEVICE = 100
KERNEL = b"spin"
# One thread spins until %globaltimer says spin_ns have passed, then writes its first and
# last reading to out[0], out[1]. A kernel executing is what NVML counts as busy, whatever
# the number of threads. %globaltimer is the GPU's ns clock, common to all its contexts.
PTX = b"""\
.version 7.0
.target sm_52
.address_size 64

.visible .entry spin(
    .param .u64 spin_ns,
    .param .u64 out
)
{
    .reg .pred %p<2>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [spin_ns];
    ld.param.u64 %rd2, [out];
    cvta.to.global.u64 %rd3, %rd2;
    mov.u64 %rd4, %globaltimer;
$Lspin:
    mov.u64 %rd5, %globaltimer;
    sub.u64 %rd6, %rd5, %rd4;
    setp.lt.u64 %p1, %rd6, %rd1;
    @%p1 bra $Lspin;
    st.global.u64 [%rd3], %rd4;
    st.global.u64 [%rd3+8], %rd5;
    ret;
}
"""


class CudaUnavailable(Exception):
    """No CUDA driver library, or no GPU it can use: nothing to test on this host."""


class CudaFailed(Exception):
    """A CUDA driver call failed; the message names the call and the driver's error."""


class Span(NamedTuple):
    """One kernel's execution as it timed itself: %globaltimer ns at its start and end."""

    start_ns: int
    end_ns: int


class Cuda:
    """One context on one GPU (the primary context of device ``ordinal``)."""

    def __init__(self, ordinal: int, lib: Any | None = None) -> None:
        self._lib = lib if lib is not None else _load()
        self._call("cuInit", 0)
        device = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(device), ordinal)
        self._device = device
        ctx = ctypes.c_void_p()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), device)
        self._call("cuCtxSetCurrent", ctx)
        module = ctypes.c_void_p()
        self._call("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(PTX))
        self._module = module
        function = ctypes.c_void_p()
        self._call("cuModuleGetFunction", ctypes.byref(function), module, KERNEL)
        self._function = function

    def uuid(self) -> str:
        """The GPU's UUID as NVML writes it ("GPU-xxxxxxxx-…"): the same GPU for both."""
        raw = (ctypes.c_ubyte * 16)()
        self._call("cuDeviceGetUuid", raw, self._device)
        h = bytes(raw).hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def spin(self, durations_ns: Sequence[int]) -> list[Span]:
        """Runs one spin kernel per duration, back to back on the default stream, and
        returns their self-timed spans once all have finished."""
        size = 16 * len(durations_ns)
        out = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(out), ctypes.c_size_t(size))
        try:
            for i, ns in enumerate(durations_ns):
                self._launch(ns, out.value + 16 * i)
            self._call("cuCtxSynchronize")
            host = (ctypes.c_uint64 * (2 * len(durations_ns)))()
            self._call("cuMemcpyDtoH_v2", host, out, ctypes.c_size_t(size))
        finally:
            self._lib.cuMemFree_v2(out)
        return [Span(host[2 * i], host[2 * i + 1]) for i in range(len(durations_ns))]

    def _launch(self, spin_ns: int, out_ptr: int) -> None:
        arg_ns, arg_out = ctypes.c_uint64(spin_ns), ctypes.c_uint64(out_ptr)
        params = (ctypes.c_void_p * 2)(
            ctypes.cast(ctypes.byref(arg_ns), ctypes.c_void_p),
            ctypes.cast(ctypes.byref(arg_out), ctypes.c_void_p),
        )
        one = ctypes.c_uint(1)
        self._call(
            "cuLaunchKernel", self._function, one, one, one, one, one, one,
            ctypes.c_uint(0), None, params, None,
        )  # fmt: skip

    def close(self) -> None:
        self._lib.cuModuleUnload(self._module)
        self._lib.cuDevicePrimaryCtxRelease_v2(self._device)

    def _call(self, name: str, *args: Any) -> None:
        code = getattr(self._lib, name)(*args)
        if code == CUDA_SUCCESS:
            return
        error = self._error_name(code)
        if name == "cuInit" or code == CUDA_ERROR_NO_DEVICE:
            raise CudaUnavailable(f"{name}: {error}: no GPU the CUDA driver can use")
        raise CudaFailed(f"{name}: {error}")

    def _error_name(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self._lib.cuGetErrorName(code, ctypes.byref(text)) == CUDA_SUCCESS and text.value:
            return text.value.decode()
        return f"CUDA error {code}"


def probe(lib: Any | None = None) -> int:
    """The number of GPUs the CUDA driver can use; raises CudaUnavailable when there is no
    driver or no GPU. Creates no context: the GPU under test stays free of this process."""
    lib = lib if lib is not None else _load()
    code = lib.cuInit(0)
    count = ctypes.c_int()
    if code == CUDA_SUCCESS:
        code = lib.cuDeviceGetCount(ctypes.byref(count))
    if code != CUDA_SUCCESS or count.value == 0:
        raise CudaUnavailable(f"cuInit: no GPU the CUDA driver can use (CUDA error {code})")
    return count.value


def _load() -> Any:
    try:
        return ctypes.CDLL(LIBCUDA)
    except OSError as exc:
        raise CudaUnavailable(f"no CUDA driver: cannot load {LIBCUDA} ({exc})") from None
