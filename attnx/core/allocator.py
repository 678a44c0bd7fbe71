"""The CPU memory allocator setting that batched LRP passes need to run at full speed.

An explanation's backward passes create and free many large temporaries (at batch 16 on
ViT-B, MLP activations of 39 MB each). glibc's ``malloc`` serves blocks above its mmap threshold
(at most 32 MB by default) with fresh pages from the kernel and returns them on ``free``, so every
such tensor pays for zeroing and faulting in its pages. The LRP rules reuse their own
temporaries and returned gradients across layers (:meth:`attnx.lrp.relay.Propagation.scratch`,
:meth:`~attnx.lrp.relay.Propagation.output`); what is left are the tensors autograd and the
model's own ops allocate: measured on the benchmark machine, Transformer Attribution on ViT-B/16
at batch 16 takes 2.9x a forward + backward with the default setting and 2.5x with freed memory
kept for reuse. ``attnx.explain`` therefore splits such a batch into shares whose temporaries glibc
keeps (:mod:`attnx.core.sub_batches`: 1.7x) unless this setting is applied.

:func:`reuse_freed_memory` keeps freed memory in the process for the next allocation
(``mallopt`` of the mmap and trim thresholds), as PyTorch's CPU performance guide does by
preloading jemalloc or tcmalloc. It is a process-wide setting, so attnx never applies it by
itself: call it once at the start of a batched run. The cost is a resident size that stays at
its peak instead of shrinking after the call. The same effect without code:
``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment, or
``LD_PRELOAD`` of jemalloc / tcmalloc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["keep_heap_blocks", "reuse_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1


_REUSING = False


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), else ``None`` (macOS, Windows, musl allocate
    differently). Looked up once: ``find_library`` takes about a millisecond, and every CPU call
    of ``attnx.explain`` asks."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None  # only glibc has both


def reusing() -> bool:
    """Whether :func:`reuse_freed_memory` was applied in this process."""
    return _REUSING


def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process (see the module
    docstring). Returns whether the setting was applied: ``False`` where the C library is not
    glibc (macOS, Windows, musl), which allocate differently."""
    global _REUSING
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _REUSING = bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))
    return _REUSING


#: glibc's largest dynamic mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)
MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_heap_blocks() -> None:
    """Let glibc serve blocks of up to 32 MiB from its heap and keep them there, as its own rule
    does after a program frees a block that large: ``malloc`` raises its mmap threshold to the size
    of a freed mmapped block (at most 32 MiB) and its trim threshold to twice that. One block just
    below 32 MiB is allocated (never touched: no page is faulted in) and freed. A pass whose
    largest temporaries are a few MB (the DINOv2 zoo model at batch 2) otherwise keeps the
    starting 128 KiB threshold and faults the pages of every activation in again (2x the time of
    its forward + backward, measured); the pass's own large maps used to raise it by chance. No
    setting is changed: the thresholds stay glibc's dynamic ones."""
    import torch

    block = torch.empty(MMAP_THRESHOLD_MAX - 2**16, dtype=torch.uint8)
    del block
