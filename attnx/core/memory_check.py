"""The memory check before a pass: refuse a call whose estimated peak exceeds the free memory.

:func:`check_memory` compares the free memory of the device (:mod:`attnx.core.free_memory`) with
:func:`attnx.core.memory_estimate.estimate` and raises :class:`attnx.errors.InsufficientMemoryError`
naming both and the methods that fit. The weights
already in memory are not counted again: the call's own allocations are compared with what is free.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InsufficientMemoryError, UnsupportedModelError
from .free_memory import human
from .memory_estimate import estimate

__all__ = ["check_memory"]


def check_memory(
    model: nn.Module, inputs: Any, method: str, options: dict, precision: str = "auto", registry: Any = None
) -> None:
    """Refuse ``method`` on ``inputs`` when its estimated allocations exceed the free memory.

    Models or inputs the estimate cannot read (no config, no patch size) are not checked.
    """
    try:
        plan = estimate(model, inputs, method, precision=precision, registry=registry, **options)
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
