"""The seam reads NVML's answers through its own ctypes structs: they must lay out exactly as
pynvml's (and nvml.h's), or every field would be read at the wrong offset."""

from __future__ import annotations

import ctypes

import pynvml
import pytest

from creditmeter.agent import nvml


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (nvml._ProcessInfo, pynvml.c_nvmlProcessInfo_v3_t),
        (nvml._UtilizationSample, pynvml.c_nvmlProcessUtilizationSample_t),
        (nvml._Sample, pynvml.c_nvmlSample_t),
        (nvml._Value, pynvml.c_nvmlValue_t),
    ],
)
def test_struct_layouts_match_pynvml(ours: type, theirs: type) -> None:
    assert ctypes.sizeof(ours) == ctypes.sizeof(theirs)
    assert ctypes.alignment(ours) == ctypes.alignment(theirs)
    for name, *_ in ours._fields_:
        assert getattr(ours, name).offset == getattr(theirs, name).offset, name
