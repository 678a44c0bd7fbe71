"""Dual encoders (CLIP, SigLIP, OpenCLIP): one tower at a time, explained at its embedding.

A dual encoder has no class logits: an image tower and a text tower each map their input to an
embedding, and the model's logit is the scaled cosine similarity of the two. The adapter explains
one tower per pass, chosen by the inputs: an image batch ``(B, C, H, W)`` runs the image tower, the
dict a Hugging Face tokenizer returns (or an OpenCLIP ``(B, T)`` id tensor) the text tower. Its
"logits" are the tower's *projected, unnormalised* embedding ``(B, D)``, so the targets are
functions of that embedding (:mod:`attnx.core.image_text` pairs it with the other tower's embedding;
:mod:`attnx.core.similarity` compares it with any reference).

The readout row of each tower is the token the model pools:

* CLIP image tower: the class token (row 0); OpenCLIP ``pool_type="avg"``: the mean of the patch rows;
* SigLIP image tower: no class token, a multi-head attention pooling head (MAP) whose learned
  probe attends to every patch; the readout is that probe's attention, averaged over its heads
  and recorded in the same forward (the weights with which the pooled vector mixes the patch rows);
* CLIP text tower: the end-of-text token (HF: ``argmax(input_ids)`` when ``eos_token_id == 2``, the
  original checkpoints, else the first ``eos_token_id``; OpenCLIP: its ``text_pool_type``); the text
  attention is causal;
* SigLIP text tower: the last position (bidirectional attention; it may be a padding token, which the
  model pools nonetheless, so that position counts as real).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..core.batch import Batch, check_image_batch, check_text_inputs
from ..core.layer_readout import LayerReadout
from ..core.layout import Layout
from ..core.recorder import AttentionRecorder
from ..errors import AttnxTypeError, AttnxValueError, UnsupportedModelError
from .base import Adapter, block_output, hidden_states_argument, mha_value_projection, refuse_pooling
from .hf import layer_stack, value_projections
from .kernels import AttentionInterceptor, TokenWatcher
from .mlp_branch import named_mlp_branches
from .pooling import probe_attention
from .switches import attn_implementation, no_new_forward_hooks

__all__ = ["DualEncoderAdapter", "HFDualEncoderAdapter", "OpenCLIPAdapter", "TOWERS"]

TOWERS = ("image", "text")

#: Hugging Face dual encoders and their towers -> (towers it has, the output field of the embedding)
_HF_MODELS = {
    "CLIPModel": (TOWERS, None),
    "SiglipModel": (TOWERS, None),
    "CLIPVisionModelWithProjection": (("image",), "image_embeds"),
    "CLIPTextModelWithProjection": (("text",), "text_embeds"),
    "SiglipVisionModel": (("image",), "pooler_output"),
    "SiglipTextModel": (("text",), "pooler_output"),
}


def text_ids(inputs: Any) -> dict:
    """The token inputs of a text tower as keyword arguments: a tokenizer's dict, or an id tensor."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    kwargs = check_text_inputs(inputs)
    if kwargs["input_ids"].is_floating_point():
        raise AttnxTypeError(f"token ids must be integers, got dtype {kwargs['input_ids'].dtype}")
    return kwargs


def is_text_input(inputs: Any) -> bool:
    """A tokenizer's dict or an integer id tensor (the text tower), not an image batch."""
    return isinstance(inputs, Mapping) or (isinstance(inputs, torch.Tensor) and not inputs.is_floating_point())


class DualEncoderAdapter(Adapter):
    """What the dual-encoder adapters share: the tower is chosen by the inputs of ``prepare``.

    Subclasses give the towers (``towers``), the layout of each, how to call one, the logit scale
    and bias. ``tower`` is the tower of the batch prepared last (``prepare`` is always followed
    by the pass over that batch).
    """

    name = "dual_encoder"
    outputs_embedding = True
    expects = (
        "an image batch (B, C, H, W) for the image tower, or the token ids of the text tower (the dict a "
        "Hugging Face tokenizer returns, or OpenCLIP's (B, T) id tensor); attnx.ImageText(images, prompts) "
        "explains image-text pairs"
    )
    towers: tuple[str, ...] = TOWERS

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.tower = "image"
        self.pool_weights: torch.Tensor | None = None

    def prepare(self, inputs: Any) -> Batch:
        tower = "text" if is_text_input(inputs) else "image"
        if tower not in self.towers:
            raise AttnxValueError(
                f"{type(self.model).__name__} is the {self.towers[0]} tower of a dual encoder: it takes "
                f"{'token ids' if self.towers[0] == 'text' else 'an image batch (B, C, H, W)'}, not "
                f"{'token ids' if tower == 'text' else 'images'}"
            )
        self.tower = tower
        batch = self.prepare_text(text_ids(inputs)) if tower == "text" else self.prepare_image(inputs)
        batch.extra["tower"] = tower
        return batch

    def prepare_image(self, inputs: Any) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_text(self, kwargs: dict) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokenizer_options(self, tokenizer: Any) -> dict:
        """Keyword arguments for calling the model's tokenizer on a list of prompts."""
        return {}

    def logit_scale(self) -> float:
        """The factor of the cosine similarity in the model's logit (``exp(logit_scale)``)."""
        raise UnsupportedModelError(f"{type(self.model).__name__} has no logit scale (a single tower)")

    def logit_bias(self) -> float:
        """The constant added to the scaled cosine (SigLIP's ``logit_bias``), 0 for CLIP."""
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else float(bias.detach())

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        layout = super().resolve_layout(batch, num_tokens)
        if layout.readout is None and self.tower == "image" and self.pool_weights is not None:
            # the attention pooling head's probe attention, recorded in this forward, is the readout
            layout.readout = self.pool_weights
        return layout

    @contextlib.contextmanager
    def pooling_probe(self, head: nn.Module | None) -> Iterator[None]:
        """Record the head-averaged attention of a MAP pooling head's probe over the tokens."""
        self.pool_weights = None
        if head is None:
            yield
            return

        def attention_of(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            return weights if weights is not None and weights.dim() == 3 and weights.shape[1] == 1 else None

        with probe_attention(head, attention_of, lambda w: setattr(self, "pool_weights", w)):
            yield


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------
class HFDualEncoderAdapter(DualEncoderAdapter):
    """Hugging Face ``CLIPModel`` / ``SiglipModel`` and their towers with projection
    (``CLIPVisionModelWithProjection``, ``CLIPTextModelWithProjection``, ``SiglipVisionModel``,
    ``SiglipTextModel``), switched to the eager kernel with ``output_attentions=True``."""

    name = "hf_dual_encoder"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in _HF_MODELS and hasattr(model, "config")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.towers, self.field = _HF_MODELS[type(model).__name__]
        self.siglip = type(model).__name__.startswith("Siglip")
        self.recorder: AttentionRecorder | None = None

    def tower_module(self, tower: str) -> nn.Module:
        if tower == "image":
            return getattr(self.model, "vision_model", self.model)
        return getattr(self.model, "text_model", self.model)

    def tower_config(self, tower: str) -> Any:
        cfg = self.model.config
        return getattr(cfg, "vision_config" if tower == "image" else "text_config", cfg)

    def prepare_image(self, inputs: Any) -> Batch:
        if isinstance(inputs, Mapping):
            if "pixel_values" not in inputs:
                raise AttnxValueError(f"expected 'pixel_values' in the image inputs, got keys {sorted(inputs)}")
            inputs = inputs["pixel_values"]
        cfg = self.tower_config("image")
        x = check_image_batch(inputs, getattr(cfg, "num_channels", None))
        p = cfg.patch_size
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if H % p or W % p:
            raise AttnxValueError(f"image size {H}x{W} is not a multiple of the model's patch size {p}")
        kwargs = {"pixel_values": x}
        if (H, W) != (cfg.image_size, cfg.image_size):
            kwargs["interpolate_pos_encoding"] = True
        if self.siglip:
            if self.head() is None:
                raise UnsupportedModelError("a SigLIP vision tower without its pooling head (vision_use_head=False) has no embedding")
            layout = Layout.for_image(x, (H // p, W // p), prefix_tokens=0, readout=None)
        else:
            layout = Layout.for_image(x, (H // p, W // p), prefix_tokens=1, readout=0)
        return Batch(args=(), kwargs=kwargs, batch_size=x.shape[0], layout=layout, device=x.device)

    def head(self) -> nn.Module | None:
        head = getattr(self.tower_module("image"), "head", None)
        return getattr(head, "attention", None)

    def prepare_text(self, kwargs: dict) -> Batch:
        # what the text towers take (a tokenizer may add token_type_ids, which they do not)
        kwargs = {k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        B, T = ids.shape
        valid = None if mask is None else mask.bool()
        if self.siglip:
            readout = torch.full((B,), T - 1, dtype=torch.long, device=ids.device)
            if valid is not None:  # SigLIP pools the last position even when it is padding
                valid = valid.clone()
                valid[:, -1] = True
            causal = False
        else:
            eos = self.tower_config("text").eos_token_id
            readout = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
            if eos != 2 and not (ids == eos).any(-1).all():
                raise AttnxValueError(f"a text of the batch has no end-of-text token (id {eos}), the token CLIP pools")
            causal = True
        layout = Layout(num_tokens=T, prefix_tokens=0, readout=readout, valid=valid, causal=causal)
        return Batch(args=(), kwargs=kwargs, batch_size=B, layout=layout, device=ids.device)

    def input_embeddings(self) -> nn.Module | None:
        if self.tower != "text":
            return None
        return self.tower_module("text").embeddings.token_embedding

    def tokenizer_options(self, tokenizer: Any) -> dict:
        # SigLIP was trained on texts padded to a fixed length and pools the last position
        length = self.tower_config("text").max_position_embeddings
        padding = "max_length" if self.siglip else True
        return dict(padding=padding, max_length=length, truncation=True, return_tensors="pt")

    def logit_scale(self) -> float:
        if not hasattr(self.model, "logit_scale"):
            return super().logit_scale()
        return float(self.model.logit_scale.detach().exp())

    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        with attn_implementation(self.model, "eager"), no_new_forward_hooks(self.model):
            self.recorder = recorder
            try:
                yield
            finally:
                self.recorder = None

    def block_inputs(self, batch: Batch) -> list:
        tower = batch.extra.get("tower", self.tower)
        return layer_stack(self.tower_module(tower), self.tower_config(tower))

    def value_projections(self, batch: Batch) -> list:
        tower = batch.extra.get("tower", self.tower)
        return value_projections(self.block_inputs(batch), self.tower_config(tower)) or super().value_projections(batch)

    def mlp_branches(self, batch: Batch) -> list:
        return named_mlp_branches(self.block_inputs(batch)) or super().mlp_branches(batch)
    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each layer's output through the tower's final norm, pooling and projection: CLIP's image
        tower ``post_layernorm`` on the class token (``pooling="mean"``: on the mean of every token)
        and ``visual_projection``, its text tower ``final_layer_norm`` at the end-of-text token and
        ``text_projection``; SigLIP's ``post_layernorm`` and attention-pooling head, its text tower
        ``final_layer_norm`` at the last position and ``head``."""
        tower = batch.extra.get("tower", self.tower)
        module = self.tower_module(tower)
        if not (tower == "image" and not self.siglip):
            refuse_pooling(self, pooling)
        position = batch.layout.readout
        if tower == "image" and self.siglip:
            def read(x: torch.Tensor) -> torch.Tensor:
                return module.head(module.post_layernorm(x))
        elif tower == "image":
            def read(x: torch.Tensor) -> torch.Tensor:
                pooled = x.mean(dim=1) if pooling == "mean" else x[:, 0]
                return self.model.visual_projection(module.post_layernorm(pooled))
        else:
            project = module.head if self.siglip else self.model.text_projection

            def read(x: torch.Tensor) -> torch.Tensor:
                x = module.final_layer_norm(x)
                return project(x[torch.arange(x.shape[0], device=x.device), position.to(x.device)])

        def head(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
            embedding = read(tokens)
            return embedding, embedding

        blocks = [(block, block_output) for block, _ in self.block_inputs(batch)]
        return LayerReadout(blocks, head, own=pooling == "model")

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        kwargs = dict(batch.kwargs)
        tower = batch.extra.get("tower", self.tower)
        if self.recorder is not None:
            kwargs["output_attentions"] = True
        probe = self.pooling_probe(self.head() if self.siglip and tower == "image" else None)
        with probe:
            if self.field is None:
                features = self.model.get_image_features if tower == "image" else self.model.get_text_features
                out = features(**kwargs, return_dict=True)
                embedding = out.pooler_output
            else:
                out = self.model(**kwargs, return_dict=True)
                embedding = getattr(out, self.field)
        if self.recorder is not None:
            if not out.attentions:
                raise UnsupportedModelError(f"{type(self.model).__name__} returned no attentions with the eager kernel")
            for a in out.attentions:
                self.recorder.record(a)
        return embedding, embedding


# --------------------------------------------------------------------------------------------
# OpenCLIP
# --------------------------------------------------------------------------------------------
class OpenCLIPAdapter(DualEncoderAdapter):
    """OpenCLIP ``CLIP`` models with a ViT image tower (``open_clip.create_model``): attention is
    observed by the ``intercept`` kernels (``nn.MultiheadAttention`` or OpenCLIP's own ``Attention``)."""

    name = "open_clip"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip") and hasattr(model, "encode_image") and hasattr(model, "encode_text")

    def prepare_image(self, inputs: Any) -> Batch:
        visual = self.model.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
            raise UnsupportedModelError(
                f"the image tower of this OpenCLIP model ({type(visual).__name__}) is not a ViT; attention methods need one"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModelError("OpenCLIP image towers with attentional pooling (CoCa) are not supported")
        x = check_image_batch(inputs, 3)
        p = visual.conv1.kernel_size[0]
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if H % p or W % p:
            raise AttnxValueError(f"image size {H}x{W} is not a multiple of the model's patch size {p}")
        pool = visual.pool_type
        if pool not in ("tok", "avg"):
            raise UnsupportedModelError(f"OpenCLIP image pooling {pool!r} is not supported (only 'tok' and 'avg')")
        layout = Layout.for_image(x, (H // p, W // p), prefix_tokens=1, readout=0 if pool == "tok" else None)
        return Batch(args=(x,), kwargs={}, batch_size=x.shape[0], layout=layout, device=x.device)

    def prepare_text(self, kwargs: dict) -> Batch:
        ids = kwargs["input_ids"]
        B, T = ids.shape
        context = self.model.positional_embedding.shape[0]
        if T != context:
            raise AttnxValueError(
                f"OpenCLIP's text tower takes exactly {context} tokens per text (its context length), got {T}; "
                "tokenise with open_clip.get_tokenizer(model_name)"
            )
        pool = self.model.text_pool_type
        if pool == "argmax":
            readout = ids.argmax(-1)
        elif pool == "eos":
            readout = (ids == self.model.text_eos_id).int().argmax(-1)
        elif pool in ("last", "first"):
            readout = torch.full((B,), T - 1 if pool == "last" else 0, dtype=torch.long, device=ids.device)
        else:
            raise UnsupportedModelError(f"OpenCLIP text pooling {pool!r} is not supported")
        causal = getattr(self.model, "attn_mask", None) is not None
        # with causal attention the pooled token never sees the padding after it
        valid = torch.arange(T, device=ids.device)[None] <= readout[:, None] if causal else None
        layout = Layout(num_tokens=T, prefix_tokens=0, readout=readout, valid=valid, causal=causal)
        return Batch(args=(ids,), kwargs={}, batch_size=B, layout=layout, device=ids.device, extra={"input_ids": ids})

    def input_embeddings(self) -> nn.Module | None:
        return self.model.token_embedding if self.tower == "text" else None

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        with AttentionInterceptor(recorder):
            yield

    @contextlib.contextmanager
    def watch_tokens(self, recorder: AttentionRecorder, images: torch.Tensor | None = None) -> Iterator[None]:
        with TokenWatcher(recorder, None):
            yield

    def block_inputs(self, batch: Batch) -> list:
        tower = batch.extra.get("tower", self.tower)
        transformer = self.model.visual.transformer if tower == "image" else self.model.transformer

        def tokens(args: tuple, kwargs: dict) -> Any:  # (N, B, D) when the tower is not batch-first
            x = hidden_states_argument(args, kwargs)
            return x if getattr(transformer, "batch_first", True) or x is None else x.transpose(0, 1)

        return [(block, tokens) for block in transformer.resblocks]

    def value_projections(self, batch: Batch) -> list:
        """``nn.MultiheadAttention`` blocks, and OpenCLIP's own ``Attention`` (``in_proj_weight``,
        ``out_proj``) without head scaling or an inner norm between the values and ``out_proj``."""
        found = [mha_value_projection(getattr(block, "attn", None)) or open_clip_values(getattr(block, "attn", None))
                 for block, _ in self.block_inputs(batch)]
        return found if all(found) else super().value_projections(batch)

    def mlp_branches(self, batch: Batch) -> list:
        """``ln_2``'s input and ``ls_2``'s output, transposed when the tower is not batch first."""
        tower = batch.extra.get("tower", self.tower)
        transformer = self.model.visual.transformer if tower == "image" else self.model.transformer
        transpose = not getattr(transformer, "batch_first", True)
        return named_mlp_branches(self.block_inputs(batch), transpose) or super().mlp_branches(batch)


    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each block's output through the tower's final norm, pooling and projection: the image
        tower's ``ln_post`` and pooling (class token or patch mean, in the model's order;
        ``pooling="mean"``: ``ln_post`` of the mean of every token, class token included, the
        LeGrad authors' readout) and ``proj``; the text tower's ``ln_final``, its pooled token and
        ``text_projection``."""
        tower = batch.extra.get("tower", self.tower)
        model = self.model
        transformer = model.visual.transformer if tower == "image" else model.transformer
        if tower != "image":
            refuse_pooling(self, pooling)

        def tokens_of(args: tuple, kwargs: dict, output: Any) -> Any:  # (N, B, D) when not batch-first
            x = block_output(args, kwargs, output)
            return x if getattr(transformer, "batch_first", True) or not isinstance(x, torch.Tensor) else x.transpose(0, 1)

        position = batch.layout.readout
        if tower == "image":
            visual = model.visual

            def read(x: torch.Tensor) -> torch.Tensor:
                def pool(t: torch.Tensor) -> torch.Tensor:
                    return t[:, 0] if visual.pool_type == "tok" else t[:, 1:].mean(dim=1)

                if pooling == "mean":
                    pooled = visual.ln_post(x.mean(dim=1))
                elif visual.final_ln_after_pool:
                    pooled = visual.ln_post(pool(x))
                else:
                    pooled = pool(visual.ln_post(x))
                return pooled if visual.proj is None else pooled @ visual.proj
        else:
            def read(x: torch.Tensor) -> torch.Tensor:
                x = model.ln_final(x)
                x = x[torch.arange(x.shape[0], device=x.device), position.to(x.device)]
                project = model.text_projection
                if project is None:
                    return x
                return project(x) if isinstance(project, nn.Linear) else x @ project

        def head(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
            embedding = read(tokens)
            return embedding, embedding

        return LayerReadout([(block, tokens_of) for block in transformer.resblocks], head, own=pooling == "model")

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        encode = self.model.encode_image if batch.extra.get("tower", self.tower) == "image" else self.model.encode_text
        embedding = encode(*batch.args)
        return embedding, embedding


def open_clip_values(attn: nn.Module | None) -> tuple | None:
    """OpenCLIP's ``Attention``: the value third of ``F.linear(x, in_proj_weight, in_proj_bias)`` on
    its input ``x`` (batch first) and ``out_proj``'s weight; ``None`` for another module or when
    ``head_scale`` / ``ln_inner`` act between the values and ``out_proj``."""
    weight = getattr(attn, "in_proj_weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(getattr(attn, "out_proj", None), nn.Linear):
        return None
    if getattr(attn, "head_scale", None) is not None or not isinstance(getattr(attn, "ln_inner", nn.Identity()), nn.Identity):
        return None
    D = weight.shape[1]

    def read(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * D:]
        return torch.nn.functional.linear(hidden_states_argument(args, kwargs), weight[2 * D:], bias)

    return attn, read, attn.out_proj.weight
