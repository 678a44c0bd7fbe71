"""Occlusion: equal to captum's Occlusion called directly, and to the drop of the target computed by hand."""
from __future__ import annotations

import torch
from captum.attr import Occlusion

import attnx
from attnx.core.targets import Continuation
from conftest import CASES
from contracts import assert_unchanged, snapshot
from decoder_models import DecoderCase


def test_timm_vit_patches_equal_captum_and_the_drop_by_hand():
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(2)
    before = snapshot(model)
    e = attnx.explain(model, x, method="occlusion")
    assert_unchanged(before, model)
    expected = Occlusion(lambda images: model(images)).attribute(
        x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), baselines=0.0, target=e.targets)
    assert (e.input_relevance - expected).abs().max() < 1e-4
    rows = torch.arange(2)
    with torch.no_grad():
        clean = model(x)[rows, e.targets]
        for p in range(16):
            occluded = x.clone()
            r, c = divmod(p, 4)
            occluded[:, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 0
            drop = clean - model(occluded)[rows, e.targets]
            assert (e.scores[:, p] - drop).abs().max() < 1e-4
    assert e.scores.abs().amax() > 1e-2


def test_float64_model_keeps_float64_and_the_drop():
    case = CASES["hf_vit_eager"]
    model, x = case.model(torch.float64), case.inputs(1, dtype=torch.float64)
    e = attnx.explain(model, x, method="occlusion")
    assert e.scores.dtype == e.input_relevance.dtype == torch.float64
    t = int(e.targets[0])
    with torch.no_grad():
        clean = model(pixel_values=x).logits[0, t]
        occluded = x.clone()
        occluded[:, :, 8:16, 16:24] = 0  # patch (1, 2)
        assert abs(float(e.scores[0, 6]) - float(clean - model(pixel_values=occluded).logits[0, t])) < 1e-10
    assert (e.pixel_relevance[0, 8:16, 16:24].sum() - e.scores[0, 6]).abs() < 1e-10  # pixels sum to the drop


def test_bert_tokens_equal_captum_with_zero_and_pad_embeddings():
    case = CASES["hf_bert_eager"]
    model = case.model()
    inputs = case.inputs(2, lengths=[9, 6])
    embeddings = model.get_input_embeddings()
    x = embeddings(inputs["input_ids"]).detach()

    def forward(embeds, mask):
        return model(inputs_embeds=embeds, attention_mask=mask).logits

    for baseline, reference in (("zeros", torch.zeros_like(x)),
                                ("pad", embeddings(torch.full_like(inputs["input_ids"], model.config.pad_token_id)).detach())):
        e = attnx.explain(model, inputs, method="occlusion", baseline=baseline)
        expected = Occlusion(forward).attribute(x, sliding_window_shapes=(1, 32), strides=(1, 32), baselines=reference,
                                                target=e.targets, additional_forward_args=(inputs["attention_mask"],))
        assert (e.input_relevance - expected).abs().max() < 1e-4
        assert (e.token_relevance - expected.mean(-1)).abs().max() < 1e-4
        assert e.token_relevance[1, 6:].abs().max() < 1e-5  # padding occludes to no change


def test_llama_continuation_drop_by_hand():
    case = DecoderCase("llama", "lm", "sdpa")
    model = case.model()
    inputs = case.inputs(lengths=[7], batch=1)
    continuation = [5, 9, 11]
    e = attnx.explain(model, inputs, method="occlusion", target=Continuation(continuation))
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation])], dim=1)
    embeds = model.get_input_embeddings()(ids).detach()

    def log_probability(x):
        logp = model(inputs_embeds=x).logits[0].log_softmax(-1)
        return sum(logp[6 + k, t] for k, t in enumerate(continuation))

    with torch.no_grad():
        clean = log_probability(embeds)
        for j in range(7):
            occluded = embeds.clone()
            occluded[0, j] = 0
            assert abs(float(e.scores[0, j]) - float(clean - log_probability(occluded))) < 1e-4
