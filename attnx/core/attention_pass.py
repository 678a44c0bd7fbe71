"""The attention pass: a plain forward observing the attention probabilities (and, when asked, the
tokens every block reads), then ``dy_t/dA`` (and ``dy_t/dh``) by one ``torch.autograd.grad`` (no
``.grad`` is left anywhere). Methods that need no relevance run on it;
:func:`attnx.core.trace.run_trace` decides which pass runs."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters.base import Adapter
from ..adapters.switches import plain_execution
from ..errors import AttnxValueError, UnsupportedModelError
from ..lrp.engine import LRPEngine
from ..lrp.registry import Registry
from .batch import Batch
from .block_tokens import check_block_tokens, recorded_block_tokens, recorded_mlp_branches, recorded_value_outputs
from .checkpointing import outside_function_modes
from .devices import maybe_on_device, on_device
from .forward_check import tolerance
from .layer_fold import KernelCallsMissed, LayerFold, fold_backward, fold_kernel_backward, forward_folder
from .layer_readout import LayerReadout, layer_gradients, recorded_layer_outputs
from .layout import Layout, Readout
from .pass_reading import resolve, resolved_layout
from .recorder import AttentionRecorder
from .runtime import evaluation_mode
from .targets import Target
from .trace_types import FirstLayer, Trace, lowest_layer

__all__ = ["attention_pass"]


def attention_pass(
    adapter: Adapter, batch: Batch, target: Target, attentions: bool, gradients: bool,
    first_layer: FirstLayer | None = None, fold: LayerFold | None = None,
    tokens: bool = False,
    value_outputs: bool = False,
    mlp_branches: bool = False,
    rules: Registry | None = None,
    strict: bool = True,
    layer_readouts: bool = False,
) -> Trace:
    """A forward observing the attentions (``attentions``) and the tokens every block reads
    (``tokens``), then ``dy_t/dA`` (``gradients``) and ``dy_t/dh`` (``tokens``) for the layers from
    ``first_layer`` on (every layer without one); ``value_outputs`` (with ``tokens``): ``W_O v_j`` of every block;
    ``mlp_branches`` (with ``tokens``): every block's feed-forward input and branch output.

    With a ``fold`` (and ``gradients``), each layer is folded as the backward reaches it and its
    attention and gradient released: the trace holds ``folded`` and ``last_rows`` instead of
    ``attentions`` and ``gradients`` (:mod:`attnx.core.layer_fold`).

    With ``rules`` (a :class:`~attnx.lrp.registry.Registry` of a modified gradient, LibraGrad's)
    the forward runs under the LRP engine with the explained input tracked, and the gradients are
    taken through the rules (``strict``: an op the rules leave uncovered is refused).

    With ``layer_readouts`` (and ``gradients``), the gradient of each layer ``l`` is ``∂s^l/∂A^l`` of
    its own readout (:mod:`attnx.core.layer_readout`), when the method reads a layer below the
    last one or another pooling than the model's; at the last layer with the model's pooling it
    is ``dy_t/dA^L`` itself, and the model's adapter need not read intermediate layers.

    A pass that only folds layers (a ``fold``, nothing else recorded) leaves the attention to the
    model's fused kernel where the adapter can (``Adapter.observe_kernels``,
    :mod:`attnx.adapters.fused_kernel`): each layer's ``A`` is recomputed in the backward and
    folded (with ``gradients``), or computed beside the kernel in the forward and folded (without:
    rollout, raw attention), and no layer's map is kept. So does a pass under ``rules`` that hold
    the probabilities constant (LibraGrad, :meth:`~attnx.lrp.registry.Registry.attention_held_constant`):
    the engine's rule for each attention call prunes its ``q``, ``k`` paths and the kernel it runs
    is folded with the gradient LibraGrad gives its output."""
    kernel = (fold is not None and (gradients or attentions)
              and not (tokens or value_outputs or mlp_branches)
              and (rules is None or rules.attention_held_constant()) and not adapter.kernel_calls_missed)
    options = dict(first_layer=first_layer, fold=fold, tokens=tokens, value_outputs=value_outputs,
                   mlp_branches=mlp_branches, rules=rules, strict=strict, layer_readouts=layer_readouts)
    if kernel:
        try:
            return observed_pass(adapter, batch, target, attentions, gradients, kernel=True, **options)
        except KernelCallsMissed:
            adapter.kernel_calls_missed = True  # the next calls on this model go the written-out way at once
    return observed_pass(adapter, batch, target, attentions, gradients, kernel=False, **options)


def observed_pass(
    adapter: Adapter, batch: Batch, target: Target, attentions: bool, gradients: bool, kernel: bool,
    first_layer: FirstLayer | None, fold: LayerFold | None, tokens: bool, value_outputs: bool, mlp_branches: bool,
    rules: Registry | None, strict: bool, layer_readouts: bool,
) -> Trace:
    """:func:`attention_pass`; ``kernel``: the attention left to the model's kernel where the adapter can."""
    recorder = AttentionRecorder(batch.batch_size)
    model = adapter.model
    backward = gradients or tokens
    grad_mode = torch.enable_grad() if backward else torch.no_grad()
    if backward:
        batch = with_tracked_inputs(batch)
    pooling = "model" if first_layer is None else first_layer.pooling
    readouts, refused = per_layer_readouts(adapter, batch, pooling) if gradients and layer_readouts else (None, None)
    # a readout that runs the whole model again per layer keeps the written-out path: on the kernel
    # path its forwards measured slower under glibc's default allocator (the DINOv2 zoo model)
    kernel = kernel and not (readouts is not None and readouts.reruns)
    observe = adapter.observe_kernels(recorder) if kernel else None
    on_kernel = observe is not None
    if observe is not None and not gradients:
        recorder.forward_folder = forward_folder(fold)
    if observe is None:
        observe = adapter.observe(recorder) if attentions else adapter.watch_tokens(recorder, batch.explained_input)
    blocks = recorded_block_tokens(adapter.block_inputs(batch), recorder) if tokens else contextlib.nullcontext()
    values = recorded_value_outputs(adapter.value_projections(batch), recorder) if value_outputs else contextlib.nullcontext()
    branches = recorded_mlp_branches(adapter.mlp_branches(batch), recorder) if mlp_branches else contextlib.nullcontext()
    outputs = contextlib.nullcontext() if readouts is None else recorded_layer_outputs(readouts.blocks, recorder)
    engine = LRPEngine(model, rules, strict=strict) if rules is not None and backward else None
    # the backward runs inside the switches: checkpointed layers recompute under them
    # under rules, the kernel probe sits below the engine: the engine's rule for the attention call
    # (its q, k paths pruned) runs first, and the kernel it calls is the one the probe folds
    kernel_first = contextlib.nullcontext()
    if engine is not None and on_kernel:
        kernel_first, observe = observe, contextlib.nullcontext()
    with evaluation_mode(model), grad_mode, kernel_first, engine if engine is not None else contextlib.nullcontext():
        if engine is not None:
            batch = tracked_by(engine, adapter, batch)
        with tracked_embeddings(adapter.input_embeddings() if backward else None), observe, blocks, values, branches, \
                outputs:
            with plain_execution(model, keep_checkpointing=backward):
                output, logits = adapter.call(batch)
                adapter.forward_done(recorder)
                if recorder.forward_folder is not None and not recorder.kernel_calls:
                    raise KernelCallsMissed("no attention call reached the kernel")  # e.g. MHA's fast path
                if engine is not None:
                    engine.check_coverage()
                layout = resolved_layout(adapter, batch, recorder, attentions)
                if tokens:
                    check_block_tokens(recorder, layout, batch.batch_size, model)
                with outside_function_modes():  # the target's own ops are not the model's
                    resolved = resolve(target, output, logits, layout, batch.batch_size)
                first = lowest_layer(first_layer, layout, len(recorder.probs) or len(recorder.tokens))
                if backward and not resolved.scores.requires_grad:
                    raise AttnxValueError(
                        "the target's scalars do not depend on the model output (a callable target returning a "
                        "constant?); expected a function of the output, e.g. lambda out: out.logits[:, 3]"
                    )
                grads = token_grads = folded = last_rows = None
                if recorder.forward_folder is not None:
                    folded = recorder.forward_folder.folded
                n = len(recorder.probs)
                if layer_readouts and gradients and (first < n - 1 or pooling != "model"):
                    if refused is not None:
                        raise refused
                    if tokens:
                        raise AttnxValueError("per-layer readouts and the blocks' tokens are not read in one pass")
                    readout = declared_readout(adapter, layout, resolved.classes, batch.batch_size, resolved.logits.device)
                    kept, last_rows = layer_gradients(
                        recorder, readouts, target, resolved, layout, resolve, first, fold, readout, tolerance(resolved.logits)
                    )
                    folded, grads = (kept, None) if fold is not None else (None, kept)
                elif gradients and fold is not None and not tokens:
                    readout = declared_readout(adapter, layout, resolved.classes, batch.batch_size, resolved.logits.device)
                    folding = fold_kernel_backward if recorder.kernel_calls else fold_backward
                    folded, last_rows = folding(recorder, resolved.scores.sum(), fold, readout, first)
                elif backward:
                    grads, token_grads = recorder.all_gradients(
                        resolved.scores.sum(), first=first, attentions=gradients, tokens=tokens
                    )
                if engine is not None:
                    engine.release()
    keep_attentions = attentions and folded is None
    detached = output.detach() if isinstance(output, torch.Tensor) else None  # keep no graph alive
    # the layers below the first one read are not kept
    hidden = [None if i < first else maybe_on_device(t.detach(), batch.device) for i, t in enumerate(recorder.tokens)]
    return Trace(
        logits=resolved.logits.detach(),
        targets=resolved.classes,
        layout=layout,
        batch=batch,
        attentions=[on_device(a, batch.device) for a in recorder.probs] if keep_attentions else None,
        gradients=[maybe_on_device(g, batch.device) for g in grads] if gradients and grads is not None else None,
        hidden_states=hidden if tokens else None,
        hidden_gradients=[maybe_on_device(g, batch.device) for g in token_grads] if tokens else None,
        value_outputs=[None if i < first else maybe_on_device(v, batch.device) for i, v in enumerate(recorder.value_outputs)]
        if value_outputs else None,
        mlp_inputs=[None if i < first else maybe_on_device(t, batch.device) for i, t in enumerate(recorder.mlp_inputs)]
        if mlp_branches else None,
        mlp_outputs=[None if i < first else maybe_on_device(t, batch.device) for i, t in enumerate(recorder.mlp_outputs)]
        if mlp_branches else None,
        output=detached,
        target_scores=resolved.scores.detach(),
        explained_tokens=resolved.explained_tokens,
        folded=None if folded is None else [kept_on_device(k, batch.device) for k in folded],
        folded_heads=folded is not None and heads_fused_by_all(fold),
        last_rows=last_rows,
    )


def heads_fused_by_all(fold: LayerFold) -> bool:
    """Whether ``fold`` keeps each layer's attention with its heads fused so that a row attending
    only to itself in every head is such a row of the fused map too (the mean or the minimum)."""
    return getattr(fold.rule, "heads_fused", False) and fold.options.get("head_fusion", "mean") in ("mean", "min")


def tracked_by(engine: LRPEngine, adapter: Adapter, batch: Batch) -> Batch:
    """``batch`` with its explained input tracked by ``engine`` (the pixels, or the output of the
    token embeddings), so that the rules apply to every op computed from it."""
    embeddings = adapter.input_embeddings()
    if embeddings is not None:
        engine.track_output_of(embeddings)
        return batch
    return batch.with_input(engine.track(batch.explained_input))
def per_layer_readouts(adapter: Adapter, batch: Batch, pooling: str) -> tuple[LayerReadout | None, UnsupportedModelError | None]:
    """The adapter's per-layer readouts for ``batch``, or the reason it gives none (raised only if
    the method reads a layer below the last one or another pooling: the last layer needs none)."""
    try:
        return adapter.layer_readout(batch, pooling), None
    except UnsupportedModelError as refused:
        return None, refused


def declared_readout(adapter: Adapter, layout: Layout, classes: torch.Tensor | None, batch_size: int,
                     device: torch.device) -> Readout | None:
    """The readout the explainer will settle on, when the model declares it (for the explained
    classes); ``None`` when it is measured after the pass (:mod:`attnx.core.readout`)."""
    if classes is not None:
        layout = adapter.target_readout(layout, classes)
    return Readout(layout, batch_size, device) if layout.readout_declared else None


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


def kept_on_device(kept: Any, device: torch.device | None) -> Any:
    """What a fold kept of a layer, its tensors on the batch's ``device`` (as the attentions are)."""
    if isinstance(kept, torch.Tensor):
        return on_device(kept, device)
    if isinstance(kept, tuple):
        return tuple(kept_on_device(k, device) for k in kept)
    return kept
