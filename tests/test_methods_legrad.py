"""LeGrad against its formula (Bousselham et al. 2024, Eq. 4-5) written out on a hand-run forward.

The reference re-runs a tiny timm ViT block by block in float64 from its weights (attention
written out as softmax(q kᵀ / √d) so that ``A^l`` is a tensor of the graph), takes the gradient
of the target logit at the last ``A^L`` with autograd and applies the paper's formula; attnx must
match it to 1e-8. Decoders and text classifiers are checked for the masks (padding rows, causal
pairs) and for batched == alone.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.errors import AttnxTypeError
from conftest import CASES, max_abs_diff
from decoder_models import CASES as DECODERS, params, real_tokens


def hand_run_vit(model, x: torch.Tensor):
    """The logits of a timm ViT and its attention maps ``A^l`` ``(B, H, N, N)``, kept in the graph."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    maps = []
    for blk in model.blocks:
        B, N, D = tokens.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // heads) ** 0.5, dim=-1)
        maps.append(a)
        out = blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        tokens = tokens + blk.ls1(out)
        tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    return model.forward_head(model.norm(tokens)), maps


def legrad_formula(gradient: torch.Tensor) -> torch.Tensor:
    """Eq. 4-5 without masks: ``mean_h mean_i ReLU(∂s/∂A)[h, i, j]``."""
    return gradient.clamp(min=0).mean(dim=(1, 2))


@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "timm_reg4"])
def test_equals_the_papers_formula_on_a_hand_run_vit_in_float64(name):
    """The paper's score of the last layer is its tokens through the final norm and head: the
    hand-run forward's logits. Class-token, pooled and register-token heads."""
    model = CASES[name].model(torch.float64)
    x = CASES[name].inputs(3, dtype=torch.float64)
    logits, maps = hand_run_vit(model, x)
    assert max_abs_diff(logits, model(x)) < 1e-10  # the hand-run forward is the model's
    targets = torch.tensor([1, 4, 6])
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), maps[-1])
    e = attnx.Explainer(model).explain(x, "legrad", target=targets)
    expected = legrad_formula(grad)
    assert e.token_relevance.dtype == torch.float64
    assert max_abs_diff(e.token_relevance, expected) < 1e-8
    assert (expected[:, CASES[name].prefix_tokens :].abs().sum(1) > 0).all()  # a map worth comparing


DECODER_NAMES = ("gpt2_lm_eager", "gpt2_cls_eager", "llama_lm_eager", "qwen2_cls_sdpa")


@pytest.mark.parametrize("case", params([c for c in DECODERS if c.name in DECODER_NAMES]))
def test_decoder_masks_causal_pairs_and_padding(case):
    """In a causal model only pairs key <= query of real tokens count, and the query mean runs
    over the real rows; a padded batch equals each sample alone (float32: Llama-family models
    give NaN for left-padded rows in float64 themselves)."""
    model = case.model()
    x = case.inputs(lengths=[7, 4])
    explainer = attnx.Explainer(model)
    trace = explainer.capture(x, gradients=True)
    valid = x["attention_mask"].bool()
    N = valid.shape[1]
    pairs = valid[:, :, None] & valid[:, None, :] & torch.ones(N, N, dtype=torch.bool).tril()
    g = trace.gradients[-1]
    expected = (g.clamp(min=0).mean(1) * pairs).sum(1) / valid.sum(1, keepdim=True)
    e = explainer.explain(x, "legrad")
    assert max_abs_diff(e.token_relevance, expected) <= 1e-6 * expected.abs().max()
    for b in range(2):
        alone = explainer.explain(real_tokens(x, b), "legrad").scores[0]
        assert max_abs_diff(e.scores[b][valid[b]], alone) <= 1e-4 * alone.abs().max()
        assert alone.abs().sum() > 0


def test_text_classifier_batched_equals_alone():
    case = CASES["hf_bert_eager"]
    model = case.model(torch.float64)
    x = case.inputs(3, lengths=[9, 6, 4])
    e = attnx.explain(model, x, "legrad")
    for b, n in enumerate([9, 6, 4]):
        alone = attnx.explain(model, {k: v[b : b + 1, :n] for k, v in x.items()}, "legrad")
        assert max_abs_diff(e.scores[b, :n], alone.scores[0]) < 1e-8
        assert (e.scores[b, n:] == 0).all()


def test_lower_layers_are_not_offered():
    """LeGrad's lower layers need per-layer readouts: no option pretends to give them."""
    model = CASES["timm_vit"].model()
    with pytest.raises(AttnxTypeError, match="unknown option"):
        attnx.explain(model, CASES["timm_vit"].inputs(1), "legrad", start_layer=0)
