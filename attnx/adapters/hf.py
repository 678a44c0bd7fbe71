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

from ..core.batch import Batch, check_image_batch, check_text_inputs
from ..core.layer_fold import KernelCallsMissed
from ..core.layer_readout import LayerReadout
from ..core.layout import Layout
from ..core.recorder import AttentionRecorder
from ..errors import AttnxValueError, UnsupportedModelError
from .base import Adapter, block_output, hidden_states_argument, refuse_pooling
from .fused_kernel import FusedKernelProbe
from .loaded import loaded_class
from .mlp_branch import named_mlp_branches
from .switches import attn_implementation, get_attn_implementation, no_new_forward_hooks

_HEAD_SUFFIXES = ("ForSequenceClassification", "ForImageClassification", "ForImageClassificationWithTeacher")


def layer_stack(module: nn.Module, config: Any) -> list:
    """The blocks of a Hugging Face encoder or decoder (``encoder.layer``, ``layers``, ``h``): the one
    ``nn.ModuleList`` of ``config.num_hidden_layers`` modules, each read at its ``hidden_states``."""
    depth = getattr(config, "num_hidden_layers", None)
    stacks = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(stacks) != 1:
        raise UnsupportedModelError(
            f"{type(module).__name__}: found {len(stacks)} module lists of its {depth} layers, expected one; "
            "its blocks' token representations cannot be recorded"
        )
    return [(block, hidden_states_argument) for block in stacks[0]]


#: the value and output projections of a Hugging Face attention, by their names inside a block
VALUE_NAMES = ("attention.self.value", "attention.value", "v_proj", "v_lin")
OUTPUT_NAMES = ("attention.output.dense", "o_proj", "out_proj", "out_lin")


def only_linear(modules: dict, names: tuple) -> nn.Module | None:
    """The one ``nn.Linear`` among ``modules`` named (or ending in) one of ``names``, else ``None``."""
    found = [m for n, m in modules.items() for s in names if n == s or n.endswith("." + s)]
    return found[0] if len(found) == 1 and isinstance(found[0], nn.Linear) else None


def value_projections(blocks: list, config: Any) -> list:
    """Per block: its value projection (a ``nn.Linear``; grouped key/value heads repeated to every
    head), and the weight of its output projection; ``[]`` when a block has no such pair."""
    heads = getattr(config, "num_attention_heads", None)
    out = []
    for block, _ in blocks:
        modules = dict(block.named_modules())
        value, output = only_linear(modules, VALUE_NAMES), only_linear(modules, OUTPUT_NAMES)
        if value is None or output is None or not heads:
            return []
        groups, head_dim = output.in_features // value.out_features, output.in_features // heads

        def read(args: tuple, kwargs: dict, v: torch.Tensor, groups: int = groups, head_dim: int = head_dim) -> torch.Tensor:
            if groups == 1:
                return v
            B, N, _ = v.shape
            return v.reshape(B, N, -1, head_dim).repeat_interleave(groups, dim=2).reshape(B, N, -1)

        out.append((value, read, output.weight))
    return out


class HFAdapter(Adapter):
    """Adapter for Hugging Face ``*ForImageClassification`` and ``*ForSequenceClassification`` models."""

    name = "hf"
    expects = (
        "the dict a Hugging Face tokenizer returns (input_ids, attention_mask, ...) for text models, "
        "or a pixel_values tensor (B, C, H, W) for image models"
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        hf_model = loaded_class("transformers.modeling_utils", "PreTrainedModel")
        return (
            hf_model is not None
            and isinstance(model, hf_model)
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
        name = type(self.model).__name__
        if name.startswith(("Siglip", "IJepa")):  # no class token
            return 0
        if name.startswith(("CLIP", "MetaClip")):  # CLIP's class token is its "class_embedding"
            return 1
        emb = getattr(getattr(self.model, self.model.base_model_prefix, self.model), "embeddings", None)
        n = 0
        if emb is not None and getattr(emb, "cls_token", None) is not None:
            n += 1
        if emb is not None and getattr(emb, "distillation_token", None) is not None:
            n += 1
        n += int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        return n if emb is not None else 1

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
        cfg = getattr(self.model.config, "vision_config", None) or self.model.config
        if not isinstance(getattr(cfg, "patch_size", None), (int, tuple, list)) or not hasattr(cfg, "image_size"):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} is not a ViT-like encoder over one patch grid (its config has no "
                "patch_size); attention methods need global self-attention over the patches (lrp and "
                "gradient_x_input explain it with adapter='intercept' when its attention is observable)"
            )
        x = check_image_batch(inputs, getattr(cfg, "num_channels", None))
        p = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if H % p or W % p:
            raise AttnxValueError(f"image size {H}x{W} is not a multiple of the model's patch size {p}")
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size,) * 2
        kwargs = {"pixel_values": x}
        if (H, W) != tuple(size):
            kwargs["interpolate_pos_encoding"] = True
        layout = self.image_readout(Layout.for_image(x, (H // p, W // p), self._vision_prefix_tokens(), readout=0))
        return Batch(args=(), kwargs=kwargs, batch_size=x.shape[0], layout=layout, device=x.device)

    def image_readout(self, layout: Layout) -> Layout:
        """``layout`` with the rows the image classifier's head reads (its forward's pooling).

        ``ViT``, ``ViTMSN``, ``DeiT``: the class token. ``DeiT...WithTeacher``: the mean of the
        class and distillation heads' logits, rows 0 and 1 weighing 1/2 each. ``BEiT`` /
        ``Data2VecVision`` with ``use_mean_pooling``, ``CLIP``, ``SigLIP`` and ``IJepa`` (which have
        no class token or skip it): the mean of the patch rows. ``Dinov2`` (with registers too): the classifier reads
        ``[CLS; mean(patches)]``; the class row weighs the share of the classifier's gradient
        (its weight rows) on the CLS half, the patch rows share the rest equally
        (:meth:`target_readout`, per target).
        """
        name, cfg, N, p = type(self.model).__name__, self.model.config, layout.num_tokens, layout.prefix_tokens
        if name.endswith("WithTeacher"):
            weights = torch.zeros(1, N, dtype=torch.float64)
            weights[0, :2] = 0.5
            layout.readout, layout.readout_name = weights, "mean of class and distillation tokens"
        elif name.startswith(("Beit", "Data2VecVision")) and getattr(cfg, "use_mean_pooling", False):
            layout.readout, layout.readout_name = None, f"mean of {N - p} patch tokens"
        elif name.startswith(("IJepa", "Siglip", "CLIP", "MetaClip")):  # the mean of the patch rows
            layout.readout, layout.readout_name = None, f"mean of {N - p} patch tokens"
        elif name.startswith("Dinov2"):
            layout.readout = self._cls_and_mean(layout, self.model.classifier.weight)
            layout.readout_name = f"class token and mean of {N - p} patch tokens"
        else:
            layout.readout, layout.readout_name = 0, "class token"
        return layout

    def _cls_and_mean(self, layout: Layout, weight: torch.Tensor) -> torch.Tensor:
        """``(C or 1, N)`` readout of a ``[CLS; mean(patches)]`` classifier with ``weight`` rows
        ``(C or 1, 2D)``: the CLS row weighs ``|w_cls| / (|w_cls| + |w_mean|)`` (norms of each
        half of the weight row), the patch rows the rest, equally."""
        D = weight.shape[-1] // 2
        w = weight.detach().to(torch.float64).reshape(-1, 2 * D)
        cls_norm, mean_norm = w[:, :D].norm(dim=-1), w[:, D:].norm(dim=-1)
        share = cls_norm / (cls_norm + mean_norm).clamp_min(torch.finfo(torch.float64).tiny)
        out = torch.zeros(w.shape[0], layout.num_tokens, dtype=torch.float64, device=weight.device)
        out[:, 0] = share
        out[:, layout.prefix_tokens:] = ((1 - share) / layout.num_content)[:, None]
        return out

    def target_readout(self, layout: Layout, targets: torch.Tensor) -> Layout:
        """``layout`` with a readout for the explained classes ``targets`` ``(B,)`` where the
        head's pooling weighs the rows differently per class (``Dinov2``): the class row's share
        is that of the target's weight row, not of the whole classifier."""
        if not self.is_text and type(self.model).__name__.startswith("Dinov2"):
            weight = self.model.classifier.weight
            layout.readout = self._cls_and_mean(layout, weight[targets.to(weight.device)])
        return layout

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

    def observe_kernels(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager | None:
        """The model's own ``sdpa`` kernel kept (no eager switch) when that is what it runs."""
        if get_attn_implementation(self.model) != "sdpa":
            return None
        return self._kernel_observation(recorder)

    @contextlib.contextmanager
    def _kernel_observation(self, recorder: AttentionRecorder) -> Iterator[None]:
        with no_new_forward_hooks(self.model), FusedKernelProbe(recorder):
            self._calls.kernels = True
            try:
                yield
            finally:
                self._calls.kernels = False

    def forward_done(self, recorder: AttentionRecorder) -> None:
        if not getattr(self._calls, "kernels", False):
            return
        if len(recorder.kernel_calls) != getattr(self.stack_config(), "num_hidden_layers", None):
            raise KernelCallsMissed(f"{len(recorder.kernel_calls)} kernel calls")

    def stack_config(self) -> Any:
        """The config of the layer stack attnx reads: a composite model's vision or text config."""
        config = self.model.config
        return getattr(config, "vision_config", None) or getattr(config, "text_config", None) or config

    def block_inputs(self, batch: Batch) -> list:
        return layer_stack(self.model, self.stack_config())

    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each layer's output through what the model applies after its encoder: ViT / DeiT image
        classifiers: ``layernorm`` and the classifier on the class token (``...WithTeacher``: the
        mean of the class and distillation heads; ``Dinov2``: on ``[CLS; mean of the patches]``);
        BERT-like text classifiers: the pooler and the classifier; RoBERTa-like: the classification
        head on the tokens; DistilBERT: ``pre_classifier``, ReLU and the classifier on the first
        token. Other heads are refused."""
        refuse_pooling(self, pooling)
        model, name = self.model, type(self.model).__name__
        base = getattr(model, model.base_model_prefix, None)
        blocks = [(block, block_output) for block, _ in self.block_inputs(batch)]
        classifier = getattr(model, "classifier", None)
        if self.is_text:
            from transformers.modeling_outputs import SequenceClassifierOutput as Output

            if isinstance(getattr(model, "pre_classifier", None), nn.Linear) and isinstance(classifier, nn.Linear):
                def read(x: torch.Tensor) -> torch.Tensor:
                    return classifier(torch.relu(model.pre_classifier(x[:, 0])))
            elif getattr(base, "pooler", None) is not None and isinstance(classifier, nn.Linear):
                def read(x: torch.Tensor) -> torch.Tensor:
                    return classifier(base.pooler(x))
            elif isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Linear):
                def read(x: torch.Tensor) -> torch.Tensor:
                    return classifier(x)
            else:
                return super().layer_readout(batch, pooling)
        else:
            from transformers.modeling_outputs import ImageClassifierOutput as Output

            norm = getattr(base, "layernorm", None)
            prefix = batch.layout.prefix_tokens
            if not isinstance(norm, nn.Module) or not name.startswith(("ViT", "DeiT", "Dinov2")):
                return super().layer_readout(batch, pooling)
            if name.endswith("WithTeacher"):
                def read(x: torch.Tensor) -> torch.Tensor:
                    return (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2
            elif name.startswith("Dinov2"):
                def read(x: torch.Tensor) -> torch.Tensor:
                    return classifier(torch.cat([x[:, 0], x[:, prefix:].mean(dim=1)], dim=-1))
            else:
                def read(x: torch.Tensor) -> torch.Tensor:
                    return classifier(x[:, 0])

            def normed(x: torch.Tensor, read=read) -> torch.Tensor:
                return read(norm(x))

        def head(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
            logits = (read if self.is_text else normed)(tokens)
            return Output(logits=logits), logits

        return LayerReadout(blocks, head)

    def value_projections(self, batch: Batch) -> list:
        return value_projections(self.block_inputs(batch), self.stack_config()) or super().value_projections(batch)

    def mlp_branches(self, batch: Batch) -> list:
        return named_mlp_branches(self.block_inputs(batch)) or super().mlp_branches(batch)

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        kwargs = dict(batch.kwargs)
        if self._recorder is not None:
            kwargs["output_attentions"] = True
        out = self.model(**kwargs, return_dict=True)
        self.record_attentions(out)
        return out, out.logits

    def record_attentions(self, out: Any) -> None:
        """Record the attention probabilities the model returned (``output_attentions``), when observed."""
        if self._recorder is None:
            return
        attentions = getattr(out, "attentions", None)
        if not attentions or any(a is None for a in attentions):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} returned no attention probabilities with the eager kernel; "
                "adapter='intercept' sees its attention kernels instead"
            )
        for a in attentions:
            self._recorder.record(a)
