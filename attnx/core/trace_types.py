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
    layer_readouts:
        With ``gradients``: the gradient of each layer ``l`` is ``∂s^l/∂A^l``, with ``s^l`` the target
        read from layer ``l``'s output tokens through the model's final norm, pooling and head
        (:mod:`attnx.core.layer_readout`; the adapter's
        :meth:`~attnx.adapters.base.Adapter.layer_readout`), differentiated at ``A^l`` only. At the
        last layer ``s^L = y_t``: a method reading the last layer only needs no per-layer readout.
    attention_relevance:
        ``R^A = A ⊙ g̃(A)`` of every layer from an LRP pass; implies ``attentions``.
    input_relevance:
        Relevance at the input (pixels or token embeddings) from an LRP pass.
    hidden_states:
        The tokens each block reads (its input ``h^l``, ``(B, N, D)``) and ``∂y_t/∂h^l`` (a plain
        backward, beside ``dy_t/dA`` when ``gradients``); the model's adapter names its blocks.
    value_outputs:
        With ``hidden_states``: each block's values through its attention's output projection,
        ``W_O v_j`` ``(B, N, D)`` (no bias).
    mlp_branches:
        With ``hidden_states``: each block's feed-forward sublayer, the tokens it reads from the
        residual stream ``E'`` and what it adds to them ``Ẽ'`` (both ``(B, N, D)``).
    path_steps:
        When positive: ``dy_t/dA`` of the last layer averaged over that many extra passes on the
        input scaled by ``α ∈ linspace(0, 1, path_steps)`` (pixels, or the token embeddings).
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
    layer_readouts: bool = False
    attention_relevance: bool = False
    input_relevance: bool = False
    hidden_states: bool = False
    value_outputs: bool = False
    mlp_branches: bool = False
    path_steps: int = 0
    rules: Callable[[], Registry] | None = None
    forward: bool = False

    @property
    def relevance(self) -> bool:
        """Whether an LRP pass runs."""
        return self.attention_relevance or self.input_relevance

    @property
    def backward(self) -> bool:
        """Whether the pass differentiates the target (so a target must exist)."""
        return self.gradients or self.relevance or self.hidden_states or self.path_steps > 0


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
    pooling:
        For a method reading per-layer readouts (``Needs.layer_readouts``): the pooling they use
        (:data:`attnx.core.layer_readout.POOLINGS`; ``"model"``: the model's own).
    """

    rule: Callable[[Mapping[str, Any], Layout, int], int]
    options: Mapping[str, Any] = field(default_factory=dict)
    pooling: str = "model"

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
        ``∂y_t/∂A`` for each layer (same shapes), when needed (``None`` below the :class:`FirstLayer`);
        with ``Needs.layer_readouts``, ``∂s^l/∂A^l`` of each layer's own readout.
    attention_relevance:
        ``R^A`` for each layer (same shapes), when needed (``None`` below the :class:`FirstLayer`).
    hidden_states:
        The input tokens ``h^l`` ``(B, N, D)`` of every block, in forward order, when
        ``Needs.hidden_states`` (``None`` below the :class:`FirstLayer`).
    hidden_gradients:
        ``∂y_t/∂h^l`` for each block (same shapes; ``None`` below the :class:`FirstLayer`).
    value_outputs:
        ``W_O v_j`` ``(B, N, D)`` of every block, when ``Needs.value_outputs`` (``None`` below the
        :class:`FirstLayer`).
    mlp_inputs:
        The tokens ``E'`` ``(B, N, D)`` each block's feed-forward sublayer reads from the residual
        stream, when ``Needs.mlp_branches`` (``None`` below the :class:`FirstLayer`).
    mlp_outputs:
        What each block's feed-forward sublayer adds to them, ``Ẽ'`` ``(B, N, D)`` (same).
    path_gradient:
        ``(B, H, N, N)``: ``dy_t/dA`` of the last layer averaged along the scaled inputs, when
        ``Needs.path_steps``.
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
    folded:
        What a method's :class:`~attnx.core.layer_fold.LayerFold` kept of each layer, when the pass
        folded the layers as the backward reached them (``attentions`` and ``gradients`` are then
        ``None``: released layer by layer).
    folded_heads:
        Whether ``folded`` holds each layer's attention with its heads fused ``(B, N, N)`` by their
        mean or minimum (rollout's and raw attention's folds, :func:`~attnx.core.layer_fold.heads_fused`).
    last_rows:
        ``(B, N)`` float64 row norms of ``∂y_t/∂A`` at the last layer
        (:func:`~attnx.core.layer_fold.row_norms`), kept by a folding pass for the readout check.
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
    hidden_states: list[torch.Tensor | None] | None = None
    hidden_gradients: list[torch.Tensor | None] | None = None
    value_outputs: list[torch.Tensor | None] | None = None
    mlp_inputs: list[torch.Tensor | None] | None = None
    mlp_outputs: list[torch.Tensor | None] | None = None
    path_gradient: torch.Tensor | None = None
    input_relevance: torch.Tensor | None = None
    coverage: Coverage | None = None
    output: Any = None
    target_scores: torch.Tensor | None = None
    explained_tokens: torch.Tensor | None = None
    seeded_relevance: torch.Tensor | None = None
    relevance_scale: torch.Tensor | None = None
    conserving: bool = False
    model_forward: ModelForward | None = None
    folded: list[Any] | None = None
    folded_heads: bool = False
    last_rows: torch.Tensor | None = None
    forward: Any = None
