"""torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_l_32``, ...).

Each ``EncoderBlock`` calls ``self_attention(x, x, x, need_weights=False)`` on an
``nn.MultiheadAttention``. While observing, a keyword pre-hook asks every one of them for
per-head weights (``need_weights=True, average_attn_weights=False``) and a forward hook records
them. PyTorch returns those weights as a ``(B, H, N, N)`` view of the ``(B*H, N, N)`` softmax
output that the attention product consumed; that base tensor is what gradients are taken of.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.batch import Batch, check_image_batch
from ..core.layer_readout import LayerReadout
from ..core.layout import Layout
from ..core.recorder import AttentionRecorder
from ..errors import AttnxValueError
from .base import Adapter, block_output, hidden_states_argument, mha_value_projection, refuse_pooling
from .loaded import loaded_class
from .mlp_branch import named_mlp_branches
from .switches import per_head_weights


class TorchvisionViTAdapter(Adapter):
    """Adapter for ``torchvision.models.VisionTransformer``."""

    name = "torchvision_vit"
    expects = "an image batch tensor (B, C, H, W)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        tv_vit = loaded_class("torchvision.models.vision_transformer", "VisionTransformer")
        return tv_vit is not None and isinstance(model, tv_vit)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.attentions = [layer.self_attention for layer in model.encoder.layers]

    def prepare(self, inputs: Any) -> Batch:
        x = check_image_batch(inputs, self.model.conv_proj.in_channels)
        size = self.model.image_size
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if (H, W) != (size, size):
            raise AttnxValueError(f"the model expects {size}x{size} images, got {H}x{W}")
        p = self.model.patch_size
        layout = Layout.for_image(x, (H // p, W // p), prefix_tokens=1, readout=0)
        return Batch(args=(x,), kwargs={}, batch_size=x.shape[0], layout=layout, device=x.device)

    def observe(self, recorder: AttentionRecorder):
        return per_head_weights(self.attentions, recorder)

    def block_inputs(self, batch: Batch) -> list:
        return [(layer, hidden_states_argument) for layer in self.model.encoder.layers]

    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each encoder block's output through ``encoder.ln``, the class token and ``heads``."""
        refuse_pooling(self, pooling)
        model = self.model

        def head(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
            out = model.heads(model.encoder.ln(tokens)[:, 0])
            return out, out

        return LayerReadout([(layer, block_output) for layer in model.encoder.layers], head)

    def value_projections(self, batch: Batch) -> list:
        found = [mha_value_projection(a) for a in self.attentions]
        return found if all(found) else super().value_projections(batch)

    def mlp_branches(self, batch: Batch) -> list:
        """``ln_2``'s input and ``mlp``'s output."""
        return named_mlp_branches(self.block_inputs(batch)) or super().mlp_branches(batch)

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        out = self.model(*batch.args, **batch.kwargs)
        return out, out
