"""Attention written out by hand is observed by the intercept adapter (attnx/adapters/kernels.py).

The models below are written here in the styles research code uses -- DINO/DeiT
(``attn.softmax(dim=-1)``, ``attn_drop``, ``attn @ v``), ``nn.MultiheadAttention``, einsum,
``torch.bmm`` over ``(B*H, N, N)``, timm Swin's ``nn.Softmax`` module -- plus one with softmaxes
that are not attention (an MoE router followed by ``topk``, classifier softmaxes). None calls an
attention kernel unless built with ``fused=True`` (then the same weights run through
``F.scaled_dot_product_attention``). Each is checked against computations independent of attnx:

* the recorded attentions equal ``softmax(Q K^T * scale (+ bias))`` recomputed per head from the
  module's own weights and its input (grabbed by a forward pre-hook);
* the recorded ``dy/dA`` equal central finite differences of the target logit, the probabilities
  perturbed inside the model (a ``probe`` added to them before the product);
* every method gives the same scores as on the SDPA twin, and a batch equals its samples alone;
* the grid and prefix tokens are inferred from the token count (8-pixel patches on 32x32
  images, 4-pixel patches on 24x40 images; with and without a class token).
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx.errors import DegenerateMapWarning
from attnx.lrp import UncoveredOpError
from attnx.adapters.kernels import AttentionInterceptor, TokenWatcher
from attnx.errors import UnsupportedModelError
from attnx.core.recorder import AttentionRecorder
from conftest import max_abs_diff, randomize_, with_batch
from contracts import explained_or_refused

DT = torch.float64
DIM, HEADS, DEPTH, CLASSES = 16, 4, 3, 5
HEAD_DIM = DIM // HEADS


# --------------------------------------------------------------------------------------------
# attention in the styles of research code
# --------------------------------------------------------------------------------------------
class QKVAttention(nn.Module):
    """Shared parts: one ``qkv`` Linear (rows: q | k | v, heads contiguous), an output
    projection, ``fused`` (run SDPA instead, same weights) and ``probe`` (a tensor added to the
    probabilities before the product, for finite differences; ``None`` while explaining)."""

    def __init__(self, dim: int, heads: int, num_tokens: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)
        self.fused = False
        self.probe: torch.Tensor | None = None

    def bias(self) -> torch.Tensor | None:
        return None

    def probed(self, attn: torch.Tensor) -> torch.Tensor:
        return attn if self.probe is None else attn + self.probe


class DinoAttention(QKVAttention):
    """DINO / DeiT ``Attention``."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = self.probed(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class EinsumAttention(QKVAttention):
    """Scores and product by ``torch.einsum``; softmax in ``softmax_dtype`` (float32), cast back
    to the values' dtype (as Hugging Face ViT does)."""

    softmax_dtype = torch.float32

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, C // self.num_heads)).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale
            attn = F.softmax(scores, dim=-1, dtype=self.softmax_dtype).to(v.dtype)
            out = torch.einsum("bhqk,bhkd->bhqd", self.probed(attn), v)
        return self.proj(out.transpose(1, 2).flatten(2))


class BmmAttention(QKVAttention):
    """Heads folded into the batch axis: ``torch.bmm`` over ``(B*H, N, N)``."""

    def forward(self, x):
        B, N, C = x.shape
        H, d = self.num_heads, C // self.num_heads
        q, k, v = (t.reshape(B, N, H, d).transpose(1, 2).reshape(B * H, N, d) for t in self.qkv(x).chunk(3, dim=-1))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = torch.bmm(q * self.scale, k.transpose(1, 2))
            attn = F.softmax(attn, dim=-1)
            attn = F.dropout(attn, p=0.1, training=self.training)
            out = torch.bmm(self.probed(attn), v)
        return self.proj(out.reshape(B, H, N, d).transpose(1, 2).reshape(B, N, C))


class SwinStyleAttention(QKVAttention):
    """timm Swin's ``WindowAttention`` over one global window: a learned position bias added to
    the scores, an ``nn.Softmax`` module, ``type_as``."""

    def __init__(self, dim: int, heads: int, num_tokens: int) -> None:
        super().__init__(dim, heads, num_tokens)
        self.position_bias = nn.Parameter(torch.zeros(heads, num_tokens, num_tokens))
        self.softmax = nn.Softmax(dim=-1)

    def bias(self) -> torch.Tensor:
        return self.position_bias

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias, scale=self.scale)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1) + self.position_bias.unsqueeze(0)
            attn = self.softmax(attn).type_as(v)
            attn = self.attn_drop(attn)
            out = self.probed(attn) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MHAAttention(nn.Module):
    """``nn.MultiheadAttention``; with a ``probe`` the same weights run written out (the
    finite-difference path, checked against the module's own output at probe 0)."""

    def __init__(self, dim: int, heads: int, num_tokens: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fused = True  # nn.MultiheadAttention is its own kernel
        self.probe: torch.Tensor | None = None

    def bias(self) -> None:
        return None

    def forward(self, x):
        if self.probe is None:
            return self.mha(x, x, x, need_weights=False)[0]
        B, N, C = x.shape
        q, k, v = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) + self.probe
        return self.mha.out_proj(torch.matmul(attn, v).transpose(1, 2).reshape(B, N, C))


class MoEMlp(nn.Module):
    """A mixture of experts: a router softmax over the experts, ``topk``, and the chosen
    experts' outputs combined by ``matmul`` with the top weights -- not attention."""

    def __init__(self, dim: int, experts: int = 4, top: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(experts))
        self.top = top

    def forward(self, x):
        gates = self.router(x).softmax(dim=-1)  # (B, N, E): a softmax over the last axis
        weights, index = gates.topk(self.top, dim=-1)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, N, E, C)
        chosen = outs.gather(-2, index[..., None].expand(*index.shape, outs.shape[-1]))  # (B, N, top, C)
        return torch.matmul(weights.unsqueeze(-2), chosen).squeeze(-2)


class Block(nn.Module):
    def __init__(self, attention: type, num_tokens: int, moe: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = attention(DIM, HEADS, num_tokens)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = MoEMlp(DIM) if moe else nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ResearchViT(nn.Module):
    """A ViT as research code writes it: conv patch embedding, optional class token, learned
    position embedding for one image size, blocks, head on the class token (or the mean of the
    tokens). ``classifier_softmax``: the model outputs probabilities -- a softmax over the
    classes of every token (averaged) and of the class token -- not logits."""

    def __init__(self, attention: type, image_size, patch: int, class_token: bool = True, moe: bool = False,
                 classifier_softmax: bool = False) -> None:
        super().__init__()
        self.grid = (image_size[0] // patch, image_size[1] // patch)
        self.prefix = int(class_token)
        n = self.grid[0] * self.grid[1] + self.prefix
        self.patch_embed = nn.Conv2d(3, DIM, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n, DIM))
        self.blocks = nn.ModuleList(Block(attention, n, moe) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)
        self.classifier_softmax = classifier_softmax

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.classifier_softmax:
            per_token = self.head(x).softmax(dim=-1).mean(1)  # (B, N, C) softmax over classes
            return 0.5 * per_token + 0.5 * self.head(x[:, 0]).softmax(-1)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))

    def attentions(self) -> list[nn.Module]:
        return [b.attn for b in self.blocks]

    def set_fused(self, fused: bool) -> None:
        for a in self.attentions():
            if not isinstance(a, MHAAttention):
                a.fused = fused


# name -> (attention, image size, patch, class token, extra model arguments)
STYLES = {
    "dino": (DinoAttention, (32, 32), 8, True, {}),
    "dino_24x40": (DinoAttention, (24, 40), 4, True, {}),
    "mha": (MHAAttention, (24, 40), 4, False, {}),
    "einsum": (EinsumAttention, (32, 32), 8, True, {}),
    "bmm": (BmmAttention, (24, 40), 4, True, {}),
    "moe_classifier_softmax": (DinoAttention, (32, 32), 8, True, {"moe": True, "classifier_softmax": True}),
    "nn_softmax": (SwinStyleAttention, (24, 40), 4, False, {}),
}
WRITTEN_OUT = [n for n in STYLES if n != "mha"]


def build(name: str, dtype=DT) -> ResearchViT:
    attention, size, patch, cls, extra = STYLES[name]
    torch.manual_seed(0)
    model = ResearchViT(attention, size, patch, class_token=cls, **extra)
    return randomize_(model, seed=3).to(dtype).eval()


def images(name: str, batch: int = 3, dtype=DT) -> torch.Tensor:
    size = STYLES[name][1]
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------
def qk_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (3C, C) input projection (rows q | k | v) and its bias."""
    if isinstance(attn, MHAAttention):
        return attn.mha.in_proj_weight, attn.mha.in_proj_bias
    return attn.qkv.weight, attn.qkv.bias


def reference_attention(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """softmax(Q_i K_i^T * scale + bias_i) of every head i, from the weights, by hand."""
    W, b = qk_weights(attn)
    B, N, C = h.shape
    bias = attn.bias()
    out = torch.empty(B, attn.num_heads, N, N, dtype=h.dtype)
    for i in range(attn.num_heads):
        rows = slice(i * HEAD_DIM, (i + 1) * HEAD_DIM)
        Q = torch.einsum("bnc,dc->bnd", h, W[rows]) + b[rows]
        K = torch.einsum("bnc,dc->bnd", h, W[C:][rows]) + b[C:][rows]
        S = torch.einsum("bqd,bkd->bqk", Q, K) * attn.scale
        if bias is not None:
            S = S + bias[i]
        E = torch.exp(S - S.max(dim=-1, keepdim=True).values)
        out[:, i] = E / E.sum(dim=-1, keepdim=True)
    return out


def attention_inputs(model: ResearchViT, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every attention module, grabbed by forward pre-hooks on a plain forward."""
    seen = []
    handles = [a.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for a in model.attentions()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def probe_shape(attn: nn.Module, shape: torch.Size) -> torch.Size:
    """The shape of the probabilities inside ``attn`` ((B*H, N, N) for the bmm style)."""
    B, H, N, M = shape
    return torch.Size((B * H, N, M)) if isinstance(attn, BmmAttention) else shape


def target_score(model, x, targets) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, targets[:, None]).sum()


# --------------------------------------------------------------------------------------------
# the recorded attentions and gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(STYLES))
def test_recorded_attention_equals_softmax_of_own_qk(name):
    model = build(name)
    x = images(name)
    explainer = attnx.Explainer(model)
    assert explainer.adapter.name == "intercept"
    trace = explainer.capture(x)
    n = model.prefix + model.grid[0] * model.grid[1]
    assert len(trace.attentions) == DEPTH  # router and classifier softmaxes are not attention
    # the einsum style's softmax runs in float32
    tolerance = 1e-6 if name == "einsum" else 1e-12
    for l, (a, inp) in enumerate(zip(model.attentions(), attention_inputs(model, x))):
        got = trace.attentions[l]
        assert got.shape == (3, HEADS, n, n) and got.dtype == DT
        assert max_abs_diff(got, reference_attention(a, inp)) <= tolerance, f"layer {l}"


@pytest.mark.parametrize("name", list(STYLES))
def test_gradients_equal_finite_differences(name):
    model = build(name)
    for a in model.attentions():  # finite differences through a float32 softmax are noise
        if isinstance(a, EinsumAttention):
            a.softmax_dtype = DT
    x = images(name)
    targets = torch.tensor([1, 4, 2])
    trace = attnx.Explainer(model).capture(x, target=targets.tolist(), gradients=True)
    g = torch.Generator().manual_seed(5)
    eps = 1e-6
    attentions = model.attentions()
    if name == "mha":  # the written-out path used for probing is the module's own computation
        attentions[0].probe = torch.zeros(trace.attentions[0].shape, dtype=DT)
        try:
            assert abs(target_score(model, x, targets) - trace.logits.gather(1, targets[:, None]).sum()) < 1e-12
        finally:
            attentions[0].probe = None
    for l, a in enumerate(attentions):
        G = trace.gradients[l]
        assert G.shape == trace.attentions[l].shape
        D = torch.randn(G.shape, generator=g, dtype=DT)
        ys = []
        for sign in (1, -1):
            a.probe = (sign * eps * D).reshape(probe_shape(a, D.shape))
            try:
                ys.append(target_score(model, x, targets))
            finally:
                a.probe = None
        fd = ((ys[0] - ys[1]) / (2 * eps)).item()
        analytic = (G * D).sum().item()
        assert abs(analytic) > 1e-3, "degenerate probe"
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), f"layer {l}: fd {fd} vs <G,D> {analytic}"


@pytest.mark.parametrize("name", ["dino", "bmm", "einsum"])
def test_gradients_equal_autograd_through_an_independent_forward(name):
    """dy/dA of the last layer from an independent forward: the model run up to the last
    attention, then the rest recomputed in the test with A as a leaf."""
    model = build(name)
    x = images(name)
    targets = torch.tensor([0, 3, 1])
    trace = attnx.Explainer(model).capture(x, target=targets.tolist(), gradients=True)
    last = model.blocks[-1]
    h = attention_inputs(model, x)[-1]
    with torch.no_grad():  # the residual stream entering the last block, from its attention input
        stream = [None]
        handle = last.register_forward_pre_hook(lambda m, args: stream.__setitem__(0, args[0]))
        model(x)
        handle.remove()
    A = reference_attention(last.attn, h).requires_grad_(True)
    B, N, C = h.shape
    v = F.linear(h, last.attn.qkv.weight[2 * C:], last.attn.qkv.bias[2 * C:]).view(B, N, HEADS, HEAD_DIM).transpose(1, 2)
    y = stream[0] + last.attn.proj(torch.einsum("bhqk,bhkd->bqhd", A, v).reshape(B, N, C))
    y = y + last.mlp(last.norm2(y))
    logits = model.head(model.norm(y)[:, 0])
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), A)
    tolerance = 1e-6 if name == "einsum" else 1e-10  # float32 softmax in the model
    assert max_abs_diff(trace.gradients[-1], grad) <= tolerance * max(1.0, grad.abs().max().item())


# --------------------------------------------------------------------------------------------
# layout, methods, batch independence
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def uncovered_router(name: str, method: str):
    """The MoE router's ``topk`` has no LRP rule: the presets' passes refuse it by default and,
    with ``strict=False``, say so (never silently). Every other op of these models has a rule or is
    linear: any other warning is an error, except the degenerate-map warning of methods that keep
    only a positive part (attn_gradcam's ReLU can leave a sample with nothing) and integrated gradients'
    convergence warning on a routed model. Yields the extra
    options of the call."""
    spec = attnx.get_method(method)
    if name.startswith("moe") and spec.needs.relevance and spec.needs.rules is None:
        with pytest.warns(UserWarning, match=r"matched no rule.*'topk'"):
            yield {"strict": False}
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if method == "attn_gradcam":
            warnings.simplefilter("ignore", DegenerateMapWarning)
        if method == "integrated_gradients" and name.startswith("moe"):
            # the router's top-k makes the path from the baseline discontinuous: the integral is missed, and said
            warnings.simplefilter("ignore", attnx.ConvergenceWarning)
        yield {}


def test_the_uncovered_router_is_refused_by_default():
    with pytest.raises(UncoveredOpError, match="topk"):
        attnx.explain(build("moe_classifier_softmax"), images("moe_classifier_softmax"), method="lrp")


@pytest.mark.parametrize("name", list(STYLES))
def test_grid_and_prefix_tokens_are_inferred(name):
    model = build(name)
    _, size, patch, cls, _ = STYLES[name]
    grid = (size[0] // patch, size[1] // patch)
    for method in ("rollout", "lrp"):  # from the attention's token count; from the token watcher
        with uncovered_router(name, method) as extra:
            e = attnx.explain(model, images(name), method=method, **extra)
        assert e.grid == grid and e.scores.shape == (3, grid[0] * grid[1])
        assert e.layout.prefix_tokens == int(cls)
        if method == "rollout":  # the rows the head reads, measured: the class token, the mean, or
            # every token (a softmax over the classes of every token is averaged into the output)
            every = STYLES[name][4].get("classifier_softmax") or not cls
            assert e.readout.rows(0) == (list(range(e.layout.num_tokens)) if every else [0])


@pytest.mark.parametrize("name", list(STYLES))
def test_every_method_equals_the_sdpa_twin_and_is_batch_independent(name):
    """Written out vs the same weights through SDPA (which the interceptor makes explicit
    itself), then batched vs each sample alone, for every method."""
    model = build(name)
    for a in model.attentions():  # float32 softmax rounding is amplified by LRP (DESIGN.md §4)
        if isinstance(a, EinsumAttention):
            a.softmax_dtype = DT
    x = images(name)
    targets = [2, 0, 4]
    explainer = attnx.Explainer(model)

    def explain(inputs, method, target):
        with uncovered_router(name, method) as extra:
            return explainer.explain(inputs, method=method, target=target, **extra)

    for method in attnx.list_methods():
        e = explained_or_refused(lambda m: explain(x, m, targets), method)
        if e is None:  # the written-out research models do not name their blocks
            continue
        assert torch.isfinite(e.scores).all() and e.scores.abs().max() > 0, method
        scale = max(1.0, e.scores.abs().max().item())
        if name != "mha":
            model.set_fused(True)
            try:
                fused = explain(x, method, targets)
            finally:
                model.set_fused(False)
            assert max_abs_diff(e.scores, fused.scores) <= 1e-9 * scale, f"{method}: written out vs SDPA"
        for b in range(3):
            alone = explain(with_batch(x, [b]), method, [targets[b]])
            assert max_abs_diff(alone.scores[0], e.scores[b]) <= 1e-5 * scale, f"{method}, sample {b}"


# --------------------------------------------------------------------------------------------
# what is counted, and what is not
# --------------------------------------------------------------------------------------------
def test_softmaxes_that_are_not_attention_are_not_recorded():
    """A router softmax (then topk, then matmul with the top weights) and classifier softmaxes
    over the last axis of (B, N, C) and (B, C) tensors are not recorded; a model with only
    those has no attention."""

    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, DIM, 8, stride=8)
            self.moe = MoEMlp(DIM)
            self.head = nn.Linear(DIM, CLASSES)

        def forward(self, x):
            t = self.patch_embed(x).flatten(2).transpose(1, 2)
            t = t + self.moe(t)
            return self.head(t).softmax(-1).mean(1) + self.head(t.mean(1)).softmax(-1)

    model = randomize_(NoAttention()).to(DT).eval()
    recorder = AttentionRecorder(batch_size=2)
    with AttentionInterceptor(recorder), TokenWatcher(recorder):
        model(images("dino", 2))
    assert len(recorder) == 0 and recorder.token_counts == []
    with pytest.raises(UnsupportedModelError, match=r"no attention was observed in NoAttention"):
        attnx.explain(model, images("dino", 2), method="rollout")


def test_moe_model_records_exactly_the_attention_layers():
    model = build("moe_classifier_softmax")
    recorder = AttentionRecorder(batch_size=3)
    with AttentionInterceptor(recorder):
        model(images("moe_classifier_softmax"))
    assert [tuple(p.shape) for p in recorder.probs] == [(3, HEADS, 17, 17)] * DEPTH


@pytest.mark.parametrize("name", ["dino", "bmm"])
def test_sdpa_replacement_is_recorded_once(name):
    """The explicit SDPA the interceptor runs calls softmax and matmul itself; those calls do
    not re-enter it: one record per layer, in the plain and in the relevance pass."""
    model = build(name)
    model.set_fused(True)
    x = images(name)
    recorder = AttentionRecorder(batch_size=3)
    with AttentionInterceptor(recorder):
        model(x)
    n = model.prefix + model.grid[0] * model.grid[1]
    assert len(recorder) == DEPTH and recorder.token_counts == [n] * DEPTH
    assert all(p.shape == (3, HEADS, n, n) for p in recorder.probs)
    trace = attnx.Explainer(model).trace(x, needs=attnx.Needs(attentions=True, attention_relevance=True), preset="attnlrp")
    assert len(trace.attentions) == len(trace.attention_relevance) == DEPTH


@pytest.mark.parametrize("name", list(STYLES))
def test_token_watcher_counts_written_out_attention(name):
    """The token watcher notes each attention's key length, changing nothing."""
    model = build(name)
    x = images(name)
    with torch.no_grad():
        plain = model(x)
    recorder = AttentionRecorder(batch_size=3)
    with torch.no_grad(), TokenWatcher(recorder):
        watched = model(x)
    if name == "mha":  # under any mode nn.MultiheadAttention leaves its fused fast path
        assert max_abs_diff(plain, watched) <= 1e-12
    else:
        assert torch.equal(plain, watched)
    n = model.prefix + model.grid[0] * model.grid[1]
    assert recorder.token_counts == [n] * DEPTH and len(recorder) == 0


def test_grid_from_token_count_without_a_patch_convolution():
    """Patches cut by ``unfold`` and a Linear (no stride=kernel convolution to watch): methods
    that record no attention get the grid from the token count of the written-out attention."""

    class UnfoldViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3 * 4 * 4, DIM)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
            self.block = Block(DinoAttention, 61, moe=False)
            self.head = nn.Linear(DIM, CLASSES)

        def forward(self, x):
            t = self.embed(F.unfold(x, 4, stride=4).transpose(1, 2))  # (B, 60, DIM) on 24x40
            t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
            return self.head(self.block(t)[:, 0])

    model = randomize_(UnfoldViT()).to(DT).eval()
    for method in ("lrp", "gradient_x_input", "rollout"):
        with uncovered_router("unfold", method):  # F.unfold is linear: no warning
            e = attnx.explain(model, images("dino_24x40", 2), method=method)
        assert e.grid == (6, 10) and e.scores.shape == (2, 60) and e.layout.prefix_tokens == 1, method


def test_attention_changed_after_the_softmax_is_refused():
    """Probabilities renormalised after the softmax are not the softmax output the product
    consumes: nothing is recorded, and the error says what is recognised."""

    class Renormalised(DinoAttention):
        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            attn = attn * (attn > 0.01)
            attn = attn / attn.sum(-1, keepdim=True)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

    torch.manual_seed(0)
    model = randomize_(ResearchViT(Renormalised, (32, 32), 8)).to(DT).eval()
    with pytest.raises(UnsupportedModelError, match=r"no attention was observed.*softmax over the key axis"):
        attnx.explain(model, images("dino"), method="rollout")


@pytest.mark.parametrize("fused", [True, False])
def test_timm_swin_windows_are_refused_clearly(fused):
    """timm Swin's window attention (nn.Softmax over (B*windows, H, N, N)) is seen by the
    intercept adapter, and refused as not one stack of global self-attentions, rather than
    explained wrongly; the Swin adapter refuses a size whose last stage has several windows,
    naming the methods that work (tests/test_family_swin.py covers the sizes it explains)."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=CLASSES).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    with pytest.raises(UnsupportedModelError, match="windowed or hierarchical"):
        attnx.Explainer(model, adapter="intercept").explain(torch.randn(2, 3, 64, 64), method="rollout")
    with pytest.raises(UnsupportedModelError, match=r"8x8 feature map attended in windows of 4x4.*lrp, gradient_x_input"):
        attnx.explain(model, torch.randn(2, 3, 64, 64), method="rollout")
    assert all(m.fused_attn is fused for m in model.modules() if hasattr(m, "fused_attn"))


@pytest.mark.parametrize("equation,index,contracts", [
    ("bhqk,bhkd->bhqd", 0, True),
    ("bhkd,bhqk->bhqd", 1, True),
    ("b h q k, b h k d -> b h q d", 0, True),
    ("bhqk,bhkd", 0, True),  # implicit output: the labels that occur once (q, d)
    ("...qk,...kd->...qd", 0, True),
    ("bhqk,bhqd->bhkd", 0, False),  # sums over the queries (A^T V): k survives
    ("bhqk->bhq", 0, False),  # a sum over the keys, no values
    ("bhqk,bhkd->bhqkd", 0, False),  # nothing contracted
    ("bhq...,bhkd->bhqd", 0, False),  # the key axis is under an ellipsis
])
def test_einsum_contraction_of_the_key_axis(equation, index, contracts):
    from attnx.adapters.kernels import einsum_contracts_last_axis

    assert einsum_contracts_last_axis(equation, 2 if "," in equation else 1, index) is contracts


def cast_without_grad(s, v):
    attn = s.softmax(-1)
    with torch.no_grad():
        attn = attn.to(torch.float32)
    return attn @ v.float()


def twice(s, v):
    attn = s.softmax(-1)
    return attn @ v + attn @ (2 * v)


def run_intercepted(fn, *tensors, batch_size=2):
    recorder = AttentionRecorder(batch_size=batch_size)
    with AttentionInterceptor(recorder):
        out = fn(*tensors)
    return recorder, out


def test_what_the_interceptor_records_on_single_ops():
    """Attention: a softmax over the last axis of (..., Nq, Nk) multiplied with values (..., Nk, D)
    as the left operand. Not attention: a softmax over another axis (slot attention normalises
    over the slots), the right operand of a product, a product that sums the queries."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, 5, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(2, 3, 5, 4, generator=g, dtype=DT)
    cases = {
        "attention": (lambda s, v: s.softmax(-1) @ v, 1),
        "dim=3": (lambda s, v: torch.matmul(F.softmax(s, dim=3), v), 1),
        "dim=-2": (lambda s, v: s.softmax(-2) @ v, 0),
        "dim=1": (lambda s, v: s.softmax(1) @ v, 0),
        "right operand": (lambda s, v: v.transpose(-2, -1) @ s.softmax(-1), 0),
        "A^T V": (lambda s, v: torch.einsum("bhqk,bhqd->bhkd", s.softmax(-1), v), 0),
        "after masked_fill": (lambda s, v: s.softmax(-1).masked_fill(s > 2, 0.0) @ v, 0),
        "detached": (lambda s, v: s.softmax(-1).detach() @ v, 0),
        "cast under no_grad": (cast_without_grad, 0),
        "heads flattened into queries": (lambda s, v: s.softmax(-1).flatten(1, 2) @ v[:, 0], 0),
        "consumed twice": (twice, 1),
        "through contiguous, to, type_as": (lambda s, v: s.softmax(-1).contiguous().to(DT).type_as(v) @ v, 1),
        "float32 softmax, cast": (lambda s, v: F.softmax(s, dim=-1, dtype=torch.float32).to(DT) @ v, 1),
        "reshaped for bmm": (lambda s, v: torch.bmm(s.softmax(-1).reshape(6, 5, 5), v.reshape(6, 5, 4)), 1),
    }
    for label, (fn, expected) in cases.items():
        recorder, _ = run_intercepted(fn, s, v)
        assert len(recorder) == expected, label
        for probs in recorder.probs:
            assert probs.shape == (2, 3, 5, 5), label
            assert max_abs_diff(probs, s.softmax(-1)) <= (1e-7 if "float32" in label else 0.0), label


@pytest.mark.parametrize("shape,recorded", [
    ((6, 5, 5), (2, 3, 5, 5)),  # (B*H, N, N): heads folded into the batch axis
    ((2, 5, 5), (2, 1, 5, 5)),  # (B, N, N): one head
    ((2, 2, 3, 5, 5), (2, 6, 5, 5)),  # (B, groups, H, N, N)
])
def test_layouts_of_the_probabilities_are_recorded_per_sample(shape, recorded):
    s = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=DT, requires_grad=True)
    v = torch.randn(*shape[:-1], 4, dtype=DT)
    recorder, _ = run_intercepted(lambda s, v: torch.matmul(s.softmax(-1), v), s, v, batch_size=2)
    (probs,) = recorder.probs
    assert probs.shape == recorded and recorder.grad_wrt[0].shape == shape
    # sample b, head h is sample b's own h-th matrix (the batch axis leads)
    assert torch.equal(probs, s.softmax(-1).reshape(recorded))


def test_recorded_tensor_is_the_one_the_product_consumed():
    """Gradients taken w.r.t. the recorded tensor are dy/dA of the product's left operand,
    for a (B*H, N, N) bmm input recorded as (B, H, N, N) too."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, 5, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(2, 3, 5, 4, generator=g, dtype=DT)
    w = torch.randn(2, 3, 5, 4, generator=g, dtype=DT)

    def bmm(s, v):
        attn = F.softmax(s.reshape(6, 5, 5), dim=-1)
        return torch.bmm(attn, v.reshape(6, 5, 4)).reshape(2, 3, 5, 4)

    for fn in (lambda s, v: s.softmax(-1) @ v, bmm):
        recorder, out = run_intercepted(fn, s, v)
        (grad,) = recorder.gradients((out * w).sum())
        # d<A V, W>/dA = W V^T
        assert max_abs_diff(grad, w @ v.transpose(-2, -1)) <= 1e-12
