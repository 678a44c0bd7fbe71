"""Backward passes that stop at the lowest layer a method reads (``attnx.core.trace_types.FirstLayer``).

The maps must equal those computed from a trace of every layer (the method function applied to
a full trace), the layers below must be ``None`` in the trace, and the backward must really not
reach them (a gradient hook on the first block's output never fires).
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.core.layout import Readout
from attnx.methods import get_method

from conftest import CASES, max_abs_diff

# (method, options, the lowest layer read in a 3-layer model: image form / text form)
CASES_READ = [
    ("partial_lrp", {}, 2, 2),
    ("partial_lrp", {"layer": 1}, 1, 1),
    ("transformer_attribution", {}, 0, 2),
    ("transformer_attribution", {"start_layer": 1}, 1, 1),
    ("transformer_attribution", {"form": "bert"}, 2, 2),
    ("attn_gradcam", {}, 2, 2),
    ("generic", {"start_layer": -1}, 2, 2),
    ("grad_rollout", {"start_layer": 2}, 2, 2),
]


def full_trace_map(explainer, inputs, name, options):
    """The method applied to a trace of every layer (no lowest layer declared)."""
    spec = get_method(name)
    method_options, trace_options = spec.resolve(options)
    registry = explainer.registry_for(spec, trace_options)
    trace = explainer.trace(inputs, None, spec.needs, registry)
    assert all(g is not None for g in (trace.gradients or [])) and all(r is not None for r in (trace.attention_relevance or []))
    readout = Readout(trace.layout, trace.logits.shape[0], trace.logits.device)
    result = spec.fn(trace, readout, **method_options)
    return result.tokens if isinstance(result, attnx.Relevance) else result


def first_block(model):
    if hasattr(model, "blocks"):
        return model.blocks[0]
    return model.bert.encoder.layer[0]


@pytest.mark.parametrize("case_name", ["timm_vit", "hf_bert_eager"])
@pytest.mark.parametrize("name, options, image_first, text_first", CASES_READ)
def test_maps_equal_a_full_trace_and_lower_layers_are_not_reached(case_name, name, options, image_first, text_first):
    case = CASES[case_name]
    model = case.model(torch.float64)
    inputs = case.inputs(batch=2, dtype=torch.float64)
    explainer = attnx.Explainer(model)
    expected = full_trace_map(explainer, inputs, name, options)

    reached = []
    block = first_block(model)

    def on_forward(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(lambda g: reached.append(g.shape))

    handle = block.register_forward_hook(on_forward)
    try:
        spec = get_method(name)
        method_options, trace_options = spec.resolve(options)
        trace = explainer.trace(inputs, None, spec.needs, explainer.registry_for(spec, trace_options),
                                first_layer=spec.first_layer_for(method_options))
        e = explainer.explain(inputs, method=name, **options)
    finally:
        handle.remove()

    first = text_first if case.is_text else image_first
    lists = [trace.gradients, trace.attention_relevance]
    for values in (v for v in lists if v is not None):
        assert all(v is None for v in values[:first]) and all(v is not None for v in values[first:])
    assert trace.input_relevance is None
    if first > 0:
        assert reached == [], f"the backward reached the first block ({len(reached)} times)"
    else:  # the hook does see a backward that reaches the block
        assert reached
    assert max_abs_diff(e.token_relevance, expected) < 1e-12


def test_lrp_still_reaches_the_input():
    """A method reading the input relevance keeps the whole backward (and a full trace)."""
    case = CASES["timm_vit"]
    model = case.model(torch.float64)
    x = case.inputs(batch=2, dtype=torch.float64)
    trace = attnx.Explainer(model).trace(x, None, attnx.Needs(input_relevance=True, attention_relevance=True), "chefer2021")
    assert trace.input_relevance is not None and trace.input_relevance.shape == x.shape
    assert all(r is not None for r in trace.attention_relevance)


def test_an_out_of_range_layer_is_reported_by_the_method():
    case = CASES["timm_vit"]
    explainer = attnx.Explainer(case.model())
    with pytest.raises(attnx.errors.AttnxValueError, match="layer 7 is out of range for a model with 3 layers"):
        explainer.explain(case.inputs(), method="partial_lrp", layer=7)
