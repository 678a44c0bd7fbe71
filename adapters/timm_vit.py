"""timm ``VisionTransformer`` family: ViT, DeiT (distilled too), register tokens, pooled heads.

timm's ``Attention`` uses ``F.scaled_dot_product_attention`` by default (``fused_attn=True``), so
the probabilities never exist as a tensor. While observing, every attention module runs its
explicit path (``fused_attn=False``), where the probabilities pass through ``attn_drop`` (an
``nn.Dropout``, the identity in eval mode); a forward hook on ``attn_drop`` records them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import AttnxValueError
from ..batch import Batch, check_image_batch
from ..layout import Layout
from ..recorder import AttentionRecorder
from .base import Adapter
from .loaded import loaded_class
from .switches import attribute_switch

#: pooling modes whose readout is the class token; the others pool the patch tokens
_TOKEN_POOLS = ("token",)
_PATCH_POOLS = ("avg", "max", "avgmax", "")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the blocks, in forward order."""
    mods = []
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise AttnxValueError(
                f"timm block {type(block).__name__} has no 'attn.attn_drop'; this timm attention "
                "layout is not supported by the timm adapter (try adapter='intercept')"
            )
        mods.append(attn)
    return mods


class TimmViTAdapter(Adapter):
    """Adapter for ``timm.models.vision_transformer.VisionTransformer`` and its subclasses."""

    name = "timm_vit"
    expects = "an image batch tensor (B, C, H, W)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        timm_vit = loaded_class("timm.models.vision_transformer", "VisionTransformer")
        return timm_vit is not None and isinstance(model, timm_vit)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.attentions = _attention_modules(model)
        pool = getattr(model, "global_pool", "token")
        if pool not in _TOKEN_POOLS + _PATCH_POOLS:
            raise AttnxValueError(
                f"timm model with global_pool={pool!r} (attention pooling) is not supported: its "
                "readout is not a token of the encoder"
            )
        self.pool = pool

    # layout -------------------------------------------------------------------------------
    def prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1 if self.model.cls_token is not None else 0))

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        pe = self.model.patch_embed
        H, W = int(x.shape[-2]), int(x.shape[-1])
        dynamic = getattr(self.model, "dynamic_img_size", False)
        if not dynamic:
            expected = tuple(int(s) for s in pe.img_size)
            if (H, W) != expected and not getattr(pe, "dynamic_img_pad", False):
                raise AttnxValueError(
                    f"the model expects {expected[0]}x{expected[1]} images, got {H}x{W}; create it "
                    "with dynamic_img_size=True to explain other sizes"
                )
            return tuple(int(g) for g in pe.grid_size)
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(int(g) for g in pe.dynamic_feat_size((H, W)))
        ph, pw = pe.patch_size
        return (H // ph, W // pw)

    def prepare(self, inputs: Any) -> Batch:
        x = check_image_batch(inputs, getattr(self.model.patch_embed.proj, "in_channels", None))
        readout = 0 if (self.pool in _TOKEN_POOLS and self.prefix_tokens() > 0) else None
        layout = Layout.for_image(x, self.grid(x), self.prefix_tokens(), readout)
        return Batch(args=(x,), kwargs={}, batch_size=x.shape[0], layout=layout, device=x.device)

    # capture ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            recorder.record(output)

        handles = []
        try:
            with attribute_switch([(a, "fused_attn", False) for a in self.attentions]):
                for a in self.attentions:
                    handles.append(a.attn_drop.register_forward_hook(hook))
                yield
        finally:
            for h in handles:
                h.remove()

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        out = self.model(*batch.args, **batch.kwargs)
        if isinstance(out, (tuple, list)):  # distilled models in training mode
            out = (out[0] + out[1]) / 2
        return out, out
