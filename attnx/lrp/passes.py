"""One LRP pass of a model under an adapter: input relevance and relevance at the attentions."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..adapters import Adapter, AttentionRecorder, Batch, Layout
from ..capture import check_attentions, evaluation_mode
from ..targets import Target, resolve_targets
from .engine import LRPEngine
from .registry import Registry, get_preset
from .rules import divide_or_zero

__all__ = ["RelevancePass", "relevance_pass"]


@dataclass
class RelevancePass:
    """Result of :func:`relevance_pass`.

    Attributes
    ----------
    input_relevance:
        Relevance at the explained input: ``(B, C, H, W)`` pixels, or ``(B, T, D)`` token
        embeddings.
    attentions:
        Attention probabilities ``A`` per layer, ``(B, H, N, N)`` (when recorded).
    attention_relevance:
        ``R^A = A ⊙ g̃(A)`` per layer (when recorded).
    logits, targets, layout:
        As for :class:`attnx.capture.Captured`.
    coverage:
        The engine's coverage table (text).
    """

    input_relevance: torch.Tensor
    attentions: list[torch.Tensor] | None
    attention_relevance: list[torch.Tensor] | None
    logits: torch.Tensor
    targets: torch.Tensor
    layout: Layout
    coverage: str


def relevance_pass(
    adapter: Adapter,
    batch: Batch,
    target: Target,
    registry: Registry | str,
    *,
    attentions: bool = False,
    strict: bool = False,
) -> RelevancePass:
    """Forward under ``registry``, then one modified backward from the target logits.

    The seed is set by ``registry.seed``: ``"one_hot"`` puts relevance 1 on the target logit
    (Chefer et al.), ``"logit"`` puts the logit's value (so that conservation reads
    Σ input relevance = y_t).
    """
    registry = get_preset(registry)
    if callable(target) and not isinstance(target, torch.Tensor):
        raise TypeError("LRP methods need class targets (int, list or tensor), not a callable")
    model = adapter.model
    recorder = AttentionRecorder()
    embeddings = adapter.input_embeddings()
    with evaluation_mode(model), torch.enable_grad():
        engine = LRPEngine(model, registry, strict=strict)
        with engine:
            if embeddings is not None:
                engine.track_output_of(embeddings)
                root = None
            else:
                root = engine.track(batch.args[0] if batch.args else batch.kwargs["pixel_values"])
                if batch.args:
                    batch = Batch((root, *batch.args[1:]), batch.kwargs, batch.batch_size, batch.layout, batch.device, batch.extra)
                else:
                    batch = Batch(batch.args, {**batch.kwargs, "pixel_values": root}, batch.batch_size, batch.layout, batch.device, batch.extra)
            observe = adapter.observe(recorder) if attentions else contextlib.nullcontext()
            with observe:
                output, logits = adapter.call(batch)
        if root is None:
            if len(engine.roots) != 1:
                raise RuntimeError(f"expected one call of the input embeddings, saw {len(engine.roots)}")
            root = engine.roots[0]
        engine.check_coverage()
        if attentions:
            num_tokens = check_attentions(adapter, recorder, batch.batch_size)
            layout = adapter.resolve_layout(batch, num_tokens)
        else:
            layout = batch.layout if batch.layout is not None else None
        _, classes = resolve_targets(target, output, logits)
        one_hot = torch.zeros_like(logits).scatter_(1, classes[:, None], 1.0)
        seed = divide_or_zero(one_hot, logits.detach()) if registry.seed == "one_hot" else one_hot
        if attentions:
            cut = [i for i, t in enumerate(recorder.grad_wrt) if not t.requires_grad]
            if cut:
                raise ValueError(
                    f"LRP preset {registry.name!r} holds the attention probabilities constant (layers {cut} "
                    "carry no relevance), so there is no relevance at the attentions for "
                    "transformer_attribution / partial_lrp; use a preset that propagates through them, "
                    "e.g. 'chefer2021' or 'attnlrp'"
                )
        wrt = [root] + (list(recorder.grad_wrt) if attentions else [])
        grads = torch.autograd.grad(logits, wrt, seed, allow_unused=True)
    g_root = grads[0] if grads[0] is not None else torch.zeros_like(root)
    input_relevance = (root * g_root).detach()
    attn_rel = None
    probs = None
    if attentions:
        probs = [p.detach() for p in recorder.probs]
        attn_rel = [
            (p * (torch.zeros_like(p) if g is None else g.reshape(p.shape))).detach()
            for p, g in zip(probs, grads[1:])
        ]
    return RelevancePass(input_relevance, probs, attn_rel, logits.detach(), classes, layout, engine.report())
