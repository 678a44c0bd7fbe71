"""The relevance pass: a forward under an LRP rule registry (:class:`attnx.lrp.engine.LRPEngine`),
then one modified backward from the target's scalar to the attention probabilities and the input.

A method that needs both the plain gradient ``dy_t/dA`` and relevance still runs one forward: the
engine keeps the model's own graph beside the rules, a plain backward on it gives ``dy_t/dA`` and
the relevance backward follows on the same graph (:mod:`attnx.lrp.relay`). What the pass is asked
for is one :class:`RelevanceRequest`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..adapters.base import Adapter
from ..adapters.switches import plain_execution
from ..errors import AttnxValueError, UnsupportedModelError
from ..lrp.engine import LRPEngine
from ..lrp.registry import Registry
from ..lrp.relay import carries_relevance, held_constant
from .batch import Batch
from .checkpointing import outside_function_modes
from .devices import maybe_on_device, on_device
from .lrp_seed import relevance_scale, seed_for
from .pass_reading import resolve, resolved_layout
from .recorder import AttentionRecorder
from .runtime import evaluation_mode
from .targets import Target
from .trace_types import FirstLayer, Needs, Trace, lowest_layer

__all__ = ["RelevanceRequest", "relevance_pass"]


@dataclass(frozen=True)
class RelevanceRequest:
    """What one relevance pass records.

    Attributes
    ----------
    registry:
        The LRP rules of the pass.
    strict:
        Raise :class:`attnx.lrp.UncoveredOpError` when a relevance-carrying op matches no rule
        (``False``: warn and proceed with plain gradient x input).
    attention_relevance:
        The relevance at the attention probabilities ``R^A`` of every layer (from ``first_layer`` on).
    input_relevance:
        The relevance at the input (pixels or token embeddings). Without it, both backwards stop
        at the lowest layer they must reach.
    attentions:
        Record the attention probabilities.
    gradients:
        Also ``dy_t/dA`` by a plain backward on the same forward, before the relevance backward.
    first_layer:
        The lowest layer whose gradients / attention relevance are read; ``None``: every layer.
    """

    registry: Registry
    strict: bool = True
    attention_relevance: bool = False
    input_relevance: bool = True
    attentions: bool = False
    gradients: bool = False
    first_layer: FirstLayer | None = None

    @classmethod
    def from_needs(
        cls, needs: Needs, registry: Registry, strict: bool = True, first_layer: FirstLayer | None = None
    ) -> "RelevanceRequest":
        """The request that serves a method's ``needs`` in one forward."""
        return cls(
            registry, strict, attention_relevance=needs.attention_relevance, input_relevance=needs.input_relevance,
            attentions=needs.attentions or needs.gradients, gradients=needs.gradients, first_layer=first_layer,
        )

    @property
    def observes(self) -> bool:
        """Whether the attention probabilities are observed (all three uses need them)."""
        return self.attentions or self.attention_relevance or self.gradients


def relevance_pass(adapter: Adapter, batch: Batch, target: Target, request: RelevanceRequest) -> Trace:
    """Forward under ``request.registry``, then one modified backward from the target's scalar.

    The backward starts at the logits with the seed :func:`attnx.core.lrp_seed.seed_for` gives for
    the target's scalar ``s`` and ``registry.seed``: for a class target exactly the one-hot
    (``"one_hot"``: relevance 1 on the target logit, Chefer et al.) or the logit's value
    (``"logit"``: so that conservation reads Σ input relevance = y_t); for any other target (a
    callable, a continuation) the gradient of ``s`` with respect to the logits (times the logits).
    """
    registry = request.registry
    recorder = AttentionRecorder(batch.batch_size)
    engine = LRPEngine(adapter.model, registry, strict=request.strict, plain_edges=request.gradients)
    # the backwards run inside the forward's rules and switches: checkpointed layers recompute under them
    with evaluation_mode(adapter.model), torch.enable_grad(), \
            forward_under_rules(adapter, batch, engine, recorder, request.observes) as (batch, output, logits, root):
        engine.check_coverage()
        layout = resolved_layout(adapter, batch, recorder, request.observes)
        with outside_function_modes():  # the target's own ops (a difference, a cosine) are not the model's
            resolved = resolve(target, output, logits, layout, batch.batch_size)
        first = lowest_layer(request.first_layer, layout, len(recorder.probs))
        plain_grads = None
        if request.gradients:
            with engine.propagation.plain():
                plain_grads = recorder.gradients(resolved.scores.sum(), retain_graph=True, first=first)
        with outside_function_modes():
            seed = seed_for(target, resolved.scores, logits, registry)
        if request.attention_relevance:
            check_attentions_carry_relevance(recorder, registry, first, request.gradients)
        layers = list(recorder.grad_wrt[first:]) if request.attention_relevance else []
        wrt = ([root] if request.input_relevance else []) + layers
        try:
            with outside_function_modes():  # the rules' backward ops are not the forward's
                grads = list(torch.autograd.grad(logits, wrt, seed, allow_unused=True))
        finally:
            engine.release()
    g_root = grads.pop(0) if request.input_relevance else None
    if request.input_relevance and g_root is None:
        g_root = torch.zeros_like(root)
    probs = [p.detach() for p in recorder.probs] if request.observes else None
    attn_rel = None
    if request.attention_relevance:
        attn_rel = [None] * first + [
            on_device(p * (torch.zeros_like(p) if g is None else g.reshape(p.shape)), batch.device)
            for p, g in zip(probs[first:], grads)
        ]
    logits = logits.detach()
    return Trace(
        logits=resolved.logits.detach(),
        targets=resolved.classes,
        layout=layout,
        batch=batch,
        attentions=None if probs is None else [on_device(p, batch.device) for p in probs],
        gradients=None if plain_grads is None else [maybe_on_device(g, batch.device) for g in plain_grads],
        attention_relevance=attn_rel,
        input_relevance=None if g_root is None else on_device(root * g_root, batch.device),
        coverage=engine.summary(),
        output=output.detach() if isinstance(output, torch.Tensor) else None,
        target_scores=resolved.scores.detach(),
        explained_tokens=resolved.explained_tokens,
        seeded_relevance=on_device((seed * logits).flatten(1).sum(1), batch.device),
        relevance_scale=on_device(relevance_scale(seed, logits, registry.seed), batch.device),
        conserving=registry.conserving,
    )


@contextlib.contextmanager
def forward_under_rules(
    adapter: Adapter, batch: Batch, engine: LRPEngine, recorder: AttentionRecorder, observe: bool
) -> Iterator[tuple[Batch, Any, torch.Tensor, torch.Tensor]]:
    """Run the model under ``engine`` with its input tracked, yielding ``(batch, output, logits, root)``
    (``root`` the tensor the input relevance is measured at: the input, or the output of the
    input embeddings for integer inputs) while the rules and switches are still on."""
    embeddings = adapter.input_embeddings()
    model = adapter.model
    with engine:
        if embeddings is not None:
            engine.track_output_of(embeddings)
            root = None
        else:
            root = engine.track(batch.args[0] if batch.args else batch.kwargs["pixel_values"])
            batch = batch.with_input(root)
        watch = adapter.observe(recorder) if observe else adapter.watch_tokens(recorder, root)
        with watch, plain_execution(model, keep_checkpointing=True):  # inside the engine: its hooks see loaded weights
            output, logits = adapter.call(batch)
            adapter.forward_done(recorder)
            if root is None:
                if len(engine.roots) != 1:
                    raise UnsupportedModelError(
                        f"{type(model).__name__} called its input embeddings ({type(embeddings).__name__}) "
                        f"{len(engine.roots)} times in one forward; the relevance at the input needs exactly one "
                        "call (a model that embeds its inputs more than once has no single input to explain)"
                    )
                root = engine.roots[0]
            yield batch, output, logits, root


def check_attentions_carry_relevance(recorder: AttentionRecorder, registry: Registry, first: int, plain_edges: bool) -> None:
    """Refuse relevance at attention probabilities the rules hold constant (it would read as 0)."""
    # with plain edges every A is in the model's graph: only the tracked ones carry relevance
    cut = [
        i for i, t in enumerate(recorder.grad_wrt)
        if i >= first and (not t.requires_grad or (plain_edges and (held_constant(t) or not carries_relevance(t))))
    ]
    if cut:
        raise AttnxValueError(
            f"LRP preset {registry.name!r} holds the attention probabilities constant (layers {cut} "
            "carry no relevance), so there is no relevance at the attentions for "
            "transformer_attribution / partial_lrp; use a preset that propagates through them, "
            "e.g. 'chefer2021' or 'attnlrp'"
        )
