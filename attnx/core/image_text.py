"""Explaining image-text similarity of dual encoders (CLIP, SigLIP, OpenCLIP).

The logit of a dual encoder for an image ``i`` and a text ``t`` is
``s(i, t) = scale · ⟨e_i, e_t⟩ / (‖e_i‖ ‖e_t‖) + bias`` with ``e`` the projected embeddings of the
two towers (``scale = exp(logit_scale)``; ``bias`` is SigLIP's ``logit_bias``, 0 for CLIP). Each
tower is explained on its own pass (:mod:`attnx.adapters.dual_encoder`), with the other tower's
embedding held as a constant reference: the image for a prompt, the prompt for an image. Holding
it constant changes nothing for attention and gradient methods (the other tower does not depend on
this tower's activations); for LRP the relevance is seeded at the embedding with the normaliser
``‖e‖`` held constant (as LayerNorm's σ in AttnLRP and CP-LRP), so it sums to ``s - bias``.

::

    pair = attnx.explain(clip, images, text=["a photo of a cat", "a photo of a dog"], tokenizer=tok,
                         method="generic")
    pair.image.scores       # (B*P, patches): row b*P + p explains image b for prompt p
    pair.image_scores()     # (B, P, patches), the same numbers
    pair.text_scores()      # (B, P, T): the tokens of prompt p for image b
    pair.logits_per_image   # (B, P): the model's own logits

``target``: ``None`` explains every (image, prompt) pair; an int or ``B`` ints the prompt given
per image; :data:`zero_shot` the prompt each image is classified as (the argmax over the prompts,
zero-shot classification). A single tower takes any callable on its embedding, e.g.
:func:`similarity_to` (a CLIP logit to fixed text embeddings) or :func:`attnx.similarity.cosine_to`
(the similarity of two images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..adapters.base import Adapter
from ..adapters.dual_encoder import DualEncoderAdapter
from ..errors import AttnxTypeError, AttnxValueError
from .explanation import Explanation
from .similarity import CosineSimilarity, embedding_norm
from .trace import run_trace
from .trace_types import Needs

__all__ = [
    "ImageText",
    "ImageTextExplanation",
    "ScaledCosine",
    "ZeroShot",
    "embeddings",
    "explain_pairs",
    "similarity_to",
    "tower_target",
    "zero_shot",
]


@dataclass(frozen=True)
class ImageText:
    """Images and text prompts, explained pairwise by a dual encoder.

    Parameters
    ----------
    images:
        ``(B, C, H, W)`` preprocessed images.
    text:
        One prompt, a list of ``P`` prompts (tokenised with ``tokenizer``), or already tokenised
        prompts (the dict a Hugging Face tokenizer returns, or OpenCLIP's ``(P, T)`` id tensor).
    tokenizer:
        A Hugging Face tokenizer or ``open_clip.get_tokenizer(name)``; default: the explainer's.
    """

    images: torch.Tensor
    text: Any
    tokenizer: Any = None


class ZeroShot:
    """Target: for each image, the prompt it is classified as (argmax of the similarity logits)."""

    def __repr__(self) -> str:
        return "zero_shot"


#: the zero-shot class of each image (see :class:`ZeroShot`)
zero_shot = ZeroShot()


class ScaledCosine(CosineSimilarity):
    """Target: ``scale · cos(e, r)``, a dual encoder's logit without its bias, to reference
    embeddings ``r`` (e.g. the other tower's); ``relevance_seed`` holds ``‖e‖`` constant."""

    def __init__(self, reference: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__(reference)
        self.scale = float(scale)

    def __call__(self, output: Any) -> torch.Tensor:
        return self.scale * super().__call__(output)

    def relevance_seed(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scale * super().relevance_seed(logits)

    def __repr__(self) -> str:
        return f"ScaledCosine(references={self.unit.shape[0]}, scale={self.scale:g})"


def similarity_to(reference: torch.Tensor, scale: float = 1.0) -> ScaledCosine:
    """The target ``scale · cos(e, reference)`` (see :class:`ScaledCosine`)."""
    return ScaledCosine(reference, scale)


def tokenize(adapter: DualEncoderAdapter, text: Any, tokenizer: Any) -> Any:
    """Prompts -> the text tower's inputs (a tokenizer's dict, or OpenCLIP's id tensor)."""
    if isinstance(text, str):
        text = [text]
    if isinstance(text, (Mapping, torch.Tensor)):
        return text
    if not (isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text)):
        raise AttnxTypeError(f"text must be a prompt, a list of prompts or tokenised prompts, got {type(text).__name__}")
    if tokenizer is None:
        raise AttnxValueError("text prompts need a tokenizer: attnx.explain(model, images, text=[...], tokenizer=tok)")
    return tokenizer(list(text), **adapter.tokenizer_options(tokenizer))


#: what a tower's embedding needs of the pass: nothing beyond its output
EMBEDDING_ONLY = Needs()


def embeddings(adapter: DualEncoderAdapter, inputs: Any) -> torch.Tensor:
    """The projected, unnormalised embeddings ``(N, D)`` of one tower's inputs, without gradients,
    from the one pass (:func:`attnx.core.trace.run_trace`: the model held for the call, in eval
    mode, eager, in float32 when it is half precision; every flag restored)."""
    return run_trace(adapter, adapter.prepare(inputs), None, EMBEDDING_ONLY, precision="float32").logits


def repeat_rows(inputs: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of an image batch, an id tensor or a tokenizer's dict."""
    if isinstance(inputs, Mapping):
        return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs[index.to(inputs.device)]


@dataclass
class ImageTextExplanation:
    """The explanations of (image, prompt) pairs, one row per pair.

    Attributes
    ----------
    image, text:
        :class:`~attnx.core.explanation.Explanation` of the image tower (patch scores) and of the text
        tower (token scores), row ``k`` for the pair ``(image_index[k], prompt_index[k])``; ``None``
        for a tower that was not explained. Their ``target_scores`` are ``scale · cos``, the
        model's logit without its bias.
    image_index, prompt_index:
        ``(K,)`` long, the pair each row explains (every pair: ``K = B·P``, image-major).
    logits_per_image:
        ``(B, P)`` the model's logits ``scale · cos + bias`` of every image and prompt.
    prompts:
        The prompts, when given as text.
    """

    image: Explanation | None
    text: Explanation | None
    image_index: torch.Tensor
    prompt_index: torch.Tensor
    logits_per_image: torch.Tensor
    prompts: list[str] | None = None
    options: dict = field(default_factory=dict)

    @property
    def all_pairs(self) -> bool:
        B, P = self.logits_per_image.shape
        return self.image_index.numel() == B * P

    def per_pair(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of every pair ``(B·P, ...)`` -> ``(B, P, ...)``."""
        if not self.all_pairs:
            raise AttnxValueError("this explanation holds one prompt per image (a target was given): use the rows directly")
        B, P = self.logits_per_image.shape
        return values.reshape(B, P, *values.shape[1:])

    def image_scores(self) -> torch.Tensor:
        """``(B, P, patches)`` patch scores of image ``b`` for prompt ``p``."""
        return self.per_pair(self.tower("image").scores)

    def image_maps(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, P, H, W)`` heat maps (bilinear, min-max normalised per map)."""
        return self.per_pair(self.tower("image").heatmap(size))

    def text_scores(self) -> torch.Tensor:
        """``(B, P, T)`` token scores of prompt ``p`` for image ``b``."""
        return self.per_pair(self.tower("text").scores)

    def tower(self, name: str) -> Explanation:
        e = self.image if name == "image" else self.text
        if e is None:
            raise AttnxValueError(f"the {name} tower was not explained (towers=...)")
        return e

    def __repr__(self) -> str:
        B, P = self.logits_per_image.shape
        towers = [t for t in ("image", "text") if getattr(self, t) is not None]
        return f"ImageTextExplanation(images={B}, prompts={P}, rows={self.image_index.numel()}, towers={towers})"


def explain_pairs(
    explainer: Any,
    pair: ImageText,
    method: str,
    target: Any = None,
    towers: Sequence[str] | str = ("image", "text"),
    **options: Any,
) -> ImageTextExplanation:
    """Explain ``pair`` with ``explainer`` (an :class:`attnx.Explainer` of a dual encoder)."""
    adapter = explainer.adapter
    if not isinstance(adapter, DualEncoderAdapter) or len(adapter.towers) != 2:
        raise AttnxTypeError(
            f"image-text pairs need a dual encoder with both towers (CLIPModel, SiglipModel, an OpenCLIP CLIP), "
            f"got {type(explainer.model).__name__}"
        )
    towers = (towers,) if isinstance(towers, str) else tuple(towers)
    if not towers or any(t not in ("image", "text") for t in towers):
        raise AttnxValueError(f"towers must be 'image', 'text' or both, got {towers!r}")
    if callable(target) and not isinstance(target, ZeroShot):
        raise AttnxTypeError(
            "image-text pairs take target=None (every pair), a prompt index per image or attnx.image_text.zero_shot; "
            "a callable target applies to one tower: attnx.explain(model, images, target=fn) with fn on the embedding"
        )
    text = tokenize(adapter, pair.text, pair.tokenizer if pair.tokenizer is not None else explainer.tokenizer)
    image_emb, text_emb = embeddings(adapter, pair.images), embeddings(adapter, text)
    B, P = image_emb.shape[0], text_emb.shape[0]
    scale, bias = adapter.logit_scale(), adapter.logit_bias()
    cos = torch.nn.functional.normalize(image_emb, dim=-1) @ torch.nn.functional.normalize(text_emb, dim=-1).T
    logits = scale * cos + bias
    if target is None:
        image_index = torch.arange(B).repeat_interleave(P)
        prompt_index = torch.arange(P).repeat(B)
    else:
        image_index = torch.arange(B)
        if isinstance(target, ZeroShot):
            prompt_index = logits.argmax(dim=1).cpu()
        else:
            prompt_index = torch.as_tensor(target).long().reshape(-1).cpu()
            if prompt_index.numel() == 1:
                prompt_index = prompt_index.expand(B)
            if prompt_index.numel() != B or ((prompt_index < 0) | (prompt_index >= P)).any():
                raise AttnxValueError(f"target must be one prompt index in 0..{P - 1} (or one per image, {B}), got {target!r}")
    results = {}
    for tower in towers:
        if tower == "image":
            inputs, ref = repeat_rows(pair.images, image_index), text_emb[prompt_index.to(text_emb.device)]
        else:
            inputs, ref = repeat_rows(text, prompt_index), image_emb[image_index.to(image_emb.device)]
        results[tower] = explainer.explain(inputs, method=method, target=ScaledCosine(ref, scale), **options)
    prompts = [pair.text] if isinstance(pair.text, str) else list(pair.text) if isinstance(pair.text, (list, tuple)) else None
    return ImageTextExplanation(
        image=results.get("image"), text=results.get("text"), image_index=image_index, prompt_index=prompt_index,
        logits_per_image=logits.detach(), prompts=prompts, options=dict(options),
    )


def tower_target(adapter: Adapter, needs: Needs) -> Any:
    """The target of a tower whose output is an embedding (``adapter.outputs_embedding``), when none
    was given: methods that read only the attention run (the target does not change them) on the
    embedding's norm; the others raise, since an embedding has no predicted class."""
    if needs.backward or needs.forward:
        raise AttnxValueError(
            f"{type(adapter.model).__name__} is a dual encoder: its output is an embedding, not class logits. "
            "Pass text prompts (attnx.explain(model, images, text=[...], tokenizer=tok)) or a target on the "
            "embedding (attnx.image_text.similarity_to(text_embeds, scale), attnx.similarity.cosine_to(reference))"
        )
    return embedding_norm

