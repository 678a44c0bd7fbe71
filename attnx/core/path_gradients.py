"""The last layer's attention gradient integrated along scaled inputs (``Needs.path_steps``).

``(1 / S) Σ_{α ∈ linspace(0, 1, S)} ∂y_t/∂A^L (α x)``: ``S`` more attention passes, each on the
input scaled by ``α`` -- the pixels of an image model, the output of the token embedding of a text
model (the position embeddings are not scaled). The explained target is the one of the main pass:
the predicted class there, not at each ``α x``.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters.base import Adapter
from .attention_pass import attention_pass
from .batch import Batch
from .targets import Target
from .trace_types import FirstLayer

__all__ = ["path_gradient"]

LAST_LAYER = FirstLayer(lambda options, layout, num_layers: num_layers - 1)


def path_gradient(adapter: Adapter, batch: Batch, target: Target, classes: torch.Tensor | None, steps: int) -> torch.Tensor:
    """``(B, H, N, N)``: the mean of ``∂y_t/∂A^L`` over the inputs scaled by ``linspace(0, 1, steps)``.

    ``classes``: the classes the main pass explained, used when ``target`` is ``None`` (so every
    scaled input is explained at the same class)."""
    explained = classes if target is None and classes is not None else target
    embeddings = adapter.input_embeddings()
    total = None
    for alpha in torch.linspace(0, 1, steps, dtype=torch.float64).tolist():
        scaled = batch if embeddings is not None else scaled_inputs(batch, alpha)
        with scaled_output(embeddings, alpha):
            trace = attention_pass(adapter, scaled, explained, attentions=True, gradients=True, first_layer=LAST_LAYER)
        g = trace.gradients[-1]
        total = g if total is None else total + g
    return total / steps


def scaled_inputs(batch: Batch, alpha: float) -> Batch:
    """``batch`` with its floating point inputs (pixels) multiplied by ``alpha``."""

    def scale(v: Any) -> Any:
        return v * alpha if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return replace(batch, args=tuple(scale(a) for a in batch.args), kwargs={k: scale(v) for k, v in batch.kwargs.items()})


@contextlib.contextmanager
def scaled_output(module: nn.Module | None, alpha: float) -> Iterator[None]:
    """Multiply the output of ``module`` (the token embedding) by ``alpha`` while active."""
    if module is None:
        yield
        return
    handle = module.register_forward_hook(lambda mod, args, output: output * alpha)
    try:
        yield
    finally:
        handle.remove()
