"""FakeNvmlLibrary: stands in for libnvidia-ml.so.1 under the real pynvml.

pynvml looks each C symbol up with ``getattr(nvmlLib, name)`` and calls it with ctypes
arguments; here each symbol is a :class:`Symbol` object (not a bound method: pynvml sets
``restype`` on nvmlErrorString, and a bound method refuses attributes) that runs the
simulated driver and returns an nvmlReturn_t. A symbol the simulated driver lacks is simply
not an attribute, so the lookup raises AttributeError as a real CDLL does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from creditmeter.simnvml import (
    symbols_device,
    symbols_gpm,
    symbols_mig,
    symbols_sampling,
    symbols_system,
)
from creditmeter.simnvml.abi import NvmlFailure
from creditmeter.simnvml.driver import DriverCore
from creditmeter.simnvml.host import SimHost


class Symbol:
    """One C entry point. Calling it runs the simulated driver and returns its result."""

    def __init__(self, name: str, impl: Callable[..., object], library: FakeNvmlLibrary) -> None:
        self.__name__ = name
        self._impl = impl
        self._library = library

    def __call__(self, *args: Any) -> Any:
        lib = self._library
        if lib.before_call is not None:
            lib.before_call(self.__name__)
        started = time.thread_time()
        try:
            return self._impl(lib.core, *args)
        except NvmlFailure as failure:
            return int(failure.code)
        finally:
            lib.account(time.thread_time() - started)


class FakeNvmlLibrary:
    """The simulated NVML shared library of one :class:`SimHost`.

    ``sim_seconds``/``calls`` total the CPU time spent inside the simulator (the calling
    thread's, not in pynvml's wrappers, which run in a real agent too), so a benchmark can
    subtract it from the agent's CPU time: CPU from CPU, where wall time would count the
    machine's other load against the simulator and flatter the agent. ``before_call``, if
    set, is called with each symbol's name before it runs: tests use it to move the clock
    between pynvml's two calls of one query.
    """

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.core = DriverCore(host)
        self.before_call: Callable[[str], None] | None = None
        self.sim_seconds = 0.0
        self.calls = 0
        self._stats_lock = threading.Lock()
        table = {
            **symbols_system.SYMBOLS,
            **symbols_device.symbols(
                has_v3=host.scenario.host.has_v3_symbol,
                has_v2=host.scenario.host.has_v2_symbol,
                # The symbol belongs to the library, not to one GPU: present when any asks.
                accounting_v2=any(g.driver.accounting_v2 for g in host.scenario.gpus),
            ),
            **symbols_sampling.SYMBOLS,
            **symbols_mig.SYMBOLS,
            **symbols_gpm.SYMBOLS,
        }
        for name, impl in table.items():
            setattr(self, name, Symbol(name, impl, self))
        self.symbol_names = tuple(sorted(table))

    def account(self, seconds: float) -> None:
        with self._stats_lock:
            self.sim_seconds += seconds
            self.calls += 1

    def reset_stats(self) -> None:
        with self._stats_lock:
            self.sim_seconds = 0.0
            self.calls = 0

    def library_missing(self) -> bool:
        """Whether the host has no NVML library now (fault ``library_not_found``)."""
        return self.host.faults.active("library_not_found", None, self.host.now_us())
