"""Shards of an evaluation: ``--shard I/N`` jobs, and processes launched by ``torchrun``.

Batches are formed in the dataset order, ``batch_size`` samples each, always the same; a shard
``I/N`` evaluates batches ``I, I + N, I + 2N, ...``. Every sample's numbers depend only on its batch,
so the shards' per-sample results, merged by sample index (:meth:`League.merge`), are the ones a
single process computes, bit for bit (at the same number of threads), and so is the table computed
from them (only the timings differ).

* ``shard="I/N"`` evaluates one shard and returns a partial league; save it (:meth:`League.save`),
  and merge the files of all shards with :meth:`League.merge` (``attnx evaluate --shard I/N`` /
  ``attnx evaluate --merge DIR``).
* Launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment), :func:`attnx.evaluate.evaluate`
  joins the process group (gloo backend, CPU), evaluates shard ``rank/world_size`` with
  ``max(1, cores // world_size)`` threads (the previous thread count is restored afterwards),
  gathers every rank's per-sample results (``all_gather_object``) and returns the merged league on
  every rank.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
from typing import Any, Iterator

import torch

from ..errors import AttnxValueError

__all__ = [
    "all_gather",
    "batch_indices",
    "join_process_group",
    "launched_distributed",
    "parse_shard",
    "rank",
    "shard_file",
    "threads_per_rank",
    "torch_threads",
]


def parse_shard(spec: Any) -> tuple[int, int]:
    """``"I/N"`` or ``(I, N)`` -> ``(I, N)`` with ``0 <= I < N``."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise AttnxValueError(f"a shard is given as I/N (e.g. 0/4: the first of four shards), got {spec!r}")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            i, n = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise AttnxValueError(f"a shard is given as 'I/N' or (I, N), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise AttnxValueError(f"shard {i}/{n}: need 0 <= I < N")
    return i, n


def shard_file(task: str, shard: tuple[int, int]) -> str:
    """File name of a shard's per-sample results: ``samples_<task>.shard-I-of-N.npz``."""
    return f"samples_{task}.shard-{shard[0]}-of-{shard[1]}.npz"


def batch_indices(n: int, batch_size: int, shard: tuple[int, int] | None) -> list[list[int]]:
    """The sample indices of each batch of ``n`` samples that ``shard`` evaluates (``None``: all)."""
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return batches if shard is None else batches[shard[0]::shard[1]]


# ---------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------
def launched_distributed() -> bool:
    """Whether this process was launched as one of several by ``torchrun`` (``WORLD_SIZE > 1``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def join_process_group():
    """``torch.distributed``, its process group initialised (gloo) if it is not yet."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run the shards with --shard I/N instead")
    if not dist.is_initialized():
        # the ranks wait for the slowest shard in the final gather (torchrun stops the others if one fails)
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=24))
        atexit.register(_destroy_process_group)
    return dist


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank under torch.distributed (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_rank() -> int:
    """The cores of this machine shared among the ranks: ``max(1, cores // world_size)``."""
    import torch.distributed as dist

    return max(1, _cores() // dist.get_world_size())


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: as it is), then restore the previous count."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
