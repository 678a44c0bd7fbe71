"""The memory check before a pass: refuse a call whose estimated peak exceeds the free memory.

:func:`free_memory` reads what the device has free (CPU: ``MemAvailable`` of ``/proc/meminfo``,
or ``psutil`` where that file is missing; CUDA: ``torch.cuda.mem_get_info``); :func:`check_memory`
compares it with :func:`attnx.core.memory_estimate.estimate` and raises
:class:`attnx.errors.InsufficientMemoryError` naming both and the methods that fit. The weights
already in memory are not counted again: the call's own allocations are compared with what is free.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InsufficientMemoryError, UnsupportedModelError

__all__ = ["check_memory", "free_memory", "human"]



def human(n: float) -> str:
    """``n`` bytes in words: ``"3.20 GiB"``, ``"512.0 MiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def _meminfo_available() -> int | None:
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
        return _meminfo_available()
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def check_memory(model: nn.Module, inputs: Any, method: str, options: dict) -> None:
    """Refuse ``method`` on ``inputs`` when its estimated allocations exceed the free memory.

    Models or inputs the estimate cannot read (no config, no patch size) are not checked.
    """
    from .memory_estimate import estimate

    try:
        plan = estimate(model, inputs, method, **options)
    except UnsupportedModelError:
        return
    if plan.fits_available is not False:
        return
    fits = ", ".join(plan.fits) if plan.fits else "none"
    raise InsufficientMemoryError(
        f"method {method!r} needs about {human(plan.needed)} beyond the weights in memory ({plan.needed:,} bytes; peak "
        f"{human(plan.peak)}) but {human(plan.available)} ({plan.available:,} bytes) are free on {plan.device}; methods that "
        f"fit: {fits} (shorter inputs or a smaller batch fit too; check_memory=False skips this check)"
    )
