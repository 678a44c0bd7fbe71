"""attnx.estimate: the formulas against independent counts, the half-precision copies, the meta
device, and (slow) against measured peaks in fresh processes (benchmarks/memory_estimate.py)."""
from __future__ import annotations

import math

import os
import sys

import pytest
import torch
import transformers as tr

import attnx
from attnx.core.memory_estimate import TERMS, Sizes, method_terms
from attnx.core.model_shape import InputShape, input_shape, model_shape
from attnx.errors import UnsupportedModelError

LLAMA = dict(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160, max_position_embeddings=1024)
BERT = dict(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=512)
BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return tr.LlamaForCausalLM._from_config(tr.LlamaConfig(**LLAMA), attn_implementation="sdpa").eval()


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return tr.BertForSequenceClassification._from_config(tr.BertConfig(**BERT), attn_implementation="sdpa").eval()


def vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()


def tokens(n: int, batch: int = 2) -> dict:
    ids = torch.randint(3, 400, (batch, n), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def saved_activation_bytes(model, call) -> int:
    """Bytes of the tensors the model's forward saves for its backward (weights excluded), counted
    by autograd's saved-tensor hooks, each storage once."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(v for k, v in storages.items() if k not in weights)


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_block_activations_match_the_tensors_autograd_saves(kind):
    """L · layer_activations is what the forward keeps for the backward (counted independently
    by autograd's saved-tensor hooks), within 15 %."""
    if kind == "vit":
        model, x = vit(), torch.randn(2, 3, 64, 64, requires_grad=True)
        call = lambda: model(x)  # noqa: E731
    else:
        model, x = (llama(), tokens(96)) if kind == "llama" else (bert(), tokens(96))
        emb = model.get_input_embeddings()
        handle = emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
        call = lambda: model(**x)  # noqa: E731
    saved = saved_activation_bytes(model, call)
    if kind != "vit":
        handle.remove()
    shape = model_shape(model)
    predicted = shape.layers * Sizes(shape, input_shape(x, shape)).layer_activations
    assert abs(predicted / saved - 1) < 0.15, (predicted, saved)


def test_attention_terms_are_the_bytes_the_trace_keeps():
    """attention_maps / attention_gradients are the bytes of Trace.attentions / Trace.gradients."""
    model, x = bert(), tokens(40)
    trace = attnx.Explainer(model).trace(x, needs=attnx.Needs(attentions=True, gradients=True))
    kept = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    shape = model_shape(model)
    sizes = Sizes(shape, input_shape(x, shape))
    assert TERMS["attention_maps"][1](sizes) == kept(trace.attentions)
    assert TERMS["attention_gradients"][1](sizes) == kept(trace.gradients)
    last = Sizes(shape, input_shape(x, shape), first=shape.layers - 1)
    assert TERMS["attention_gradients"][1](last) == kept(trace.gradients[-1:])
    # a folding method keeps one head-fused map per layer instead (attnx.core.layer_fold)
    from attnx.methods import get_method

    generic = get_method("generic")
    folded = attnx.Explainer(model).trace(x, needs=generic.needs, fold=generic.fold_for({}))
    assert folded.gradients is None and folded.attentions is None
    assert TERMS["folded_maps"][1](sizes) == kept(folded.folded)


def test_shape_is_read_from_the_config_and_the_inputs():
    shape = model_shape(llama())
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.intermediate) == (3, 64, 4, 2, 160)
    assert shape.gated_mlp and shape.fused_kernel and shape.compute_bytes == 4
    assert input_shape(tokens(17, batch=3), shape) == InputShape(3, 17)
    v = model_shape(vit())
    assert (v.layers, v.hidden, v.heads, v.patch_size, v.prefix_tokens, v.gated_mlp) == (3, 192, 3, 16, 1, False)
    assert input_shape(torch.zeros(2, 3, 64, 48), v) == InputShape(2, 4 * 3 + 1)


def test_unknown_models_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="no memory estimate for Sequential"):
        attnx.estimate(torch.nn.Sequential(torch.nn.Linear(3, 3)), torch.zeros(1, 3))


def float32_casts(model: torch.nn.Module) -> int:
    """Two float32 casts of each bfloat16 weight shape (what attnx.core.runtime.Float32Compute keeps)."""
    shapes = {tuple(p.shape) for p in [*model.parameters(), *model.buffers()] if p.dtype == torch.bfloat16}
    return sum(2 * 4 * math.prod(s) for s in shapes)


def test_half_precision_adds_float32_casts_of_the_weights_only_where_computed_in_float32():
    """precision="auto" computes transformer_attribution in float32 (each op casts the bfloat16
    weights it reads) and attnlrp in bfloat16 (no casts, 2-byte activations); precision="float32"
    casts for both."""
    model = llama().to(torch.bfloat16)
    fp32 = float32_casts(model)
    assert fp32 < sum(p.numel() * 4 for p in model.parameters())  # less than a float32 copy of the model
    copied = attnx.estimate(model, tokens(32), method="transformer_attribution")
    assert copied.float32_weights == fp32
    assert copied.weights == sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])
    assert copied.peak == copied.weights + copied.float32_weights + sum(copied.terms.values())
    own = attnx.estimate(model, tokens(32), method="lrp")
    forced = attnx.estimate(model, tokens(32), method="lrp", precision="float32")
    assert own.float32_weights == 0 and forced.float32_weights == fp32
    assert own.terms["forward_backward"] * 2 == forced.terms["forward_backward"]


def test_the_terms_follow_what_each_method_keeps():
    """LRP presets that keep SDPA fused keep no map; written out (an eager model, or Chefer's
    rules) they do; attention-graph methods keep maps and gradients; the first layer counts."""
    from attnx.lrp import get_preset
    from attnx.methods import get_method

    shape = model_shape(llama())
    eager = model_shape(tr.LlamaForCausalLM._from_config(tr.LlamaConfig(**LLAMA), attn_implementation="eager"))
    lrp = get_method("lrp")
    assert method_terms(lrp, get_preset("attnlrp"), shape) == ("forward_backward", "rule_state")
    assert "written_out_attention" in method_terms(lrp, get_preset("attnlrp"), eager)
    assert {"written_out_attention", "stabilized_rules"} <= set(method_terms(lrp, get_preset("chefer2021"), shape))
    assert "folded_maps" in method_terms(get_method("generic"), None, shape)
    assert "attention_gradients" in method_terms(get_method("transformer_attribution"), get_preset("chefer2021"), shape)
    assert "signed_weights" in method_terms(get_method("transformer_attribution"), get_preset("chefer2021"), shape)
    # the largest below the output layer (vocabulary x hidden), whose rule computes on the target rows only
    assert shape.largest_linear == 160 * 64
    x = tokens(64, batch=1)
    every = attnx.estimate(llama(), x, method="generic", available=None)
    last = attnx.estimate(llama(), x, method="generic", start_layer=-1)
    assert every.terms["folded_maps"] == 3 * last.terms["folded_maps"] == 3 * 64 * 64 * 4  # B=1, heads fused


def test_legrad_keeps_one_head_fused_map_per_layer_it_averages():
    """LeGrad's peak is ``F_sdpa + 4·B·N²·L' + 3 tiles`` on the sdpa kernel (``F_eager + 4·B·N²·L'
    + M`` written out): the authors' default averages the last two layers (of the three),
    ``start_layer=0`` every layer, ``-1`` the last one."""
    x = tokens(64, batch=2)
    one = 2 * 64 * 64 * 4
    terms = {o: attnx.estimate(llama(), x, method="legrad", **kw).terms
             for o, kw in (("default", {}), ("every", {"start_layer": 0}), ("last", {"start_layer": -1}))}
    assert terms["default"]["folded_maps"] == 2 * one
    assert terms["every"]["folded_maps"] == 3 * one
    assert terms["last"]["folded_maps"] == one
    assert {"forward_backward", "recomputed_tiles"} <= set(terms["default"])
    assert "attention_maps" not in terms["default"] and "one_layer_gradient" not in terms["default"]
    model = llama()
    model.set_attn_implementation("eager")
    eager = attnx.estimate(model, x, method="legrad").terms
    assert {"forward_backward", "attention_maps", "one_layer_gradient"} <= set(eager)
    assert eager["folded_maps"] == 2 * one


def test_a_meta_device_model_is_estimated_without_weights():
    """A Llama-3-8B-shaped model built on the meta device: the weights, and the attention maps of
    the attention-graph methods (32 layers x 32 heads x 4096² float32 = 64 GiB)."""
    cfg = tr.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        model = tr.LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.zeros(1, 4096, dtype=torch.long)
    plan = attnx.estimate(model, ids, method="generic", available=80 * 2**30)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # the rotary frequencies
    assert plan.weights == 8_030_261_248 * 2 + buffers  # Llama-3-8B's parameter count, bfloat16
    # generic leaves the attention to the sdpa kernel and recomputes each layer in tiles of query rows
    # (attnx.adapters.fused_kernel): three 16 MiB tiles, and its folded (N, N) map per layer
    assert "attention_maps" not in plan.terms and plan.terms["recomputed_tiles"] == 3 * 2**24
    assert plan.terms["folded_maps"] == 32 * 4096**2 * 4 and plan.float32_weights == 0
    assert plan.device == "meta" and {"generic", "lrp"} <= set(plan.fits)
    assert "transformer_attribution" not in plan.fits  # float32 (outside the bfloat16 tolerance), Chefer's rules
    # rollout folds each layer in the forward beside the kernel: its fused (N, N) map per layer, two tiles
    rollout = attnx.estimate(model, ids, method="rollout", available=80 * 2**30)
    assert "attention_maps" not in rollout.terms and rollout.terms["folded_maps"] == 32 * 4096**2 * 4
    assert rollout.terms["forward_tiles"] == 2 * 2**24 and rollout.float32_weights == 0
    forced = attnx.estimate(model, ids, method="rollout", available=80 * 2**30, precision="float32")
    assert forced.float32_weights == float32_casts(model) < plan.weights / 3  # two of each shape, not a copy
    model.set_attn_implementation("eager")  # the kernel that returns the probabilities: every map is kept
    eager = attnx.estimate(model, ids, method="generic", available=80 * 2**30)
    assert eager.terms["attention_maps"] == 32 * 2**30 and "recomputed_tiles" not in eager.terms
    # rollout in bfloat16 (attnx.core.precision): 32 x 32 x 4096² x 2 bytes; in float32 twice that
    rollout = attnx.estimate(model, ids, method="rollout", available=80 * 2**30)
    assert rollout.terms["attention_maps"] == 32 * 2**30 and rollout.float32_weights == 0
    forced = attnx.estimate(model, ids, method="rollout", available=80 * 2**30, precision="float32")
    assert forced.terms["attention_maps"] == 64 * 2**30
    # not loaded: the weights must fit too (transformer_attribution: 263 GiB of its own + 15 GiB of weights)
    assert forced.needed == forced.peak and "transformer_attribution" not in forced.fits


@pytest.mark.slow
def test_estimates_bound_the_bytes_torch_allocates():
    """Measured in fresh processes: the peak of the bytes torch's allocator holds during one call
    above what it held before (profiler memory events; deterministic for a given model and input).
    The estimate is a planning number for the process's resident memory, which lies above the
    allocator's bytes (the C allocator's arenas: the resident peak of one point varies by up to
    ~35 % between identical processes, too much to test against): it may exceed the allocated
    peak by up to 40 %, and falls short of it by at most 15 %."""
    sys.path.insert(0, BENCH)
    from memory_estimate import measure

    for point in ("llama:generic:512", "llama:lrp:512", "llama:transformer_attribution:512",
                  "bert:transformer_attribution:256", "vit:rollout:224"):
        r = measure(point)
        assert -0.15 <= r["over_allocated"] <= 0.40, r
