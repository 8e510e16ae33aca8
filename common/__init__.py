"""creditmeter: bills measured GPU compute seconds, per process and per job.

The installed namespace maps onto the repository's top-level folders:
``creditmeter`` (this package, shared code) is ``common/``, ``creditmeter.agent`` is
``agent/``, ``creditmeter.collector`` is ``collector/``, ``creditmeter.v1`` holds the wire
contract generated from ``proto/creditmeter/v1`` and ``creditmeter.simnvml`` is the
simulated NVML library used by tests, the demo and the benchmarks.
"""

__version__ = "0.1.0"
