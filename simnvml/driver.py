"""The simulated driver's per-process state behind the symbols: nvmlInit's refcount and
session, device handles, GPM sample objects.

Handles are pointers to one opaque struct per GPU and per MIG instance, allocated once, so a
handle is identified by its address as in the real library. An NVML *session* runs from the
nvmlInit that raised the refcount from 0 to the nvmlShutdown that brought it back: a GPU that
was lost at any time during the session stays lost for it; a new session finds the GPU again
once the fault is over.

A session lists the MIG instances that existed at its nvmlInit, and only those: one created
later is not found by index until a new session (NVIDIA/k8s-device-plugin#992: "the
device-plugin needs to be restarted after a MIG reconfiguration"; openshift/instaslice-
operator#288: DCGM needs a restart to see MIG instances created since), and one destroyed
since is still handed out by index (NVIDIA/libcudacxx#224: three handles with SUCCESS after
one of three was deleted). Queries on the handle of an instance that no longer exists answer
NOT_FOUND, the choice of NVIDIA/k8s-test-infra's NVML mock (PR #829) for a torn-down MIG
device: the real answer is undocumented.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

from creditmeter.simnvml.abi import Ret, address, fail, point
from creditmeter.simnvml.hardware import SimGpu, SimMigDevice
from creditmeter.simnvml.host import SimHost

INIT_FAULT_CODES = {
    "library_not_found": Ret.LIBRARY_NOT_FOUND,
    "driver_not_loaded": Ret.DRIVER_NOT_LOADED,
    "lib_rm_version_mismatch": Ret.LIB_RM_VERSION_MISMATCH,
    "no_permission": Ret.NO_PERMISSION,
}


@dataclass(frozen=True, slots=True, eq=False)
class DeviceRef:
    """What a handle points at: a whole GPU, or one MIG instance of it."""

    gpu: SimGpu
    mig: SimMigDevice | None
    struct: Any  # the pynvml.struct_c_nvmlDevice_t handles point at

    @property
    def uuid(self) -> str:
        return self.mig.uuid if self.mig else self.gpu.uuid

    @property
    def name(self) -> str:
        return self.mig.name if self.mig else self.gpu.name

    def exists(self, now_us: int) -> bool:
        """A whole GPU always; a MIG instance between its creation and its destruction."""
        return self.mig is None or self.mig.spec.exists(now_us)

    @property
    def on_mig(self) -> bool:
        """A MIG instance, or a parent in MIG mode: per-process and device sampling is off."""
        return self.mig is not None or self.gpu.mig_enabled


@dataclass(frozen=True, slots=True)
class GpmRecord:
    """A taken GPM sample: which scope (GPU, or one GPU instance) and when."""

    gpu_index: int
    gi: int | None
    t_us: int


class DriverCore:
    def __init__(self, host: SimHost) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._refcount = 0
        self._session_start_us = 0
        self._listed_migs: frozenset[tuple[int, int]] = frozenset()  # (gpu index, slot)
        self.gpu_refs = tuple(DeviceRef(g, None, pynvml.struct_c_nvmlDevice_t()) for g in host.gpus)
        self.mig_refs = {
            (g.index, m.spec.slot): DeviceRef(g, m, pynvml.struct_c_nvmlDevice_t())
            for g in host.gpus
            for m in g.migs
        }
        self._by_address = {
            ctypes.addressof(r.struct): r for r in (*self.gpu_refs, *self.mig_refs.values())
        }
        self.gpm_samples: dict[int, GpmRecord | None] = {}
        self.gpm_structs: dict[int, Any] = {}  # keeps allocated sample structs alive
        # Set by install(): unhooks the library from pynvml when it vanishes from the host.
        self.on_library_missing: Callable[[], None] | None = None

    def now_us(self) -> int:
        return self.host.now_us()

    # -- sessions -----------------------------------------------------------------------------

    def init(self, now_us: int) -> None:
        failure = self.host.faults.init_failure(now_us)
        if failure is not None:
            if failure == "library_not_found" and self.on_library_missing is not None:
                self.on_library_missing()
            fail(INIT_FAULT_CODES[failure])
        with self._lock:
            if self._refcount == 0:
                self._session_start_us = now_us
                self._listed_migs = frozenset(
                    key for key, r in self.mig_refs.items() if r.exists(now_us)
                )
            self._refcount += 1

    def shutdown(self) -> None:
        with self._lock:
            if self._refcount == 0:
                fail(Ret.UNINITIALIZED)
            self._refcount -= 1

    @property
    def initialized(self) -> bool:
        return self._refcount > 0

    def require_init(self) -> None:
        if self._refcount == 0:
            fail(Ret.UNINITIALIZED)

    def lists_mig(self, gpu_index: int, slot: int) -> bool:
        """Whether this session lists the MIG instance in ``slot`` (it existed at nvmlInit)."""
        return (gpu_index, slot) in self._listed_migs

    def is_lost(self, gpu_index: int, now_us: int) -> bool:
        return self.host.faults.struck_between(
            "gpu_lost", gpu_index, self._session_start_us, now_us
        )

    # -- handles ------------------------------------------------------------------------------

    def device(self, handle: Any, now_us: int) -> DeviceRef:
        """The device a handle names, checked: initialised, valid, not lost."""
        self.require_init()
        ref = self._by_address.get(address(handle) or 0)
        if ref is None:
            fail(Ret.INVALID_ARGUMENT)
        if self.is_lost(ref.gpu.index, now_us):
            fail(Ret.GPU_IS_LOST)
        if not ref.exists(now_us):
            fail(Ret.NOT_FOUND)
        return ref

    def hand_out(self, out_arg: Any, ref: DeviceRef, now_us: int) -> None:
        """Write a handle to ``ref`` into the caller's ``nvmlDevice_t *``."""
        if self.is_lost(ref.gpu.index, now_us):
            fail(Ret.GPU_IS_LOST)
        point(out_arg, ref.struct)
