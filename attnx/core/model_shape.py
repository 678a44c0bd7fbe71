"""The sizes a memory estimate needs, read from a model and its inputs without running the model.

:func:`model_shape` reads the layers, heads, widths and weight bytes from a Hugging Face config, a
timm or torchvision ``VisionTransformer``; :func:`input_shape` reads the batch size and the number
of tokens from the inputs (token ids, an attention mask, or an image batch and the patch size).
Models built on the meta device (``with torch.device("meta"): Model(config)``) are read the same
way, so a plan for a model too large for the machine needs no weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .runtime import CASTS_PER_SHAPE, HALF_DTYPES

__all__ = ["InputShape", "ModelShape", "input_shape", "model_shape"]


@dataclass(frozen=True)
class ModelShape:
    """What the memory formulas read of a Transformer.

    Attributes
    ----------
    layers, hidden, heads, kv_heads, intermediate:
        Blocks, width, query heads, key/value heads (grouped-query attention), MLP width.
    gated_mlp:
        The MLP is ``down(act(gate(x)) * up(x))`` (Llama, Qwen, Gemma): two ``intermediate``-wide
        outputs more are kept for the backward than with ``fc2(act(fc1(x)))``.
    vocab:
        Output classes or vocabulary (the logits of one position per sample are kept).
    weight_bytes:
        Bytes of the parameters and buffers as they are stored.
    half_casts:
        Bytes of the float32 casts a call computed in float32 holds at once for float16 / bfloat16
        weights (:func:`attnx.core.runtime.float32_execution`: at most two of each weight shape).
    compute_bytes:
        Bytes per element of the computation (4 for float32 and half-precision models, 8 for float64).
    patch_size, prefix_tokens:
        For image models: pixels per patch side and class / register tokens (``None`` for text).
    largest_linear:
        Elements of the largest ``nn.Linear`` weight below the output layer (an MLP's).
    fused_kernel:
        The model's attention runs through ``F.scaled_dot_product_attention`` (Hugging Face
        ``sdpa`` / flash kernels, timm's ``fused_attn``), so an LRP preset can keep it fused.
    kernel_folds:
        The folding methods (generic, grad_rollout, attn_gradcam) leave the attention to that
        kernel and recompute each layer's map in the backward (a Hugging Face model on ``sdpa``,
        a timm ViT with ``fused_attn`` and no attention-pool head: :mod:`attnx.adapters.fused_kernel`).
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    gated_mlp: bool
    vocab: int
    weight_bytes: int
    half_casts: int
    compute_bytes: int
    patch_size: int | None = None
    prefix_tokens: int = 0
    fused_kernel: bool = True
    largest_linear: int = 0
    kernel_folds: bool = False


@dataclass(frozen=True)
class InputShape:
    """``batch`` samples of ``tokens`` tokens each."""

    batch: int
    tokens: int


def _weights(model: nn.Module) -> tuple[int, int, int]:
    """``(bytes as stored, bytes of the float32 casts of half-precision weights held at once,
    bytes per computed element)``."""
    tensors = list(model.parameters()) + list(model.buffers())
    stored = sum(t.numel() * t.element_size() for t in tensors)
    half_shapes = {tuple(t.shape) for t in tensors if t.dtype in HALF_DTYPES}
    half = CASTS_PER_SHAPE * 4 * sum(math.prod(shape) for shape in half_shapes)
    compute = 8 if any(t.dtype == torch.float64 for t in tensors) else 4
    return stored, half, compute


def _int(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def _gated(model: nn.Module) -> bool:
    return any(hasattr(m, "gate_proj") and hasattr(m, "up_proj") for m in model.modules())


def _hf_shape(model: nn.Module, config: Any) -> ModelShape | None:
    if getattr(config, "vision_config", None) is not None or getattr(config, "window_size", None) is not None:
        return None  # dual encoders (two towers) and windowed attention have other shapes
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not (isinstance(hidden, int) and isinstance(layers, int) and isinstance(heads, int)):
        return None
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    vocab = getattr(text, "vocab_size", None) or getattr(text, "num_labels", None) or 2
    patch = getattr(text, "patch_size", None)
    stored, half, compute = _weights(model)
    return ModelShape(
        layers=layers, hidden=hidden, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        intermediate=_int(intermediate), gated_mlp=_gated(model), vocab=_int(vocab), weight_bytes=stored,
        half_casts=half, compute_bytes=compute, patch_size=None if patch is None else _int(patch),
        prefix_tokens=0 if patch is None else 1,
        fused_kernel=getattr(text, "_attn_implementation", "sdpa") not in ("eager", None),
        kernel_folds=getattr(text, "_attn_implementation", "sdpa") == "sdpa",
    )


def _timm_shape(model: nn.Module) -> ModelShape | None:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if isinstance(blocks, nn.Sequential) and len(blocks) else None
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None) if attn is not None else None
    if attn is None or not isinstance(fc1, nn.Linear) or not hasattr(model, "patch_embed"):
        return None
    stored, half, compute = _weights(model)
    return ModelShape(
        layers=len(blocks), hidden=fc1.in_features, heads=attn.num_heads, kv_heads=attn.num_heads,
        intermediate=fc1.out_features, gated_mlp=False, vocab=getattr(model, "num_classes", 0) or 1,
        weight_bytes=stored, half_casts=half, compute_bytes=compute,
        patch_size=_int(model.patch_embed.patch_size), prefix_tokens=getattr(model, "num_prefix_tokens", 1),
        fused_kernel=bool(getattr(attn, "fused_attn", False)),
        kernel_folds=all(getattr(b.attn, "fused_attn", False) for b in blocks) and getattr(model, "attn_pool", None) is None,
    )


def _torchvision_shape(model: nn.Module) -> ModelShape | None:
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if not all(hasattr(model, k) for k in ("hidden_dim", "patch_size", "mlp_dim")) or layers is None:
        return None
    heads = next(m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    stored, half, compute = _weights(model)
    return ModelShape(
        layers=len(layers), hidden=model.hidden_dim, heads=heads, kv_heads=heads, intermediate=model.mlp_dim,
        gated_mlp=False, vocab=getattr(model, "num_classes", 1000), weight_bytes=stored, half_casts=half,
        compute_bytes=compute, patch_size=model.patch_size, prefix_tokens=1,
        fused_kernel=False,  # nn.MultiheadAttention: written out by every LRP preset
    )


def model_shape(model: nn.Module) -> ModelShape:
    """The :class:`ModelShape` of a Hugging Face model (from its config), a timm or a torchvision
    ``VisionTransformer``; :class:`attnx.errors.UnsupportedModelError` for other models."""
    config = getattr(model, "config", None)
    shape = _hf_shape(model, config) if config is not None else None
    shape = shape or _timm_shape(model) or _torchvision_shape(model)
    if shape is not None:
        # the output layer's rule computes on the rows its relevance reaches (the targets) only
        largest = max((m.weight.numel() for m in model.modules()
                       if isinstance(m, nn.Linear) and m.out_features != shape.vocab), default=0)
        shape = replace(shape, largest_linear=largest)
    if shape is None:
        raise UnsupportedModelError(
            f"no memory estimate for {type(model).__name__}: expected a Hugging Face model with a config "
            "(hidden_size, num_hidden_layers, num_attention_heads) or a timm / torchvision VisionTransformer"
        )
    return shape


def input_shape(inputs: Any, shape: ModelShape) -> InputShape:
    """Batch size and tokens per sample of ``inputs``: token ids / an attention mask ``(B, T)``, a
    tokenizer's output, or images ``(B, C, H, W)`` cut into ``shape.patch_size`` patches."""
    if isinstance(inputs, Mapping):
        for key in ("input_ids", "attention_mask", "inputs_embeds", "pixel_values"):
            if isinstance(inputs.get(key), torch.Tensor):
                inputs = inputs[key]
                break
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and shape.patch_size:
        B, _, H, W = inputs.shape
        return InputShape(B, (H // shape.patch_size) * (W // shape.patch_size) + shape.prefix_tokens)
    if isinstance(inputs, torch.Tensor) and inputs.dim() in (2, 3):
        return InputShape(int(inputs.shape[0]), int(inputs.shape[1]))
    raise UnsupportedModelError(
        "no memory estimate for these inputs: expected token ids (B, T), a tokenizer's output, or images "
        f"(B, C, H, W) for a model with a patch size, got {type(inputs).__name__}"
    )
