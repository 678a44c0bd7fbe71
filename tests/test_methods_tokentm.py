"""TokenTM (Wu et al., CVPR 2024) against the paper's equations written out per sample and per layer.

No code of the authors could be found, so the reference is the formula: for every block the
transformation weights ``w_j = L(Ẽ_j)/L(E_j) · exp(cos(E_j, Ẽ_j)) / Σ_k exp(cos(E_k, Ẽ_k))`` of the
attention (block input -> values through the output projection) and of the MLP (the residual stream
it reads -> what it adds), ``U_attn = I + E_h[(∇A ⊙ A)⁺] diag(w_attn)``, ``U_mlp = I + diag(w_mlp)``,
``C = U_mlp U_attn C`` from ``C^0 = diag(‖E^0_j‖)``, read at the head's readout row. Everything is
taken from the models' own modules run by hand (a timm ViT, a Hugging Face BERT and Llama, checked
against the models' own logits and ``output_hidden_states``) in float64, one sample at a time with
Python loops over the tokens; attnx must match to 1e-8. Padding, batch independence, every model
kind and the one-line refusals are checked too.
"""
from __future__ import annotations

import math

import pytest
import torch

import attnx
from attnx.errors import UnsupportedModelError
from conftest import CASES, max_abs_diff
from contracts import KINDS, assert_unchanged, snapshot
from decoder_models import DecoderCase, real_tokens


# --------------------------------------------------------------------------------------------
# the reference: the paper's equations, one sample, plain loops
# --------------------------------------------------------------------------------------------
def weights(before: torch.Tensor, after: torch.Tensor) -> list[float]:
    """``w_j = L(Ẽ_j) / L(E_j) · NECC_j`` over the ``N`` tokens of one sample (``(N, D)`` each)."""
    N = before.shape[0]
    cos = [float(before[j] @ after[j]) / (float(before[j].norm()) * float(after[j].norm())) for j in range(N)]
    total = sum(math.exp(c) for c in cos)
    return [float(after[j].norm()) / float(before[j].norm()) * math.exp(cos[j]) / total for j in range(N)]


def reference(layers: list[dict], readout: torch.Tensor, init: str = "length") -> torch.Tensor:
    """``readout · C^L`` for one sample; ``layers[l]`` holds ``A``, ``G`` ``(H, N, N)``, ``h``, ``wov``,
    ``mlp_in``, ``mlp_out`` ``(N, D)``; ``readout`` ``(N,)`` the head's row weights."""
    N = layers[0]["h"].shape[0]
    eye = torch.eye(N, dtype=torch.float64)
    if init == "length":
        C = torch.diag(torch.tensor([float(layers[0]["h"][j].norm()) for j in range(N)], dtype=torch.float64))
    else:
        C = eye.clone()
    for layer in layers:
        A, G = layer["A"], layer["G"]
        fused = sum((G[h] * A[h]).clamp(min=0) for h in range(A.shape[0])) / A.shape[0]
        U_attn = eye + fused @ torch.diag(torch.tensor(weights(layer["h"], layer["wov"]), dtype=torch.float64))
        U_mlp = eye + torch.diag(torch.tensor(weights(layer["mlp_in"], layer["mlp_out"]), dtype=torch.float64))
        C = U_mlp @ U_attn @ C
    return readout @ C


def per_sample(layers: list[dict], b: int) -> list[dict]:
    return [{k: v[b].detach() for k, v in layer.items()} for layer in layers]


# --------------------------------------------------------------------------------------------
# the models' quantities, from their own modules run by hand
# --------------------------------------------------------------------------------------------
def hand_run_vit(model, x: torch.Tensor):
    """A timm ViT's logits and, per block, ``A`` (in the graph), the input ``h``, ``W_O v``, the
    residual stream the MLP reads and what the MLP branch adds."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    layers = []
    for blk in model.blocks:
        B, N, D = tokens.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // heads) ** 0.5, dim=-1)
        values = v.transpose(1, 2).reshape(B, N, D)
        mid = tokens + blk.ls1(blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D)))
        branch = blk.ls2(blk.mlp(blk.norm2(mid)))
        layers.append({"A": a, "h": tokens, "wov": values @ blk.attn.proj.weight.T, "mlp_in": mid, "mlp_out": branch})
        tokens = mid + branch
    return model.forward_head(model.norm(tokens)), layers


def with_gradients(layers: list[dict], score: torch.Tensor) -> list[dict]:
    grads = torch.autograd.grad(score, [layer["A"] for layer in layers])
    return [{**layer, "G": g} for layer, g in zip(layers, grads)]


def vit_readout(name: str, model, N: int) -> torch.Tensor:
    """The head's row: the class token, both tokens of a distilled DeiT, the mean of the patches."""
    r = torch.zeros(N, dtype=torch.float64)
    if name == "timm_avgpool":
        r[model.num_prefix_tokens:] = 1 / (N - model.num_prefix_tokens)
    elif name == "timm_deit_distilled":
        r[:2] = 0.5
    else:
        r[0] = 1
    return r


@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "timm_deit_distilled"])
def test_equals_the_formula_on_a_hand_run_vit_in_float64(name):
    model = CASES[name].model(torch.float64)
    x = CASES[name].inputs(2, dtype=torch.float64)
    logits, layers = hand_run_vit(model, x)
    assert max_abs_diff(logits, model(x)) < 1e-10  # the hand-run forward is the model's
    targets = torch.tensor([1, 4])
    layers = with_gradients(layers, logits.gather(1, targets[:, None]).sum())
    e = attnx.Explainer(model).explain(x, "tokentm", target=targets)
    assert e.token_relevance.dtype == torch.float64
    N = layers[0]["h"].shape[1]
    for b in range(2):
        expected = reference(per_sample(layers, b), vit_readout(name, model, N))
        assert max_abs_diff(e.token_relevance[b], expected) < 1e-8 * max(1.0, expected.abs().max().item())
        assert (expected > 0).all()


def test_the_identity_initialisation_in_float64():
    model = CASES["timm_vit"].model(torch.float64)
    x = CASES["timm_vit"].inputs(1, dtype=torch.float64)
    logits, layers = hand_run_vit(model, x)
    layers = with_gradients(layers, logits[:, 2].sum())
    e = attnx.Explainer(model).explain(x, "tokentm", target=2, init="identity")
    expected = reference(per_sample(layers, 0), vit_readout("timm_vit", model, layers[0]["h"].shape[1]), init="identity")
    assert max_abs_diff(e.token_relevance[0], expected) < 1e-8 * expected.abs().max()
    default = attnx.Explainer(model).explain(x, "tokentm", target=2).token_relevance[0]
    assert max_abs_diff(default, e.token_relevance[0] * layers[0]["h"][0].norm(dim=-1)) < 1e-10 * default.abs().max()


def bert_layers(model, inputs: dict) -> tuple[torch.Tensor, list[dict]]:
    """A BERT's logits and per layer ``A`` (its own ``output_attentions``, in the graph), ``h`` (its
    ``output_hidden_states``), ``W_O v`` and the feed-forward input / output run by hand from them."""
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    layers = []
    for blk, h, h_next, a in zip(model.bert.encoder.layer, out.hidden_states[:-1], out.hidden_states[1:], out.attentions):
        B, N, D = h.shape
        H = a.shape[1]
        v = blk.attention.self.value(h).detach()
        ctx = (a.detach() @ v.reshape(B, N, H, D // H).transpose(1, 2)).transpose(1, 2).reshape(B, N, D)
        mid = blk.attention.output.LayerNorm(blk.attention.output.dense(ctx) + h.detach())
        branch = blk.output.dense(blk.intermediate(mid))
        assert max_abs_diff(blk.output.LayerNorm(mid + branch), h_next) < 1e-10  # the hand run is the model's
        layers.append({"A": a, "h": h, "wov": v @ blk.attention.output.dense.weight.T, "mlp_in": mid, "mlp_out": branch})
    return out.logits, layers


def test_equals_the_formula_on_a_padded_bert_in_float64():
    """Each sample's reference on its real tokens alone; attnx on the padded batch."""
    case = CASES["hf_bert_eager"]
    model = case.model(torch.float64)
    x = case.inputs(lengths=[9, 6])
    targets = torch.tensor([3, 0])
    e = attnx.Explainer(model).explain(x, "tokentm", target=targets)
    valid = x["attention_mask"].bool()
    for b in range(2):
        logits, layers = bert_layers(model, real_tokens(x, b))
        layers = with_gradients(layers, logits[0, targets[b]])
        readout = torch.zeros(int(valid[b].sum()), dtype=torch.float64)
        readout[0] = 1
        expected = reference(per_sample(layers, 0), readout)
        assert max_abs_diff(e.token_relevance[b][valid[b]], expected) < 1e-8 * expected.abs().max()
        assert (e.token_relevance[b][~valid[b]] == 0).all()


def llama_layers(model, inputs: dict) -> tuple[torch.Tensor, list[dict]]:
    """A Llama's logits and per layer ``A`` (in the graph), ``h``, ``W_O v`` (grouped key/value heads
    repeated) and the feed-forward input / output run by hand from its own outputs."""
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    layers = []
    stack = model.model.layers
    for i, (blk, h, a) in enumerate(zip(stack, out.hidden_states[:-1], out.attentions)):
        B, N, D = h.shape
        H = a.shape[1]
        v = blk.self_attn.v_proj(blk.input_layernorm(h.detach()))
        heads = v.reshape(B, N, -1, D // H).repeat_interleave(H // (v.shape[-1] // (D // H)), dim=2)
        ctx = (a.detach() @ heads.transpose(1, 2)).transpose(1, 2).reshape(B, N, D)
        mid = h.detach() + blk.self_attn.o_proj(ctx)
        branch = blk.mlp(blk.post_attention_layernorm(mid))
        if i + 1 < len(stack):  # the last entry of hidden_states is after the final norm
            assert max_abs_diff(mid + branch, out.hidden_states[i + 1]) < 1e-10
        wov = heads.reshape(B, N, D) @ blk.self_attn.o_proj.weight.T
        layers.append({"A": a, "h": h, "wov": wov, "mlp_in": mid, "mlp_out": branch})
    return out.logits, layers


def test_equals_the_formula_on_llama_in_float64():
    """A causal language model explained at its last token's next-token logit."""
    case = DecoderCase("llama", "lm", "eager")
    model = case.model(torch.float64)
    x = case.inputs(lengths=[7, 7])
    targets = torch.tensor([5, 11])
    logits, layers = llama_layers(model, x)
    layers = with_gradients(layers, logits[:, -1].gather(1, targets[:, None]).sum())
    e = attnx.Explainer(model).explain(x, "tokentm", target=targets)
    readout = torch.zeros(7, dtype=torch.float64)
    readout[-1] = 1
    for b in range(2):
        expected = reference(per_sample(layers, b), readout)
        assert max_abs_diff(e.token_relevance[b], expected) < 1e-8 * expected.abs().max()


def test_equals_the_formula_on_a_clip_image_tower_in_float64():
    """The HF CLIP image tower at its pooled class token, one projected-embedding coordinate."""
    spec = KINDS["clip_hf"]
    model = spec.build().double()
    model.set_attn_implementation("eager")  # the kernel that returns the attention probabilities
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vision = model.vision_model
    out = vision(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    layers = []
    for blk, h, a in zip(vision.encoder.layers, out.hidden_states[:-1], out.attentions):
        B, N, D = h.shape
        H = a.shape[1]
        v = blk.self_attn.v_proj(blk.layer_norm1(h.detach()))
        ctx = (a.detach() @ v.reshape(B, N, H, D // H).transpose(1, 2)).transpose(1, 2).reshape(B, N, D)
        mid = h.detach() + blk.self_attn.out_proj(ctx)
        branch = blk.mlp(blk.layer_norm2(mid))
        layers.append({"A": a, "h": h, "wov": v @ blk.self_attn.out_proj.weight.T, "mlp_in": mid, "mlp_out": branch})
    embedding = model.visual_projection(out.pooler_output)
    features = model.get_image_features(pixel_values=pixels)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    assert max_abs_diff(embedding, features) < 1e-10
    layers = with_gradients(layers, embedding[0, 3])
    e = attnx.Explainer(model).explain(pixels, "tokentm", target=lambda emb: emb[:, 3])
    readout = torch.zeros(layers[0]["h"].shape[1], dtype=torch.float64)
    readout[0] = 1
    expected = reference(per_sample(layers, 0), readout)
    assert max_abs_diff(e.token_relevance[0], expected) < 1e-8 * expected.abs().max()


# --------------------------------------------------------------------------------------------
# batches, model kinds, refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [CASES["hf_bert_sdpa"], DecoderCase("llama", "cls", "eager"), DecoderCase("llama", "lm", "eager")],
                         ids=["bert", "llama_cls", "llama_lm"])
def test_a_padded_batch_equals_each_sample_alone(case):
    model = case.model()
    x = case.inputs(lengths=[9, 5])
    explainer = attnx.Explainer(model)
    e = explainer.explain(x, "tokentm")
    valid = x["attention_mask"].bool()
    for b in range(2):
        alone = explainer.explain(real_tokens(x, b), "tokentm").token_relevance[0]
        assert max_abs_diff(e.token_relevance[b][valid[b]], alone) <= 1e-4 * alone.abs().max()
        assert alone.abs().sum() > 0


def test_a_batch_of_images_equals_each_image_alone():
    model = CASES["timm_vit"].model()
    x = CASES["timm_vit"].inputs(3)
    explainer = attnx.Explainer(model)
    e = explainer.explain(x, "tokentm", target=torch.tensor([0, 3, 5]))
    for b, t in enumerate([0, 3, 5]):
        alone = explainer.explain(x[b:b + 1], "tokentm", target=t).token_relevance[0]
        assert max_abs_diff(e.token_relevance[b], alone) <= 1e-5 * alone.abs().max()


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("swin") and k != "gpt2"])
def test_every_model_kind_and_the_model_is_left_as_found(kind):
    spec = KINDS[kind]
    model = spec.build()
    before = snapshot(model)
    e = attnx.explain(model, spec.inputs(), method="tokentm", **spec.call())
    scores = e.image.scores if hasattr(e, "image") else e.scores
    assert torch.isfinite(scores).all() and (scores.abs().sum(1) > 0).all()
    assert_unchanged(before, model)


@pytest.mark.parametrize("kind", ["swin_timm", "swin_hf", "gpt2"])
def test_swin_and_gpt2_are_refused_in_one_line(kind):
    """Swin names no blocks (windowed stages); GPT-2's fused ``c_attn`` names no value projection."""
    spec = KINDS[kind]
    with pytest.raises(UnsupportedModelError, match="tokentm") as err:
        attnx.explain(spec.build(), spec.inputs(), method="tokentm")
    assert "\n" not in str(err.value) and "do not apply" in str(err.value)
