"""A model output that is not finite: attnx's kernel switch is not allowed to be the cause.

Hugging Face's eager attention computes its softmax in float32; on a float64 decoder with left
padding its fully masked rows give NaN, while the model's own SDPA kernel stays finite. The family
adapter (which switches to eager to see the probabilities) then falls back to ``intercept``, which
keeps the model's kernel (the folding methods keep it in the family adapter); a model whose own
kernel gives NaN is refused in one line that says so.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.errors import NonFiniteOutputError

from decoder_models import DecoderCase


@pytest.mark.parametrize("method,adapter", [("attention_flow", "intercept"), ("generic", "hf_decoder"),
                                            ("rollout", "hf_decoder")])
def test_float64_sdpa_decoder_with_left_padding_is_explained_through_its_own_kernel(method, adapter):
    """attention_flow switches the family adapter to eager (NaN rows): the fallback keeps the
    kernel; generic and rollout leave the attention to the model's kernel in the family adapter
    itself."""
    case = DecoderCase("llama", "lm", "sdpa")
    model = case.model(torch.float64)
    x = case.inputs(lengths=[5, 8])
    explainer = attnx.Explainer(model)
    padded = explainer.explain(x, method=method)
    assert explainer.adapter.name == adapter
    assert torch.isfinite(padded.scores).all()
    # the same batch in float32 (finite under eager too) through the family adapter
    reference = attnx.explain(case.model(torch.float32), x, method=method)
    assert attnx.Explainer(case.model(torch.float32)).adapter.name != "intercept"
    assert (padded.scores.float() - reference.scores).abs().max() <= 1e-4 * reference.scores.abs().max()

def test_a_model_whose_own_kernel_gives_nan_is_refused_in_one_line():
    case = DecoderCase("llama", "lm", "eager")
    model = case.model(torch.float64)
    with pytest.raises(NonFiniteOutputError, match="own attention kernel produced it.*softmax in float32") as err:
        attnx.explain(model, case.inputs(lengths=[5, 8]), method="generic")
    assert "\n" not in str(err.value)
