"""One pass: a forward of the model under its adapter, recording what a method declared it needs.

``run_trace`` is the only place that runs a model for an explanation (the dual encoders' embeddings
of :mod:`attnx.core.image_text` included). It holds the model for the call (one call at a time,
eager: :mod:`attnx.core.runtime`; in float32 or a half-precision model's own dtype:
:mod:`attnx.core.precision`), puts it in eval mode, and
runs one of two passes:

* :func:`attnx.core.attention_pass.attention_pass` -- a plain forward observing the attention
  probabilities, then ``dy_t/dA`` by ``torch.autograd.grad``;
* :func:`attnx.core.relevance_pass.relevance_pass` -- a forward under an LRP rule registry and one
  modified backward to the attention probabilities and the input (``dy_t/dA`` from the same forward).

A method may also ask for the last layer's ``dy_t/dA`` integrated along scaled inputs
(:mod:`attnx.core.path_gradients`): more attention passes after the main one.
Methods that perturb the inputs get the explained target's score for perturbed copies of the
batch (:class:`attnx.core.target_forward.TargetForward` on ``Trace.forward``).

The types are in :mod:`attnx.core.trace_types`, the relevance seed in :mod:`attnx.core.lrp_seed`,
what both passes read of their forward in :mod:`attnx.core.pass_reading`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..adapters.base import Adapter
from ..adapters.switches import no_new_forward_hooks
from ..errors import AttnxValueError
from ..lrp.registry import Registry
from .attention_pass import attention_pass
from .batch import READOUT_LOGITS_ONLY, Batch
from .forward_check import model_forward
from .layer_fold import LayerFold
from .pass_reading import patch_layout, resolve
from .path_gradients import path_gradient
from .precision import explained_in, in_float32
from .relevance_pass import RelevanceRequest, relevance_pass
from .runtime import eager_compiled, evaluation_mode, exclusive
from .target_forward import TargetForward
from .targets import Continuation, Target, is_callable_target
from .trace_types import FirstLayer, Needs, Trace

__all__ = ["FirstLayer", "Needs", "Trace", "run_trace"]


def run_trace(
    adapter: Adapter,
    batch: Batch,
    target: Target,
    needs: Needs,
    registry: Registry | None = None,
    strict: bool = True,
    patch_size: int | None = None,
    check_forward: bool = False,
    first_layer: FirstLayer | None = None,
    fold: LayerFold | None = None,
    precision: str = "auto",
    method: str | None = None,
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
        The LRP rule registry of the relevance pass, when ``needs.relevance``; for a pass that
        reads no relevance, the rules of a modified gradient (LibraGrad) that the gradients it
        records (``dy_t/dA``, ``dy_t/dh``, a perturbed forward's) are taken through.
    strict:
        Raise instead of warning when a relevance-carrying op matches no rule.
    patch_size:
        Pixels per patch of an image model whose token layout cannot be known (no adapter
        gives it and no attention call shows it): the grid that pixel relevance is pooled on.
    check_forward:
        Also run the model's own forward on the batch (``Trace.model_forward``), to compare.
    first_layer:
        The lowest layer whose gradients / attention relevance the method reads (the backward
        passes stop there); ``None``: every layer.
    fold:
        What the method keeps of each layer (:mod:`attnx.core.layer_fold`): the attention pass
        folds each layer as the backward reaches it and releases it; ignored by a relevance pass.
    precision:
        ``"auto"``, ``"model"`` or ``"float32"``: the precision a float16 / bfloat16 model (or
        input) is computed in (:mod:`attnx.core.precision`); the trace's tensors are float32.
    method:
        The method the pass serves (``"<method>:<preset>"`` with a preset), for ``precision="auto"``.

    The model is explained by one call at a time (other threads wait), eagerly if it was
    compiled in place (:mod:`attnx.core.runtime`).
    """
    model = adapter.model
    # no_new_forward_hooks: transformers installs output-capturing hooks for good on a model
    # whose config asks for attentions; the model is left as it was found
    with exclusive(model), eager_compiled(model), no_new_forward_hooks(model), \
            explained_in(model, batch, precision, needs.relevance, method) as batch:
        trace = one_pass(adapter, batch, target, needs, registry, strict, patch_size, check_forward, first_layer, fold)
    return in_float32(trace)


def one_pass(
    adapter: Adapter,
    batch: Batch,
    target: Target,
    needs: Needs,
    registry: Registry | None,
    strict: bool,
    patch_size: int | None,
    check_forward: bool,
    first_layer: FirstLayer | None,
    fold: LayerFold | None = None,
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
        # a registry given to a pass that reads no relevance holds the rules of a modified
        # gradient (LibraGrad): the gradients the pass records are taken through them
        trace = attention_pass(adapter, batch, target, attentions=needs.attentions or needs.gradients,
                               gradients=needs.gradients, first_layer=first_layer, fold=fold, tokens=needs.hidden_states,
                               value_outputs=needs.value_outputs, mlp_branches=needs.mlp_branches, rules=registry,
                               strict=strict, layer_readouts=needs.layer_readouts)
    elif needs.layer_readouts:
        raise AttnxValueError("the relevance pass does not read per-layer readouts; a method reads one or the other")
    elif needs.hidden_states:
        raise AttnxValueError("the relevance pass does not record the blocks' tokens; a method reads one or the other")
    elif registry is None:
        raise AttnxValueError("a relevance pass needs an LRP rule registry (preset)")
    else:
        # one forward serves everything: the attentions, dy_t/dA (a plain backward through the
        # model's own graph, kept beside the rules) and the relevance backward
        trace = relevance_pass(adapter, batch, target, RelevanceRequest.from_needs(needs, registry, strict, first_layer))
    if needs.path_steps > 0:
        trace.path_gradient = path_gradient(adapter, batch, target, trace.targets, needs.path_steps)
    if needs.forward:
        trace.forward = TargetForward(adapter, batch, target, trace.layout, trace.target_scores, trace.targets,
                                      rules=None if needs.relevance else registry, strict=strict)
    if check_forward:
        read_as = None if is_callable_target(target) else target  # a callable is not called twice

        def read(output: Any, logits: torch.Tensor) -> torch.Tensor:
            return resolve(read_as, output, logits, trace.layout, batch.batch_size).logits

        with evaluation_mode(adapter.model):
            trace.model_forward = model_forward(adapter, batch, read)
    return trace
