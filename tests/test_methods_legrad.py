"""LeGrad against its formula (Bousselham et al. 2024, Eq. 4-6) written out, and the authors' code.

The references, in float64, attnx must match to 1e-8:

* a tiny timm ViT re-run block by block from its weights (attention written out as
  softmax(q kᵀ / √d) so that ``A^l`` is a tensor of the graph): ``s^l`` is each layer's tokens through
  the model's ``norm`` and ``forward_head`` (class token, patch mean, distilled pair, registers),
  ``torch.autograd.grad(s^l, A^l)`` per layer, the paper's formula averaged over the layers;
* Hugging Face BERT (padded), GPT-2 and Llama (padded) and CLIP's two towers run with
  ``output_attentions`` and ``output_hidden_states`` (eager: the returned probabilities are the
  graph's): ``s^l`` written out from layer ``l``'s hidden state through the final norm and head;
* the authors' ``compute_legrad_clip`` (WalBouss/LeGrad) on the same OpenCLIP weights, in a
  subprocess, with their readout (``pooling="mean"``), when their code is at ``LEGRAD_REF``; the
  batched variant's timm wrapper (Shaun-Z/LeGrad, ``TimmWrapper``) on a headless timm ViT, when at
  ``LEGRAD_BATCHED_REF``.

Decoders and text classifiers are checked for the masks (padding rows, causal pairs) and for
batched == alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnx
from attnx.errors import AttnxTypeError, AttnxValueError, UnsupportedModelError
from conftest import CASES, max_abs_diff
from decoder_models import CASES as DECODERS, params, real_tokens

DT = torch.float64


def hand_run_vit(model, x: torch.Tensor):
    """The logits of a timm ViT, its attention maps ``A^l`` ``(B, H, N, N)`` and each layer's output
    tokens, kept in the graph."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    maps, outputs = [], []
    for blk in model.blocks:
        B, N, D = tokens.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // heads) ** 0.5, dim=-1)
        maps.append(a)
        out = blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        tokens = tokens + blk.ls1(out)
        tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
        outputs.append(tokens)
    return model.forward_head(model.norm(tokens)), maps, outputs


def legrad_formula(gradient: torch.Tensor) -> torch.Tensor:
    """Eq. 4-5 without masks: ``mean_h mean_i ReLU(∂s/∂A)[h, i, j]``."""
    return gradient.clamp(min=0).mean(dim=(1, 2))


def masked_formula(gradient: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Eq. 4-5 with the pairs that may attend: ``Σ_i mask ⊙ mean_h ReLU(∂s/∂A)`` over the real query rows."""
    positive = gradient.clamp(min=0).mean(dim=1) * pairs
    return positive.sum(dim=1) / pairs.any(dim=-1).sum(dim=-1, keepdim=True)


def layer_average(scores: list, maps: list, first: int, formula=legrad_formula) -> torch.Tensor:
    """Eq. 6: ``E^l`` of ``torch.autograd.grad(s^l, A^l)``, one layer at a time, averaged from ``first`` on."""
    total = 0
    for s, a in zip(scores[first:], maps[first:]):
        (g,) = torch.autograd.grad(s.sum(), a, retain_graph=True)
        total = total + formula(g)
    return total / (len(maps) - first)


@pytest.mark.parametrize("start_layer", [-2, 0, -1])
@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "timm_reg4", "timm_deit_distilled"])
def test_equals_the_papers_formula_on_a_hand_run_vit_in_float64(name, start_layer):
    """``s^l`` = layer ``l``'s tokens through the model's norm and head (class token, patch mean,
    registers, the distilled pair), the gradient at ``A^l`` only, the layers averaged."""
    model = CASES[name].model(DT)
    x = CASES[name].inputs(3, dtype=DT)
    logits, maps, outputs = hand_run_vit(model, x)
    assert max_abs_diff(logits, model(x)) < 1e-10  # the hand-run forward is the model's
    targets = torch.tensor([1, 4, 6])
    scores = [model.forward_head(model.norm(t)).gather(1, targets[:, None]) for t in outputs]
    expected = layer_average(scores, maps, start_layer % 3)
    e = attnx.Explainer(model).explain(x, "legrad", target=targets, start_layer=start_layer)
    assert e.token_relevance.dtype == DT
    assert max_abs_diff(e.token_relevance, expected) < 1e-8
    assert (expected[:, CASES[name].prefix_tokens :].abs().sum(1) > 0).all()  # a map worth comparing
    if start_layer != -1:  # the lower layers change the map: not the last layer's
        last = layer_average(scores, maps, 2)
        assert max_abs_diff(expected, last) > 1e-3 * expected.abs().max()


def test_default_is_the_authors_last_two_layers_and_the_predicted_class_at_every_layer():
    """Without a target every layer's score is the model's predicted class, not the layer's own argmax."""
    model = CASES["timm_vit"].model(DT)
    x = CASES["timm_vit"].inputs(4, dtype=DT)
    logits, maps, outputs = hand_run_vit(model, x)
    predicted = logits.argmax(1)
    layer_logits = [model.forward_head(model.norm(t)) for t in outputs]
    assert (layer_logits[1].argmax(1) != predicted).any()  # a layer whose argmax differs
    expected = layer_average([z.gather(1, predicted[:, None]) for z in layer_logits], maps, 1)
    e = attnx.explain(model, x, "legrad")
    assert max_abs_diff(e.token_relevance, expected) < 1e-8
    assert torch.equal(e.token_relevance, attnx.explain(model, x, "legrad", start_layer=-2).token_relevance)


def hf_layer_scores(model, x: dict, read) -> tuple[list, list, torch.Tensor]:
    """The attentions and each layer's score ``read(l, hidden state after layer l)`` of a Hugging Face
    model run with ``output_attentions`` and ``output_hidden_states`` (eager kernel)."""
    out = model(**x, output_attentions=True, output_hidden_states=True, return_dict=True)
    L = len(out.attentions)
    return list(out.attentions), [read(l, out.hidden_states[l + 1]) for l in range(L)], out.logits


@pytest.mark.parametrize("start_layer", [-2, 0])
def test_bert_with_padding_pooler_and_classifier_in_float64(start_layer):
    model = CASES["hf_bert_eager"].model(DT)
    x = CASES["hf_bert_eager"].inputs(3, lengths=[9, 6, 4])
    targets = torch.tensor([1, 4, 2])

    def read(l, h):  # BERT has no final norm: the pooler (tanh of the class token's dense) and the classifier
        return model.classifier(model.bert.pooler(h)).gather(1, targets[:, None])

    maps, scores, logits = hf_layer_scores(model, x, read)
    assert max_abs_diff(scores[-1][:, 0], logits.gather(1, targets[:, None])[:, 0]) < 1e-12
    valid = x["attention_mask"].bool()
    pairs = (valid[:, :, None] & valid[:, None, :]).to(DT)
    expected = layer_average(scores, maps, start_layer % 3, lambda g: masked_formula(g, pairs))
    e = attnx.explain(model, x, "legrad", target=targets, start_layer=start_layer)
    assert max_abs_diff(e.token_relevance, expected) < 1e-8
    assert (e.scores[~valid] == 0).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_language_models_final_norm_and_lm_head_in_float64(family):
    """GPT-2's ``ln_f`` / Llama's RMSNorm and the output layer at the last real token (right padding:
    Llama gives NaN on left-padded rows in float64 itself), the pairs key <= query of real tokens.
    Hugging Face's last hidden state is already normed."""
    case = next(c for c in DECODERS if c.name == f"{family}_lm_eager")
    model = case.model(DT)
    x = case.inputs(lengths=[7, 4], side="right")
    last = x["attention_mask"].sum(-1) - 1
    x["position_ids"] = (x["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as attnx runs a padded batch
    x["position_ids"] = x["position_ids"].masked_fill(x["attention_mask"] == 0, 1)
    norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    targets = torch.tensor([5, 11])

    def read(l, h):
        h = h if l == model.config.num_hidden_layers - 1 else norm(h)
        return model.lm_head(h[torch.arange(2), last]).gather(1, targets[:, None])

    maps, scores, logits = hf_layer_scores(model, x, read)
    assert max_abs_diff(scores[-1][:, 0], logits[torch.arange(2), last].gather(1, targets[:, None])[:, 0]) < 1e-10
    valid = x["attention_mask"].bool()
    N = valid.shape[1]
    pairs = (valid[:, :, None] & valid[:, None, :] & torch.ones(N, N, dtype=torch.bool).tril()).to(DT)
    expected = layer_average(scores, maps, 0, lambda g: masked_formula(g, pairs))
    inputs = {k: v for k, v in x.items() if k != "position_ids"}
    e = attnx.explain(model, inputs, "legrad", target=targets, start_layer=0)
    assert max_abs_diff(e.token_relevance, expected) <= 1e-8 * max(1.0, expected.abs().max().item())
    assert (e.scores[~valid] == 0).all()


def test_clip_towers_post_layernorm_pooling_and_projection_in_float64():
    """HF CLIP: the image tower's class token through ``post_layernorm`` and ``visual_projection``,
    the text tower's end-of-text token through ``final_layer_norm`` and ``text_projection``, each
    scored by the cosine to the other tower's embedding."""
    from clip_models import WordTokenizer, hf_clip, images

    model = hf_clip(layers=3, dtype=DT)
    model.set_attn_implementation("eager")  # the returned attentions are the graph's
    x = images(2, DT)
    text = WordTokenizer()(["a big brown dog", "a cat"])
    with torch.no_grad():
        img_ref = model.get_image_features(pixel_values=x, return_dict=True).pooler_output
        txt_ref = model.get_text_features(**text, return_dict=True).pooler_output
    vision, textual = model.vision_model, model.text_model

    def image_score(l, h):
        return F.cosine_similarity(model.visual_projection(vision.post_layernorm(h[:, 0])), txt_ref, dim=-1)

    out = vision(pixel_values=x, output_attentions=True, output_hidden_states=True, return_dict=True)
    scores = [image_score(l, out.hidden_states[l + 1]) for l in range(3)]
    expected = layer_average(scores, list(out.attentions), 1)
    e = attnx.explain(model, x, "legrad", target=attnx.similarity.cosine_to(txt_ref))
    assert max_abs_diff(e.token_relevance, expected) < 1e-8

    eot = text["input_ids"].argmax(-1)
    out = textual(**text, output_attentions=True, output_hidden_states=True, return_dict=True)
    scores = [F.cosine_similarity(model.text_projection(textual.final_layer_norm(out.hidden_states[l + 1])[torch.arange(2), eot]),
                                  img_ref, dim=-1) for l in range(3)]
    valid = torch.arange(text["input_ids"].shape[1])[None] <= eot[:, None]
    valid &= text["attention_mask"].bool()
    N = valid.shape[1]
    pairs = (valid[:, :, None] & valid[:, None, :] & torch.ones(N, N, dtype=torch.bool).tril()).to(DT)
    expected = layer_average(scores, list(out.attentions), 0, lambda g: masked_formula(g, pairs))
    e = attnx.explain(model, text, "legrad", target=attnx.similarity.cosine_to(img_ref), start_layer=0)
    assert max_abs_diff(e.token_relevance, expected) < 1e-8


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
    e = explainer.explain(x, "legrad", start_layer=-1)
    assert max_abs_diff(e.token_relevance, expected) <= 1e-6 * expected.abs().max()
    for b in range(2):
        alone = explainer.explain(real_tokens(x, b), "legrad", start_layer=-1).scores[0]
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


def test_every_layer_of_a_padded_decoder_batch_equals_each_sample_alone():
    case = next(c for c in DECODERS if c.name == "llama_cls_eager")
    model = case.model()
    x = case.inputs(lengths=[7, 4])
    explainer = attnx.Explainer(model)
    e = explainer.explain(x, "legrad", start_layer=0)
    valid = x["attention_mask"].bool()
    for b in range(2):
        alone = explainer.explain(real_tokens(x, b), "legrad", start_layer=0).scores[0]
        assert max_abs_diff(e.scores[b][valid[b]], alone) <= 1e-4 * alone.abs().max()


def test_a_family_without_per_layer_readouts_refuses_in_one_line_and_reads_the_last_layer():
    """A model only the intercept adapter knows has no head attnx can apply to its layers."""
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 16)
            self.attns = nn.ModuleList(nn.MultiheadAttention(16, 2, batch_first=True) for _ in range(2))
            self.head = nn.Linear(16, 3)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            for attn in self.attns:
                h = h + attn(h, h, h, need_weights=False)[0]
            return self.head(h[:, 0])

    torch.manual_seed(0)
    model = Tiny().eval()
    x = {"input_ids": torch.randint(0, 20, (2, 5))}
    with pytest.raises(UnsupportedModelError, match=r"^[^\n]*start_layer=-1[^\n]*$"):
        attnx.explain(model, x, "legrad", start_layer=0)
    assert attnx.explain(model, x, "legrad", start_layer=-1).scores.shape == (2, 5)


def test_options_are_typed():
    model = CASES["timm_vit"].model()
    x = CASES["timm_vit"].inputs(1)
    with pytest.raises(AttnxValueError):
        attnx.explain(model, x, "legrad", start_layer=3)
    with pytest.raises((AttnxTypeError, AttnxValueError)):
        attnx.explain(model, x, "legrad", pooling="cls")
    with pytest.raises(UnsupportedModelError, match="pooling='mean'"):  # a family without that readout
        attnx.explain(CASES["torchvision_vit"].model(), x, "legrad", pooling="mean")


# --------------------------------------------------------------------------------------------
# the authors' code (WalBouss/LeGrad) on the same OpenCLIP weights
# --------------------------------------------------------------------------------------------
#: where the authors' repository is checked out (its ``legrad`` package); CI has no copy
LEGRAD_REF = Path(os.environ.get("LEGRAD_REF", "/work/ref/legrad"))

#: Runs ``LeWrapper(model, layer_index).compute_legrad_clip`` on the weights saved by the test.
#: Shims, none of which changes what is computed: ``cv2`` (their plotting only) is stubbed; their
#: hooked ``nn.MultiheadAttention`` forward and their block features read the blocks sequence-first
#: (``(N, B, D)``, as OpenCLIP ran them when the code was written) and their tower forward feeds the
#: blocks sequence-first, so every block's attention is told so (``batch_first=False``).
AUTHORS_SCRIPT = """
import json, sys, types
sys.modules.setdefault("cv2", types.ModuleType("cv2"))
sys.path.insert(0, {ref!r})
import torch, torch.nn.functional as F, open_clip
from legrad import LeWrapper
saved = torch.load({weights!r})
torch.set_default_dtype(torch.float64)
model = open_clip.CLIP(**saved["config"]).double().eval()
model.load_state_dict(saved["state"])
for block in model.visual.transformer.resblocks:
    block.attn.batch_first = False
wrapped = LeWrapper(model, layer_index={layer_index})
text = F.normalize(wrapped.encode_text(saved["text"]), dim=-1)
heat = wrapped.compute_legrad_clip(text, saved["image"])
print(json.dumps(heat.detach().double().tolist()))
"""


def authors_legrad(tmp_path, model, config, image, text, layer_index: int) -> torch.Tensor:
    """The authors' min-max normalised heat map ``(1, P, H, W)`` of ``image`` for each prompt."""
    weights = tmp_path / "weights.pt"
    torch.save({"config": config, "state": model.state_dict(), "image": image, "text": text}, weights)
    script = AUTHORS_SCRIPT.format(ref=str(LEGRAD_REF), weights=str(weights), layer_index=layer_index)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=DT)


def as_authors_show(scores: torch.Tensor, patch: int) -> torch.Tensor:
    """attnx's patch scores ``(P, h·w)`` drawn as the authors draw theirs: bilinear ×patch, min-max per prompt."""
    side = int(scores.shape[-1] ** 0.5)
    heat = F.interpolate(scores.reshape(1, -1, side, side), scale_factor=patch, mode="bilinear")
    low = heat.amin(dim=(-2, -1), keepdim=True)
    return (heat - low) / (heat.amax(dim=(-2, -1), keepdim=True) - low)


@pytest.mark.subprocess
@pytest.mark.skipif(not (LEGRAD_REF / "legrad" / "wrapper.py").exists(),
                    reason=f"the LeGrad authors' code (github.com/WalBouss/LeGrad) is not checked out at {LEGRAD_REF} (LEGRAD_REF)")
@pytest.mark.parametrize("layer_index", [-2, 0])
def test_pooling_mean_is_the_authors_compute_legrad_clip(tmp_path, layer_index):
    """Their ``compute_legrad_clip`` (OpenCLIP, a 3-layer ViT, two prompts) against attnx's
    ``legrad`` with their readout (``pooling="mean"``) and ``start_layer=layer_index``, drawn as they
    draw it (their sum of layers, upsampling and min-max normalisation only rescale)."""
    pytest.importorskip("einops", reason="the authors' code needs einops")
    pytest.importorskip("open_clip")
    from clip_models import CONTEXT, DIM, IMAGE, PATCH, PROJ, VOCAB, WordTokenizer, images

    config = dict(embed_dim=PROJ, vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=DIM, layers=3, head_width=8,
                                                  mlp_ratio=2),
                  text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=DIM, heads=4, layers=2))
    import open_clip

    from conftest import randomize_

    torch.manual_seed(0)
    model = randomize_(open_clip.CLIP(**config), seed=5).to(DT).eval()
    image, text = images(1, DT), WordTokenizer(open_clip=True)(["a big brown dog", "a cat"])
    theirs = authors_legrad(tmp_path, model, config, image, text, layer_index)[0]
    pair = attnx.explain(model, image, text=text, method="legrad", start_layer=layer_index, pooling="mean", towers=("image",))
    ours = as_authors_show(pair.image_scores()[0], PATCH)[0]
    assert theirs.shape == ours.shape == (2, IMAGE, IMAGE)
    assert (theirs[0] - theirs[1]).abs().max() > 1e-3  # one map per prompt
    assert max_abs_diff(ours, theirs) < 1e-8
    # the model's own readout (its class token) is another map
    own = as_authors_show(attnx.explain(model, image, text=text, method="legrad", start_layer=layer_index).image_scores()[0], PATCH)[0]
    assert max_abs_diff(own, theirs) > 1e-2


def test_hf_clip_mean_pooling_and_siglip_attention_pool_head_in_float64():
    """``pooling="mean"`` on Hugging Face CLIP's image tower: ``post_layernorm`` of the mean of every
    token; SigLIP's image tower: ``post_layernorm`` and its attention-pooling head on every layer."""
    from clip_models import hf_clip, hf_siglip, images

    x = images(2, DT)
    for build, read, options in (
        (hf_clip, lambda m, h: m.visual_projection(m.vision_model.post_layernorm(h.mean(dim=1))), {"pooling": "mean"}),
        (hf_siglip, lambda m, h: m.vision_model.head(m.vision_model.post_layernorm(h)), {}),
    ):
        model = build(layers=3, dtype=DT)
        model.set_attn_implementation("eager")
        with torch.no_grad():
            dim = model.get_image_features(pixel_values=x, return_dict=True).pooler_output.shape[-1]
        ref = torch.randn(2, dim, dtype=DT, generator=torch.Generator().manual_seed(3))
        out = model.vision_model(pixel_values=x, output_attentions=True, output_hidden_states=True, return_dict=True)
        scores = [F.cosine_similarity(read(model, out.hidden_states[l + 1]), ref, dim=-1) for l in range(3)]
        expected = layer_average(scores, list(out.attentions), 1)
        e = attnx.explain(model, x, "legrad", target=attnx.similarity.cosine_to(ref), **options)
        assert max_abs_diff(e.token_relevance, expected) < 1e-8, build.__name__


#: where the batched variant of their code (github.com/Shaun-Z/LeGrad) is checked out
LEGRAD_BATCHED_REF = Path(os.environ.get("LEGRAD_BATCHED_REF", "/work/ref/legrad_batched"))

#: ``TimmWrapper(model, layer_indices)``: a forward, ``dot_concept_vectors`` and
#: ``aggregate_layerwise_maps`` on the weights saved by the test; ``cv2`` (plotting) stubbed.
BATCHED_SCRIPT = """
import json, sys, types
sys.modules.setdefault("cv2", types.ModuleType("cv2"))
sys.path.insert(0, {src!r})
import torch, timm
from legrad.backends.timm.wrapper import TimmWrapper
saved = torch.load({weights!r})
model = timm.models.vision_transformer.VisionTransformer(**saved["config"]).double().eval()
model.load_state_dict(saved["state"])
wrapped = TimmWrapper(model, layer_indices={layers})
wrapped(saved["images"])
wrapped.dot_concept_vectors(saved["concepts"])
print(json.dumps(wrapped.aggregate_layerwise_maps().detach().double().tolist()))
"""


@pytest.mark.subprocess
@pytest.mark.skipif(not (LEGRAD_BATCHED_REF / "src" / "legrad" / "backends" / "timm" / "wrapper.py").exists(),
                    reason=f"the batched LeGrad code (github.com/Shaun-Z/LeGrad) is not checked out at {LEGRAD_BATCHED_REF} "
                           "(LEGRAD_BATCHED_REF)")
def test_pooling_mean_is_the_batched_variants_timm_wrapper(tmp_path):
    """Their ``TimmWrapper`` on a headless timm ViT (three layers, the last two read, two images, two
    concept vectors): ``cos(norm(mean of a layer's tokens), concept)`` differentiated at each read
    layer's attention, against attnx's ``legrad`` with ``pooling="mean"`` and the cosine target."""
    pytest.importorskip("einops", reason="their code needs einops")
    from timm.models.vision_transformer import VisionTransformer

    from conftest import randomize_

    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=0)
    torch.manual_seed(0)
    model = randomize_(VisionTransformer(**config), seed=21).to(DT).eval()
    x = CASES["timm_vit"].inputs(2, dtype=DT)
    concepts = F.normalize(torch.randn(2, 32, dtype=DT, generator=torch.Generator().manual_seed(4)), dim=-1)
    weights = tmp_path / "weights.pt"
    torch.save({"config": config, "state": model.state_dict(), "images": x, "concepts": concepts}, weights)
    script = BATCHED_SCRIPT.format(src=str(LEGRAD_BATCHED_REF / "src"), weights=str(weights), layers=[1, 2])
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=DT)  # (B, concepts, H, W)
    for m in range(2):
        target = attnx.similarity.cosine_to(concepts[m].expand(2, -1))
        e = attnx.explain(model, x, "legrad", target=target, pooling="mean")
        ours = as_authors_show(e.scores, 8)  # (1, B, H, W): one map per image
        assert max_abs_diff(ours[0], theirs[:, m]) < 1e-8
    assert (theirs[:, 0] - theirs[:, 1]).abs().max() > 1e-3  # one map per concept
