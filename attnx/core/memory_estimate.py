"""The peak memory of an explanation, predicted before the pass from the model's sizes.

``attnx.estimate(model, inputs, method=...)`` adds up what one call keeps at its peak, from the
model's shape (:mod:`attnx.core.model_shape`) and what the method's trace keeps, without running
the model. :func:`check_memory` refuses a call whose estimate exceeds the free memory of the
device, before anything is allocated (:class:`attnx.errors.InsufficientMemoryError`).

Units: ``B`` samples, ``N`` tokens, ``L`` layers, ``H`` query heads, ``e`` bytes per computed
element (4; 2 for a half-precision model computed in its own dtype, :mod:`attnx.core.precision`);
``M = B·H·N²·e`` is one layer's attention map. What each method keeps is one entry of
:data:`METHOD_TERMS`; the bytes of each kind of kept tensor are :data:`TERMS`. The formulas were
checked against measured peaks on small models (``benchmarks/memory_estimate.py``, docs/memory.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.fused_kernel import TILE_BYTES
from ..lrp.fused_attention import FusedAttention
from ..lrp.linear import AlphaBeta, Gamma
from ..lrp.registry import get_preset
from ..lrp.rules import Bilinear, Passthrough
from ..methods.registry import get_method, list_methods
from . import free_memory
from .layout import Layout
from .model_shape import InputShape, ModelShape, input_shape, model_shape
from .precision import OWN_PRECISION, check_precision
from .runtime import HALF_DTYPES
from .sub_batches import check_sub_batch, sub_batch_size

__all__ = ["METHOD_TERMS", "TERMS", "MemoryEstimate", "estimate", "method_terms"]

GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """One call's sizes: the model's shape, the inputs' and the first layer the backward reaches."""

    shape: ModelShape
    inputs: InputShape
    first: int = 0

    @property
    def token_bytes(self) -> int:
        """``B·N·e``: one value per token of every sample."""
        return self.inputs.batch * self.inputs.tokens * self.shape.compute_bytes

    @property
    def map_bytes(self) -> int:
        """``M = B·H·N²·e``: one layer's attention map."""
        return self.inputs.batch * self.shape.heads * self.inputs.tokens**2 * self.shape.compute_bytes

    @property
    def layer_activations(self) -> int:
        """What one block's forward keeps for its backward (read from the saved tensors of Llama,
        BERT and timm ViT blocks): the MLP's ``intermediate``-wide outputs (two; four for a gated
        MLP: gate, its activation, up and their product), eight ``hidden``-wide tensors (the norms'
        inputs and outputs, ``q``, ``k``, ``v``, the attention output and its projection's input),
        rotated keys and values of a decoder, and the kernel's log-sum-exp per head."""
        s = self.shape
        head_dim = s.hidden // s.heads
        rotary = 2 * s.kv_heads * head_dim if s.gated_mlp else 0
        width = (4 if s.gated_mlp else 2) * s.intermediate + 8 * s.hidden + rotary + s.heads
        return self.token_bytes * width

    @property
    def logits_bytes(self) -> int:
        """The logits of one position per sample."""
        return self.inputs.batch * self.shape.vocab * self.shape.compute_bytes

    @property
    def read_layers(self) -> int:
        """Layers from the first one the method reads to the last."""
        return self.shape.layers - self.first


# What one call keeps, by kind: bytes at the peak. Each entry is one kind of tensor the trace or
# the pass keeps; the methods' entries below list the kinds they keep.
TERMS: dict[str, tuple[str, Callable[[Sizes], float]]] = {
    "forward": ("the forward's working set without gradients: one block's activations, the logits",
                lambda s: s.layer_activations + s.logits_bytes),
    "forward_backward": ("the model's own forward + backward: every block's activations, one block's gradients",
                         lambda s: (s.shape.layers + 1) * s.layer_activations + s.logits_bytes),
    "attention_maps": ("the attention probabilities of every layer, kept by the trace (eager kernel): L·M",
                       lambda s: s.shape.layers * s.map_bytes),
    "attention_scores": ("the eager kernel's scores and their gradient, one layer at a time: 2·M",
                         lambda s: 2 * s.map_bytes),
    "attention_gradients": ("dy/dA of every layer read: (L - first)·M", lambda s: s.read_layers * s.map_bytes),
    "folded_maps": ("a layer fold's head-fused map of every layer read, kept as the backward reaches it "
                    "(attnx.core.layer_fold): (L - first)·B·N²·4", lambda s: s.read_layers * s.inputs.batch * s.inputs.tokens**2 * 4),
    "one_layer_gradient": ("dy/dA (LeGrad: ∂s^l/∂A^l of its own readout) of the one layer being folded: M",
                           lambda s: s.map_bytes),
    "recomputed_tiles": ("attention left to the model's kernel (attnx.adapters.fused_kernel): A, dy/dA and one "
                         "of their products (dS, the fold's) for one tile of query rows of the layer being folded: "
                         "3·min(TILE_BYTES, M)", lambda s: 3 * min(TILE_BYTES, s.map_bytes)),
    "forward_tiles": ("rollout / raw attention beside the model's kernel (attnx.adapters.fused_kernel): the scores "
                      "and probabilities of one tile of query rows as the forward computes them: 2·min(TILE_BYTES, M)",
                      lambda s: 2 * min(TILE_BYTES, s.map_bytes)),
    "attention_relevance": ("R^A of every layer read: (L - first)·M", lambda s: s.read_layers * s.map_bytes),
    "method_math": ("the method's products over one layer (A ⊙ ∇A, its positive part): 2·M",
                    lambda s: 2 * s.map_bytes),
    "readout_pass": ("a second pass measuring the readout rows of an image model (attentions kept, a backward "
                     "to the last layer): L·M + the activations; none for text, whose readout is declared",
                     lambda s: s.shape.layers * (s.map_bytes + s.layer_activations) if s.shape.patch_size else 0),
    "written_out_attention": ("an attention kernel written out under LRP rules: probabilities and scores kept "
                              "per layer: 1.5·L·M", lambda s: 1.5 * s.shape.layers * s.map_bytes),
    "stabilized_rules": ("Chefer et al.'s stabilised attention products keep about 2 maps per layer for their "
                         "backward: 2·L·M", lambda s: 2 * s.shape.layers * s.map_bytes),
    "signed_weights": ("α-β / γ rules build |W| and W± of one linear layer at a time in the backward: 2 copies "
                       "of the largest weight", lambda s: 2 * s.shape.largest_linear * s.shape.compute_bytes),
    "rule_state": ("LRP rules' saved outputs (ε-rule, normalisations): 0.15 of the activations",
                   lambda s: 0.15 * s.shape.layers * s.layer_activations),
}

#: the kinds of tensors each method keeps at its peak (today's code); a method not listed gets
#: the kinds its :class:`~attnx.core.trace_types.Needs` imply (:func:`method_terms`)
METHOD_TERMS: dict[str, tuple[str, ...]] = {
    "raw_attention": ("forward", "attention_maps", "attention_scores", "readout_pass"),
    "rollout": ("forward", "attention_maps", "attention_scores", "readout_pass"),
    "attention_flow": ("forward", "attention_maps", "attention_scores", "readout_pass"),
    "random": ("forward", "attention_maps", "attention_scores", "readout_pass"),
    # the folding methods: each layer folded as the backward reaches it, then released
    "grad_rollout": ("forward_backward", "attention_maps", "attention_scores", "one_layer_gradient", "folded_maps"),
    "generic": ("forward_backward", "attention_maps", "attention_scores", "one_layer_gradient", "folded_maps"),
    "attn_gradcam": ("forward_backward", "attention_maps", "attention_scores", "one_layer_gradient"),
    # legrad: one short backward per layer averaged, from that layer's readout to its attention
    "legrad": ("forward_backward", "attention_maps", "attention_scores", "one_layer_gradient", "folded_maps"),
    "transformer_attribution": ("forward_backward", "attention_maps", "attention_scores", "attention_gradients",
                                "attention_relevance", "rule_state", "method_math"),
    "partial_lrp": ("forward_backward", "attention_maps", "attention_scores", "attention_relevance", "rule_state"),
    "lrp": ("forward_backward", "rule_state"),
    "gradient_x_input": ("forward_backward",),
}


#: the folding methods that leave the attention to the model's kernel where it can (their folds
#: take a layer in tiles of query rows): what they keep there instead of the maps; rollout and raw
#: attention fold each layer in the forward (no backward), the others in the backward
KERNEL_FOLDS = {
    "generic": ("recomputed_tiles",), "grad_rollout": ("recomputed_tiles",), "attn_gradcam": ("recomputed_tiles",),
    "legrad": ("recomputed_tiles",),
    "rollout": ("folded_maps", "forward_tiles"), "raw_attention": ("folded_maps", "forward_tiles"),
}


def attention_stays_fused(registry: Any, shape: ModelShape) -> bool:
    """Whether an LRP pass under ``registry`` runs the model's attention by its own kernel
    (:class:`attnx.lrp.FusedAttention` or plain gradients on an SDPA model): no map is kept."""
    if registry is None or not shape.fused_kernel:
        return False
    return isinstance(registry.rule_for_function(F.scaled_dot_product_attention, []), (FusedAttention, Passthrough))


def stabilized_products(registry: Any) -> bool:
    """Whether ``registry``'s attention products keep Chefer et al.'s stabilised state per layer."""
    rule = None if registry is None else registry.rule_for_function(torch.matmul, [])
    return isinstance(rule, Bilinear) and bool(getattr(rule, "chefer", False))


def signed_linear_rules(registry: Any) -> bool:
    """Whether ``registry``'s rule for ``nn.Linear`` splits the weights by sign (α-β, γ)."""
    rules = [] if registry is None else [e.rule for e in registry.entries if e.key is nn.Linear]
    return any(isinstance(r, (AlphaBeta, Gamma)) for r in rules)


def method_terms(method: Any, registry: Any, shape: ModelShape) -> tuple[str, ...]:
    """The :data:`TERMS` a call of ``method`` (a :class:`~attnx.methods.registry.Method`) keeps,
    with the LRP ``registry`` of its relevance pass (``None`` without one)."""
    needs = method.needs
    if method.name in METHOD_TERMS:
        terms = list(METHOD_TERMS[method.name])
    else:  # a user's method: what its needs make the trace keep
        grad = needs.gradients or needs.relevance
        terms = ["forward_backward" if grad else "forward"]
        if needs.attentions or needs.gradients or needs.attention_relevance:
            terms += ["attention_maps", "attention_scores"] + ([] if grad else ["readout_pass"])
        terms += ["attention_gradients"] * needs.gradients + ["attention_relevance"] * needs.attention_relevance
        terms += ["rule_state"] * needs.relevance
    if method.name in KERNEL_FOLDS and shape.kernel_folds and registry is None:
        kept = ("attention_maps", "attention_scores", "one_layer_gradient")
        terms = [t for t in terms if t not in kept] + list(KERNEL_FOLDS[method.name])
    observed = "attention_maps" in terms
    if needs.relevance and not observed and not attention_stays_fused(registry, shape):
        terms.append("written_out_attention")
    if needs.relevance and stabilized_products(registry):
        terms.append("stabilized_rules")
    if needs.relevance and signed_linear_rules(registry):
        terms.append("signed_weights")
    return tuple(terms)


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted peak memory of one call, and what it is made of.

    Attributes
    ----------
    method:
        The method estimated.
    weights:
        Bytes of the model's parameters and buffers as stored (already in memory for a loaded model).
    float32_weights:
        Bytes of the float32 casts of half-precision weights held at once by a call computed in
        float32 (each op casts the weights it reads: at most two of each weight shape).
    terms:
        ``{kind: bytes}`` of what the pass keeps at its peak (:data:`TERMS`).
    fits:
        The registered methods (default options) whose estimate fits ``available`` (``None``
        when the free memory is unknown).
    available:
        Free bytes on the device (CPU: ``MemAvailable``; CUDA: ``torch.cuda.mem_get_info``), or ``None``.
    device:
        The device the model's weights are on.
    """

    method: str
    weights: int
    float32_weights: int
    terms: dict[str, int]
    fits: tuple[str, ...] | None = None
    available: int | None = None
    device: str = "cpu"
    shape: ModelShape | None = field(default=None, repr=False)
    inputs: InputShape | None = field(default=None, repr=False)

    @property
    def pass_bytes(self) -> int:
        """Bytes the call allocates above the weights."""
        return self.float32_weights + sum(self.terms.values())

    @property
    def needed(self) -> int:
        """Bytes that must be free: the call's allocations, and the weights too for a model on
        the meta device (planned, not loaded)."""
        return self.pass_bytes + (self.weights if self.device == "meta" else 0)

    @property
    def peak(self) -> int:
        """Predicted peak bytes of the call, weights included."""
        return self.weights + self.pass_bytes

    @property
    def fits_available(self) -> bool | None:
        """Whether the call's own allocations fit the free memory (``None``: unknown)."""
        return None if self.available is None else self.needed <= self.available

    def __str__(self) -> str:
        rows = [f"{self.method}: peak {self.peak / GiB:.2f} GiB (weights {self.weights / GiB:.2f} GiB"
                + (f", float32 casts {self.float32_weights / GiB:.2f} GiB" if self.float32_weights else "") + ")"]
        rows += [f"  {k}: {v / GiB:.3f} GiB" for k, v in self.terms.items()]
        if self.available is not None:
            fits = ", ".join(self.fits or ()) or "none"
            rows.append(f"  available on {self.device}: {self.available / GiB:.2f} GiB; fits: {fits}")
        return "\n".join(rows)


def _device_of(model: nn.Module) -> str:
    p = next(iter(model.parameters()), None)
    return "cpu" if p is None else str(p.device)


def predict(
    method: Any, registry: Any, shape: ModelShape, inputs: InputShape, first: int = 0, own_precision: bool = False
) -> tuple[dict[str, int], int]:
    """``({kind: bytes}, float32 weight bytes)`` of one call of ``method``; ``own_precision``: a
    half-precision model computed in its own dtype (:mod:`attnx.core.precision`)."""
    if own_precision and shape.half_casts:  # computed in the model's own half precision: no casts
        shape = replace(shape, compute_bytes=2)
    sizes = Sizes(shape, inputs, max(0, min(first, shape.layers - 1)))
    terms = {name: int(TERMS[name][1](sizes)) for name in method_terms(method, registry, shape)}
    return terms, 0 if own_precision else shape.half_casts  # float32 casts of float16 / bfloat16 weights


def _first_layer(method: Any, options: dict, shape: ModelShape, inputs: InputShape) -> int:
    """The first layer the method reads under ``options`` (0 when its rule needs the layout)."""
    first = method.first_layer_for(options)
    if first is None:
        return 0
    try:
        layout = Layout(num_tokens=inputs.tokens, prefix_tokens=shape.prefix_tokens, readout=None,
                        grid=(1, inputs.tokens - shape.prefix_tokens) if shape.patch_size else None)
        return first.index(layout, shape.layers)
    except (AttributeError, TypeError, ValueError):  # a rule reading more of the layout than the sizes give
        return 0


def estimate(
    model: nn.Module, inputs: Any, method: str = "rollout", available: int | None = None, precision: str = "auto",
    registry: Any = None, sub_batch: int | str | None = "auto", **options: Any,
) -> MemoryEstimate:
    """The predicted peak memory of ``attnx.explain(model, inputs, method=method, **options)``.

    Computed from the model's sizes and what the method keeps, without running the model (a model
    on the meta device works: plan for a model that does not fit the machine).

    Parameters
    ----------
    model:
        A Hugging Face model, a timm or torchvision ``VisionTransformer``.
    inputs:
        What ``attnx.explain`` would get: token ids, a tokenizer's output or an image batch.
    method:
        A name from :func:`attnx.list_methods`.
    available:
        Free bytes to plan for; default the free memory of the model's device (``None`` for the
        meta device).
    precision:
        As for :func:`attnx.explain`: a half-precision model computed in its own dtype (no float32
        casts of its weights, 2-byte activations) for the methods :mod:`attnx.core.precision` runs so.
    registry:
        The call's LRP rule registry when it is already resolved (else from ``preset``).
    sub_batch:
        As for :func:`attnx.explain`: the peak is that of one share when the batch is explained
        in shares (:mod:`attnx.core.sub_batches`; a target that does not split by sample, a
        callable, runs the batch whole: pass ``sub_batch=None`` to plan for that).
    **options:
        The method's options (``preset``, ``start_layer``, ...).

    Returns
    -------
    :class:`MemoryEstimate`: ``peak`` bytes, the breakdown and the methods that fit ``available``.
    """
    check_precision(precision)
    shape = model_shape(model)
    sizes = input_shape(inputs, shape)
    share = sub_batch_size(model, inputs, check_sub_batch(sub_batch))
    if share is not None and share < sizes.batch:
        sizes = replace(sizes, batch=share)
    half = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    half = half if half in HALF_DTYPES else None
    device = _device_of(model)
    if available is None and device != "meta":
        available = free_memory.free_memory(device)

    def one(name: str, opts: dict, resolved: Any = None) -> tuple[dict[str, int], int]:
        spec = get_method(name)
        method_opts, trace_opts = spec.resolve(opts)
        registry = None
        if spec.needs.relevance:
            registry = resolved or (get_preset(trace_opts["preset"]) if "preset" in trace_opts else spec.needs.rules())
        key = f"{name}:{registry.name}" if "preset" in trace_opts else name
        own = precision == "model" or (precision == "auto" and key in OWN_PRECISION.get(half, ()))
        return predict(spec, registry, shape, sizes, _first_layer(spec, method_opts, shape, sizes), own and half is not None)

    terms, casts = one(method, options, registry)
    fits = None
    if available is not None:
        unloaded = shape.weight_bytes if device == "meta" else 0  # weights to bring in too
        def needed(m: str) -> int:
            kept, casts = one(m, {})
            return unloaded + casts + sum(kept.values())

        fits = tuple(m for m in list_methods() if needed(m) <= available)
    return MemoryEstimate(method, shape.weight_bytes, casts, terms, fits, available, device, shape, sizes)
