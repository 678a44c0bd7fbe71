"""Tiny dual encoders for the tests: Hugging Face CLIP and SigLIP, OpenCLIP, and a word-level tokenizer.

The models are re-initialised with :func:`conftest.randomize_` (peaked attention, O(1)
gradients). Token ids: 0 padding, 3..90 words, 97 start of text, 98 end of text (the largest id,
so CLIP's ``argmax(input_ids)`` pooling finds it, as in the original checkpoints).
"""
from __future__ import annotations

import torch
from torch import nn

from conftest import randomize_

VOCAB = 99
BOS, EOT = 97, 98
DIM, PROJ, IMAGE, PATCH, CONTEXT = 32, 24, 32, 8, 12


class WordTokenizer:
    """Words -> ids like a Hugging Face tokenizer (a dict) or, with ``open_clip=True``, like
    OpenCLIP's tokenizer (a ``(N, CONTEXT)`` id tensor)."""

    def __init__(self, open_clip: bool = False) -> None:
        self.open_clip = open_clip
        self.calls: list[dict] = []

    @staticmethod
    def word(w: str) -> int:
        return 3 + sum(map(ord, w)) % 87

    def __call__(self, texts, padding=True, max_length=None, truncation=True, return_tensors="pt", **kw):
        self.calls.append(dict(padding=padding, max_length=max_length))
        rows = [[BOS] + [self.word(w) for w in t.split()] + [EOT] for t in texts]
        T = CONTEXT if self.open_clip else (max_length if padding == "max_length" else max(map(len, rows)))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids if self.open_clip else {"input_ids": ids, "attention_mask": mask}


def towers(layers: int = 2, **extra) -> dict:
    common = dict(hidden_size=DIM, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, **extra)
    text = dict(common, vocab_size=VOCAB, max_position_embeddings=16)
    vision = dict(common, image_size=IMAGE, patch_size=PATCH)
    return dict(text_config=text, vision_config=vision)


def hf_clip(layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    cfg = towers(layers, projection_dim=PROJ)
    cfg["text_config"].update(eos_token_id=2, bos_token_id=BOS, pad_token_id=0)
    model = CLIPModel(CLIPConfig(**cfg, projection_dim=PROJ))
    randomize_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    return model.to(dtype).eval()


def hf_siglip(layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import SiglipConfig, SiglipModel

    cfg = towers(layers)
    cfg["text_config"].update(eos_token_id=EOT, bos_token_id=BOS, pad_token_id=0)
    model = SiglipModel(SiglipConfig(**cfg))
    randomize_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    return model.to(dtype).eval()


def open_clip_model(layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, pool: str = "tok", **block) -> nn.Module:
    """OpenCLIP's ``CLIP``: ``nn.MultiheadAttention`` blocks, or with ``block_type="custom"`` its
    own ``Attention`` class (SDPA, here with ``qk_norm``)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=PROJ,
        vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=DIM, layers=layers, head_width=8, mlp_ratio=2, pool_type=pool, **block),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=DIM, heads=4, layers=layers, **block),
    )
    randomize_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    return model.to(dtype).eval()


def open_clip_custom(layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    return open_clip_model(layers, dtype, seed, block_type="custom", qk_norm=True)


FAMILIES = {"clip": hf_clip, "siglip": hf_siglip, "open_clip": open_clip_model, "open_clip_custom": open_clip_custom}


def tokenizer_for(family: str) -> WordTokenizer:
    return WordTokenizer(open_clip=family.startswith("open_clip"))


def images(batch: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def model_logits(family: str, model: nn.Module, x: torch.Tensor, text) -> torch.Tensor:
    """``(B, P)`` logits per image as the model itself computes them."""
    with torch.no_grad():
        if family.startswith("open_clip"):
            img, txt, scale = model(x, text)
            return scale * img @ txt.T
        return model(pixel_values=x, **text).logits_per_image
