"""Defaults per GPU product, so a scenario can say ``product = "H100"`` and nothing more.

The sample period is not documented by NVIDIA; 1/6 s is what data-centre parts show in
practice and older or smaller parts use 1 s. It is rounded to whole µs (the simulator's unit).
"""

from __future__ import annotations

from dataclasses import dataclass

SIXTH_OF_A_SECOND_US = 166_667
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True, slots=True)
class Product:
    name: str  # what nvmlDeviceGetName returns
    sample_period_us: int
    memory_total_bytes: int
    idle_w: float
    busy_w: float
    gpm_supported: bool  # GPM is Hopper and newer
    max_mig_devices: int  # 0: the product has no MIG
    mig_slices: int = 7  # GPC slices a MIG-capable part divides into


PRODUCTS: dict[str, Product] = {
    p.name: p
    for p in (
        Product("NVIDIA H100 80GB HBM3", SIXTH_OF_A_SECOND_US, 81_559 * MIB, 70.0, 700.0, True, 7),
        Product("NVIDIA H100 PCIe", SIXTH_OF_A_SECOND_US, 81_559 * MIB, 50.0, 350.0, True, 7),
        Product("NVIDIA A100-SXM4-80GB", SIXTH_OF_A_SECOND_US, 80 * GIB, 55.0, 400.0, False, 7),
        Product("NVIDIA A100-SXM4-40GB", SIXTH_OF_A_SECOND_US, 40 * GIB, 50.0, 400.0, False, 7),
        Product("NVIDIA L4", SIXTH_OF_A_SECOND_US, 23_034 * MIB, 16.0, 72.0, False, 0),
        Product("Tesla T4", 1_000_000, 15_360 * MIB, 10.0, 70.0, False, 0),
    )
}

ALIASES: dict[str, str] = {
    "H100": "NVIDIA H100 80GB HBM3",
    "H100-PCIE": "NVIDIA H100 PCIe",
    "A100": "NVIDIA A100-SXM4-80GB",
    "A100-40GB": "NVIDIA A100-SXM4-40GB",
    "L4": "NVIDIA L4",
    "T4": "Tesla T4",
}


def find_product(name: str) -> Product | None:
    """The product for a full NVML name or a short alias (case-insensitive), or None."""
    full = ALIASES.get(name.upper(), name)
    return PRODUCTS.get(full)
