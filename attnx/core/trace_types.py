"""What a pass is asked for and what it gives: :class:`Needs`, :class:`FirstLayer` and :class:`Trace`.

A method declares its :class:`Needs` once, where it is registered; the lowest layer it reads
depends on its options and on the model, so it travels beside the needs, explicitly, as a
:class:`FirstLayer`. The pass (:func:`attnx.core.trace.run_trace`) fills a :class:`Trace`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..lrp.coverage import Coverage
from ..lrp.registry import Registry
from .batch import Batch
from .forward_check import ModelForward
from .layout import Layout

__all__ = ["FirstLayer", "Needs", "Trace"]


@dataclass(frozen=True)
class Needs:
    """What a method reads from the trace.

    Attributes
    ----------
    attentions:
        The attention probabilities ``A`` of every layer.
    gradients:
        ``dy_t/dA`` of every layer (a plain backward); implies ``attentions``.
    attention_relevance:
        ``R^A = A ⊙ g̃(A)`` of every layer from an LRP pass; implies ``attentions``.
    input_relevance:
        Relevance at the input (pixels or token embeddings) from an LRP pass.
    rules:
        For methods whose LRP rules are fixed: a factory of their
        :class:`~attnx.lrp.registry.Registry` (the others take a ``preset`` option).
    forward:
        A :class:`~attnx.core.target_forward.TargetForward` on ``Trace.forward``: the explained
        target's score for perturbed inputs (pixels or token embeddings) or under manipulated
        attention, computed with the model's own forward on the same batch.
    """

    attentions: bool = False
    gradients: bool = False
    attention_relevance: bool = False
    input_relevance: bool = False
    rules: Callable[[], Registry] | None = None
    forward: bool = False

    @property
    def relevance(self) -> bool:
        """Whether an LRP pass runs."""
        return self.attention_relevance or self.input_relevance


@dataclass(frozen=True)
class FirstLayer:
    """The lowest layer whose gradients / attention relevance a method reads, under its options.

    The backward passes stop there (below it, the entries of ``Trace.gradients`` and
    ``Trace.attention_relevance`` are ``None``), which leaves what is read unchanged.

    Attributes
    ----------
    rule:
        ``rule(options, layout, num_layers)`` -> the layer index (negative counts from the end).
    options:
        The method's options for this call.
    """

    rule: Callable[[Mapping[str, Any], Layout, int], int]
    options: Mapping[str, Any] = field(default_factory=dict)

    def index(self, layout: Layout, num_layers: int) -> int:
        """The first layer the backward passes must reach (0 when the rule names no valid layer:
        the method then reports the bad option itself)."""
        if num_layers == 0:
            return 0
        first = self.rule(self.options, layout, num_layers)
        if not isinstance(first, int) or not -num_layers <= first < num_layers:
            return 0
        return first % num_layers


def lowest_layer(first_layer: FirstLayer | None, layout: Layout, num_layers: int) -> int:
    """:meth:`FirstLayer.index`, 0 (every layer) without one."""
    return 0 if first_layer is None else first_layer.index(layout, num_layers)


@dataclass
class Trace:
    """What one explained pass produced.

    Attributes
    ----------
    logits:
        ``(B, C)`` logits at the explained position, detached (for a language model, the
        next-token logits of the last real token, or of the last prompt token for a continuation).
    targets:
        ``(B,)`` explained class (or token id) per sample, or ``None`` for a callable or a
        continuation target.
    layout:
        The token layout of the batch.
    batch:
        The validated inputs.
    attentions:
        Post-softmax attention of every layer in forward order, each ``(B, H, N, N)``.
    gradients:
        ``∂y_t/∂A`` for each layer (same shapes), when needed (``None`` below the :class:`FirstLayer`).
    attention_relevance:
        ``R^A`` for each layer (same shapes), when needed (``None`` below the :class:`FirstLayer`).
    input_relevance:
        Relevance at the input, ``(B, C, H, W)`` pixels or ``(B, T, D)`` token embeddings, when
        ``Needs.input_relevance``.
    coverage:
        What the LRP pass did with every relevance-carrying op.
    output:
        The raw model output (detached where it is a tensor).
    target_scores:
        ``(B,)`` the explained scalars ``y_t`` (a logit, the callable's value, a continuation's
        summed log-probability), detached.
    explained_tokens:
        ``(B, K)`` for language models: the explained token(s) after the prompt (``-1`` pads
        continuations of different lengths); ``None`` otherwise.
    seeded_relevance:
        ``(B,)`` the relevance an LRP pass put on the logits (``Σ seed ⊙ logits``): what the
        input relevance sums to under a conserving preset.
    relevance_scale:
        ``(B,)`` the size relevance at the logits can take for this seed (``Σ |seed| · max |logit|``
        for a logit seed, ``Σ |seed ⊙ logits|`` for a one-hot seed): a blow-up is measured against it,
        so that a target logit near zero is no false alarm.
    conserving:
        Whether the LRP pass's preset (about) conserves relevance.
    model_forward:
        The model's own forward on the same batch (:mod:`attnx.core.forward_check`), when the pass
        was asked to check that the explained forward is the model's.
    forward:
        The explained target's score for perturbed inputs (:class:`~attnx.core.target_forward.TargetForward`),
        when ``Needs.forward``.
    """

    logits: torch.Tensor
    targets: torch.Tensor | None
    layout: Layout
    batch: Batch | None = None
    attentions: list[torch.Tensor] | None = None
    gradients: list[torch.Tensor] | None = None
    attention_relevance: list[torch.Tensor] | None = None
    input_relevance: torch.Tensor | None = None
    coverage: Coverage | None = None
    output: Any = None
    target_scores: torch.Tensor | None = None
    explained_tokens: torch.Tensor | None = None
    seeded_relevance: torch.Tensor | None = None
    relevance_scale: torch.Tensor | None = None
    conserving: bool = False
    model_forward: ModelForward | None = None
    forward: Any = None
