"""Reading what a pass recorded: the attention stack, the token layout it shows, and the targets
at the explained position. Both passes (:mod:`attnx.core.attention_pass`,
:mod:`attnx.core.relevance_pass`) read their forward with these."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..adapters import adapter_names
from ..adapters.base import Adapter
from ..errors import AttnxValueError, NonFiniteOutputError, UnsupportedModelError
from .batch import Batch
from .layout import Layout, Readout
from .recorder import AttentionRecorder
from .targets import BoundContinuation, ResolvedTarget, Target, resolve_targets

__all__ = ["check_attentions", "explained_position", "patch_layout", "resolve", "resolved_layout"]


def check_attentions(adapter: Adapter, recorder: AttentionRecorder, batch_size: int) -> int:
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
def patch_layout(adapter: Adapter, batch: Batch, patch_size: int) -> Layout:
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


def resolved_layout(adapter: Adapter, batch: Batch, recorder: AttentionRecorder, attentions: bool) -> Layout:
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

def explained_position(layout: Layout, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """``(B,)`` the position whose logits are explained, when the readout is one token per
    sample (sequence logits of a language model are read there); else ``None``."""
    if layout.readout is None or (isinstance(layout.readout, torch.Tensor) and layout.readout.dim() == 2):
        return None
    return Readout(layout, batch_size, device).index


def resolve(target: Target, output: Any, logits: torch.Tensor, layout: Layout, batch_size: int) -> ResolvedTarget:
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
        hint = (" (an attention kernel that computes its softmax in float32, as Hugging Face's eager one does, gives "
                "NaN rows at padded positions of a float64 model)" if logits.dtype == torch.float64 else "")
        raise NonFiniteOutputError(
            f"the explained output of {type(output).__name__} is not finite (NaN or inf) for sample(s) {samples}; "
            f"the model's own attention kernel produced it (check its dtype and the attention mask){hint}"
        )
    return resolved
