"""Hugging Face transformers: ViT/DeiT image classifiers and BERT-family sequence classifiers.

In transformers 5 the attention kernel is chosen by ``config._attn_implementation`` (``sdpa`` by
default) and only the ``eager`` kernel materialises the probabilities. While observing, the model
is switched to ``eager`` (and back to what it was afterwards) and run with
``output_attentions=True``; the returned probabilities are the very tensors the attention
product consumed (dropout is the identity in eval mode), so gradients flow through them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..errors import AttnxValueError, UnsupportedModelError
from ..batch import Batch, check_image_batch, check_text_inputs
from ..layout import Layout
from ..recorder import AttentionRecorder
from .base import Adapter
from .switches import attn_implementation, no_new_forward_hooks

try:
    from transformers import PreTrainedModel as _HFModel
except Exception:  # pragma: no cover
    _HFModel = None

_HEAD_SUFFIXES = ("ForSequenceClassification", "ForImageClassification", "ForImageClassificationWithTeacher")


class HFAdapter(Adapter):
    """Adapter for Hugging Face ``*ForImageClassification`` and ``*ForSequenceClassification`` models."""

    name = "hf"
    expects = (
        "the dict a Hugging Face tokenizer returns (input_ids, attention_mask, ...) for text models, "
        "or a pixel_values tensor (B, C, H, W) for image models"
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            _HFModel is not None
            and isinstance(model, _HFModel)
            and type(model).__name__.endswith(_HEAD_SUFFIXES)
        )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.is_text = type(model).__name__.endswith("ForSequenceClassification")
        self._calls = threading.local()  # the recorder of the call in progress, per thread

    @property
    def _recorder(self) -> AttentionRecorder | None:
        """The recorder of this thread's observed call, if one is in progress."""
        return getattr(self._calls, "recorder", None)

    # layout -------------------------------------------------------------------------------
    def _vision_prefix_tokens(self) -> int:
        emb = getattr(getattr(self.model, self.model.base_model_prefix, self.model), "embeddings", None)
        n = 0
        if emb is not None and getattr(emb, "cls_token", None) is not None:
            n += 1
        if emb is not None and getattr(emb, "distillation_token", None) is not None:
            n += 1
        n += int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        return max(n, 1)

    def prepare(self, inputs: Any) -> Batch:
        if self.is_text:
            kwargs = check_text_inputs(inputs)
            ids = kwargs["input_ids"]
            mask = kwargs.get("attention_mask")
            layout = Layout(
                num_tokens=ids.shape[1],
                prefix_tokens=0,
                readout=0,
                valid=None if mask is None else mask.bool(),
            )
            return Batch(args=(), kwargs=kwargs, batch_size=ids.shape[0], layout=layout, device=ids.device)
        if isinstance(inputs, Mapping):
            if "pixel_values" not in inputs:
                raise AttnxValueError(f"expected 'pixel_values' in the image inputs, got keys {sorted(inputs)}")
            inputs = inputs["pixel_values"]
        cfg = self.model.config
        x = check_image_batch(inputs, getattr(cfg, "num_channels", None))
        p = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if H % p or W % p:
            raise AttnxValueError(f"image size {H}x{W} is not a multiple of the model's patch size {p}")
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size,) * 2
        kwargs = {"pixel_values": x}
        if (H, W) != tuple(size):
            kwargs["interpolate_pos_encoding"] = True
        layout = Layout.for_image(x, (H // p, W // p), self._vision_prefix_tokens(), readout=0)
        return Batch(args=(), kwargs=kwargs, batch_size=x.shape[0], layout=layout, device=x.device)

    def input_embeddings(self) -> nn.Module | None:
        return self.model.get_input_embeddings() if self.is_text else None

    # capture ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        with attn_implementation(self.model, "eager"), no_new_forward_hooks(self.model):
            self._calls.recorder = recorder
            try:
                yield
            finally:
                self._calls.recorder = None

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        kwargs = dict(batch.kwargs)
        if self._recorder is not None:
            kwargs["output_attentions"] = True
        out = self.model(**kwargs, return_dict=True)
        if self._recorder is not None:
            attentions = getattr(out, "attentions", None)
            if not attentions:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} returned no attention probabilities with the eager kernel; "
                    "adapter='intercept' sees its attention kernels instead"
                )
            for a in attentions:
                self._recorder.record(a)
        return out, out.logits
