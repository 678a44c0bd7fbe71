"""Per-layer readouts (``attnx.core.layer_readout``): each layer's target through the model's head.

* a callable target is called on each layer's output as on the model's (a Hugging Face output with
  ``.logits``), against the score written out from the hidden states;
* an adapter whose readout of the last layer is not the model's output is refused, in one line;
* the blocks' hooks are removed and the model's head, run again on every layer, records nothing
  (the recorded layers are the model's own).
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.adapters.timm_vit import TimmViTAdapter
from attnx.core.layer_readout import LayerReadout
from attnx.errors import UnsupportedModelError
from conftest import CASES, max_abs_diff

DT = torch.float64


def test_a_callable_target_reads_each_layers_output():
    model = CASES["hf_bert_eager"].model(DT)
    x = CASES["hf_bert_eager"].inputs(2, lengths=[9, 5])

    def margin(out):
        return out.logits[:, 1] - out.logits[:, 0]

    out = model(**x, output_attentions=True, output_hidden_states=True, return_dict=True)
    valid = x["attention_mask"].bool()
    pairs = (valid[:, :, None] & valid[:, None, :]).to(DT)
    total = 0
    for l in range(3):
        logits = model.classifier(model.bert.pooler(out.hidden_states[l + 1]))
        (g,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), out.attentions[l], retain_graph=True)
        total = total + (g.clamp(min=0).mean(1) * pairs).sum(1) / valid.sum(1, keepdim=True)
    e = attnx.explain(model, x, "legrad", target=margin, start_layer=0)
    assert max_abs_diff(e.token_relevance, total / 3) < 1e-8


class NoNorm(TimmViTAdapter):
    """A wrong per-layer readout: the head without the final norm."""

    name = "timm_vit_no_norm"

    def layer_readout(self, batch, pooling="model"):
        right = super().layer_readout(batch, pooling)
        model = self.model

        def head(tokens):
            out = model.forward_head(tokens)
            return out, out

        return LayerReadout(right.blocks, head)


def test_a_readout_that_is_not_the_models_output_is_refused():
    case = CASES["timm_vit"]
    model = case.model()
    explainer = attnx.Explainer(model, adapter=NoNorm(model))
    with pytest.raises(UnsupportedModelError, match=r"^[^\n]*differs from the model's output[^\n]*$"):
        explainer.explain(case.inputs(2), "legrad")
    assert explainer.explain(case.inputs(2), "legrad", start_layer=-1).scores.shape == (2, 16)  # no readout needed


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit_eager"])
def test_hooks_are_removed_and_the_heads_record_nothing(name):
    case = CASES[name]
    model = case.model()
    x = case.inputs(2)
    e = attnx.explain(model, x, "legrad", start_layer=0)
    assert e.scores.shape == (2, 16)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    trace = attnx.Explainer(model).trace(x, None, attnx.Needs(attentions=True, gradients=True, layer_readouts=True))
    assert len(trace.attentions) == len(trace.gradients) == 3  # the forward's layers, not the heads' runs
    assert all(g.abs().max() > 0 for g in trace.gradients)
