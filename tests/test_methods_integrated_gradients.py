"""Integrated gradients: equal to captum called directly on the same model, and complete.

The references call captum's ``IntegratedGradients`` / ``LayerIntegratedGradients`` on a plain
function of the model (its logits at the target, a similarity), with the same baseline and
number of steps; attnx goes through :class:`attnx.core.target_forward.TargetForward` in chunks.
"""
from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients

import attnx
from clip_models import hf_clip
from conftest import CASES
from contracts import assert_unchanged, snapshot
from decoder_models import DecoderCase

STEPS = 8


def test_timm_vit_equals_captum_and_scores_sum_each_patch():
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(2)
    before = snapshot(model)
    e = attnx.explain(model, x, method="integrated_gradients", n_steps=STEPS)
    assert_unchanged(before, model)
    expected = IntegratedGradients(lambda images: model(images)).attribute(
        x, baselines=torch.zeros_like(x), target=e.targets, n_steps=STEPS)
    assert (e.input_relevance - expected).abs().max() < 1e-4
    per_patch = expected.sum(1).reshape(2, 4, 8, 4, 8).sum((2, 4)).flatten(1)  # 4x4 grid of 8x8 patches
    assert (e.scores - per_patch).abs().max() < 1e-4


def test_completeness_within_the_convergence_delta():
    case = CASES["hf_vit_sdpa"]
    model, x = case.model(torch.float64), case.inputs(2, dtype=torch.float64)
    e = attnx.explain(model, x, method="integrated_gradients", n_steps=64)
    with torch.no_grad():
        rows = torch.arange(2)
        difference = model(pixel_values=x).logits[rows, e.targets] - model(pixel_values=torch.zeros_like(x)).logits[rows, e.targets]
    total = e.input_relevance.flatten(1).sum(1)
    delta = torch.tensor(e.options["convergence_delta"], dtype=torch.float64)
    assert (total - difference - delta).abs().max() < 1e-8  # captum's delta is the completeness error
    assert (delta.abs() < 1e-3 * difference.abs()).all(), (delta, difference)
    assert (e.scores.sum(1) - total).abs().max() < 1e-8


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_zero_embeddings_equal_captum_on_inputs_embeds(impl):
    case = CASES[f"hf_bert_{impl}"]
    model = case.model()
    inputs = case.inputs(2, lengths=[9, 6])
    e = attnx.explain(model, inputs, method="integrated_gradients", n_steps=STEPS)
    embeddings = model.get_input_embeddings()(inputs["input_ids"]).detach()

    def forward(embeds, mask):
        return model(inputs_embeds=embeds, attention_mask=mask).logits

    expected = IntegratedGradients(forward).attribute(
        embeddings, baselines=torch.zeros_like(embeddings), target=e.targets, n_steps=STEPS,
        additional_forward_args=(inputs["attention_mask"],))
    assert (e.input_relevance - expected).abs().max() < 1e-4
    assert (e.token_relevance - expected.sum(-1)).abs().max() < 1e-4


def test_bert_pad_baseline_equals_captum_layer_integrated_gradients():
    case = CASES["hf_bert_sdpa"]
    model = case.model()
    inputs = case.inputs(2, lengths=[9, 7])
    e = attnx.explain(model, inputs, method="integrated_gradients", n_steps=STEPS, baseline="pad")
    ids = inputs["input_ids"]

    def forward(token_ids, mask):
        return model(input_ids=token_ids, attention_mask=mask).logits

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    expected = lig.attribute(ids, baselines=torch.full_like(ids, model.config.pad_token_id), target=e.targets, n_steps=STEPS,
                             additional_forward_args=(inputs["attention_mask"],))
    assert (e.input_relevance - expected).abs().max() < 1e-4


def test_gpt2_next_token_equals_captum_layer_integrated_gradients():
    case = DecoderCase("gpt2", "lm", "sdpa")
    model = case.model()
    inputs = case.inputs(lengths=[9, 5])  # left padding
    e = attnx.explain(model, inputs, method="integrated_gradients", n_steps=STEPS, baseline="pad")
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    def forward(token_ids, attention_mask, position_ids):
        return model(input_ids=token_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    ids = inputs["input_ids"]
    expected = lig.attribute(ids, baselines=torch.zeros_like(ids), target=e.targets, n_steps=STEPS,
                             additional_forward_args=(mask, positions))
    assert (e.input_relevance - expected).abs().max() < 1e-4


def test_clip_image_tower_similarity_equals_captum():
    model = hf_clip()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=images.flip(0)).pooler_output
    target = attnx.similarity.cosine_to(reference)
    e = attnx.explain(model, images, method="integrated_gradients", n_steps=STEPS, target=target)

    def forward(x):  # one copy of the batch per call, as attnx calls a callable target
        return torch.cat([target(model.get_image_features(pixel_values=x[i:i + 2]).pooler_output) for i in range(0, len(x), 2)])

    expected = IntegratedGradients(forward).attribute(images, baselines=torch.zeros_like(images), n_steps=STEPS)
    assert (e.input_relevance - expected).abs().max() < 1e-4


def test_pad_baseline_on_images_is_refused():
    case = CASES["timm_vit"]
    with pytest.raises(attnx.errors.AttnxValueError, match="pad"):
        attnx.explain(case.model(), case.inputs(1), method="integrated_gradients", baseline="pad", n_steps=2)


def test_a_path_integral_that_did_not_converge_is_named():
    """A zero baseline of a decoder with RMSNorm: the output swings near the path's start, so a
    the quadrature misses y(x) − y(x') (the warning names the samples, here even with 256 points);
    from the padding token's embedding the path is smooth and converges."""
    import warnings

    from attnx.errors import ConvergenceWarning

    case = DecoderCase("llama", "lm", "eager")
    model = case.model(torch.float64)
    x = case.inputs(lengths=[8, 8])
    with pytest.warns(ConvergenceWarning, match=r"did not converge for sample\(s\) \[.*n_steps=2;.*baseline='pad'"):
        rough = attnx.explain(model, x, method="integrated_gradients", n_steps=2)
    assert rough.completeness_error().max() > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fine = attnx.explain(model, x, method="integrated_gradients", n_steps=64, baseline="pad")
    assert fine.completeness_error().max() <= 0.1
