"""How much memory a device has free, and byte counts in words.

CPU: ``MemAvailable`` of ``/proc/meminfo`` (what the kernel can give without swapping), or
``psutil`` (an optional package) where that file is missing; CUDA: ``torch.cuda.mem_get_info``.
"""
from __future__ import annotations

import torch

__all__ = ["free_memory", "human"]


def human(n: float) -> str:
    """``n`` bytes in words: ``"3.20 GiB"``, ``"512.00 MiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def meminfo_available() -> int | None:
    """Free bytes of the machine (``None`` when neither ``/proc/meminfo`` nor ``psutil`` tells)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # optional: systems without /proc
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def free_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device`` (``None`` when unknown: the meta device, an unknown backend)."""
    device = torch.device(device)
    if device.type == "cpu":
        return meminfo_available()
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return None
