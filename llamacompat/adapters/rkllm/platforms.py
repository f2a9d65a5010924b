"""CPU settings per Rockchip chip for RKLLMExtendParam (1.2.0+).

The runtime runs its CPU-side work (sampling, tokenizing) on the cores in
``enabled_cpus_mask``; Rockchip's demos pin it to the big cores. The NPU core
count is fixed when the model is converted (``num_npu_core``), not here.
"""

from __future__ import annotations

__all__ = ["PLATFORMS", "cpu_settings", "detect_platform"]

# chip -> the CPUs to use, big cores first (Rockchip's demos: CPU4-7 on RK3588/RK3576)
PLATFORMS: dict[str, tuple[int, ...]] = {
    "rk3588": (4, 5, 6, 7),  # 4x Cortex-A76 (4-7) + 4x A55 (0-3); NPU: 3 cores
    "rk3576": (4, 5, 6, 7),  # 4x Cortex-A72 (4-7) + 4x A53 (0-3); NPU: 2 cores
    "rk3562": (0, 1, 2, 3),  # 4x Cortex-A53; NPU: 1 core
}


def detect_platform(compatible: str = "/proc/device-tree/compatible") -> str | None:
    """The chip named in the device tree ("rockchip,rk3588"), when this is a Rockchip board."""
    try:
        with open(compatible, "rb") as handle:
            names = handle.read().decode("ascii", "replace").split("\0")
    except OSError:
        return None
    for name in names:
        chip = name.rpartition(",")[2]
        if chip in PLATFORMS:
            return chip
    return None


def cpu_settings(platform: str | None, n_threads: int) -> tuple[int, int] | None:
    """(enabled_cpus_num, enabled_cpus_mask), or None to keep the runtime's default.

    ``n_threads`` > 0 takes that many CPUs: the chip's preferred ones first, then CPU 0, 1, ...
    """
    preferred = PLATFORMS.get(platform or "", ())
    if n_threads <= 0 and not preferred:
        return None
    count = n_threads if n_threads > 0 else len(preferred)
    cpus = list(preferred) + [cpu for cpu in range(max(count, 8)) if cpu not in preferred]
    chosen = cpus[:count]
    mask = 0
    for cpu in chosen:
        mask |= 1 << cpu
    return len(chosen), mask
