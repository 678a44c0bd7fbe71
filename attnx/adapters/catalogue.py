"""What each adapter serves and how it observes attention: the README's supported-models table.

:func:`adapters_markdown` writes the table from the registered adapters, in the order attnx
tries them (``attnx models --markdown`` prints it); :data:`SUPPORT` holds one row per adapter
that ships with attnx.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["SUPPORT", "Support", "adapters_markdown"]


class Support(NamedTuple):
    """One adapter's row: the model families it matches and how it makes attention observable."""

    families: str
    observed: str


#: the adapters that ship with attnx, by name
SUPPORT: dict[str, Support] = {
    "timm_vit": Support(
        "timm `VisionTransformer` (ViT, DeiT, distilled DeiT, register tokens, `global_pool` token / avg / "
        "max / map, `dynamic_img_size`)",
        "`fused_attn` switched off while explaining, a hook on `attn_drop`; `generic`, `grad_rollout`, "
        "`attn_gradcam`, `legrad`, `rollout`, `raw_attention` keep the fused kernel, `A` recomputed beside it ([long contexts](docs/long_context.md#the-models-own-kernel-a-recomputed-in-the-backward))",
    ),
    "timm_swin": Support(
        "timm `SwinTransformer`, `SwinTransformerV2`",
        "the last stage's blocks (V1: `fused_attn` switched off, a hook on `attn_drop`); LRP through the "
        "whole model ([Swin](docs/supported_models.md#hierarchical-models-swin))",
    ),
    "torchvision_vit": Support(
        "torchvision `VisionTransformer` (`vit_b_16`, ...)",
        "`nn.MultiheadAttention` asked for per-head weights",
    ),
    "hf_dual_encoder": Support(
        "Hugging Face `CLIPModel`, `SiglipModel` and their single towers (`CLIPVisionModelWithProjection`, "
        "`SiglipTextModel`, ...)",
        "one tower per pass, chosen by the inputs; the eager kernel and `output_attentions=True`",
    ),
    "open_clip": Support(
        "OpenCLIP `CLIP` with a ViT image tower",
        "one tower per pass; `nn.MultiheadAttention` or OpenCLIP's own `Attention` through `intercept`'s kernels",
    ),
    "hf_decoder": Support(
        "Hugging Face decoders: GPT-2, Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, Phi-3, Mixtral "
        "(`*ForCausalLM`, `GPT2LMHeadModel`, decoder `*ForSequenceClassification`)",
        "the eager kernel, `output_attentions=True`; one map per query head under grouped-query attention; "
        "`generic`, `grad_rollout`, `attn_gradcam`, `legrad`, `rollout`, `raw_attention` keep `sdpa`, `A` recomputed beside it ([long contexts](docs/long_context.md#the-models-own-kernel-a-recomputed-in-the-backward))",
    ),
    "hf_swin": Support(
        "Hugging Face `SwinForImageClassification`, `Swinv2ForImageClassification`",
        "the last stage's blocks: Swin's eager kernel, Swinv2 a hook on `attention.self.dropout`",
    ),
    "hf": Support(
        "Hugging Face `*ForImageClassification` (ViT, DeiT, BEiT, DINOv2, ...) and `*ForSequenceClassification` "
        "(BERT, RoBERTa, DistilBERT, ...)",
        "the eager kernel and `output_attentions=True`, whatever `attn_implementation` the model was loaded "
        "with; `generic`, `grad_rollout`, `attn_gradcam`, `legrad`, `rollout`, `raw_attention` keep `sdpa` ([long contexts](docs/long_context.md#the-models-own-kernel-a-recomputed-in-the-backward))",
    ),
    "intercept": Support(
        "anything else: research code (`attn.softmax(-1) ... attn @ v`, `torch.bmm`, `torch.einsum`, "
        "`nn.Softmax`), `F.scaled_dot_product_attention`, `nn.MultiheadAttention`",
        "a `TorchFunctionMode` writes SDPA out, asks `F.multi_head_attention_forward` for per-head weights and "
        "recognises written-out attention by its data flow (a softmax over the key axis multiplied with the "
        "values); `generic`, `grad_rollout`, `attn_gradcam`, `legrad`, `rollout`, `raw_attention` leave SDPA to its kernel ([long contexts](docs/long_context.md#the-models-own-kernel-a-recomputed-in-the-backward))",
    ),
}


def adapters_markdown() -> str:
    """The supported-models table: one row per registered adapter, in lookup order (the fallback last)."""
    from . import adapter_names

    rows = ["| model family | adapter | how attention is observed |", "|---|---|---|"]
    for name in adapter_names():
        row = SUPPORT.get(name, Support("(registered by the user)", "its own `observe`"))
        rows.append(f"| {row.families} | `{name}` | {row.observed} |")
    return "\n".join(rows)
