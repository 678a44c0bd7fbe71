"""AtMan (Deiseroth et al., NeurIPS 2023) against its formula written out on tiny models.

The reference suppresses token ``j`` on the pre-softmax scores themselves, as the paper and the
authors' code do (``H - min_k H``, column ``j`` times ``1 - f``, masked keys left out), either in
a timm ViT re-run block by block from its weights, or in a Hugging Face model running a reference
attention function registered with ``transformers.AttentionInterface``. attnx reaches the same
forward from the probabilities (``log A - min log A``), through SDPA made explicit or the eager
kernels' written-out softmax, or ``nn.MultiheadAttention`` written out. The authors' code (Aleph-Alpha/AtMan) runs only on its own copies
of GPT-Neo / MAGMA with their weights, so it is not run here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

import attnx
from clip_models import hf_clip
from conftest import CASES
from contracts import assert_unchanged, snapshot
from decoder_models import DecoderCase

SUPPRESSION = 0.9


def suppressed_scores(scores: torch.Tensor, allowed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """softmax over the allowed keys of ``(H - min_allowed H) * factor_k`` (scores ``(B, h, N, N)``)."""
    low = scores.masked_fill(~allowed, float("inf")).amin(dim=-1, keepdim=True)
    shifted = ((scores - low) * factors[:, None, None, :]).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(shifted, dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))


def one_hot_factors(num_tokens: int, j: int | None, dtype) -> torch.Tensor:
    f = torch.ones(1, num_tokens, dtype=dtype)
    if j is not None:
        f[0, j] = 1 - SUPPRESSION
    return f


# --------------------------------------------------------------------------------------------
# timm ViT, re-run by hand
# --------------------------------------------------------------------------------------------
def timm_logits(model, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """A timm ViT's forward written out, attention suppressed on its scores."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    for blk in model.blocks:
        a = blk.attn
        y = blk.norm1(h)
        B, N, C = y.shape
        qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q @ k.transpose(-2, -1)) * a.scale
        probs = suppressed_scores(scores, torch.ones_like(scores, dtype=torch.bool), factors)
        h = h + a.proj((probs @ v).transpose(1, 2).reshape(B, N, C))
        h = h + blk.mlp(blk.norm2(h))
    h = model.norm(h)
    return model.head(h[:, 0])


@pytest.mark.parametrize("name", ["timm_vit", "timm_vit_unfused"])
def test_timm_vit_equals_the_scores_formula_in_float64(name):
    model = CASES[name].model(torch.float64)
    x = CASES[name].inputs(2, dtype=torch.float64)
    e = attnx.explain(model, x, method="atman")
    targets = e.targets
    N = 17
    with torch.no_grad():
        for b in range(2):
            clean = timm_logits(model, x[b:b + 1], one_hot_factors(N, None, x.dtype)).log_softmax(-1)[0, targets[b]]
            assert abs(float(clean) - float(e.logits[b].log_softmax(-1)[targets[b]])) < 1e-10
            expected = torch.stack([
                clean - timm_logits(model, x[b:b + 1], one_hot_factors(N, j, x.dtype)).log_softmax(-1)[0, targets[b]]
                for j in range(N)
            ])
            assert (e.token_relevance[b] - expected).abs().max() < 1e-8
            assert expected.abs().max() > 1e-3  # suppression changes the prediction


# --------------------------------------------------------------------------------------------
# Hugging Face models: a reference attention function
# --------------------------------------------------------------------------------------------
REFERENCE = {"factors": None}


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-2, -1)) * scaling
    T, S = scores.shape[-2:]
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if getattr(module, "is_causal", False):
        allowed = allowed & torch.ones(T, S, dtype=torch.bool).tril()
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(scores.dtype).min / 2
        allowed = allowed & mask
    probs = suppressed_scores(scores, allowed, REFERENCE["factors"].to(scores.dtype))
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("atman_reference", reference_attention)


def reference_scores(model, call, num_tokens: int, dtype) -> torch.Tensor:
    """``(N + 1,)`` the target's log-probability with nothing, then each token, suppressed."""
    old = model.config._attn_implementation
    model.set_attn_implementation("atman_reference")
    try:
        out = []
        for j in [None, *range(num_tokens)]:
            REFERENCE["factors"] = one_hot_factors(num_tokens, j, dtype)
            with torch.no_grad():
                out.append(call())
        return torch.stack(out)
    finally:
        model.set_attn_implementation(old)


def real(inputs: dict, b: int) -> dict:
    keep = inputs["attention_mask"][b].bool()
    return {k: v[b:b + 1, keep] for k, v in inputs.items()}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_classifier_equals_the_scores_formula(impl):
    case = CASES[f"hf_bert_{impl}"]
    model = case.model(torch.float64)
    inputs = case.inputs(2, lengths=[9, 6])
    e = attnx.explain(model, inputs, method="atman")
    for b, n in ((0, 9), (1, 6)):
        one = real(inputs, b)
        ref = reference_scores(model, lambda one=one, t=int(e.targets[b]): model(**one).logits.log_softmax(-1)[0, t], n, torch.float64)
        expected = ref[0] - ref[1:]
        assert (e.token_relevance[b, :n] - expected).abs().max() < 1e-8
        assert (e.token_relevance[b, n:] == 0).all()  # padding


# Llama's eager kernel takes the softmax in float32, and a float64 Llama gives NaN on left padding
# there (the explained pass observes the attention through it): Llama is compared in float32
@pytest.mark.parametrize("family,impl,dtype,tol", [
    ("gpt2", "sdpa", torch.float64, 1e-8), ("gpt2", "eager", torch.float64, 1e-8),
    ("llama", "sdpa", torch.float32, 1e-4), ("llama", "eager", torch.float32, 1e-4),
])
def test_decoder_next_token_equals_the_scores_formula(family, impl, dtype, tol):
    case = DecoderCase(family, "lm", impl)
    model = case.model(dtype)
    inputs = case.inputs(lengths=[9, 5])
    e = attnx.explain(model, inputs, method="atman")
    T = inputs["input_ids"].shape[1]
    for b, n in ((0, 9), (1, 5)):
        one = real(inputs, b)
        token = e.targets[b]
        ref = reference_scores(model, lambda one=one, token=token: model(**one).logits[0, -1].log_softmax(-1)[token], n, dtype)
        expected = ref[0] - ref[1:]
        assert (e.token_relevance[b, T - n:] - expected).abs().max() < tol  # left padding
        assert (e.token_relevance[b, : T - n] == 0).all()


def test_score_target_is_the_drop_of_the_logit():
    case = CASES["hf_vit_sdpa"]
    model, x = case.model(torch.float64), case.inputs(1, dtype=torch.float64)
    e = attnx.explain(model, x, method="atman", score="target", suppression=0.5)
    target = int(e.targets[0])
    global SUPPRESSION
    saved, SUPPRESSION = SUPPRESSION, 0.5
    try:
        ref = reference_scores(model, lambda: model(pixel_values=x).logits[0, target], 17, torch.float64)
    finally:
        SUPPRESSION = saved
    assert (e.token_relevance[0] - (ref[0] - ref[1:])).abs().max() < 1e-8
    assert e.options["score"] == "target" and e.options["suppression"] == 0.5


def test_cosine_neighbourhood_suppresses_similar_tokens_with_the_authors_factor():
    case = CASES["hf_bert_sdpa"]
    model = case.model(torch.float64)
    inputs = case.inputs(1)
    kappa, f = 0.15, SUPPRESSION
    e = attnx.explain(model, inputs, method="atman", neighbourhood=kappa)
    embeddings = model.get_input_embeddings()(inputs["input_ids"])[0].detach()
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True)
    cosine = unit @ unit.T
    assert ((cosine >= kappa).sum() - 9) > 0  # some tokens have neighbours
    t = int(e.targets[0])
    old = model.config._attn_implementation
    model.set_attn_implementation("atman_reference")
    try:
        with torch.no_grad():
            REFERENCE["factors"] = torch.ones(1, 9, dtype=torch.float64)
            clean = model(**inputs).logits.log_softmax(-1)[0, t]
            expected = []
            for j in range(9):
                factors = torch.where(cosine[j] >= kappa, f * (1 - cosine[j]) + (1 - f), torch.ones(9, dtype=torch.float64))
                factors[j] = 1 - f
                REFERENCE["factors"] = factors[None]
                expected.append(clean - model(**inputs).logits.log_softmax(-1)[0, t])
    finally:
        model.set_attn_implementation(old)
    assert (e.token_relevance[0] - torch.stack(expected)).abs().max() < 1e-8
    alone = attnx.explain(model, inputs, method="atman")
    assert (alone.token_relevance - e.token_relevance).abs().max() > 1e-4  # the neighbourhood changes the map
    assert e.options["neighbourhood"] == kappa


def test_cosine_neighbourhood_needs_token_embeddings():
    case = CASES["timm_vit"]
    with pytest.raises(attnx.errors.AttnxValueError, match="token embeddings"):
        attnx.explain(case.model(), case.inputs(1), method="atman", neighbourhood=0.7)


# --------------------------------------------------------------------------------------------
# contracts
# --------------------------------------------------------------------------------------------
def test_batch_equals_samples_alone_and_model_is_left_as_found():
    case = DecoderCase("gpt2", "cls", "eager")
    model = case.model()
    inputs = case.inputs(lengths=[9, 4])
    before = snapshot(model)
    e = attnx.explain(model, inputs, method="atman")
    assert_unchanged(before, model)
    for b, n in ((0, 9), (1, 4)):
        alone = attnx.explain(model, real(inputs, b), method="atman")
        assert (alone.token_relevance[0] - e.token_relevance[b, :n]).abs().max() < 1e-4


def test_clip_image_tower_explains_a_similarity():
    model = hf_clip()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=images.flip(0)).pooler_output
    e = attnx.explain(model, images, method="atman", target=attnx.similarity.cosine_to(reference))
    assert e.options["score"] == "target"
    assert torch.isfinite(e.scores).all() and e.scores.abs().amax() > 0


def torchvision_logits(model, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """A torchvision ViT's forward written out (``nn.MultiheadAttention`` by its packed weights)."""
    h = model._process_input(x)
    h = torch.cat([model.class_token.expand(h.shape[0], -1, -1), h], dim=1) + model.encoder.pos_embedding
    for layer in model.encoder.layers:
        mha = layer.self_attention
        y = layer.ln_1(h)
        B, N, C = y.shape
        q, k, v = (F.linear(y, w, b).reshape(B, N, mha.num_heads, -1).transpose(1, 2)
                   for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
        scores = (q @ k.transpose(-2, -1)) / (C // mha.num_heads) ** 0.5
        probs = suppressed_scores(scores, torch.ones_like(scores, dtype=torch.bool), factors)
        h = h + mha.out_proj((probs @ v).transpose(1, 2).reshape(B, N, C))
        h = h + layer.mlp(layer.ln_2(h))
    return model.heads(model.encoder.ln(h)[:, 0])


def test_torchvision_multihead_attention_equals_the_scores_formula():
    case = CASES["torchvision_vit"]
    model, x = case.model(torch.float64), case.inputs(1, dtype=torch.float64)
    e = attnx.explain(model, x, method="atman")
    t = int(e.targets[0])
    with torch.no_grad():
        clean = torchvision_logits(model, x, one_hot_factors(17, None, x.dtype)).log_softmax(-1)[0, t]
        assert abs(float(clean) - float(e.logits[0].log_softmax(-1)[t])) < 1e-10
        expected = torch.stack([
            clean - torchvision_logits(model, x, one_hot_factors(17, j, x.dtype)).log_softmax(-1)[0, t] for j in range(17)
        ])
    assert (e.token_relevance[0] - expected).abs().max() < 1e-8


def test_suppression_bounds_are_checked():
    case = CASES["timm_vit"]
    with pytest.raises(attnx.errors.AttnxValueError, match="suppression"):
        attnx.explain(case.model(), case.inputs(1), method="atman", suppression=1.5)


def test_probability_form_equals_the_scores_form():
    """``log A - min log A`` is the shifted score: the edit on probabilities is the scores formula."""
    from attnx.methods.atman import suppressed_probabilities

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64) * 4
    allowed = torch.ones(5, 5, dtype=torch.bool).tril().expand(3, 2, 5, 5)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    factors = torch.rand(3, 5, generator=g, dtype=torch.float64)
    expected = suppressed_scores(scores, allowed, factors)
    assert (suppressed_probabilities(probs, factors) - expected).abs().max() < 1e-12
    folded = suppressed_probabilities(probs.reshape(6, 5, 5), factors).reshape(3, 2, 5, 5)
    assert (folded - expected).abs().max() < 1e-12
