"""Sub-batches: a large CPU batch explained in shares whose temporaries glibc keeps for reuse.

glibc's ``malloc`` serves a block above its mmap threshold (at most 32 MiB, ``DEFAULT_MMAP_THRESHOLD_MAX``
on 64-bit) with fresh pages from the kernel and unmaps it on ``free``, and gives the top of its heap
back to the kernel once more than twice that threshold is free there (:mod:`attnx.core.allocator`).
An explanation's passes allocate and free their block activations and gradients many times, so a
batch whose block temporaries are that large pays for zeroing and faulting their pages in at every
layer: Transformer Attribution at batch 16 took 3.7x its forward + backward on ViT-S/16 (MLP
activation ``16 × 197 × 1536`` float32, 19 MB) and 3.0x on ViT-B/16 (39 MB), but 1.5x and 1.8x to
2.2x in two shares of 8 (measured side by side, ``docs/benchmarks.md``). :func:`sub_batch_size` picks the largest
even share of the batch whose largest block temporary (an MLP activation or a layer's attention
map) stays within :data:`SHARE_BYTES`;
the explainer explains the shares one after the other and joins their explanations
(:meth:`attnx.core.explanation.Explanation.concatenate`). Every sample's map is the one its share
gives alone: a sample's explanation never depends on the other samples of its batch.

Only where the cost exists: a model on the CPU under glibc whose thresholds were left as they are
(not after :func:`attnx.reuse_freed_memory`, nor with ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` in the environment); only inputs that split by their first dimension
(an image batch, a tokenizer's output) and targets that split with them (none, a class, one per
sample); ``sub_batch=None`` explains the batch whole, an ``int`` sets the share.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import AttnxValueError, UnsupportedModelError
from . import allocator
from .model_shape import input_shape, model_shape

__all__ = ["SHARE_BYTES", "check_sub_batch", "largest_block_temporary", "split", "sub_batch_size"]

#: the largest block temporary of a share: half of glibc's largest mmap threshold on 64-bit
#: (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB), since blocks of 19 MB were still faulted in again
#: (the heap's top is trimmed beyond twice the threshold; measured on ViT-S/16, module docstring)
SHARE_BYTES = 16 * 2**20


def check_sub_batch(sub_batch: Any) -> int | str | None:
    """``sub_batch`` as given, or one line naming what was expected."""
    if sub_batch is None or sub_batch == "auto":
        return sub_batch
    if isinstance(sub_batch, int) and not isinstance(sub_batch, bool) and sub_batch >= 1:
        return sub_batch
    raise AttnxValueError(f"sub_batch must be 'auto', None or a positive int, got {sub_batch!r}")


def pages_are_fresh() -> bool:
    """Whether large freed blocks go back to the kernel: glibc with its own thresholds."""
    if allocator.reusing() or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    return allocator.glibc() is not None


def fresh_pages_on_cpu(model: nn.Module) -> bool:
    """:func:`pages_are_fresh` for a model on the CPU (other devices have their own allocators)."""
    return pages_are_fresh() and all(p.device.type == "cpu" for p in model.parameters())


def largest_block_temporary(model: nn.Module, inputs: Any) -> tuple[int, int] | None:
    """``(batch size, bytes per sample)`` of the largest tensor a block makes: an MLP activation
    ``(N, intermediate)`` or a layer's attention map ``(heads, N, N)``, in the computation's dtype;
    ``None`` for a model or inputs the memory estimate cannot read."""
    try:
        shape = model_shape(model)
        size = input_shape(inputs, shape)
    except UnsupportedModelError:
        return None
    n = size.tokens
    return size.batch, n * max(shape.intermediate, shape.heads * n) * shape.compute_bytes


def sub_batch_size(model: nn.Module, inputs: Any, sub_batch: int | str | None) -> int | None:
    """How many samples one pass takes, or ``None``: the whole batch (see the module docstring)."""
    if sub_batch is None:
        return None
    if sub_batch != "auto":
        return sub_batch
    if not fresh_pages_on_cpu(model):
        return None
    largest = largest_block_temporary(model, inputs)
    if largest is None:
        return None
    batch, per_sample = largest
    fits = max(1, SHARE_BYTES // max(per_sample, 1))
    if fits >= batch:
        return None
    return math.ceil(batch / math.ceil(batch / fits))  # even shares: 16 -> 8 + 8, not 13 + 3


def batch_size_of(inputs: Any) -> int | None:
    """B of an image batch or of a tokenizer's output (every tensor with the same first size)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else None
    if isinstance(inputs, Mapping):
        sizes = {int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def split_target(target: Any, batch: int, start: int, stop: int) -> Any:
    """The share ``start:stop`` of ``target``; raises ``ValueError`` for a target that does not split
    by sample (a callable, a continuation: the pass reads them for the whole batch)."""
    if target is None or isinstance(target, (int, str)):
        return target
    if isinstance(target, torch.Tensor):
        if target.dim() == 0:
            return target
        if target.dim() == 1 and target.shape[0] == batch:
            return target[start:stop]
    elif isinstance(target, Sequence) and len(target) == batch:
        return target[start:stop]
    raise ValueError("this target does not split by sample")


def split(inputs: Any, target: Any, size: int) -> list[tuple[int, Any, Any]] | None:
    """``(first sample, inputs, target)`` of consecutive shares of at most ``size`` samples, or
    ``None`` when the inputs or the target do not split by sample."""
    batch = batch_size_of(inputs)
    if batch is None or batch <= size:
        return None
    shares = []
    for start in range(0, batch, size):
        stop = min(start + size, batch)
        try:
            part_target = split_target(target, batch, start, stop)
        except ValueError:
            return None
        if isinstance(inputs, torch.Tensor):
            part = inputs[start:stop]
        else:
            part = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
        shares.append((start, part, part_target))
    return shares
