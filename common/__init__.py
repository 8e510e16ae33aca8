"""creditmeter: bills measured GPU compute seconds, per process and per job.

The installed namespace maps onto the repository's top-level folders:
``creditmeter`` (this package, shared code) is ``common/``, ``creditmeter.agent`` is
``agent/``, ``creditmeter.collector`` is ``collector/``, ``creditmeter.v1`` holds the wire
contract generated from ``proto/creditmeter/v1`` and ``creditmeter.simnvml`` is the
simulated NVML library used by tests, the demo and the benchmarks.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from creditmeter.jobclient import end_job, job, start_job

# The worker API, imported on first use: `import creditmeter` stays free of grpc.
_LAZY = {"job", "start_job", "end_job"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from creditmeter import jobclient

        return getattr(jobclient, name)
    raise AttributeError(f"module 'creditmeter' has no attribute {name!r}")


__all__ = ["__version__", "end_job", "job", "start_job"]
