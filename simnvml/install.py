"""Putting the fake library under pynvml, and taking it away. The one place that touches
pynvml's module state.

pynvml's nvmlInit loads ``libnvidia-ml.so.1`` through ``CDLL`` only while ``pynvml.nvmlLib``
is None. To make a missing library look exactly as on a host without the driver, the sim
also stands in for that loader: ``pynvml.CDLL`` becomes a :class:`DriverLoader`, which raises
OSError for ``libnvidia-ml.so.1`` while the host's ``library_not_found`` fault is in force
(pynvml turns that into NVMLError_LibraryNotFound itself) and returns the fake otherwise.
When the fault is in force at install time ``nvmlLib`` stays None; when it starts later,
the fake's nvmlInit detaches it from pynvml (and fails with LIBRARY_NOT_FOUND), so later
nvmlInit calls go through the loader too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pynvml

from creditmeter.simnvml.host import SimHost
from creditmeter.simnvml.library import FakeNvmlLibrary

LIBRARY_NAME = "libnvidia-ml.so.1"


class DriverLoader:
    """Stands in for ``ctypes.CDLL`` inside pynvml; other libraries load for real."""

    def __init__(self, library: FakeNvmlLibrary, real_cdll: Any, previous_lib: Any) -> None:
        self.library = library
        self.real_cdll = real_cdll
        self.previous_lib = previous_lib

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name != LIBRARY_NAME:
            return self.real_cdll(name, *args, **kwargs)
        if self.library.library_missing():
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return self.library


def install(host: SimHost) -> FakeNvmlLibrary:
    """Make pynvml talk to a fake library of ``host`` (replacing any fake installed before)."""
    uninstall()
    library = FakeNvmlLibrary(host)
    loader = DriverLoader(library, pynvml.CDLL, pynvml.nvmlLib)
    library.core.on_library_missing = _detach
    with pynvml.libLoadLock:
        pynvml.CDLL = loader
        pynvml.nvmlLib = None if library.library_missing() else library
        _reset_pynvml()
    return library


def uninstall() -> None:
    """Restore pynvml as it was before :func:`install`; a no-op when nothing is installed."""
    loader = pynvml.CDLL
    if not isinstance(loader, DriverLoader):
        return
    with pynvml.libLoadLock:
        pynvml.CDLL = loader.real_cdll
        pynvml.nvmlLib = loader.previous_lib
        _reset_pynvml()


@contextmanager
def installed(host: SimHost) -> Iterator[FakeNvmlLibrary]:
    library = install(host)
    try:
        yield library
    finally:
        uninstall()


def _detach() -> None:
    """The library vanished from the host: pynvml must load it again (through the loader)."""
    with pynvml.libLoadLock:
        pynvml.nvmlLib = None
        _reset_pynvml()


def _reset_pynvml() -> None:
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml._nvmlLib_refcount = 0
