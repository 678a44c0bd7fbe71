"""LRP methods on stock models: conservation, path independence, batch independence (DESIGN.md
§4-§6), in float64.

* CP-LRP conserves: with every bias-like parameter zeroed (biases, LayerNorm betas, position
  embeddings, class tokens, token-type embeddings, relative position bias tables) the input
  relevance sums to the target logit, on timm ViT, torchvision ViT, Hugging Face BERT (at the
  token embeddings) and a timm Swin Transformer (in strict mode: no uncovered op).
* The relevance does not depend on the attention kernel: Hugging Face eager vs SDPA, timm
  ``fused_attn`` on vs off, and timm vs torchvision running the same (ported) weights.
* A batch explained at once equals each sample explained alone, with per-sample targets.

Transformer attribution's own semantics: ``test_methods_transformer_attribution.py``.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

import attnx
from attnx.lrp import presets
from conftest import CASES, randomize_, text_inputs, with_batch

DT = torch.float64
PRESETS = list(presets)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


def target_logit(e) -> torch.Tensor:
    return e.logits.gather(1, e.targets[:, None])[:, 0]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
BIAS_LIKE = (
    "pos_embed", "cls_token", "class_token", "pos_embedding", "position_embeddings", "token_type_embeddings",
    "relative_position_bias_table",
)


def zero_bias_like_(model: nn.Module) -> list[str]:
    """Zero every bias-like parameter in place; returns their names."""
    zeroed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(k in name for k in BIAS_LIKE):
                p.zero_()
                zeroed.append(name)
    return zeroed


def swin() -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4, embed_dim=24,
        depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), num_classes=5,
    )
    return randomize_(model, seed=21).to(DT).eval()


def images(batch: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=DT)


def bert_inputs(lengths=(9, 6, 4)) -> dict:
    return text_inputs(len(lengths), torch.Generator().manual_seed(3), 0, list(lengths))


# --------------------------------------------------------------------------------------------
# 1. CP-LRP conserves the target logit
# --------------------------------------------------------------------------------------------
CONSERVATION = {
    "timm_vit": (lambda: CASES["timm_vit"].model(DT), lambda: images(2), {"pos_embed", "cls_token"}),
    "torchvision_vit": (
        lambda: CASES["torchvision_vit"].model(DT), lambda: images(2), {"encoder.pos_embedding", "class_token", "heads.head.bias"},
    ),
    "hf_bert": (
        lambda: CASES["hf_bert_sdpa"].model(DT), lambda: bert_inputs(),
        {"bert.embeddings.token_type_embeddings.weight", "bert.embeddings.position_embeddings.weight",
         "bert.pooler.dense.bias", "bert.embeddings.LayerNorm.bias"},
    ),
    "timm_swin": (swin, lambda: images(2, 64), {"layers.0.blocks.0.attn.relative_position_bias_table", "head.fc.bias"}),
}


@pytest.mark.parametrize("name", list(CONSERVATION))
def test_cplrp_conserves_the_target_logit(name):
    build, inputs, must_zero = CONSERVATION[name]
    model, x = build(), inputs()
    targets = [1, 3] + ([0] if name == "hf_bert" else [])
    # with the biases in place, relevance leaks to them (the check below can fail)
    e = attnx.explain(model, x, method="lrp", preset="cplrp", target=targets, strict=True)
    dims = tuple(range(1, e.input_relevance.dim()))
    assert rel_err(e.input_relevance.sum(dims), target_logit(e)) > 1e-3
    zeroed = zero_bias_like_(model)
    assert must_zero <= set(zeroed)
    e = attnx.explain(model, x, method="lrp", preset="cplrp", target=targets, strict=True)
    R = e.input_relevance
    assert R.dtype == DT
    assert R.shape == ((3, 9, 32) if name == "hf_bert" else x.shape)
    assert e.targets.tolist() == targets
    assert target_logit(e).abs().min() > 1e-3  # not a trivial 0 == 0
    assert rel_err(R.sum(dims), target_logit(e)) <= 1e-6
    if name == "hf_bert":  # padding gets nothing; per-token scores are the embedding sums
        assert any(line.split()[:2] == ["tanh", "identity"] for line in e.coverage.report().splitlines())
        valid = x["attention_mask"].bool()
        assert R[~valid].abs().max() <= 1e-12
        assert rel_err(e.scores, R.sum(-1) * valid) <= 1e-12
    if name == "timm_swin":  # the Swin adapter, and its coverage is complete
        assert "NO RULE" not in e.coverage.report() and "constant" in e.coverage.report()


# --------------------------------------------------------------------------------------------
# 2. the same relevance whatever the attention kernel
# --------------------------------------------------------------------------------------------
def bert_pair():
    eager, sdpa = CASES["hf_bert_eager"].model(DT), CASES["hf_bert_sdpa"].model(DT)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


@pytest.mark.parametrize("preset", PRESETS)
def test_hf_eager_and_sdpa_give_the_same_lrp(preset):
    eager, sdpa = bert_pair()
    x = bert_inputs()
    a = attnx.explain(eager, x, method="lrp", preset=preset, target=[1, 3, 0], strict=True)
    b = attnx.explain(sdpa, x, method="lrp", preset=preset, target=[1, 3, 0], strict=True)
    assert "scaled_dot_product_attention" in b.coverage.report()
    assert "scaled_dot_product_attention" not in a.coverage.report()
    # chefer2021's 1e-9 stabilisers see the attention mask added (eager) or filled in (SDPA)
    assert rel_err(b.input_relevance, a.input_relevance) <= (1e-6 if preset == "chefer2021" else 1e-9)
    assert a.input_relevance.abs().max() > 0


@pytest.mark.parametrize("method", ["transformer_attribution", "partial_lrp"])
def test_hf_eager_and_sdpa_give_the_same_attention_relevance(method):
    eager, sdpa = bert_pair()
    x = bert_inputs()
    a = attnx.explain(eager, x, method=method, target=[1, 3, 0])
    b = attnx.explain(sdpa, x, method=method, target=[1, 3, 0])
    assert rel_err(b.token_relevance, a.token_relevance) <= 1e-9
    assert a.scores.abs().max() > 0
    assert sdpa.config._attn_implementation == "sdpa"


def port_timm_to_torchvision(t: nn.Module) -> nn.Module:
    """A torchvision ViT running the weights of the timm ViT ``t`` (the same function)."""
    from torchvision.models.vision_transformer import VisionTransformer

    depth, dim = len(t.blocks), t.embed_dim
    v = VisionTransformer(
        image_size=t.patch_embed.img_size[0], patch_size=t.patch_embed.patch_size[0], num_layers=depth,
        num_heads=t.blocks[0].attn.num_heads, hidden_dim=dim, mlp_dim=t.blocks[0].mlp.fc1.out_features,
        num_classes=t.num_classes,
    ).to(DT)
    sd = t.state_dict()
    new = {
        "class_token": sd["cls_token"], "encoder.pos_embedding": sd["pos_embed"],
        "conv_proj.weight": sd["patch_embed.proj.weight"], "conv_proj.bias": sd["patch_embed.proj.bias"],
        "encoder.ln.weight": sd["norm.weight"], "encoder.ln.bias": sd["norm.bias"],
        "heads.head.weight": sd["head.weight"], "heads.head.bias": sd["head.bias"],
    }
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "self_attention.in_proj", "attn.proj": "self_attention.out_proj",
             "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    for i in range(depth):
        for a, b in names.items():
            for s in ("weight", "bias"):
                key = f"encoder.layers.encoder_layer_{i}.{b}_{s}" if a == "attn.qkv" else f"encoder.layers.encoder_layer_{i}.{b}.{s}"
                new[key] = sd[f"blocks.{i}.{a}.{s}"]
    v.load_state_dict(new, strict=True)
    # align LayerNorm eps
    v.encoder.ln.eps = t.norm.eps
    for i, layer in enumerate(v.encoder.layers):
        layer.ln_1.eps, layer.ln_2.eps = t.blocks[i].norm1.eps, t.blocks[i].norm2.eps
    return v.eval()


@pytest.fixture(scope="module")
def timm_and_torchvision():
    t = CASES["timm_vit"].model(DT)
    v = port_timm_to_torchvision(t)
    x = images(3)
    with torch.no_grad():
        assert rel_err(v(x), t(x)) <= 1e-12, "the port is not the same function"
    return t, v, x


@pytest.mark.parametrize("preset", PRESETS)
def test_timm_and_torchvision_give_the_same_lrp(timm_and_torchvision, preset):
    t, v, x = timm_and_torchvision
    a = attnx.explain(t, x, method="lrp", preset=preset, target=[1, 3, 0], strict=True)
    b = attnx.explain(v, x, method="lrp", preset=preset, target=[1, 3, 0], strict=True)
    assert "multi_head_attention_forward" in b.coverage.report()
    # chefer2021's 1e-9 stabilisers see the attention scale at another place (1e-8 level)
    assert rel_err(b.input_relevance, a.input_relevance) <= 1e-6


@pytest.mark.parametrize("method", ["transformer_attribution", "partial_lrp"])
def test_timm_and_torchvision_give_the_same_attention_relevance(timm_and_torchvision, method):
    t, v, x = timm_and_torchvision
    a = attnx.explain(t, x, method=method, target=[1, 3, 0])
    b = attnx.explain(v, x, method=method, target=[1, 3, 0])
    assert rel_err(b.token_relevance, a.token_relevance) <= 1e-6
    assert a.scores.abs().max() > 0


@pytest.mark.parametrize("method,preset", [("lrp", p) for p in PRESETS] + [("transformer_attribution", "chefer2021")])
def test_timm_fused_and_unfused_attention_give_the_same_relevance(method, preset):
    fused, unfused = CASES["timm_vit"].model(DT), CASES["timm_vit_unfused"].model(DT)
    assert all(m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn"))
    assert not any(m.fused_attn for m in unfused.modules() if hasattr(m, "fused_attn"))
    x = images(3)
    a = attnx.explain(fused, x, method=method, preset=preset, target=[1, 3, 0])
    b = attnx.explain(unfused, x, method=method, preset=preset, target=[1, 3, 0])
    if method == "lrp":
        assert "scaled_dot_product_attention" in a.coverage.report()
        assert "scaled_dot_product_attention" not in b.coverage.report()
        assert rel_err(b.input_relevance, a.input_relevance) <= 1e-6
    assert rel_err(b.scores, a.scores) <= 1e-6


# --------------------------------------------------------------------------------------------
# 3. batch independence
# --------------------------------------------------------------------------------------------
BATCH_MODELS = {
    "timm_vit": (lambda: CASES["timm_vit"].model(DT), lambda: images(3)),
    "torchvision_vit": (lambda: CASES["torchvision_vit"].model(DT), lambda: images(3)),
    "hf_bert_padded": (lambda: CASES["hf_bert_sdpa"].model(DT), lambda: bert_inputs((9, 6, 4))),
}
BATCH_METHODS = (
    [("lrp", p) for p in PRESETS]
    + [("transformer_attribution", p) for p in ("chefer2021", "attnlrp")]
    + [("partial_lrp", p) for p in ("chefer2021", "attnlrp")]
)
TARGETS = [4, 0, 2]


def assert_batch_independent(model, x, method, preset, extra=None):
    explainer = attnx.Explainer(model)
    options = {"preset": preset, **(extra or {})}
    batch = explainer.explain(x, method=method, target=TARGETS, **options)
    assert batch.targets.tolist() == TARGETS
    full = batch.input_relevance if method == "lrp" else batch.token_relevance
    assert full.abs().max() > 0
    for b in range(3):
        alone = explainer.explain(with_batch(x, [b]), method=method, target=[TARGETS[b]], **options)
        got = alone.input_relevance if method == "lrp" else alone.token_relevance
        err = (got[0] - full[b]).abs().max().item()
        assert err <= 1e-6 * max(1.0, full[b].abs().max().item()), f"sample {b}: {err:.3e}"
        assert (alone.scores[0] - batch.scores[b]).abs().max().item() <= 1e-6 * max(1.0, batch.scores[b].abs().max().item())


@pytest.mark.parametrize("method,preset", BATCH_METHODS, ids=[f"{m}-{p}" for m, p in BATCH_METHODS])
@pytest.mark.parametrize("name", list(BATCH_MODELS))
def test_batch_equals_samples_alone(name, method, preset):
    build, inputs = BATCH_MODELS[name]
    assert_batch_independent(build(), inputs(), method, preset)


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_equals_samples_alone_swin(preset):
    assert_batch_independent(swin(), images(3, 64), "lrp", preset)
