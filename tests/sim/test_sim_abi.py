"""The fake library's C surface agrees with pynvml's: codes, strings, and the struct layouts
(creditmeter.nvml_abi) through which the simulator writes and the agent reads."""

from __future__ import annotations

import ctypes
import random

import pynvml
import pytest

from creditmeter.agent import nvml
from creditmeter.nvml_abi import (
    ProcessInfo,
    ProcessInfoCc,
    ProcessInfoV1,
    ProcessUtilizationInfo,
    ProcessUtilizationSample,
    Sample,
    Value,
)
from creditmeter.simnvml import FakeNvmlLibrary, ManualClock, Scenario, SimHost
from creditmeter.simnvml.abi import ERROR_STRINGS, Ret


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (ProcessUtilizationSample, pynvml.c_nvmlProcessUtilizationSample_t),
        (ProcessUtilizationInfo, pynvml.c_nvmlProcessUtilizationInfo_v1_t),
        (ProcessInfo, pynvml.c_nvmlProcessInfo_v3_t),
        (ProcessInfoCc, pynvml.c_nvmlProcessDetail_v1_t),  # R535's nvmlProcessInfo_v3_t
        (Sample, pynvml.c_nvmlSample_t),
        (Value, pynvml.c_nvmlValue_t),
    ],
)
def test_result_records_have_nvml_layouts(ours: type, theirs: type) -> None:
    assert ctypes.sizeof(ours) == ctypes.sizeof(theirs)
    assert [(name, getattr(ours, name).offset) for name, _ in ours._fields_] == [
        (name, getattr(theirs, name).offset) for name, _ in theirs._fields_
    ]


def test_the_v1_process_entry_is_v2s_first_two_fields() -> None:
    """nvmlProcessInfo_v1_t, which pynvml no longer carries: pid and usedGpuMemory."""
    assert ctypes.sizeof(ProcessInfoV1) == 16
    assert [(n, getattr(ProcessInfoV1, n).offset) for n, _ in ProcessInfoV1._fields_] == [
        (n, getattr(ProcessInfo, n).offset) for n, _ in ProcessInfo._fields_[:2]
    ]


def test_return_codes_match_pynvml() -> None:
    for ret in Ret:
        assert (
            getattr(pynvml, f"NVML_{ret.name}" if ret is Ret.SUCCESS else f"NVML_ERROR_{ret.name}")
            == ret
        )


def test_error_strings_agree_with_pynvmls_table() -> None:
    table = {
        pynvml.NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        pynvml.NVML_ERROR_NOT_FOUND: "Not Found",
    }
    for code, text in table.items():
        assert ERROR_STRINGS[code].decode() == text


def test_symbols_take_attributes_and_missing_ones_raise_attribute_error() -> None:
    lib = FakeNvmlLibrary(SimHost(Scenario.from_toml('[[gpu]]\nproduct = "H100"\n'), ManualClock()))
    lib.nvmlErrorString.restype = ctypes.c_char_p  # what pynvml does
    assert lib.nvmlErrorString(pynvml.NVML_ERROR_NOT_SUPPORTED) == b"Not Supported"
    assert "nvmlDeviceGetComputeRunningProcesses_v3" in lib.symbol_names
    with pytest.raises(AttributeError):
        lib.nvmlDeviceGetTemperature  # noqa: B018


@pytest.mark.parametrize("structure", [ProcessUtilizationSample, ProcessUtilizationInfo])
def test_the_agents_row_reader_reads_what_the_fields_hold(structure: type) -> None:
    # Garbage included: the padded answers of go-nvml#11 hold smUtil 37100 and zero rows.
    rng = random.Random(12)
    rows = (structure * 5)()
    for row in rows:
        for name, kind in structure._fields_:
            setattr(row, name, rng.randrange(2 ** (8 * ctypes.sizeof(kind))))
    reader = nvml._SAMPLE_ROW if structure is ProcessUtilizationSample else nvml._INFO_ROW
    by_offset = sorted(nvml._UTIL_FIELDS, key=lambda n: getattr(structure, n).offset)
    got = list(reader.iter_unpack(nvml._filled(rows, 4)))
    assert got == [tuple(getattr(row, name) for name in by_offset) for row in rows[:4]]
