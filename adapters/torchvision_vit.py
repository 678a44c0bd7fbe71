"""torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_l_32``, ...).

Each ``EncoderBlock`` calls ``self_attention(x, x, x, need_weights=False)`` on an
``nn.MultiheadAttention``. While observing, a keyword pre-hook asks every one of them for
per-head weights (``need_weights=True, average_attn_weights=False``) and a forward hook records
them. PyTorch returns those weights as a ``(B, H, N, N)`` view of the ``(B*H, N, N)`` softmax
output that the attention product consumed; that base tensor is what gradients are taken of.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .base import Adapter, AttentionRecorder, Batch, check_image_batch

try:
    from torchvision.models.vision_transformer import VisionTransformer as _TvViT
except Exception:  # pragma: no cover
    _TvViT = None


def record_mha_weights(recorder: AttentionRecorder, weights: torch.Tensor) -> None:
    """Record the per-head weights returned by ``F.multi_head_attention_forward``.

    The returned ``(B, H, L, S)`` tensor is a view; its base ``(B*H, L, S)`` is the tensor the
    attention product used, so gradients are taken with respect to the base.
    """
    base = weights._base if weights._base is not None else weights
    if base.numel() != weights.numel():
        base = weights
    recorder.record(weights, grad_wrt=base)


@contextlib.contextmanager
def per_head_weights(modules: list[nn.MultiheadAttention], recorder: AttentionRecorder) -> Iterator[None]:
    """Make ``nn.MultiheadAttention`` modules return and record per-head attention weights."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        module_wants = (kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True))
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = False
        wanted[module] = module_wants
        return args, kwargs

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        out, weights = output
        record_mha_weights(recorder, weights)
        need, average = wanted.pop(module)
        if not need:
            return out, None
        return out, (weights.mean(dim=1) if average else weights)

    wanted: dict[nn.Module, tuple[bool, bool]] = {}
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class TorchvisionViTAdapter(Adapter):
    """Adapter for ``torchvision.models.VisionTransformer``."""

    name = "torchvision_vit"
    expects = "an image batch tensor (B, C, H, W)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _TvViT is not None and isinstance(model, _TvViT)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.attentions = [layer.self_attention for layer in model.encoder.layers]

    def prepare(self, inputs: Any) -> Batch:
        x = check_image_batch(inputs, self.model.conv_proj.in_channels)
        size = self.model.image_size
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if (H, W) != (size, size):
            raise ValueError(f"the model expects {size}x{size} images, got {H}x{W}")
        p = self.model.patch_size
        layout = self.image_layout(x, (H // p, W // p), prefix_tokens=1, readout=0)
        return Batch(args=(x,), kwargs={}, batch_size=x.shape[0], layout=layout, device=x.device)

    def observe(self, recorder: AttentionRecorder):
        return per_head_weights(self.attentions, recorder)

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        out = self.model(*batch.args, **batch.kwargs)
        return out, out
