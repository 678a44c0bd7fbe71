"""The explained target's score on perturbed inputs: the model's own forward, batched in chunks."""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.core.trace_types import Needs
from attnx.errors import ForwardMismatchError, UnsupportedModelError
from conftest import CASES
from contracts import KINDS, assert_unchanged, snapshot
from decoder_models import DecoderCase

FORWARD = Needs(forward=True)


def test_rows_are_copies_of_the_samples_and_chunks_do_not_change_scores():
    case = DecoderCase("gpt2", "lm", "sdpa")
    model = case.model()
    inputs = case.inputs(lengths=[9, 5])
    trace = attnx.Explainer(model).trace(inputs, needs=FORWARD)
    forward = trace.forward
    x = forward.inputs()
    assert forward.kind == "embeddings" and x.shape == (2, 9, 32)
    noisy = x.repeat(3, 1, 1) + 0.1 * torch.randn(6, 9, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward.chunk_size = 64
        whole = forward(noisy)
        forward.chunk_size = 1  # one copy of the batch per call
        chunked = forward(noisy)
        assert (whole - chunked).abs().max() < 1e-5
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        for r in range(6):
            b = r % 2
            logits = model(inputs_embeds=noisy[r:r + 1], attention_mask=mask[b:b + 1], position_ids=positions[b:b + 1]).logits
            assert abs(float(logits[0, -1, trace.targets[b]]) - float(whole[r])) < 1e-4
        plain = forward(copies=2, score="log_probability")
        assert (plain - trace.logits.log_softmax(-1)[torch.arange(2), trace.targets].repeat(2)).abs().max() < 1e-4


def test_a_forward_that_is_not_the_explained_one_is_refused():
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(2)
    trace = attnx.Explainer(model).trace(x, needs=FORWARD)
    trace.forward.scores = trace.forward.scores + 1.0  # as if the explained pass had computed another function
    with pytest.raises(ForwardMismatchError, match="perturbation"):
        trace.forward.inputs()


@pytest.mark.parametrize("name", ["swin_timm", "swin_hf"])
def test_windowed_attention_is_not_manipulated(name):
    """Swin's windows are not the explained tokens: refused, never edited with the wrong columns."""
    kind = KINDS[name]
    with pytest.raises(UnsupportedModelError, match="window|no self-attention over the"):
        attnx.explain(kind.build(), kind.inputs(), method="atman")


OPTIONS = {"integrated_gradients": {"n_steps": 4}, "occlusion": {}, "atman": {}}
WINDOWED = ("swin_timm", "swin_hf")


@pytest.mark.parametrize("method", sorted(OPTIONS))
@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_model_kind(name, method):
    """Every kind of model runs each perturbation method (or refuses it with a clear error), leaves the
    model as found, and gives finite, not all-zero maps."""
    kind = KINDS[name]
    model = kind.build()
    before = snapshot(model)
    call = kind.call()
    if "text" in call:  # a dual encoder: explain the image tower at its similarity to the prompts
        call["towers"] = ("image", "text")
    refused = method == "atman" and name in WINDOWED
    if refused:
        with pytest.raises(UnsupportedModelError):
            attnx.explain(model, kind.inputs(), method=method, **OPTIONS[method], **call)
    else:
        e = attnx.explain(model, kind.inputs(), method=method, **OPTIONS[method], **call)
        for part in ([e.image, e.text] if hasattr(e, "image") else [e]):
            assert torch.isfinite(part.scores).all() and part.scores.abs().amax() > 0
    assert_unchanged(before, model)
