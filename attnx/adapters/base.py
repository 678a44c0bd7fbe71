"""The adapter protocol: what attnx needs to know about one architecture family.

An adapter answers four questions about a model (see ``Adapter``):

1. ``matches(model)`` -- is this model mine?
2. ``observe(recorder)`` -- the reversible switches that make the post-softmax attention
   probabilities of every layer observable during a forward, as tensors inside the autograd
   graph (undone on exit, also on exceptions); see :mod:`attnx.adapters.switches`.
3. ``prepare(inputs)`` -- the token layout for these inputs (prefix tokens, patch grid, padding).
4. ``call(batch)`` -- run the model and return the classification logits ``(B, C)``.

Adapters hold architecture knowledge only; the core types they fill (``Layout``, ``Batch``,
``AttentionRecorder``) live in the attnx core, and they never do explanation math.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..core.batch import Batch
from ..core.layout import Layout
from ..core.recorder import AttentionRecorder
from ..errors import AttnxTypeError

__all__ = ["Adapter"]


class Adapter:
    """Base class of the architecture adapters.

    Subclasses set ``name`` and implement ``matches``, ``prepare``, ``observe`` and ``call``.
    Register new ones with :func:`attnx.adapters.register_adapter`.
    """

    name: ClassVar[str] = "base"
    #: what users can pass as ``inputs``, used in error messages
    expects: ClassVar[str] = "inputs"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, inputs: Any) -> Batch:  # pragma: no cover - abstract
        """Validate ``inputs`` and describe their token layout."""
        raise NotImplementedError

    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:  # pragma: no cover - abstract
        """Make the attention probabilities observable while the context is active."""
        raise NotImplementedError
        yield

    @contextlib.contextmanager
    def watch_tokens(self, recorder: AttentionRecorder, images: torch.Tensor | None = None) -> Iterator[None]:
        """Note the token count of every attention call (and the grid of a patch embedding
        applied to ``images``) without changing how anything is computed.

        Only adapters whose ``prepare`` cannot know the layout (``Batch.layout is None``) need
        this; the others have nothing to watch.
        """
        yield

    def patch_layout(self, batch: Batch, grid: tuple[int, int]) -> Layout:
        """The layout of ``batch`` from the grid of a patch embedding seen by ``watch_tokens``."""
        return batch.layout

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:  # pragma: no cover - abstract
        """Run the model; return its raw output and the logits ``(B, C)``."""
        raise NotImplementedError

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        """The layout of ``batch``, checked against the token count the attention layers saw."""
        if batch.layout.num_tokens != num_tokens:
            raise RuntimeError(
                f"adapter {self.name!r} expected {batch.layout.num_tokens} tokens but the attention "
                f"layers saw {num_tokens}"
            )
        return batch.layout

    def input_embeddings(self) -> nn.Module | None:
        """The module whose output is the first relevance-carrying activation for integer inputs."""
        return None

    def append_continuation(self, batch: Batch, continuation: list[list[int]]) -> tuple[Batch, Any]:
        """``batch`` with each sample's continuation tokens appended after its prompt, and the
        :class:`attnx.core.targets.BoundContinuation` saying where they are (causal language models)."""
        raise AttnxTypeError(
            f"a continuation target needs a causal language model; adapter {self.name!r} "
            f"({type(self.model).__name__}) has none"
        )
