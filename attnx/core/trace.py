"""One pass: a forward of the model under its adapter, recording what a method declared it needs.

``run_trace`` is the only place that runs a model for an explanation. It puts the model in eval
mode, makes the attention probabilities observable through the adapter, resolves the targets and
takes gradients with ``torch.autograd.grad`` (no ``.grad`` is left anywhere). When a method needs
relevance, the forward runs under an LRP rule registry (:class:`attnx.lrp.engine.LRPEngine`) and
one modified backward gives the relevance at the attention probabilities and at the input.
A method that needs both the plain gradient ``dy_t/dA`` and relevance still runs one forward:
the engine keeps the model's own graph beside the rules, a plain backward on it gives ``dy_t/dA``
and the relevance backward follows on the same graph (:mod:`attnx.lrp.relay`).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapters import adapter_names
from ..adapters.switches import no_new_forward_hooks, plain_execution
from ..errors import AttnxValueError, DegenerateMapWarning, UnsupportedModelError
from ..lrp.coverage import Coverage
from ..lrp.engine import LRPEngine, is_tracked
from ..lrp.registry import Registry, get_preset
from ..lrp.relay import held_constant
from ..lrp.rules import divide_or_zero
from .batch import READOUT_LOGITS_ONLY, Batch
from .forward_check import ModelForward, model_forward
from .layout import Layout, Readout
from .recorder import AttentionRecorder
from .runtime import eager_compiled, exclusive, float32_execution
from .targets import BoundContinuation, Continuation, Target, is_callable_target, resolve_targets

__all__ = ["Needs", "Trace", "evaluation_mode", "lrp_seed", "run_trace"]


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
    first_layer:
        ``first_layer(layout, num_layers)``: the lowest layer whose gradients / attention
        relevance the method reads; ``None``: every layer. The backward passes then stop there
        (below it, the entries of ``Trace.gradients`` and ``Trace.attention_relevance`` are
        ``None``), which leaves what is read unchanged.
    """

    attentions: bool = False
    gradients: bool = False
    attention_relevance: bool = False
    input_relevance: bool = False
    rules: Callable[[], Registry] | None = None
    first_layer: Callable[[Layout, int], int] | None = None

    def lowest_layer(self, layout: Layout, num_layers: int) -> int:
        """The first layer the backward passes must reach (0 when ``first_layer`` names no valid
        layer: the method then reports the bad option itself)."""
        if self.first_layer is None or num_layers == 0:
            return 0
        first = self.first_layer(layout, num_layers)
        if not isinstance(first, int) or not -num_layers <= first < num_layers:
            return 0
        return first % num_layers

    @property
    def relevance(self) -> bool:
        """Whether an LRP pass runs."""
        return self.attention_relevance or self.input_relevance

    @property
    def plain_pass(self) -> bool:
        """Whether the forward is a plain one (no LRP pass): with relevance, the one forward runs
        under the LRP engine and also gives ``A`` and ``dy_t/dA``."""
        return not self.relevance


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
        ``∂y_t/∂A`` for each layer (same shapes), when needed (``None`` below ``Needs.first_layer``).
    attention_relevance:
        ``R^A`` for each layer (same shapes), when needed (``None`` below ``Needs.first_layer``).
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


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each module's own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def tracked_embeddings(module: nn.Module | None) -> Iterator[None]:
    """Make the output of ``module`` require grad (so a frozen model still has a graph)."""
    if module is None:
        yield
        return

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def with_tracked_inputs(batch: Batch) -> Batch:
    """A copy of ``batch`` whose floating point inputs are leaves that require grad."""

    def track(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().requires_grad_(True)
        return v

    return replace(batch, args=tuple(track(a) for a in batch.args), kwargs={k: track(v) for k, v in batch.kwargs.items()})


def check_attentions(adapter: Any, recorder: AttentionRecorder, batch_size: int) -> int:
    """Check the recorded attentions form one (B, H, N, N) stack; return N."""
    if len(recorder) == 0:
        raise UnsupportedModelError(
            f"no attention was observed in {type(adapter.model).__name__} with adapter {adapter.name!r}: attention "
            f"methods need a model with attention, and attnx's adapters {adapter_names()} found none (the "
            "'intercept' one sees F.scaled_dot_product_attention, F.multi_head_attention_forward and a softmax over "
            "the key axis whose output is multiplied with the values by @, matmul, bmm or einsum); for attention "
            "computed otherwise, register an adapter with attnx.adapters.register_adapter"
        )
    shapes = {tuple(a.shape[-2:]) for a in recorder.probs}
    batches = {a.shape[0] for a in recorder.probs}
    if len(shapes) != 1 or batches != {batch_size} or any(s[0] != s[1] for s in shapes):
        raise UnsupportedModelError(
            f"the attention layers of {type(adapter.model).__name__} are not one stack of global "
            f"self-attentions over {batch_size} samples (token shapes {sorted(shapes)}, leading "
            f"sizes {sorted(batches)}); attention methods need global self-attention (windowed or "
            "hierarchical models: the 'timm_swin' and 'hf_swin' adapters read a Swin model's last "
            "stage when one window covers it; lrp and gradient_x_input read no attention and explain windowed "
            "models too)"
        )
    return shapes.pop()[0]


def run_trace(
    adapter: Any,
    batch: Batch,
    target: Target,
    needs: Needs,
    registry: Registry | str | None = None,
    strict: bool = False,
    patch_size: int | None = None,
    check_forward: bool = False,
) -> Trace:
    """Run ``adapter.model`` on ``batch`` and record what ``needs`` asks for.

    Parameters
    ----------
    adapter:
        The model's :class:`attnx.adapters.Adapter`.
    batch:
        Inputs prepared by that adapter.
    target:
        What to explain (see :func:`attnx.core.targets.resolve_targets`).
    needs:
        What to record.
    registry:
        The LRP rule registry (or preset name) of the relevance pass, when ``needs.relevance``.
    strict:
        Raise instead of warning when a relevance-carrying op matches no rule.
    patch_size:
        Pixels per patch of an image model whose token layout cannot be known (no adapter
        gives it and no attention call shows it): the grid that pixel relevance is pooled on.
    check_forward:
        Also run the model's own forward on the batch (``Trace.model_forward``), to compare.

    The model is explained by one call at a time (other threads wait), eagerly if it was
    compiled in place, and in float32 if it or the inputs are float16 / bfloat16
    (:mod:`attnx.core.runtime`).
    """
    model = adapter.model
    # no_new_forward_hooks: transformers installs output-capturing hooks for good on a model
    # whose config asks for attentions; the model is left as it was found
    with exclusive(model), eager_compiled(model), no_new_forward_hooks(model), float32_execution(model, batch) as batch:
        return one_pass(adapter, batch, target, needs, registry, strict, patch_size, check_forward)


def one_pass(
    adapter: Any,
    batch: Batch,
    target: Target,
    needs: Needs,
    registry: Registry | str | None,
    strict: bool,
    patch_size: int | None,
    check_forward: bool = False,
) -> Trace:
    """:func:`run_trace`'s passes, with the model held for the call."""
    if patch_size is not None:
        batch = replace(batch, layout=patch_layout(adapter, batch, patch_size))
    if isinstance(target, Continuation):
        batch, target = adapter.append_continuation(batch, target.token_ids(batch.batch_size))
    if not callable(target):
        # the target reads the logits at the explained positions only: a language model may skip
        # the output layer elsewhere (a callable sees the whole output, so it gets every position)
        batch = replace(batch, extra={**batch.extra, READOUT_LOGITS_ONLY: True})
    if not needs.relevance:
        trace = plain_pass(adapter, batch, target, attentions=needs.attentions or needs.gradients,
                           gradients=needs.gradients, lowest_layer=needs.lowest_layer)
    elif registry is None:
        raise AttnxValueError("a relevance pass needs an LRP rule registry (preset)")
    else:
        # one forward serves everything: the attentions, dy_t/dA (a plain backward through the
        # model's own graph, kept beside the rules) and the relevance backward
        trace = relevance_pass(
            adapter, batch, target, registry, attentions=needs.attention_relevance, strict=strict,
            observe=needs.attentions or needs.gradients, gradients=needs.gradients,
            input_relevance=needs.input_relevance, lowest_layer=needs.lowest_layer,
        )
    if check_forward:
        read_as = None if is_callable_target(target) else target  # a callable is not called twice

        def read(output: Any, logits: torch.Tensor) -> torch.Tensor:
            return resolve(read_as, output, logits, trace.layout, batch.batch_size).logits

        with evaluation_mode(adapter.model):
            trace.model_forward = model_forward(adapter, batch, read)
    return trace


def on_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``t`` detached, on the device of the inputs: a model dispatched over several devices
    (``accelerate``) computes each layer where its weights are, the explanation lives with the inputs."""
    t = t.detach()
    return t if device is None else t.to(device)


def maybe_on_device(t: torch.Tensor | None, device: torch.device | None) -> torch.Tensor | None:
    """:func:`on_device`, passing ``None`` (a layer the backward did not reach) through."""
    return None if t is None else on_device(t, device)


def explained_position(layout: Layout, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """``(B,)`` the position whose logits are explained, when the readout is one token per
    sample (sequence logits of a language model are read there); else ``None``."""
    if layout.readout is None or (isinstance(layout.readout, torch.Tensor) and layout.readout.dim() == 2):
        return None
    return Readout(layout, batch_size, device).index


def resolve(target: Target, output: Any, logits: torch.Tensor, layout: Layout, batch_size: int):
    """:func:`attnx.core.targets.resolve_targets` at the explained position of ``layout``; a target
    that is not finite (the model produced NaN or inf) raises instead of giving a NaN map."""
    position = explained_position(layout, batch_size, logits.device)
    if logits.dim() == 3 and layout is not None and logits.shape[1] < layout.num_tokens:
        # a language model computed the logits of the last positions only (READOUT_LOGITS_ONLY)
        offset = layout.num_tokens - logits.shape[1]
        position = None if position is None else position - offset
        if isinstance(target, BoundContinuation):
            target = replace(target, positions=target.positions - offset)
    resolved = resolve_targets(target, output, logits, position)
    bad = ~torch.isfinite(resolved.scores.detach())
    if bad.any():
        samples = torch.nonzero(bad).flatten().tolist()
        raise AttnxValueError(
            f"the explained output of {type(output).__name__} is not finite (NaN or inf) for sample(s) {samples}; "
            "the model itself produced it (check its dtype and the attention mask)"
        )
    return resolved


def all_layers(layout: Layout, num_layers: int) -> int:
    return 0


def plain_pass(
    adapter: Any, batch: Batch, target: Target, attentions: bool, gradients: bool,
    lowest_layer: Callable[[Layout, int], int] = all_layers,
) -> Trace:
    """A forward observing the attentions, then ``dy_t/dA`` by ``torch.autograd.grad`` (for the
    layers from ``lowest_layer(layout, num_layers)`` on)."""
    recorder = AttentionRecorder(batch.batch_size)
    model = adapter.model
    grad_mode = torch.enable_grad() if gradients else torch.no_grad()
    if gradients:
        batch = with_tracked_inputs(batch)
    observe = adapter.observe(recorder) if attentions else adapter.watch_tokens(recorder, batch.explained_input)
    with evaluation_mode(model), grad_mode:
        with tracked_embeddings(adapter.input_embeddings() if gradients else None), observe:
            with plain_execution(model):
                output, logits = adapter.call(batch)
        layout = resolved_layout(adapter, batch, recorder, attentions)
        resolved = resolve(target, output, logits, layout, batch.batch_size)
        first = lowest_layer(layout, len(recorder.probs))
        if gradients and not resolved.scores.requires_grad:
            raise AttnxValueError(
                "the target's scalars do not depend on the model output (a callable target returning a constant?); "
                "expected a function of the output, e.g. lambda out: out.logits[:, 3]"
            )
        grads = recorder.gradients(resolved.scores.sum(), first=first) if gradients else None
    detached = output.detach() if isinstance(output, torch.Tensor) else None  # keep no graph alive
    return Trace(
        logits=resolved.logits.detach(),
        targets=resolved.classes,
        layout=layout,
        batch=batch,
        attentions=[on_device(a, batch.device) for a in recorder.probs] if attentions else None,
        gradients=None if grads is None else [maybe_on_device(g, batch.device) for g in grads],
        output=detached,
        target_scores=resolved.scores.detach(),
        explained_tokens=resolved.explained_tokens,
    )


def patch_layout(adapter: Any, batch: Batch, patch_size: int) -> Layout:
    """The layout of an image batch cut into ``patch_size`` patches, for a model whose layout
    is otherwise unknown; an adapter's own layout must agree with it."""
    x = batch.explained_input
    if x is None or x.dim() != 4:
        raise AttnxValueError("patch_size applies to image batches (B, C, H, W)")
    H, W = int(x.shape[-2]), int(x.shape[-1])
    if patch_size <= 0 or H % patch_size or W % patch_size:
        raise AttnxValueError(f"patch_size={patch_size} does not tile {H}x{W} images")
    grid = (H // patch_size, W // patch_size)
    if batch.layout is not None:
        if batch.layout.grid != grid:
            raise AttnxValueError(f"patch_size={patch_size} disagrees with the model's patch grid {batch.layout.grid} for {H}x{W} images")
        return batch.layout
    return Layout.for_image(x, grid, prefix_tokens=0, readout=None)


def resolved_layout(adapter: Any, batch: Batch, recorder: AttentionRecorder, attentions: bool) -> Layout:
    """The layout of ``batch``: checked against the recorded attentions, or, when the adapter
    could not know it beforehand, completed from the patch embedding and the token count the
    attention kernels saw."""
    if attentions:
        return adapter.resolve_layout(batch, check_attentions(adapter, recorder, batch.batch_size))
    if batch.layout is not None:
        return batch.layout
    if recorder.patch_grids:
        h, w = recorder.patch_grids[0]
        # attention over fewer tokens than patches is windowed (Swin): the patch grid is the layout;
        # over more, the grid is the one the attention methods infer from the token count
        if not recorder.token_counts or recorder.token_counts[0] < h * w:
            return adapter.patch_layout(batch, (h, w))
    if recorder.token_counts:
        return adapter.resolve_layout(batch, recorder.token_counts[0])
    raise UnsupportedModelError(
        f"cannot know the patch grid of {type(adapter.model).__name__}: adapter {adapter.name!r} "
        "saw neither an attention call nor a patch embedding; pass patch_size (pixels per patch) or "
        "register an adapter that gives the token layout (attnx.adapters.register_adapter)"
    )


def linear_target_seed(target: Any, scores: torch.Tensor, logits: torch.Tensor, seed: str) -> torch.Tensor:
    """The modified gradient at the logits for a callable target with ``relevance_seed``,
    checked against the target's value (a rule that does not reproduce it would be a silent
    wrong answer)."""
    weights = target.relevance_seed(logits)
    if not isinstance(weights, torch.Tensor) or weights.shape != logits.shape:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise AttnxValueError(f"relevance_seed must return a tensor shaped like the logits {tuple(logits.shape)}, got {got}")
    weights = weights.detach().to(logits.dtype)
    linear = (weights * logits).sum(dim=1)
    tolerance = 1e-4 * (1 + scores.abs()) if logits.dtype != torch.float64 else 1e-9 * (1 + scores.abs())
    if ((linear - scores).abs() > tolerance).any():
        raise AttnxValueError(
            f"relevance_seed of {type(target).__name__} is not the target: Σ w·logits = {linear.tolist()}, "
            f"the target = {scores.tolist()}"
        )
    return divide_or_zero(weights, scores[:, None]) if seed == "one_hot" else weights


def relevance_pass(
    adapter: Any,
    batch: Batch,
    target: Target,
    registry: Registry | str,
    *,
    attentions: bool = False,
    strict: bool = False,
    observe: bool = False,
    gradients: bool = False,
    input_relevance: bool = True,
    lowest_layer: Callable[[Layout, int], int] = all_layers,
) -> Trace:
    """Forward under ``registry``, then one modified backward from the target's scalar.

    ``attentions``: the relevance at the attention probabilities too; ``observe``: record the
    attention probabilities; ``gradients``: also ``dy_t/dA`` by a plain backward on the same
    forward (the engine keeps the model's own graph beside the rules), before the relevance
    backward; ``input_relevance``: the relevance at the input (without it, and for the
    attention layers from ``lowest_layer(layout, num_layers)`` on, both backwards stop at the
    lowest layer they must reach).

    The backward starts at the logits with the seed :func:`lrp_seed` gives for the target's
    scalar ``s`` and ``registry.seed``: for a class target exactly the one-hot (``"one_hot"``:
    relevance 1 on the target logit, Chefer et al.) or the logit's value (``"logit"``: so that
    conservation reads Σ input relevance = y_t); for any other target (a callable, a
    continuation) the gradient of ``s`` with respect to the logits (times the logits).
    """
    registry = get_preset(registry)
    model = adapter.model
    recorder = AttentionRecorder(batch.batch_size)
    embeddings = adapter.input_embeddings()
    observe = observe or attentions or gradients
    with evaluation_mode(model), torch.enable_grad():
        engine = LRPEngine(model, registry, strict=strict, plain_edges=gradients)
        with engine:
            if embeddings is not None:
                engine.track_output_of(embeddings)
                root = None
            else:
                root = engine.track(batch.args[0] if batch.args else batch.kwargs["pixel_values"])
                batch = batch.with_input(root)
            watch = adapter.observe(recorder) if observe else adapter.watch_tokens(recorder, root)
            with watch, plain_execution(model):  # inside the engine: its hooks see loaded weights
                output, logits = adapter.call(batch)
        if root is None:
            if len(engine.roots) != 1:
                raise RuntimeError(f"expected one call of the input embeddings, saw {len(engine.roots)}")
            root = engine.roots[0]
        engine.check_coverage()
        layout = resolved_layout(adapter, batch, recorder, observe)
        resolved = resolve(target, output, logits, layout, batch.batch_size)
        first = lowest_layer(layout, len(recorder.probs))
        plain_grads = None
        if gradients:
            with engine.propagation.plain():
                plain_grads = recorder.gradients(resolved.scores.sum(), retain_graph=True, first=first)
        # a target stating its own rule (attnx.core.similarity); plain autograd (gradient x input) keeps the exact gradient
        if callable(getattr(target, "relevance_seed", None)) and not getattr(registry, "plain_gradient", False):
            seed = linear_target_seed(target, resolved.scores.detach(), logits.detach(), registry.seed)
        else:
            # plain autograd (gradient x input) is the exact gradient whatever the seed sums to: no warning
            seed = lrp_seed(resolved.scores, logits, registry.seed, warn=not getattr(registry, "plain_gradient", False))
        if attentions:
            # with plain edges every A is in the model's graph: only the tracked ones carry relevance
            cut = [
                i for i, t in enumerate(recorder.grad_wrt)
                if i >= first and (not t.requires_grad or (gradients and (held_constant(t) or not is_tracked(t))))
            ]
            if cut:
                raise AttnxValueError(
                    f"LRP preset {registry.name!r} holds the attention probabilities constant (layers {cut} "
                    "carry no relevance), so there is no relevance at the attentions for "
                    "transformer_attribution / partial_lrp; use a preset that propagates through them, "
                    "e.g. 'chefer2021' or 'attnlrp'"
                )
        layers = list(recorder.grad_wrt[first:]) if attentions else []
        wrt = ([root] if input_relevance else []) + layers
        try:
            grads = list(torch.autograd.grad(logits, wrt, seed, allow_unused=True))
        finally:
            engine.release()
    g_root = (grads.pop(0) if input_relevance else None)
    if input_relevance and g_root is None:
        g_root = torch.zeros_like(root)
    probs = attn_rel = None
    if observe:
        probs = [p.detach() for p in recorder.probs]
    if attentions:
        attn_rel = [None] * first + [
            on_device(p * (torch.zeros_like(p) if g is None else g.reshape(p.shape)), batch.device)
            for p, g in zip(probs[first:], grads)
        ]
    if observe:
        probs = [on_device(p, batch.device) for p in probs]
    return Trace(
        logits=resolved.logits.detach(),
        targets=resolved.classes,
        layout=layout,
        batch=batch,
        attentions=probs,
        gradients=None if plain_grads is None else [maybe_on_device(g, batch.device) for g in plain_grads],
        attention_relevance=attn_rel,
        input_relevance=None if g_root is None else on_device(root * g_root, batch.device),
        coverage=engine.summary(),
        output=output.detach() if isinstance(output, torch.Tensor) else None,
        target_scores=resolved.scores.detach(),
        explained_tokens=resolved.explained_tokens,
        seeded_relevance=on_device((seed * logits.detach()).flatten(1).sum(1), batch.device),
        relevance_scale=on_device(relevance_scale(seed, logits.detach(), registry.seed), batch.device),
        conserving=registry.conserving,
    )


def relevance_scale(seed: torch.Tensor, logits: torch.Tensor, kind: str) -> torch.Tensor:
    """``(B,)`` the size of the relevance a seed can put on the logits (see ``Trace.relevance_scale``)."""
    seed, logits = seed.flatten(1), logits.flatten(1)
    if kind == "logit":
        return seed.abs().sum(1) * logits.abs().amax(1)
    return (seed * logits).abs().sum(1)


def lrp_seed(scores: torch.Tensor, logits: torch.Tensor, seed: str, warn: bool = True) -> torch.Tensor:
    """The modified gradient a relevance pass starts from at the logits, for the target's
    scalars ``s`` ``(B,)``.

    The relevance put on the logits ``z`` is ``R_z = ∂s/∂z`` with ``seed="one_hot"`` and
    ``R_z = z ⊙ ∂s/∂z`` with ``seed="logit"``; under the gradient x input convention the returned
    seed is ``R_z / z`` (0 where ``z = 0``), resp. ``∂s/∂z``. For a class target ``s = z_c`` this
    is the one-hot of ``c`` (relevance 1, resp. ``z_c``, on the target logit); for a callable such
    as ``z_a - z_b`` it is ``+1`` / ``-1`` (times the logits); for a continuation, the gradient of
    its summed log-probability. ``∂s/∂z`` follows only the logits: other outputs a callable reads
    (hidden states) are held constant. ``warn``: warn when a ``"logit"`` seed sums to 0 (a
    relevance pass meant to conserve would then show nothing).
    """
    if not scores.requires_grad:
        raise AttnxValueError("the target's scalar does not depend on the model output (it carries no gradient)")
    (grad,) = torch.autograd.grad(scores.sum(), logits, retain_graph=True, allow_unused=True)
    if grad is None:
        raise AttnxValueError(
            "the target does not depend on the logits: LRP methods start the relevance at the logits, "
            "so a callable target must be a function of them"
        )
    if seed == "one_hot":
        return divide_or_zero(grad, logits.detach())
    if seed != "logit":
        raise AttnxValueError(f"unknown LRP seed {seed!r}; expected 'one_hot' or 'logit'")
    total, s = (grad * logits.detach()).reshape(grad.shape[0], -1).sum(1), scores.detach()
    flat = ((total.abs() <= 1e-6 * s.abs()) & (s != 0)).nonzero().flatten().tolist()
    if flat and warn:  # Σ z ∂s/∂z = 0: s does not change with the scale of z (a cosine of a normalised embedding)
        warnings.warn(
            f"the target of sample(s) {flat} does not change with the scale of the logits (e.g. a cosine "
            "similarity of the output), so the relevance seeded with z * ds/dz sums to 0; give the target a "
            "relevance_seed holding the norm constant (attnx.similarity.cosine_to, attnx.image_text.similarity_to)",
            DegenerateMapWarning, stacklevel=5,
        )
    return grad
