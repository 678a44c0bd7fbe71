"""The tokens every block reads (``Needs.hidden_states``) and their gradients equal the model's own.

References: a Hugging Face model's own ``output_hidden_states`` (the input of every layer) and
``torch.autograd.grad`` at them; torchvision's and OpenCLIP's blocks run by hand from the
embeddings. The layers below the first a method reads are not kept; what cannot be recorded is
refused in one line.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.adapters import InterceptAdapter
from attnx.core.trace_types import FirstLayer, Needs
from attnx.errors import AttnxValueError, UnsupportedModelError
from conftest import CASES, max_abs_diff
from decoder_models import DecoderCase

TOKENS = Needs(attentions=True, hidden_states=True)


def assert_equal_lists(got, expected, tol: float) -> None:
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g.shape == e.shape and max_abs_diff(g, e) <= tol * max(e.abs().max().item(), 1.0)


@pytest.mark.parametrize("case", [CASES["hf_bert_eager"], CASES["hf_vit_eager"], DecoderCase("gpt2", "lm", "eager"),
                                  DecoderCase("llama", "cls", "eager")], ids=["bert", "hf_vit", "gpt2", "llama_cls"])
def test_hf_tokens_and_gradients_equal_its_output_hidden_states(case):
    """Against the eager kernel, the one attnx observes (in float64 here SDPA differs by up to 3e-6)."""
    model = case.model(torch.float64)
    x = case.inputs(lengths=[9, 9]) if isinstance(case, DecoderCase) else case.inputs(2, dtype=torch.float64)
    targets = torch.tensor([1, 2])
    kwargs = x if isinstance(x, dict) else {"pixel_values": x}
    out = model(**kwargs, output_hidden_states=True)
    logits = out.logits[:, -1] if out.logits.dim() == 3 else out.logits
    hidden = list(out.hidden_states[:-1])
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), hidden)
    trace = attnx.Explainer(model).trace(x, targets, TOKENS)
    assert_equal_lists(trace.hidden_states, [h.detach() for h in hidden], 1e-10)
    assert_equal_lists(trace.hidden_gradients, list(grads), 1e-10)
    assert trace.gradients is None  # not asked for


def test_torchvision_tokens_equal_its_blocks_run_by_hand():
    model = CASES["torchvision_vit"].model(torch.float64)
    x = CASES["torchvision_vit"].inputs(2, dtype=torch.float64)
    tokens = model._process_input(x)
    tokens = torch.cat([model.class_token.expand(2, -1, -1), tokens], dim=1) + model.encoder.pos_embedding
    expected = []
    for layer in model.encoder.layers:
        expected.append(tokens)
        tokens = layer(tokens)
    trace = attnx.Explainer(model).trace(x, torch.tensor([0, 3]), TOKENS)
    assert_equal_lists(trace.hidden_states, [t.detach() for t in expected], 1e-10)


def test_torchvision_value_outputs_are_its_values_through_out_proj():
    """``W_O v_j``: ``ln_1(z)`` through the value third of ``in_proj`` then ``out_proj``'s weight."""
    model = CASES["torchvision_vit"].model(torch.float64)
    x = CASES["torchvision_vit"].inputs(2, dtype=torch.float64)
    trace = attnx.Explainer(model).trace(x, torch.tensor([0, 3]), Needs(attentions=True, hidden_states=True, value_outputs=True))
    for layer, z, got in zip(model.encoder.layers, trace.hidden_states, trace.value_outputs):
        mha, D = layer.self_attention, layer.self_attention.embed_dim
        v = torch.nn.functional.linear(layer.ln_1(z), mha.in_proj_weight[2 * D:], mha.in_proj_bias[2 * D:])
        assert max_abs_diff(got, v @ mha.out_proj.weight.T) < 1e-10


@pytest.mark.parametrize("block", [{}, {"block_type": "custom"}], ids=["mha", "custom"])
def test_open_clip_value_outputs_are_its_values_through_out_proj(block):
    """``nn.MultiheadAttention`` and OpenCLIP's own ``Attention``: ``ln_1(z)`` through the value
    third of ``in_proj`` then ``out_proj``'s weight."""
    from clip_models import open_clip_model

    model = open_clip_model(dtype=torch.float64, **block)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    needs = Needs(attentions=True, hidden_states=True, value_outputs=True)
    trace = attnx.Explainer(model).trace(x, attnx.similarity.embedding_norm, needs)
    blocks = model.visual.transformer.resblocks
    assert len(trace.value_outputs) == len(blocks) > 0
    for blk, z, got in zip(blocks, trace.hidden_states, trace.value_outputs):
        D = blk.attn.in_proj_weight.shape[1]
        v = torch.nn.functional.linear(blk.ln_1(z), blk.attn.in_proj_weight[2 * D:], blk.attn.in_proj_bias[2 * D:])
        assert max_abs_diff(got, v @ blk.attn.out_proj.weight.T) < 1e-10


def test_open_clip_tokens_are_batch_first():
    from clip_models import open_clip_model

    model = open_clip_model(dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for b in model.visual.transformer.resblocks]
    try:
        model.encode_image(x)
    finally:
        for h in handles:
            h.remove()
    batch_first = getattr(model.visual.transformer, "batch_first", True)
    expected = seen if batch_first else [s.transpose(0, 1) for s in seen]
    trace = attnx.Explainer(model).trace(x, attnx.similarity.embedding_norm, TOKENS)
    assert_equal_lists(trace.hidden_states, expected, 1e-10)
    assert all(g is not None and g.abs().sum() > 0 for g in trace.hidden_gradients)


def test_layers_below_the_first_read_are_not_kept():
    case = CASES["timm_vit"]
    trace = attnx.Explainer(case.model()).trace(case.inputs(2), None, TOKENS,
                                                first_layer=FirstLayer(lambda o, layout, n: n - 1))
    *below, last = trace.hidden_states
    assert all(h is None for h in below) and all(g is None for g in trace.hidden_gradients[:-1])
    assert last.shape == (2, case.num_tokens, 16) or last.shape[:2] == (2, case.num_tokens)
    assert trace.hidden_gradients[-1].abs().sum() > 0


def test_a_failing_forward_leaves_no_hooks():
    case = CASES["timm_vit"]
    model = case.model()
    with pytest.raises(AttnxValueError):
        attnx.Explainer(model).trace(torch.randn(1, 3, 24, 24), None, TOKENS)  # the wrong size
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_the_relevance_pass_does_not_record_them():
    case = CASES["timm_vit"]
    needs = Needs(attentions=True, attention_relevance=True, hidden_states=True)
    with pytest.raises(AttnxValueError, match="relevance pass"):
        attnx.Explainer(case.model()).trace(case.inputs(1), None, needs, preset="chefer2021")


def test_an_adapter_that_does_not_name_its_blocks_is_refused():
    """``intercept`` without a family adapter (a model attnx does not know) names no blocks."""
    case = CASES["timm_vit"]
    with pytest.raises(UnsupportedModelError, match="blocks"):
        model = case.model()
        attnx.Explainer(model, adapter=InterceptAdapter(model)).trace(case.inputs(1), None, TOKENS)


MLP = Needs(attentions=True, hidden_states=True, mlp_branches=True)


def test_torchvision_mlp_branches_are_its_feed_forward_run_by_hand():
    """``E'`` = ``z + attention(ln_1(z))`` and ``Ẽ' = mlp(ln_2(E'))``; their sum is the next block's input."""
    model = CASES["torchvision_vit"].model(torch.float64)
    x = CASES["torchvision_vit"].inputs(2, dtype=torch.float64)
    trace = attnx.Explainer(model).trace(x, torch.tensor([0, 3]), MLP)
    layers = model.encoder.layers
    assert len(trace.mlp_inputs) == len(trace.mlp_outputs) == len(layers) > 0
    for i, (layer, z, got_in, got_out) in enumerate(zip(layers, trace.hidden_states, trace.mlp_inputs, trace.mlp_outputs)):
        y = layer.ln_1(z)
        mid = z + layer.self_attention(y, y, y, need_weights=False)[0]
        assert max_abs_diff(got_in, mid) < 1e-10
        assert max_abs_diff(got_out, layer.mlp(layer.ln_2(mid))) < 1e-10
        if i + 1 < len(layers):
            assert max_abs_diff(got_in + got_out, trace.hidden_states[i + 1]) < 1e-10


@pytest.mark.parametrize("case", [CASES["hf_bert_eager"], CASES["hf_vit_eager"], DecoderCase("llama", "cls", "eager")],
                         ids=["bert", "hf_vit", "llama_cls"])
def test_hf_mlp_branches_sum_to_the_next_block_input(case):
    """Pre-norm blocks add the branch to the residual stream (``E' + Ẽ'`` is the next block's input);
    BERT's post-norm block normalises the sum with ``output.LayerNorm``."""
    model = case.model(torch.float64)
    x = case.inputs(lengths=[9, 9]) if isinstance(case, DecoderCase) else case.inputs(2, dtype=torch.float64)
    trace = attnx.Explainer(model).trace(x, torch.tensor([1, 0]), MLP)
    blocks = [b for b, _ in attnx.Explainer(model).adapter.block_inputs(None)]
    for i in range(len(blocks) - 1):
        total = trace.mlp_inputs[i] + trace.mlp_outputs[i]
        if hasattr(blocks[i], "intermediate") and hasattr(blocks[i], "output"):
            total = blocks[i].output.LayerNorm(total)
        assert max_abs_diff(total, trace.hidden_states[i + 1]) < 1e-10
        assert trace.mlp_outputs[i].abs().sum() > 0


def test_open_clip_mlp_branches_are_batch_first():
    """A tower that is not batch first: ``E'`` and ``Ẽ' = ls_2(mlp(ln_2(E')))`` as ``(B, N, D)``."""
    from clip_models import open_clip_model

    model = open_clip_model(dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    trace = attnx.Explainer(model).trace(x, attnx.similarity.embedding_norm, MLP)
    blocks = model.visual.transformer.resblocks
    for i, blk in enumerate(blocks):
        assert trace.mlp_inputs[i].shape[0] == 2
        assert max_abs_diff(trace.mlp_outputs[i], blk.ls_2(blk.mlp(blk.ln_2(trace.mlp_inputs[i])))) < 1e-10
        if i + 1 < len(blocks):
            assert max_abs_diff(trace.mlp_inputs[i] + trace.mlp_outputs[i], trace.hidden_states[i + 1]) < 1e-10


def test_a_model_without_named_feed_forward_sublayers_is_refused_in_one_line():
    """A timm block whose feed-forward sublayer is not ``norm2`` -> ``ls2`` (here renamed) is refused."""
    model = CASES["timm_vit"].model()
    for blk in model.blocks:
        blk.post_norm = blk.norm2
        del blk.norm2
        blk.forward = lambda x, blk=blk: x + blk.ls1(blk.attn(blk.norm1(x))) + blk.ls2(blk.mlp(blk.post_norm(x)))
    with pytest.raises(UnsupportedModelError, match="feed-forward sublayers.*tokentm") as err:
        attnx.Explainer(model).trace(CASES["timm_vit"].inputs(1), None, MLP)
    assert "\n" not in str(err.value)
