"""LRP methods on stock models: conservation, path independence, batch independence, and the
semantics of transformer attribution pinned independently (DESIGN.md §4-§6), in float64.

* CP-LRP conserves: with every bias-like parameter zeroed (biases, LayerNorm betas, position
  embeddings, class tokens, token-type embeddings, relative position bias tables) the input
  relevance sums to the target logit, on timm ViT, torchvision ViT, Hugging Face BERT (at the
  token embeddings) and a timm Swin Transformer (in strict mode: no uncovered op).
* The relevance does not depend on the attention kernel: Hugging Face eager vs SDPA, timm
  ``fused_attn`` on vs off, and timm vs torchvision running the same (ported) weights.
* A batch explained at once equals each sample explained alone, with per-sample targets.
* Transformer attribution is recomputed here from ``Explainer.trace(needs=Needs(attention_relevance=True))`` and
  ``Explainer.capture(gradients=True)`` with explicit full matrix products (the ViT and the
  BERT form), and checked against a one-layer model whose ``R^A`` is derived by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx import Needs
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


# --------------------------------------------------------------------------------------------
# 4. transformer attribution, recomputed
# --------------------------------------------------------------------------------------------
def lrp_and_gradients(model, x, targets):
    explainer = attnx.Explainer(model)
    lrp = explainer.trace(x, target=targets, needs=Needs(attention_relevance=True), preset="chefer2021")
    cap = explainer.capture(x, target=targets, gradients=True)
    assert lrp.targets.tolist() == cap.targets.tolist() == targets
    assert len(lrp.attention_relevance) == len(cap.gradients) == 3
    return explainer, lrp.attention_relevance, cap.gradients


def layer_maps(relevance, gradients):
    """Ā_l = E_h[(∇A_l ⊙ R^A_l)⁺], each (B, N, N)."""
    return [(g * r).clamp(min=0).mean(dim=1) for g, r in zip(gradients, relevance)]


def product(matrices):
    """M_L ⋯ M_s as full (B, N, N) matrices, later layers on the left."""
    C = matrices[0]
    for M in matrices[1:]:
        C = M @ C
    return C


@pytest.mark.parametrize("start_layer", [0, 1])
def test_transformer_attribution_vit_form(start_layer):
    model, x, targets = CASES["timm_vit"].model(DT), images(2), [5, 2]
    explainer, relevance, gradients = lrp_and_gradients(model, x, targets)
    eye = torch.eye(17, dtype=DT)
    maps = [m + eye for m in layer_maps(relevance, gradients)]  # no normalisation
    C = product(maps[start_layer:])
    e = explainer.explain(x, method="transformer_attribution", target=targets, start_layer=start_layer)
    assert e.options["form"] == "vit"
    assert rel_err(e.token_relevance, C[:, 0, :]) <= 1e-12
    assert rel_err(e.scores, C[:, 0, 1:]) <= 1e-12
    # the comparison tells the layer order and the normalisation apart
    reversed_order = maps[start_layer]
    for M in maps[start_layer + 1:]:
        reversed_order = reversed_order @ M
    assert rel_err(reversed_order[:, 0, 1:], e.scores) > 1e-6
    normalised = product([m / m.sum(-1, keepdim=True) for m in maps[start_layer:]])
    assert rel_err(normalised[:, 0, 1:], e.scores) > 1e-6


@pytest.mark.parametrize("start_layer", [None, 0])
def test_transformer_attribution_bert_form(start_layer):
    model, x, targets = CASES["hf_bert_eager"].model(DT), bert_inputs((9, 6, 4)), [1, 3, 0]
    explainer, relevance, gradients = lrp_and_gradients(model, x, targets)
    valid = x["attention_mask"].bool()
    eye = torch.eye(9, dtype=DT)
    maps = [m + eye for m in layer_maps(relevance, gradients)]
    maps = [m / m.sum(-1, keepdim=True) for m in maps]  # rows normalised
    s = 2 if start_layer is None else start_layer  # default: the last layer only
    row = product(maps[s:])[:, 0, :].clone()
    for b in range(3):  # the CLS token's self-relevance: the row's minimum over the real tokens
        row[b, 0] = min(row[b, j].item() for j in range(9) if valid[b, j])
    options = {} if start_layer is None else {"start_layer": start_layer}
    e = explainer.explain(x, method="transformer_attribution", target=targets, **options)
    assert e.options["form"] == "bert" and e.options["start_layer"] == s
    assert rel_err(e.token_relevance[valid], row[valid]) <= 1e-12
    assert rel_err(e.scores, row * valid) <= 1e-12


class OneLayer(nn.Module):
    """A class token and four pixel tokens (a 2x2 RGB image, d = 3), one attention head without
    projections (q = k = v = tokens), and a linear head on the class token's output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 3, generator=g, dtype=DT))
        self.head = nn.Linear(3, 4).to(DT)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(4, 3, generator=g, dtype=DT))
            self.head.bias.copy_(torch.randn(4, generator=g, dtype=DT))

    def forward(self, x):
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        q = tokens.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, q, q)
        return self.head(out[:, 0, 0])


def by_hand(model: OneLayer, x: torch.Tensor, target: int):
    """R^A and ∇A of the class token's row, in plain Python.

    Seed: relevance 1 at the target logit. Head (α=1 β=0, bias ignored): R_o[d] =
    P_d / (Σ P + 1e-9) with P_d = o_d⁺ W_td⁺ + o_d⁻ W_td⁻. Attention output o_d = Σ_j A_0j v_jd
    (Chefer's bilinear rule, halved): R^A_0j = ½ Σ_d A_0j v_jd R_o[d] / (o_d + 1e-9).
    Gradient: ∂y_t/∂A_0j = Σ_d W_td v_jd.
    """
    W = model.head.weight.tolist()[target]
    toks = [model.cls_token[0, 0].tolist()] + [[x[c, i, j].item() for c in range(3)] for i in range(2) for j in range(2)]
    scale = 1 / math.sqrt(3)
    scores = [scale * sum(toks[0][d] * toks[j][d] for d in range(3)) for j in range(5)]
    top = max(scores)
    ex = [math.exp(s - top) for s in scores]
    A = [e / sum(ex) for e in ex]
    o = [sum(A[j] * toks[j][d] for j in range(5)) for d in range(3)]
    P = [max(o[d], 0) * max(W[d], 0) + min(o[d], 0) * min(W[d], 0) for d in range(3)]
    R_o = [P[d] / (sum(P) + 1e-9) for d in range(3)]
    R_A = [0.5 * sum(A[j] * toks[j][d] * R_o[d] / (o[d] + 1e-9) for d in range(3)) for j in range(5)]
    grad_A = [sum(W[d] * toks[j][d] for d in range(3)) for j in range(5)]
    return R_A, grad_A


def test_transformer_attribution_by_hand_on_one_attention_layer():
    model = OneLayer()
    x = images(2, size=2, seed=8)
    targets = [0, 3]
    explainer = attnx.Explainer(model)
    assert explainer.adapter.name == "intercept"
    ta = explainer.explain(x, method="transformer_attribution", target=targets)
    plrp = explainer.explain(x, method="partial_lrp", target=targets)
    assert ta.grid == (2, 2) and ta.layout.prefix_tokens == 1
    tol = 1e-7  # the reference code's 1e-9 stabilisers (indexing, fan-out) act below this
    for b in range(2):
        R_A, grad_A = by_hand(model, x[b], targets[b])
        # C = Ā + I, row 0: the identity only adds to the class token's own entry
        expected_ta = [max(g * r, 0.0) + (1.0 if j == 0 else 0.0) for j, (g, r) in enumerate(zip(grad_A, R_A))]
        expected_plrp = [max(r, 0.0) for r in R_A]
        assert max(abs(a - c) for a, c in zip(ta.token_relevance[b].tolist(), expected_ta)) <= tol * max(expected_ta)
        assert max(abs(a - c) for a, c in zip(ta.scores[b].tolist(), expected_ta[1:])) <= tol * max(expected_ta)
        assert max(abs(a - c) for a, c in zip(plrp.token_relevance[b].tolist(), expected_plrp)) <= tol * max(expected_plrp)
        # not trivial: some patches relevant, some clamped away
        assert max(expected_ta[1:]) > 1e-3 and min(g * r for g, r in zip(grad_A[1:], R_A[1:])) < -1e-3
