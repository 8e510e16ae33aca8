"""One selftest worker process: busy and idle on a GPU in a given rhythm, then it prints the
spans its kernels timed. ``python PATH/selftest_worker.py ORDINAL START PLAN``: START is the
CLOCK_MONOTONIC second the plan starts at (shared by every worker on the host), PLAN a JSON
list of [offset_s, busy_s] phases.

Run as a file, not a module, and it loads ``cuda.py`` from beside itself: a worker then needs
no installed package, only the checkout (bin/gpu-selftest on a bare GPU host).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

KERNEL_NS = 100_000_000  # kernels of 100 ms: a phase ends within one of its end


def kernels_ns(busy_s: float) -> list[int]:
    """A busy phase as back-to-back kernel durations."""
    total = round(busy_s * 1e9)
    full, rest = divmod(total, KERNEL_NS)
    return [KERNEL_NS] * full + ([rest] if rest else [])


def cuda_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_selftest_cuda", Path(__file__).with_name("cuda.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    ordinal, start, plan = int(argv[0]), float(argv[1]), json.loads(argv[2])
    lib = cuda_module()
    try:
        cuda = lib.Cuda(ordinal)
    except (lib.CudaUnavailable, lib.CudaFailed) as exc:
        print(f"selftest worker: {exc}", file=sys.stderr)
        return 3
    try:
        uuid = cuda.uuid()
        spans = []
        for offset_s, busy_s in plan:
            # The workload's own rhythm: idle until the phase's start on the shared clock.
            time.sleep(max(0.0, start + offset_s - time.monotonic()))
            spans += cuda.spin(kernels_ns(busy_s))
    except lib.CudaFailed as exc:
        print(f"selftest worker: {exc}", file=sys.stderr)
        return 1
    finally:
        cuda.close()
    print(json.dumps({"pid": os.getpid(), "uuid": uuid, "spans": spans}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
