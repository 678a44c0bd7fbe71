"""Dual encoders: Hugging Face CLIP and SigLIP, OpenCLIP (tiny random models, see clip_models.py).

* every method on both towers of every family; one map per (image, prompt) pair; a batch of
  images explained at once equals each image alone; the model is left as found;
* the explained scalar is the model's own ``logits_per_image`` (without SigLIP's bias);
* gradient methods against ``torch.autograd`` on the model's own ``logits_per_image`` (generic
  for both towers, gradient × input at the pixels);
* Chefer et al.'s ICCV'21 relevance of a one-layer CLIP image tower against a forward written out
  here; SigLIP's readout (its pooling head's probe attention) against the probe attention computed
  by hand;
* CP-LRP with every bias-like parameter zeroed conserves ``scale · cos`` on every tower.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnx
from attnx.core import image_text
from attnx.errors import AttnxError
from clip_models import FAMILIES, IMAGE, PATCH, WordTokenizer, hf_clip, hf_siglip, images, model_logits, open_clip_model, tokenizer_for
from contracts import assert_unchanged, snapshot

DT = torch.float64
PROMPTS = ["a cat", "a big brown dog"]
METHODS = attnx.list_methods()
N_PATCHES = (IMAGE // PATCH) ** 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


def tokens(family: str, prompts=PROMPTS):
    tok = tokenizer_for(family)
    if family == "siglip":
        return tok(prompts, padding="max_length", max_length=16)
    return tok(prompts)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param](dtype=DT)


# --------------------------------------------------------------------------------------------
# every method, both towers, one map per pair, batched = alone, state restored
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_method_one_map_per_prompt_batched_equals_alone(family, method):
    name, model = family
    x = images(2, DT)
    before = snapshot(model)
    pair = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method=method)
    assert_unchanged(before, model)
    assert isinstance(pair, attnx.ImageTextExplanation)
    T = 12 if name.startswith("open_clip") else 16 if name == "siglip" else 6  # "a big brown dog" + start and end
    assert pair.image_scores().shape == (2, 2, N_PATCHES)
    assert pair.text_scores().shape == (2, 2, T)
    assert pair.image_maps().shape == (2, 2, IMAGE, IMAGE)
    assert pair.image_index.tolist() == [0, 0, 1, 1] and pair.prompt_index.tolist() == [0, 1, 0, 1]
    for e in (pair.image, pair.text):
        assert torch.isfinite(e.scores).all() and e.method == method
    for b in range(2):
        alone = attnx.explain(model, x[b : b + 1], text=PROMPTS, tokenizer=tokenizer_for(name), method=method)
        assert rel_err(pair.image_scores()[b], alone.image_scores()[0]) <= 1e-5
        assert rel_err(pair.text_scores()[b], alone.text_scores()[0]) <= 1e-5
    if attnx.get_method(method).gradients:  # a class-specific method gives each prompt its own map
        s = pair.image_scores()
        assert (s[:, 0] - s[:, 1]).abs().max() > 1e-6 * s.abs().max()


def test_the_explained_scalar_is_the_models_logit(family):
    name, model = family
    x = images(3, DT)
    pair = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method="generic")
    expected = model_logits(name, model, x, tokens(name))
    bias = float(model.logit_bias.detach()) if name == "siglip" else 0.0
    assert rel_err(pair.logits_per_image, expected) <= 1e-10
    for e in (pair.image, pair.text):  # Hugging Face's eager kernel takes its softmax in float32
        assert rel_err(e.target_scores.reshape(3, 2) + bias, expected) <= (1e-10 if name.startswith("open_clip") else 1e-6)


def test_zero_shot_and_prompt_index_targets(family):
    name, model = family
    x = images(3, DT)
    every = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method="grad_rollout")
    predicted = every.logits_per_image.argmax(1)
    zs = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method="grad_rollout", target=image_text.zero_shot)
    assert zs.prompt_index.tolist() == predicted.tolist() and zs.image.scores.shape == (3, N_PATCHES)
    assert rel_err(zs.image.scores, every.image_scores()[torch.arange(3), predicted]) <= 1e-10
    one = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method="grad_rollout", target=[1, 0, 1])
    assert rel_err(one.text.scores, every.text_scores()[torch.arange(3), torch.tensor([1, 0, 1])]) <= 1e-10
    with pytest.raises(AttnxError, match="one prompt index"):
        attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method="rollout", target=2)


def test_one_tower_takes_callable_targets(family):
    """The similarity of two images (cosine), and a text retrieval score, on the image tower alone."""
    name, model = family
    x = images(2, DT)
    ex = attnx.Explainer(model)
    ref = image_text.embeddings(ex.adapter, images(1, DT, seed=5))
    e = ex(x, method="lrp", preset="cplrp", target=attnx.similarity.cosine_to(ref))
    emb = image_text.embeddings(ex.adapter, x)
    assert rel_err(e.target_scores, F.cosine_similarity(emb, ref)) <= 1e-10
    gallery = F.normalize(image_text.embeddings(ex.adapter, tokens(name)), dim=-1)
    retrieval = lambda out: F.normalize(out, dim=-1).matmul(gallery.T).mul(10).log_softmax(-1)[:, 1]  # noqa: E731
    g = ex(x, method="generic", target=retrieval)
    assert torch.isfinite(g.scores).all() and g.scores.shape == (2, N_PATCHES)
    assert ex(x, method="rollout").scores.shape == (2, N_PATCHES)  # attention only: no target needed
    with pytest.raises(AttnxError, match="dual encoder: its output is an embedding"):
        ex(x, method="generic")


# --------------------------------------------------------------------------------------------
# gradient methods against torch.autograd on the model's own logits_per_image
# --------------------------------------------------------------------------------------------
def generic_rows(attentions, grads, readout):
    """Chefer et al. ICCV'21, Eq. 5-6, for one sample: R = I + Σ_l Ā_l R, read at ``readout``."""
    N = attentions[0].shape[-1]
    R = torch.eye(N, dtype=DT)
    for A, G in zip(attentions, grads):
        R = R + (G * A).clamp(min=0).mean(0) @ R
    return R[readout]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_generic_against_autograd_on_logits_per_image(name):
    model = FAMILIES[name](dtype=DT)
    x, text = images(2, DT), tokens(name)
    pair = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method="generic")
    # the authors' CLIP notebook keeps the last layer only (its start_layer = 11 of 12)
    last = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for(name), method="generic", start_layer=-1)
    model.set_attn_implementation("eager")
    try:
        for b in range(2):
            for p in range(2):
                x_bp = x[b : b + 1].clone().requires_grad_(True)
                out = model(pixel_values=x_bp, **{k: v[p : p + 1] for k, v in text.items()}, output_attentions=True)
                img_att, txt_att = out.vision_model_output.attentions, out.text_model_output.attentions
                grads = torch.autograd.grad(out.logits_per_image[0, 0], [*img_att, *txt_att, x_bp])
                L = len(img_att)
                if name == "clip":
                    image_row = generic_rows([a[0] for a in img_att], [g[0] for g in grads[:L]], 0)[1:]
                    eot = int(text["input_ids"][p].argmax())
                else:  # the MAP probe's head-mean attention weights the rows
                    w = pair.image.layout.readout[2 * b + p].to(DT)
                    assert abs(float(w.sum()) - 1) < 1e-12
                    N = img_att[0].shape[-1]
                    image_row = torch.stack([generic_rows([a[0] for a in img_att], [g[0] for g in grads[:L]], i) for i in range(N)])
                    image_row = w @ image_row
                    eot = text["input_ids"].shape[1] - 1
                text_row = generic_rows([a[0] for a in txt_att], [g[0] for g in grads[L:-1]], eot)
                # Hugging Face's eager kernel takes the softmax in float32 (here and in attnx's pass)
                assert rel_err(pair.image_scores()[b, p], image_row) <= 1e-6
                if name == "clip":
                    row = generic_rows([img_att[-1][0]], [grads[L - 1][0]], 0)[1:]
                    assert rel_err(last.image_scores()[b, p], row) <= 1e-6
                    assert rel_err(last.image_scores()[b, p], image_row) > 1e-3
                valid = text["attention_mask"][p].bool()
                if name == "siglip":
                    valid[-1] = True
                assert rel_err(pair.text_scores()[b, p], text_row * valid) <= 1e-6
                # gradient x input at the pixels
                gx = attnx.explain(model, x[b : b + 1], text=[PROMPTS[p]], tokenizer=tokenizer_for(name),
                                   method="gradient_x_input", towers="image")
                assert rel_err(gx.image.pixel_relevance[0], (x_bp * grads[-1]).sum(1)[0].detach()) <= 1e-6
    finally:
        model.set_attn_implementation("sdpa")


def test_open_clip_generic_against_autograd_on_its_similarity():
    """OpenCLIP's attention is nn.MultiheadAttention: the weights are recomputed here from its
    in-projection, the gradient taken by autograd on the model's own (normalised) features."""
    model = open_clip_model(dtype=DT)
    x, ids = images(1, DT), tokens("open_clip", PROMPTS[:1])
    pair = attnx.explain(model, x, text=PROMPTS[:1], tokenizer=tokenizer_for("open_clip"), method="generic", towers="image")
    probs = []

    def attention(block_attn, h, *args, **kwargs):  # the block's own MHA, asked for per-head weights
        out, w = torch.nn.MultiheadAttention.forward(block_attn, h, h, h, need_weights=True, average_attn_weights=False)
        probs.append(w)
        # the output recomputed from w (in the graph) so that the gradient at w is dL/dA
        q_w = block_attn.in_proj_weight
        v = F.linear(h, q_w[2 * h.shape[-1] :], block_attn.in_proj_bias[2 * h.shape[-1] :])
        B, N, D = v.shape
        H = block_attn.num_heads
        o = (w @ v.view(B, N, H, D // H).transpose(1, 2)).transpose(1, 2).reshape(B, N, D)
        return block_attn.out_proj(o), None

    blocks = model.visual.transformer.resblocks
    originals = [blk.attn.forward for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.forward = (lambda a: (lambda q, k, v, **kw: attention(a, q)))(blk.attn)
        img, txt, scale = model(x, ids)
        s = scale * (img * txt).sum()
        grads = torch.autograd.grad(s, probs)
    finally:
        for blk, _ in zip(blocks, originals):
            del blk.attn.forward
    row = generic_rows([p[0].detach() for p in probs], [g[0] for g in grads], 0)[1:]
    assert rel_err(pair.image.scores[0], row) <= 1e-9


# --------------------------------------------------------------------------------------------
# one-layer towers against forwards written out here
# --------------------------------------------------------------------------------------------
def heads(t, H):
    B, N, D = t.shape
    return t.view(B, N, H, D // H).transpose(1, 2)


def test_iccv21_relevance_of_a_one_layer_clip_image_tower():
    """R = I + mean_h((∇A ⊙ A)⁺) R; the class-token row over the patches is mean_h((∇A ⊙ A)⁺)[0, 1:]."""
    model = hf_clip(layers=1, dtype=DT)
    x, text = images(2, DT), tokens("clip")
    pair = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for("clip"), method="generic", towers="image")
    vm, H = model.vision_model, model.config.vision_config.num_attention_heads
    with torch.no_grad():
        t_emb = model.get_text_features(**text).pooler_output
    emb = vm.embeddings
    patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)
    h = torch.cat([emb.class_embedding.expand(2, 1, -1), patches], 1) + emb.position_embedding.weight
    h = vm.pre_layrnorm(h)
    layer = vm.encoder.layers[0]
    a = layer.layer_norm1(h)
    q, k, v = (heads(proj(a), H) for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
    A = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1).detach().requires_grad_(True)
    o = layer.self_attn.out_proj((A @ v).transpose(1, 2).reshape(2, -1, h.shape[-1]))
    h = h + o
    h = h + layer.mlp(layer.layer_norm2(h))
    e = model.visual_projection(vm.post_layernorm(h[:, 0]))
    assert rel_err(e.detach(), model.get_image_features(pixel_values=x).pooler_output.detach()) <= 1e-10
    scale = model.logit_scale.exp()
    for b in range(2):
        for p in range(2):
            s = scale * F.cosine_similarity(e[b], t_emb[p], dim=0)
            (g,) = torch.autograd.grad(s, A, retain_graph=True)
            expected = (g[b] * A[b]).clamp(min=0).mean(0)[0, 1:]
            assert rel_err(pair.image_scores()[b, p], expected.detach()) <= 1e-6  # eager softmax in float32


def test_siglip_readout_is_the_pooling_heads_probe_attention():
    """Rollout of a one-layer SigLIP image tower: the probe's head-mean attention w over the
    tokens, times Â = (mean_h A + I) / 2, all computed here from the weights."""
    model = hf_siglip(layers=1, dtype=DT)
    x = images(2, DT)
    e = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for("siglip"), method="rollout", towers="image")
    vm, H = model.vision_model, model.config.vision_config.num_attention_heads
    h = vm.embeddings(x)
    layer = vm.encoder.layers[0]
    a = layer.layer_norm1(h)
    q, k = (heads(proj(a), H) for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj))
    A = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
    h = h + layer.self_attn.out_proj((A @ heads(layer.self_attn.v_proj(a), H)).transpose(1, 2).reshape(2, -1, h.shape[-1]))
    h = vm.post_layernorm(h + layer.mlp(layer.layer_norm2(h)))
    mha = vm.head.attention
    D = h.shape[-1]
    pq = F.linear(vm.head.probe, mha.in_proj_weight[:D], mha.in_proj_bias[:D])  # (1, 1, D)
    pk = F.linear(h, mha.in_proj_weight[D : 2 * D], mha.in_proj_bias[D : 2 * D])
    w = ((heads(pq.expand(2, 1, D), mha.num_heads) @ heads(pk, mha.num_heads).transpose(-1, -2)) / math.sqrt(D // mha.num_heads))
    w = w.softmax(-1).mean(1)[:, 0]  # (B, N)
    N = A.shape[-1]
    A_hat = (A.mean(1) + torch.eye(N, dtype=DT)) / 2
    expected = (w[:, None] @ A_hat)[:, 0].detach()
    for p in range(2):
        assert rel_err(e.image_scores()[:, p], expected) <= 1e-6  # eager softmax in float32


# --------------------------------------------------------------------------------------------
# LRP through the projection and the normalised dot product
# --------------------------------------------------------------------------------------------
BIAS_LIKE = ("bias", "class_embedding", "position_embedding", "positional_embedding")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cplrp_conserves_the_similarity_logit(name):
    model = FAMILIES[name](dtype=DT)
    x = images(2, DT)
    kw = dict(text=PROMPTS, tokenizer=tokenizer_for(name), method="lrp", preset="cplrp", strict=True)
    leaky = attnx.explain(model, x, **kw)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(k in pname for k in BIAS_LIKE) and "logit_bias" not in pname:
                p.zero_()
    pair = attnx.explain(model, x, **kw)
    for tower, dims in (("image", (1, 2, 3)), ("text", (1, 2))):
        e = pair.tower(tower)
        assert e.target_scores.abs().min() > 1e-3
        assert rel_err(e.input_relevance.sum(dims), e.target_scores) <= 1e-8
        assert rel_err(leaky.tower(tower).input_relevance.sum(dims), leaky.tower(tower).target_scores) > 1e-4
        assert "NO RULE" not in e.coverage.report()


# --------------------------------------------------------------------------------------------
# towers given alone, a real OpenCLIP architecture, errors
# --------------------------------------------------------------------------------------------
def test_towers_with_projection_match_the_full_model():
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    model = hf_clip(dtype=DT)
    vision = CLIPVisionModelWithProjection(model.config.vision_config).to(DT).eval()
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    text = CLIPTextModelWithProjection(model.config.text_config).to(DT).eval()
    text.text_model.load_state_dict(model.text_model.state_dict())
    text.text_projection.load_state_dict(model.text_projection.state_dict())
    x, ids = images(2, DT), tokens("clip")
    pair = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for("clip"), method="generic", target=[0, 1])
    ex = attnx.Explainer(model)
    t_emb, i_emb = image_text.embeddings(ex.adapter, ids), image_text.embeddings(ex.adapter, x)
    scale = model.logit_scale.exp().item()
    e = attnx.explain(vision, x, method="generic", target=image_text.similarity_to(t_emb, scale))
    assert rel_err(e.scores, pair.image.scores) <= 1e-10
    e = attnx.explain(text, ids, method="generic", target=image_text.similarity_to(i_emb, scale))
    assert rel_err(e.scores, pair.text.scores) <= 1e-10
    with pytest.raises(AttnxError, match="image tower of a dual encoder"):
        attnx.explain(vision, ids, method="rollout")


@pytest.mark.slow  # a full-size ViT-B/32 built and explained at 224 px
def test_open_clip_vit_b_32_without_weights():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    pair = attnx.explain(model, x, text=["a diagram", "a dog"], tokenizer=tok, method="generic")
    assert_unchanged(before, model)
    assert pair.image_scores().shape == (1, 2, 49) and pair.text_scores().shape == (1, 2, 77)
    ids = tok(["a diagram"])
    eot = int(ids[0].argmax())
    assert pair.text_scores()[0, 0, eot + 1 :].abs().max() == 0  # padding after the end of text
    with torch.no_grad():
        img, txt, scale = model(x, tok(["a diagram", "a dog"]))
    assert rel_err(pair.image.target_scores, (scale * img @ txt.T)[0]) <= 1e-4


def test_errors_are_one_clear_line():
    model = hf_clip()
    x = images(1)
    with pytest.raises(AttnxError, match="need a tokenizer"):
        attnx.explain(model, x, text=PROMPTS)
    with pytest.raises(AttnxError, match="one tower"):
        attnx.explain(model, x, text=PROMPTS, tokenizer=WordTokenizer(), target=lambda out: out.sum(-1))
    with pytest.raises(AttnxError, match="towers must be"):
        attnx.explain(model, x, text=PROMPTS, tokenizer=WordTokenizer(), towers="audio")
    with pytest.raises(AttnxError, match="context length"):
        attnx.explain(open_clip_model(), torch.ones(1, 5, dtype=torch.long), method="rollout")
    with pytest.raises(AttnxError, match="dual encoder with both towers"):
        from conftest import CASES

        attnx.explain(CASES["timm_vit"].model(), images(1), text=PROMPTS, tokenizer=WordTokenizer())
    pool = open_clip_model(pool="avg")  # mean of the patch rows: no class-token readout
    e = attnx.explain(pool, images(1), text=PROMPTS[:1], tokenizer=tokenizer_for("open_clip"), method="rollout")
    assert e.image.layout.readout is None


@pytest.mark.parametrize("preset", sorted(attnx.lrp.presets))
def test_lrp_presets_cover_every_tower(family, preset):
    name, model = family
    pair = attnx.explain(model, images(2, DT), text=PROMPTS, tokenizer=tokenizer_for(name), method="lrp", preset=preset,
                         strict=True)
    for tower in ("image", "text"):
        e = pair.tower(tower)
        assert torch.isfinite(e.input_relevance).all() and e.input_relevance.abs().sum() > 0
        assert "NO RULE" not in e.coverage.report()


def test_siglip_towers_alone_match_the_full_model():
    from transformers import SiglipTextModel, SiglipVisionModel

    model = hf_siglip(dtype=DT)
    vision = SiglipVisionModel(model.config.vision_config).to(DT).eval()
    vision.load_state_dict(model.vision_model.state_dict())  # the towers hold the transformer's modules directly
    text = SiglipTextModel(model.config.text_config).to(DT).eval()
    text.load_state_dict(model.text_model.state_dict())
    x, ids = images(2, DT), tokens("siglip")
    pair = attnx.explain(model, x, text=PROMPTS, tokenizer=tokenizer_for("siglip"), method="transformer_attribution", target=[1, 0])
    ex = attnx.Explainer(model)
    t_emb, i_emb = image_text.embeddings(ex.adapter, ids), image_text.embeddings(ex.adapter, x)
    scale = model.logit_scale.exp().item()
    e = attnx.explain(vision, x, method="transformer_attribution", target=image_text.similarity_to(t_emb.flip(0), scale))
    assert rel_err(e.scores, pair.image.scores) <= 1e-10
    e = attnx.explain(text, {k: v.flip(0) for k, v in ids.items()}, method="transformer_attribution",
                      target=image_text.similarity_to(i_emb, scale))
    assert rel_err(e.scores, pair.text.scores) <= 1e-10


def test_lrp_warns_on_a_scale_invariant_callable():
    """A cosine computed inside a plain callable is seeded with e ⊙ ∂s/∂e, which sums to 0: a warning
    points to the targets that hold the norm constant (which give the conserving answer)."""
    import warnings

    model = hf_clip(dtype=DT)
    with torch.no_grad():  # CP-LRP conserves with the biases zeroed: the input sums show the seed's total
        for pname, p in model.named_parameters():
            if any(k in pname for k in BIAS_LIKE):
                p.zero_()
    x = images(2, DT)
    ex = attnx.Explainer(model)
    ref = image_text.embeddings(ex.adapter, images(1, DT, seed=5))
    plain = lambda out: F.cosine_similarity(out, ref.expand_as(out))  # noqa: E731
    with pytest.warns(attnx.DegenerateMapWarning, match="does not change with the scale of the logits"):
        e = ex(x, method="lrp", preset="cplrp", target=plain)
    assert e.input_relevance.sum((1, 2, 3)).abs().max() < 1e-8 * e.target_scores.abs().min()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnx.DegenerateMapWarning)
        e = ex(x, method="lrp", preset="cplrp", target=attnx.similarity.cosine_to(ref))
    assert rel_err(e.input_relevance.sum((1, 2, 3)), e.target_scores) <= 1e-8


def test_text_tower_ignores_token_type_ids():
    """Some tokenizers add token_type_ids, which CLIP's text tower does not take."""
    model = hf_clip(dtype=DT)
    ids = tokens("clip")
    plain = attnx.explain(model, ids, method="rollout")
    typed = attnx.explain(model, {**ids, "token_type_ids": torch.zeros_like(ids["input_ids"])}, method="rollout")
    assert rel_err(typed.scores, plain.scores) == 0
