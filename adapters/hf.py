"""Hugging Face transformers: ViT/DeiT image classifiers and BERT-family sequence classifiers.

In transformers 5 the attention kernel is chosen by ``config._attn_implementation`` (``sdpa`` by
default) and only the ``eager`` kernel materialises the probabilities. While observing, the model
is switched to ``eager`` (and back to what it was afterwards) and run with
``output_attentions=True``; the returned probabilities are the very tensors the attention
product consumed (dropout is the identity in eval mode), so gradients flow through them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .base import Adapter, AttentionRecorder, Batch, Layout, check_image_batch, check_text_inputs

try:
    from transformers import PreTrainedModel as _HFModel
except Exception:  # pragma: no cover
    _HFModel = None

_HEAD_SUFFIXES = ("ForSequenceClassification", "ForImageClassification", "ForImageClassificationWithTeacher")


def get_attn_implementation(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def set_attn_implementation(model: nn.Module, impl: str | None) -> None:
    if impl is None or get_attn_implementation(model) == impl:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers: the modules read the config at call time
        model.config._attn_implementation = impl


@contextlib.contextmanager
def attn_implementation(model: nn.Module, impl: str) -> Iterator[None]:
    """Switch a Hugging Face model to another attention kernel, restoring the old one on exit."""
    old = get_attn_implementation(model)
    try:
        set_attn_implementation(model, impl)
        yield
    finally:
        set_attn_implementation(model, old)


_HOOKED_MARK = "_output_capturing_hooks_installed"


@contextlib.contextmanager
def no_new_forward_hooks(model: nn.Module) -> Iterator[None]:
    """Remove the forward hooks a call adds to ``model`` and its submodules.

    With ``output_attentions=True`` transformers 5 installs its output-capturing forward hooks on
    the first call and keeps them for good (marking the model with ``_output_capturing_hooks_installed``);
    explaining must leave the model as it was found.
    """
    before = {m: set(m._forward_hooks) for m in model.modules()}
    marked = {m for m in model.modules() if _HOOKED_MARK in m.__dict__}
    try:
        yield
    finally:
        for m in model.modules():
            for key in set(m._forward_hooks) - before.get(m, set()):
                for hooks in (m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called):
                    hooks.pop(key, None)
            if m not in marked and _HOOKED_MARK in m.__dict__:
                del m.__dict__[_HOOKED_MARK]


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
        self._recorder: AttentionRecorder | None = None

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
                raise ValueError(f"expected 'pixel_values' in the image inputs, got keys {sorted(inputs)}")
            inputs = inputs["pixel_values"]
        cfg = self.model.config
        x = check_image_batch(inputs, getattr(cfg, "num_channels", None))
        p = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the model's patch size {p}")
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size,) * 2
        kwargs = {"pixel_values": x}
        if (H, W) != tuple(size):
            kwargs["interpolate_pos_encoding"] = True
        layout = self.image_layout(x, (H // p, W // p), self._vision_prefix_tokens(), readout=0)
        return Batch(args=(), kwargs=kwargs, batch_size=x.shape[0], layout=layout, device=x.device)

    def input_embeddings(self) -> nn.Module | None:
        return self.model.get_input_embeddings() if self.is_text else None

    # capture ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        with attn_implementation(self.model, "eager"), no_new_forward_hooks(self.model):
            self._recorder = recorder
            try:
                yield
            finally:
                self._recorder = None

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        kwargs = dict(batch.kwargs)
        if self._recorder is not None:
            kwargs["output_attentions"] = True
        out = self.model(**kwargs, return_dict=True)
        if self._recorder is not None:
            attentions = getattr(out, "attentions", None)
            if not attentions:
                raise RuntimeError(
                    f"{type(self.model).__name__} returned no attentions with the eager kernel; "
                    "try adapter='generic'"
                )
            for a in attentions:
                self._recorder.record(a)
        return out, out.logits
