"""GPU loss and init faults, scheduled and injected, seen through pynvml's exception classes."""

from __future__ import annotations

from collections.abc import Callable

import pynvml
import pytest
from sim_helpers import Sim

TWO_GPUS = """
[host]
seed = 3
[[gpu]]
product = "H100"
[[gpu]]
product = "H100"
"""


def test_lost_gpu_stays_lost_until_nvml_is_reopened(sim: Callable[[str], Sim]) -> None:
    s = sim(TWO_GPUS)
    pynvml.nvmlInit()
    h0, h1 = (pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(2))
    s.clock.advance(5)
    s.host.inject("gpu_lost", gpu=0)
    for call in (
        lambda: pynvml.nvmlDeviceGetUUID(h0),
        lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(h0),
        lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h0),
        lambda: pynvml.nvmlDeviceGetHandleByIndex(0),
    ):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call()
    assert pynvml.nvmlDeviceGetUUID(h1).startswith("GPU-")  # the other GPU is fine
    s.clock.advance(5)
    s.host.clear("gpu_lost", gpu=0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):  # the fault is over, the session is not
        pynvml.nvmlDeviceGetUUID(h0)
    pynvml.nvmlShutdown()
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0)).startswith("GPU-")
    assert pynvml.nvmlDeviceGetUUID(h0).startswith("GPU-")  # same handle, new session


def test_scheduled_gpu_loss_and_reinit_during_it(sim: Callable[[str], Sim]) -> None:
    s = sim(TWO_GPUS + '[[fault]]\nkind = "gpu_lost"\ngpu = 1\nstart_s = 5\nend_s = 8\n')
    pynvml.nvmlInit()
    h1 = pynvml.nvmlDeviceGetHandleByIndex(1)
    s.clock.advance(4)
    pynvml.nvmlDeviceGetUUID(h1)
    s.clock.advance(2)  # t = 6
    pynvml.nvmlShutdown()
    pynvml.nvmlInit()  # re-init while the GPU is still off the bus: still lost
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(1)
    s.clock.advance(3)  # t = 9: the fault ended at 8, but this session saw it
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetUUID(h1)
    pynvml.nvmlShutdown()
    pynvml.nvmlInit()
    pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(1))


def test_a_short_loss_between_polls_still_loses_the_gpu(sim: Callable[[str], Sim]) -> None:
    s = sim(TWO_GPUS + '[[fault]]\nkind = "gpu_lost"\ngpu = 0\nstart_s = 2\nend_s = 2.5\n')
    pynvml.nvmlInit()
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(3)  # nobody called during [2, 2.5)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetUUID(h0)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("driver_not_loaded", pynvml.NVMLError_DriverNotLoaded),
        ("lib_rm_version_mismatch", pynvml.NVMLError_LibRmVersionMismatch),
        ("no_permission", pynvml.NVMLError_NoPermission),
        ("library_not_found", pynvml.NVMLError_LibraryNotFound),
    ],
)
def test_init_faults_raise_the_right_pynvml_error(
    sim: Callable[[str], Sim], kind: str, error: type[Exception]
) -> None:
    s = sim(TWO_GPUS + f'[[fault]]\nkind = "{kind}"\nend_s = 10\n')
    with pytest.raises(error):
        pynvml.nvmlInit()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    s.clock.advance(10)
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetCount() == 2


def test_missing_library_goes_through_pynvmls_own_loader(sim: Callable[[str], Sim]) -> None:
    sim(TWO_GPUS + '[[fault]]\nkind = "library_not_found"\n')
    assert pynvml.nvmlLib is None  # as on a host without the driver
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()
    assert pynvml.nvmlLib is None


def test_library_vanishing_after_install(sim: Callable[[str], Sim]) -> None:
    s = sim(TWO_GPUS)
    s.host.inject("library_not_found")
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()
    assert pynvml.nvmlLib is None
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):  # now via the loader stand-in
        pynvml.nvmlInit()
    s.host.clear("library_not_found")
    pynvml.nvmlInit()
    assert pynvml.nvmlLib is s.lib


def test_injecting_needs_the_right_target(sim: Callable[[str], Sim]) -> None:
    s = sim(TWO_GPUS)
    with pytest.raises(ValueError, match="needs gpu"):
        s.host.inject("gpu_lost")
    with pytest.raises(ValueError, match="takes no gpu"):
        s.host.inject("driver_not_loaded", gpu=0)
    with pytest.raises(ValueError, match="jump_wall"):
        s.host.inject("wall_jump")
