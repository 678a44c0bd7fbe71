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

from ..core.batch import Batch, check_image_batch
from ..core.layer_fold import KernelCallsMissed
from ..core.layer_readout import LayerReadout
from ..core.layout import Layout
from ..core.recorder import AttentionRecorder
from ..errors import AttnxValueError, UnsupportedModelError
from .base import Adapter, block_output, hidden_states_argument, refuse_pooling
from .fused_kernel import FusedKernelProbe
from .loaded import loaded_class
from .mlp_branch import named_mlp_branches
from .pooling import TimmPooling
from .switches import attribute_switch


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the blocks, in forward order."""
    mods = []
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise UnsupportedModelError(
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
        #: what the head reads (class token, patch mean, distillation pair, max, MAP probe)
        self.pooling = TimmPooling(model)

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
        embed = self.model.patch_embed  # a hybrid model's patch embedding runs a CNN backbone first
        channels = None if hasattr(embed, "backbone") else getattr(getattr(embed, "proj", None), "in_channels", None)
        x = check_image_batch(inputs, channels)
        layout = self.pooling.apply(Layout.for_image(x, self.grid(x), self.prefix_tokens(), None))
        return Batch(args=(x,), kwargs={}, batch_size=x.shape[0], layout=layout, device=x.device)

    # capture ------------------------------------------------------------------------------
    def observe_kernels(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager | None:
        """The blocks' fused kernel kept (``fused_attn``, timm's default) for a pass that folds the
        layers, unless the head is an attention pool (its probabilities are read in the forward)."""
        if not all(getattr(a, "fused_attn", False) for a in self.attentions) or self.pooling.attn_pool is not None:
            return None
        return self._kernel_observation(recorder)

    @contextlib.contextmanager
    def _kernel_observation(self, recorder: AttentionRecorder) -> Iterator[None]:
        self._kernels = True
        try:
            with self.pooling.capture(), FusedKernelProbe(recorder):
                yield
        finally:
            self._kernels = False

    def forward_done(self, recorder: AttentionRecorder) -> None:
        if getattr(self, "_kernels", False) and len(recorder.kernel_calls) != len(self.attentions):
            raise KernelCallsMissed(f"{len(recorder.kernel_calls)} kernel calls for {len(self.attentions)} blocks")

    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            recorder.record(output)

        handles = []
        try:
            with attribute_switch([(a, "fused_attn", False) for a in self.attentions]), self.pooling.capture():
                for a in self.attentions:
                    handles.append(a.attn_drop.register_forward_hook(hook))
                yield
        finally:
            for h in handles:
                h.remove()

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        return self.pooling.complete(super().resolve_layout(batch, num_tokens))

    def block_inputs(self, batch: Batch) -> list:
        return [(block, hidden_states_argument) for block in self.model.blocks]

    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each block's output through ``norm`` and ``forward_head`` (the pooling -- class token,
        patch mean, attention pool --, ``fc_norm`` and the head; a distilled model's two heads
        averaged); ``pooling="mean"``: ``norm`` of the mean of every token, then ``fc_norm`` and the
        head (the batched LeGrad code's readout of a timm ViT)."""
        model = self.model
        if pooling != "model" and (self.pooling.attn_pool is not None or self.pooling.distilled):
            refuse_pooling(self, pooling)

        def head(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
            if pooling == "mean":  # the mean of every token through the final norm, then the head
                out = model.head(model.head_drop(model.fc_norm(model.norm(tokens.mean(dim=1)))))
            else:
                out = model.forward_head(model.norm(tokens))
            if isinstance(out, (tuple, list)):  # distilled models in training mode
                out = (out[0] + out[1]) / 2
            return out, out

        return LayerReadout([(block, block_output) for block in model.blocks], head, own=pooling == "model")

    def value_projections(self, batch: Batch) -> list:
        """The last third of the fused ``qkv`` output, and ``proj``."""
        out = []
        for a in self.attentions:
            if not isinstance(getattr(a, "qkv", None), nn.Linear) or not isinstance(getattr(a, "proj", None), nn.Linear):
                return super().value_projections(batch)
            out.append((a.qkv, lambda args, kwargs, qkv: qkv.chunk(3, dim=-1)[2], a.proj.weight))
        return out

    def mlp_branches(self, batch: Batch) -> list:
        """``norm2``'s input and ``ls2``'s output (the layer scale; an Identity without one)."""
        return named_mlp_branches(self.block_inputs(batch)) or super().mlp_branches(batch)

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        out = self.model(*batch.args, **batch.kwargs)
        if isinstance(out, (tuple, list)):  # distilled models in training mode
            out = (out[0] + out[1]) / 2
        return out, out
