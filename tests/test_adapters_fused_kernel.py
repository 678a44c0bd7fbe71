"""Attention left in the model's fused kernel (``attnx.adapters.fused_kernel``).

The recomputed probabilities must be the ones ``F.scaled_dot_product_attention`` multiplies the
values by; the backward must give the kernel's own input gradients and hand each fold the true
``A`` and ``dy_t/dA`` (autograd through the attention written out); the folding methods must give
on a Hugging Face model running ``sdpa`` the maps they give with the model switched to ``eager``,
without that switch and without any ``(N, N)`` tensor saved by the forward; a forward whose calls
are not one per layer must fall back to the written-out probabilities.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import attnx
from attnx.adapters import fused_kernel
from attnx.core import layer_fold
from attnx.adapters.fused_kernel import KernelCall, RecomputedAttention, sdpa_probabilities

from decoder_models import DecoderCase


@contextlib.contextmanager
def kernel_backwards(note=lambda ctx: ctx.call.index):
    """``note(ctx)`` of every :class:`RecomputedAttention` backward run inside, in order."""
    seen = []
    original = RecomputedAttention.backward

    def noted(ctx, grad):
        seen.append(note(ctx))
        return original(ctx, grad)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RecomputedAttention, "backward", staticmethod(noted))
        yield seen


def kernel_inputs(heads: int = 4, kv_heads: int = 4, n: int = 7, m: int | None = None, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    m = n if m is None else m
    q = torch.randn(2, heads, n, 5, generator=g, dtype=dtype)
    k = torch.randn(2, kv_heads, m, 5, generator=g, dtype=dtype)
    v = torch.randn(2, kv_heads, m, 5, generator=g, dtype=dtype)
    return q, k, v


def masks(n: int, m: int) -> dict:
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, n, m, generator=g) > 0.3
    keep[1, :, 2] = False  # a query that may attend to no key
    additive = torch.zeros(2, 1, n, m, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    return {"none": {}, "causal": {"is_causal": True}, "bool": {"attn_mask": keep}, "additive": {"attn_mask": additive}}


def written_out(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The attention written out from its definition (no attnx code): ``A`` and ``A v``."""
    heads = q.shape[1]
    if k.shape[1] != heads:
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    allowed = torch.ones(scores.shape, dtype=torch.bool)
    if is_causal:
        allowed = allowed & torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        allowed = allowed & (attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf"))
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs, probs @ v


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_recomputed_probabilities_are_the_kernels(mask, kv_heads):
    q, k, v = kernel_inputs(kv_heads=kv_heads)
    kwargs = {**masks(7, 7)[mask], "enable_gqa": kv_heads != 4}
    probs = sdpa_probabilities(q, k, kwargs.get("attn_mask"), kwargs.get("is_causal", False), None, kwargs["enable_gqa"])
    expected, _ = written_out(q, k, v, **kwargs)
    assert torch.allclose(probs, expected, atol=1e-12)
    repeated = v.repeat_interleave(4 // kv_heads, dim=1)
    assert torch.allclose(probs @ repeated, F.scaled_dot_product_attention(q, k, v, **kwargs), atol=1e-12)


@pytest.mark.parametrize("tile_bytes", [2**24, 2 * 4 * 7 * 8 * 3], ids=["whole", "tiles of 3 rows"])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_backward_gives_the_kernels_gradients_and_the_fold_true_A_and_dA(mask, kv_heads, tile_bytes, monkeypatch):
    monkeypatch.setattr(fused_kernel, "TILE_BYTES", tile_bytes)
    q, k, v = (t.requires_grad_(True) for t in kernel_inputs(kv_heads=kv_heads))
    kwargs = masks(7, 7)[mask]
    gqa = kv_heads != 4
    weights = torch.randn(2, 4, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seen = {"A": [], "dA": []}

    class Folder:
        def tiled(self, index):
            return True

        def piece(self, index, rows, a, g):
            seen["A"].append(a.clone())
            seen["dA"].append(g.clone())

        def done(self, index):
            seen["done"] = index

    call = KernelCall(0, kwargs.get("attn_mask"), kwargs.get("is_causal", False), 0.3, gqa)
    call.folder = Folder()
    probe = torch.zeros((), requires_grad=True)
    out = RecomputedAttention.apply(q, k, v, probe, call)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))

    probs, expected_out = written_out(q, k, v, scale=0.3, **kwargs)
    probs.retain_grad()
    (expected_out * weights).sum().backward()
    assert torch.allclose(out, expected_out, atol=1e-12)
    for mine, theirs in zip(got, (q.grad, k.grad, v.grad)):
        assert torch.allclose(mine, theirs, atol=1e-10)
    assert len(seen["A"]) == (1 if tile_bytes == 2**24 else 3) and seen["done"] == 0
    assert torch.allclose(torch.cat(seen["A"], dim=-2), probs, atol=1e-12)
    assert torch.allclose(torch.cat(seen["dA"], dim=-2), probs.grad, atol=1e-12)
    assert call.folded


def llama(impl: str = "sdpa"):
    return DecoderCase("llama", "lm", impl).model()


@pytest.mark.parametrize("tile_bytes", [2**24, 2 * 4 * 9 * 4 * 2], ids=["whole", "tiles of 2 rows"])
@pytest.mark.parametrize("method", ["generic", "grad_rollout", "attn_gradcam"])
@pytest.mark.parametrize("family,head", [("llama", "lm"), ("qwen2", "cls"), ("gpt2", "lm")])
def test_folding_methods_on_sdpa_equal_the_eager_kernel(method, family, head, tile_bytes, monkeypatch):
    monkeypatch.setattr(fused_kernel, "TILE_BYTES", tile_bytes)
    case = DecoderCase(family, head, "sdpa")
    model = case.model()
    inputs = case.inputs(lengths=[9, 6])
    with kernel_backwards(lambda ctx: len(ctx.call.row_tiles(*ctx.saved_tensors[:2]))) as backwards:
        fused = attnx.explain(model, inputs, method=method)
    assert backwards, "the sdpa kernel was not kept: the pass switched the model"
    assert max(backwards) == (5 if tile_bytes < 2**24 else 1)
    assert model.config._attn_implementation == "sdpa"
    eager = attnx.explain(DecoderCase(family, head, "eager").model(), inputs, method=method)
    assert torch.isfinite(fused.scores).all()
    assert torch.allclose(fused.scores, eager.scores, rtol=1e-4, atol=1e-6 * float(eager.scores.abs().max()))


def test_backward_stops_at_the_lowest_layer_read():
    model = llama()
    case = DecoderCase("llama", "lm", "sdpa")
    with kernel_backwards(lambda ctx: (ctx.call.index, ctx.call.input_gradients)) as folded:
        attnx.explain(model, case.inputs(), method="generic", start_layer=1)
    assert folded == [(2, True), (1, False)]


def test_the_forward_saves_no_attention_map():
    """Every tensor autograd saves in the forward: none is a (.., N, N) map (the eager kernel saves one per layer)."""
    case = DecoderCase("llama", "lm", "sdpa")
    inputs = case.inputs(lengths=[13, 13])

    def saved_maps(model) -> int:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attnx.explain(model, inputs, method="generic", check_forward=False)
        return sum(1 for s in shapes if len(s) >= 2 and s[-2:] == (13, 13))

    assert saved_maps(case.model()) == 0
    assert saved_maps(DecoderCase("llama", "lm", "eager").model()) >= 3  # the check can fail


def test_a_call_not_covered_falls_back_to_the_written_out_probabilities(monkeypatch):
    case = DecoderCase("llama", "lm", "sdpa")
    inputs = case.inputs()
    expected = attnx.explain(case.model(), inputs, method="generic").scores
    original = fused_kernel.FusedKernelProbe.__torch_function__
    seen = []

    def skipping_one(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            seen.append(1)
            if len(seen) == 2:  # the second layer's call runs unrecorded: two of three layers seen
                return func(*args, **(kwargs or {}))
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(fused_kernel.FusedKernelProbe, "__torch_function__", skipping_one)
    explainer = attnx.Explainer(case.model())
    got = explainer.explain(inputs, method="generic").scores
    assert seen, "the kernel path was not tried"
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    tried = len(seen)
    again = explainer.explain(inputs, method="grad_rollout").scores  # the miss is remembered: no second try
    assert len(seen) == tried and explainer.adapter.kernel_calls_missed and torch.isfinite(again).all()


def test_checkpointed_layers_recompute_through_the_kernel_and_give_the_same_map():
    case = DecoderCase("llama", "lm", "sdpa")
    inputs = case.inputs()
    plain = attnx.explain(case.model(), inputs, method="grad_rollout").scores
    model = case.model()
    model.activation_checkpointing_enable()
    layers = model.model.layers
    forwards = []
    handles = [m.self_attn.register_forward_hook(lambda *a: forwards.append(1)) for m in layers]
    try:
        with kernel_backwards() as backwards:
            got = attnx.explain(model, inputs, method="grad_rollout", check_forward="never").scores
    finally:
        for h in handles:
            h.remove()
    assert sorted(backwards) == [0, 1, 2]
    assert len(forwards) == 2 * len(layers)  # each layer ran again in the backward
    assert torch.allclose(got, plain, rtol=1e-5, atol=1e-7)


def test_a_layer_the_backward_does_not_reach_falls_back(monkeypatch):
    """A layer read whose kernel call the backward did not reach: its A was not kept, so the pass
    runs again with the probabilities written out (the same map)."""
    case = DecoderCase("llama", "lm", "sdpa")
    inputs = case.inputs()
    expected = attnx.explain(case.model(), inputs, method="generic").scores
    original = RecomputedAttention.backward

    def unreached_first(ctx, grad):  # as if layer 0's output had no gradient path
        out = original(ctx, grad)
        if ctx.call.index == 0:
            ctx.call.folded = False
        return out

    monkeypatch.setattr(RecomputedAttention, "backward", staticmethod(unreached_first))
    tried = []
    monkeypatch.setattr(layer_fold.KernelCallsMissed, "__init__",
                        lambda self, *a: tried.append(a) or Exception.__init__(self, *a))
    got = attnx.explain(case.model(), inputs, method="generic").scores
    assert tried, "the kernel path did not notice the layer it did not reach"
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_half_precision_model_is_folded_in_its_own_dtype():
    case = DecoderCase("llama", "lm", "sdpa")
    inputs = case.inputs()
    exact = attnx.explain(case.model(), inputs, method="generic", target=7).scores  # one token: the top ones may swap
    half = attnx.explain(case.model(torch.bfloat16), inputs, method="generic", target=7, precision="model").scores
    eager = attnx.explain(DecoderCase("llama", "lm", "eager").model(torch.bfloat16), inputs, method="generic",
                          target=7, precision="model").scores
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert torch.allclose(half, eager, rtol=0.05, atol=0.02 * float(eager.abs().max()))
    # the bfloat16 model's map against the float32 one: the tolerance of docs/large_models.md
    assert torch.nn.functional.cosine_similarity(half.flatten(1), exact.flatten(1)).min() > 0.99


@pytest.mark.parametrize("global_pool", ["token", "avg", "map"])
def test_timm_vit_keeps_its_fused_kernel_unless_the_head_is_an_attention_pool(global_pool):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5,
                              global_pool=global_pool, class_token=global_pool == "token").eval()
    assert all(block.attn.fused_attn for block in model.blocks)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for method in ("generic", "grad_rollout", "attn_gradcam"):
        with kernel_backwards() as backwards:
            fused = attnx.explain(model, x, method=method, target=[1, 3])
        # a MAP head's probe attention is read in the forward: the blocks are written out instead
        assert len(backwards) == (0 if global_pool == "map" else 1 if method == "attn_gradcam" else 3)
        with pytest.MonkeyPatch.context() as mp:
            for block in model.blocks:
                mp.setattr(block.attn, "fused_attn", False)
            written = attnx.explain(model, x, method=method, target=[1, 3])
        assert torch.allclose(fused.scores, written.scores, rtol=1e-4, atol=1e-6 * float(written.scores.abs().max()))
        assert all(block.attn.fused_attn for block in model.blocks)


class HandWritten(torch.nn.Module):
    """A user's own pre-norm Transformer classifier calling ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 3, vocab: int = 30) -> None:
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(depth))
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        B, N, D = x.shape
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for qkv, norm in zip(self.qkv, self.norm):
            q, k, v = qkv(norm(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, N, D)
        return self.head(x[:, 0])


@pytest.mark.parametrize("method", ["generic", "grad_rollout", "attn_gradcam"])
def test_hand_written_attention_keeps_its_kernel_under_the_intercepting_adapter(method, monkeypatch):
    from attnx.adapters.intercept import InterceptAdapter

    torch.manual_seed(0)
    model = HandWritten().eval()
    ids = torch.randint(1, 30, (2, 7), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    with kernel_backwards() as backwards:
        explainer = attnx.Explainer(model)
        fused = explainer.explain(inputs, method=method, target=[0, 2])
    assert explainer.adapter.name == "intercept" and backwards
    monkeypatch.setattr(InterceptAdapter, "observe_kernels", lambda self, recorder: None)
    written = attnx.explain(model, inputs, method=method, target=[0, 2])
    assert torch.allclose(fused.scores, written.scores, rtol=1e-4, atol=1e-6 * float(written.scores.abs().max()))
    assert (fused.scores[1, 5:] == 0).all()  # padding


def forward_folds(monkeypatch):
    """The query-row tiles each forward-folded kernel call handed to its folder, in call order."""
    tiles: list[int] = []
    original = fused_kernel.KernelCall.row_tiles

    def counted(self, query, key):
        out = original(self, query, key)
        if self.folder is not None:
            tiles.append(len(out))
        return out

    monkeypatch.setattr(fused_kernel.KernelCall, "row_tiles", counted)
    return tiles


ROLLOUTS = [("rollout", {}), ("rollout", {"head_fusion": "max", "discard_ratio": 0.3, "start_layer": 1}),
            ("raw_attention", {}), ("raw_attention", {"layer": 0, "head_fusion": "min"})]


@pytest.mark.parametrize("tile_bytes", [2**24, 2 * 4 * 9 * 4 * 2], ids=["whole", "tiles of 2 rows"])
@pytest.mark.parametrize("method,options", ROLLOUTS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
@pytest.mark.parametrize("family,head", [("llama", "lm"), ("qwen2", "cls"), ("gpt2", "lm")])
def test_rollout_and_raw_attention_fold_in_the_forward_on_sdpa_as_on_the_eager_kernel(
    method, options, family, head, tile_bytes, monkeypatch
):
    """No backward: each layer's A is computed beside the kernel as the forward makes it, heads
    fused and let go; the maps equal the eager kernel's (every map kept)."""
    monkeypatch.setattr(fused_kernel, "TILE_BYTES", tile_bytes)
    case = DecoderCase(family, head, "sdpa")
    model, inputs = case.model(), case.inputs(lengths=[9, 6])
    tiles = forward_folds(monkeypatch)
    with kernel_backwards() as backwards:
        fused = attnx.explain(model, inputs, method=method, check_forward="never", **options)
    assert not backwards and len(tiles) == model.config.num_hidden_layers
    assert max(tiles) == (5 if tile_bytes < 2**24 else 1)
    assert model.config._attn_implementation == "sdpa"
    eager = attnx.explain(DecoderCase(family, head, "eager").model(), inputs, method=method, **options)
    assert torch.isfinite(fused.scores).all()
    assert torch.allclose(fused.scores, eager.scores, rtol=1e-5, atol=1e-7 * float(eager.scores.abs().max()))


def test_a_forward_fold_keeps_no_attention_map(monkeypatch):
    """The trace of a folded rollout holds L fused (B, N, N) maps, no (B, H, N, N) attention."""
    from attnx.core.trace_types import Needs

    case = DecoderCase("llama", "lm", "sdpa")
    model, inputs = case.model(), case.inputs(lengths=[13, 13])
    spec = attnx.get_method("rollout")
    trace = attnx.Explainer(model).trace(inputs, needs=Needs(attentions=True), fold=spec.fold_for({"head_fusion": "mean"}))
    assert trace.attentions is None
    assert [tuple(m.shape) for m in trace.folded] == [(2, 13, 13)] * model.config.num_hidden_layers
    eager = attnx.Explainer(DecoderCase("llama", "lm", "eager").model()).trace(inputs, needs=Needs(attentions=True))
    for folded, full in zip(trace.folded, eager.attentions):  # the heads' mean of the written-out map
        assert torch.allclose(folded, full.mean(dim=1), atol=1e-6)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_vit_rollout_keeps_its_fused_kernel(global_pool, monkeypatch):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5,
                              global_pool=global_pool, class_token=global_pool == "token").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tiles = forward_folds(monkeypatch)
    fused = attnx.explain(model, x, method="rollout", discard_ratio=0.2)
    assert len(tiles) == 3
    with pytest.MonkeyPatch.context() as mp:
        for block in model.blocks:
            mp.setattr(block.attn, "fused_attn", False)
        written = attnx.explain(model, x, method="rollout", discard_ratio=0.2)
    assert torch.allclose(fused.scores, written.scores, rtol=1e-5, atol=1e-7)


def test_hand_written_attention_rollout_keeps_its_kernel_under_the_intercepting_adapter(monkeypatch):
    from attnx.adapters.intercept import InterceptAdapter

    torch.manual_seed(0)
    model = HandWritten().eval()
    ids = torch.randint(1, 30, (2, 7), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    tiles = forward_folds(monkeypatch)
    explainer = attnx.Explainer(model)
    fused = explainer.explain(inputs, method="rollout", target=[0, 2])
    assert explainer.adapter.name == "intercept" and len(tiles) == 3
    monkeypatch.setattr(InterceptAdapter, "observe_kernels", lambda self, recorder: None)
    written = attnx.explain(model, inputs, method="rollout", target=[0, 2])
    assert torch.allclose(fused.scores, written.scores, rtol=1e-5, atol=1e-7)
    assert (fused.scores[1, 5:] == 0).all()  # padding


@pytest.mark.parametrize("tile_bytes", [2**24, 2 * 4 * 9 * 4 * 2], ids=["whole", "tiles of 2 rows"])
@pytest.mark.parametrize("options", [{}, {"start_layer": 0}, {"start_layer": -1}], ids=["default", "every", "last"])
@pytest.mark.parametrize("family,head", [("llama", "lm"), ("qwen2", "cls"), ("gpt2", "lm")])
def test_legrad_keeps_the_kernel_one_short_backward_per_layer(family, head, options, tile_bytes, monkeypatch):
    """Each layer's own readout differentiated at its attention: the call's backward recomputes A
    and folds ``∂s^l/∂A^l``; the backwards run from the top layer down, one per layer averaged."""
    monkeypatch.setattr(fused_kernel, "TILE_BYTES", tile_bytes)
    case = DecoderCase(family, head, "sdpa")
    model, inputs = case.model(), case.inputs(lengths=[9, 6])
    with kernel_backwards(lambda ctx: (ctx.call.index, ctx.call.input_gradients)) as backwards:
        fused = attnx.explain(model, inputs, method="legrad", **options)
    averaged = {"default": [2, 1], "every": [2, 1, 0], "last": [2]}[
        "every" if options.get("start_layer") == 0 else "last" if options else "default"]
    assert [i for i, _ in backwards] == averaged
    assert not any(gradients for _, gradients in backwards)  # no backward goes below the attention it folds
    eager = attnx.explain(DecoderCase(family, head, "eager").model(), inputs, method="legrad", **options)
    assert torch.isfinite(fused.scores).all() and fused.scores.abs().max() > 0
    assert torch.allclose(fused.scores, eager.scores, rtol=1e-4, atol=1e-6 * float(eager.scores.abs().max()))


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_timm_vit_legrad_keeps_its_fused_kernel(pooling):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with kernel_backwards() as backwards:
        fused = attnx.explain(model, x, method="legrad", target=[1, 3], start_layer=0, pooling=pooling)
    assert len(backwards) == 3
    with pytest.MonkeyPatch.context() as mp:
        for block in model.blocks:
            mp.setattr(block.attn, "fused_attn", False)
        written = attnx.explain(model, x, method="legrad", target=[1, 3], start_layer=0, pooling=pooling)
    assert torch.allclose(fused.scores, written.scores, rtol=1e-5, atol=1e-7 * float(written.scores.abs().max()))


@pytest.mark.parametrize("tile_bytes", [2**24, 2 * 4 * 9 * 4 * 2], ids=["whole", "tiles of 2 rows"])
@pytest.mark.parametrize("method", ["generic", "attn_gradcam"])
@pytest.mark.parametrize("family,head", [("llama", "lm"), ("qwen2", "cls"), ("gpt2", "lm")])
def test_libragrad_keeps_the_kernel_with_its_query_and_key_paths_pruned(method, family, head, tile_bytes, monkeypatch):
    """LibraGrad holds the probabilities constant: the engine's rule for the call passes nothing to
    ``q`` and ``k``, and the kernel it runs is folded as without rules (``∇A = g vᵀ`` of LibraGrad's
    gradient). The maps equal the eager kernel's, whose softmax LibraGrad prunes written out."""
    monkeypatch.setattr(fused_kernel, "TILE_BYTES", tile_bytes)
    case = DecoderCase(family, head, "sdpa")
    model = case.model()
    inputs = case.inputs(lengths=[9, 6])
    with kernel_backwards(lambda ctx: (tuple(ctx.needs_input_grad[:3]), len(ctx.call.row_tiles(*ctx.saved_tensors[:2])))) as backwards:
        fused = attnx.explain(model, inputs, method=method, libragrad=True)
    assert backwards, "the sdpa kernel was not kept: the pass switched the model"
    assert {needs for needs, _ in backwards} == {(False, False, True)}  # no gradient to q and k
    assert max(tiles for _, tiles in backwards) == (5 if tile_bytes < 2**24 else 1)
    assert model.config._attn_implementation == "sdpa"
    eager = attnx.explain(DecoderCase(family, head, "eager").model(), inputs, method=method, libragrad=True)
    plain = attnx.explain(DecoderCase(family, head, "eager").model(), inputs, method=method)
    assert torch.isfinite(fused.scores).all()
    assert torch.allclose(fused.scores, eager.scores, rtol=1e-4, atol=1e-6 * float(eager.scores.abs().max()))
    assert not torch.allclose(plain.scores, eager.scores, rtol=1e-3)  # LibraGrad's gradients are not the plain ones


def test_libragrad_on_a_timm_vit_keeps_its_fused_kernel():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with kernel_backwards() as backwards:
        fused = attnx.explain(model, x, method="generic", libragrad=True)
    assert backwards == [2, 1, 0]
    for block in model.blocks:
        block.attn.fused_attn = False
    eager = attnx.explain(model, x, method="generic", libragrad=True, target=fused.targets.tolist())
    assert torch.allclose(fused.scores, eager.scores, rtol=1e-4, atol=1e-6 * float(eager.scores.abs().max()))
