"""Swin Transformers: timm ``SwinTransformer`` / ``SwinTransformerV2`` and Hugging Face
``SwinForImageClassification`` / ``Swinv2ForImageClassification`` (attnx/adapters/swin.py).

Tiny float64 models: 32x32 images, 4x4 patches, window 4, two stages of two blocks. Stage 0 is an
8x8 map in four 4x4 windows (its second block shifted: ``torch.roll`` and the shift mask), patch
merging gives stage 1, a 4x4 map in one window: the stage attention methods read.

* the attention captured on the last stage equals ``softmax(q kᵀ · scale + bias)`` (V2:
  ``cos(q, k) · exp(logit_scale) + 16 σ(cpb_mlp(table))``) recomputed here from the weights, the
  relative position index rebuilt from its definition;
* ``∂y_t/∂A`` equals autograd through a reference forward of the attention written here (a hook
  replaces each last-stage attention output by one computed from ``A + δ``, ``δ = 0``);
  rollout, gradient rollout, generic, raw attention and attention GradCAM equal their formulas
  on those independent tensors; gradient × input equals ``x ⊙ ∂y_t/∂x`` at the pixels;
* a batch equals its samples alone, the model is left as found (also after a refusal), CP-LRP
  conserves the target logit with the biases zeroed, every preset runs in strict mode;
* a size whose last stage has several windows is refused, naming the methods that work.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx.adapters.swin import INPUT_METHODS
from attnx.errors import UnsupportedModelError
from attnx.lrp import presets
from attnx.methods.registry import get_method
from conftest import max_abs_diff, randomize_
from contracts import assert_unchanged, mixed_mode, snapshot

DT = torch.float64
CLASSES = 5
SMALL = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=CLASSES)


def timm_v1(**kw):
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(**{**SMALL, **kw})


def timm_v2(**kw):
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformerV2(**{**SMALL, **kw})


def hf_config(cls):
    return cls(image_size=32, patch_size=4, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], num_labels=CLASSES)


def hf_v1():
    import transformers

    return transformers.SwinForImageClassification(hf_config(transformers.SwinConfig))


def hf_v2():
    import transformers

    return transformers.Swinv2ForImageClassification(hf_config(transformers.Swinv2Config))


def build(family: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_(BUILDERS[family](**kw), seed=7)
    with torch.no_grad():  # cosine attention: a temperature that peaks it, as trained V2 models do
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(math.log(10.0) + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.to(DT).eval()


BUILDERS = {"timm_v1": timm_v1, "timm_v2": timm_v2, "hf_v1": lambda: hf_v1(), "hf_v2": lambda: hf_v2()}
FAMILIES = list(BUILDERS)
ADAPTER = {"timm_v1": "timm_swin", "timm_v2": "timm_swin", "hf_v1": "hf_swin", "hf_v2": "hf_swin"}
#: Hugging Face's Swin V1 kernel rounds the scores to float32 for its softmax: the reference's
#: float64 scores may round one float32 ulp apart
TOL = {"timm_v1": 1e-10, "timm_v2": 1e-10, "hf_v1": 1e-6, "hf_v2": 1e-10}
#: methods Swin refuses at every size: they read every block's tokens or values (attcat, bt_t, tokentm),
#: or suppress a token in every layer, windows included (atman)
REFUSED = ("attcat", "bt_t", "tokentm", "atman")
ATTENTION_METHODS = [m for m in attnx.list_methods() if m not in INPUT_METHODS and m not in REFUSED]


def images(batch: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=DT)


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


# --------------------------------------------------------------------------------------------
# the reference attention, from the weights
# --------------------------------------------------------------------------------------------
def relative_index(h: int, w: int) -> torch.Tensor:
    """Index of the (2h-1)(2w-1) relative offsets for every (query, key) pair of an h x w window."""
    a, b = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    a, b = a.flatten(), b.flatten()
    return (a[:, None] - a[None, :] + h - 1) * (2 * w - 1) + (b[:, None] - b[None, :] + w - 1)


def log_coords(h: int, w: int) -> torch.Tensor:
    """SwinV2's log-spaced relative coordinates, ((2h-1)(2w-1), 2)."""
    dh, dw = torch.meshgrid(torch.arange(-(h - 1), h, dtype=DT), torch.arange(-(w - 1), w, dtype=DT), indexing="ij")
    t = torch.stack([dh / (h - 1) * 8, dw / (w - 1) * 8], dim=-1).reshape(-1, 2)
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


def attention_module(family: str, block: nn.Module) -> nn.Module:
    return {"timm_v1": lambda: block.attn, "timm_v2": lambda: block.attn, "hf_v1": lambda: block.attention,
            "hf_v2": lambda: block.attention.self}[family]()


def last_blocks(family: str, model: nn.Module) -> list[nn.Module]:
    if family.startswith("timm"):
        return list(model.layers[-1].blocks)
    return list(getattr(model, model.base_model_prefix).encoder.layers[-1].blocks)


def reference(family: str, m: nn.Module, x: torch.Tensor):
    """``(A, out)``: the probabilities of one global-window attention module on its input ``x``
    ``(B, N, C)`` and ``out(A)``, the module's output computed from given probabilities."""
    B, N, C = x.shape
    side = math.isqrt(N)
    idx = relative_index(side, side).reshape(-1)
    if family.startswith("timm"):
        heads = m.num_heads
        bias = None
        if family == "timm_v2" and m.q_bias is not None:
            bias = torch.cat([m.q_bias, torch.zeros_like(m.q_bias), m.v_bias])
        elif family == "timm_v1":
            bias = m.qkv.bias
        q, k, v = F.linear(x, m.qkv.weight, bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        project = m.proj
    else:
        heads = m.num_attention_heads
        lin = (m.q_proj, m.k_proj, m.v_proj) if family == "hf_v1" else (m.query, m.key, m.value)
        q, k, v = (f(x).reshape(B, N, heads, -1).transpose(1, 2) for f in lin)
        project = m.o_proj if family == "hf_v1" else (lambda t: t)
    if family.endswith("v1"):
        table = m.relative_position_bias_table if family == "timm_v1" else m.relative_position_bias.relative_position_bias_table
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + table[idx].reshape(N, N, heads).permute(2, 0, 1)
    else:
        mlp = m.cpb_mlp if family == "timm_v2" else m.continuous_position_bias_mlp
        # the module's table was made in float32 at construction: the same up to its rounding
        coords = m.relative_coords_table.reshape(-1, 2)
        assert max_abs_diff(coords, log_coords(side, side)) <= 1e-6
        table = mlp(coords).reshape(-1, heads)
        scale = torch.clamp(m.logit_scale, max=math.log(100.0)).exp()
        cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = cosine * scale + 16 * torch.sigmoid(table[idx].reshape(N, N, heads).permute(2, 0, 1))
    # Hugging Face's eager Swin kernel takes the softmax in float32, whatever the model's dtype
    A = scores.softmax(dim=-1, dtype=torch.float32).to(DT) if family == "hf_v1" else scores.softmax(dim=-1)
    return A, lambda probs: project((probs @ v).transpose(1, 2).reshape(B, N, -1))


def reference_pass(family: str, model: nn.Module, x: torch.Tensor, targets: list[int]):
    """The model run with each last-stage attention output replaced by the reference computed
    from ``A + δ`` (``δ = 0``): the logits, ``A`` and ``∂y_t/∂A = ∂y_t/∂δ`` by autograd."""
    probs, deltas = [], []

    def hook(m, args, out):
        A, output = reference(family, m, args[0])
        d = torch.zeros_like(A, requires_grad=True)
        probs.append(A.detach())
        deltas.append(d)
        new = output(A + d)
        if family == "hf_v1":
            return (new, out[1])
        if family == "hf_v2":
            return (new, *out[1:])
        return new

    handles = [attention_module(family, b).register_forward_hook(hook) for b in last_blocks(family, model)]
    try:
        with torch.enable_grad():
            logits = logits_of(model(x))
            y = logits[torch.arange(x.shape[0]), torch.tensor(targets)].sum()
            grads = torch.autograd.grad(y, deltas)
    finally:
        for h in handles:
            h.remove()
    return logits.detach(), probs, list(grads)


# --------------------------------------------------------------------------------------------
# adapters and layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_and_layouts(family):
    model = build(family)
    explainer = attnx.Explainer(model)
    assert explainer.adapter.name == ADAPTER[family]
    x = images(2)
    e = explainer.explain(x, method="rollout")
    assert e.grid == (4, 4) and e.scores.shape == (2, 16) and e.heatmap().shape == (2, 32, 32)
    assert e.layout.readout is None and e.layout.prefix_tokens == 0  # the mean of the pooled tokens
    for method in INPUT_METHODS:
        e = explainer.explain(x, method=method)
        assert e.grid == (8, 8) and e.scores.shape == (2, 64)
        assert e.pixel_relevance.shape == (2, 32, 32) and e.input_relevance.shape == x.shape
        assert max_abs_diff(e.scores, F.avg_pool2d(e.pixel_relevance[:, None], 4).flatten(1) * 16) <= 1e-12


# --------------------------------------------------------------------------------------------
# attention and gradients against the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_and_gradients_equal_the_reference(family):
    model = build(family)
    x, targets = images(3), [1, 4, 0]
    logits, probs, grads = reference_pass(family, model, x, targets)
    with torch.no_grad():
        plain = logits_of(model(x))
    assert max_abs_diff(logits, plain) <= TOL[family]  # the reference is the module's computation
    trace = attnx.Explainer(model).capture(x, target=targets, gradients=True)
    assert len(trace.attentions) == len(probs) == 2
    for a, ref in zip(trace.attentions, probs):
        assert a.shape == ref.shape == (3, 4, 16, 16)
        assert max_abs_diff(a, ref) <= TOL[family] / 2
        assert ref.max() > 0.3  # peaked, not uniform (1/16)
    for g, ref in zip(trace.gradients, grads):
        assert ref.abs().max() > 1e-3
        assert max_abs_diff(g, ref) <= TOL[family] * max(1.0, ref.abs().max().item())


def rownorm(m: torch.Tensor) -> torch.Tensor:
    return m / m.sum(-1, keepdim=True)


def mean_row(m: torch.Tensor) -> torch.Tensor:
    """The pooled readout: the mean of the rows."""
    return m.mean(dim=-2)


def formulas(probs, grads) -> dict:
    eye = torch.eye(probs[0].shape[-1], dtype=DT)
    out = {"raw_attention": mean_row(probs[-1].mean(1))}
    c = eye
    for a in probs:
        c = rownorm((a.mean(1) + eye) / 2) @ c
    out["rollout"] = mean_row(c)
    c = eye
    for a, g in zip(probs, grads):
        c = rownorm(((a * g).mean(1).clamp(min=0) + eye) / 2) @ c
    out["grad_rollout"] = mean_row(c)
    r = eye.expand(probs[0].shape[0], -1, -1)
    for a, g in zip(probs, grads):
        r = r + (g * a).clamp(min=0).mean(1) @ r
    out["generic"] = mean_row(r)
    w = mean_row(grads[-1]).mean(-1)  # (B, H): the readout row's gradient, averaged over the columns
    out["attn_gradcam"] = (w[..., None] * mean_row(probs[-1])).mean(1).clamp(min=0)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.filterwarnings("ignore::attnx.errors.DegenerateMapWarning")  # attn_gradcam may find no positive part
def test_methods_equal_their_formulas_on_the_reference(family):
    model = build(family)
    x, targets = images(2, seed=4), [2, 3]
    _, probs, grads = reference_pass(family, model, x, targets)
    explainer = attnx.Explainer(model)
    for method, expected in formulas(probs, grads).items():
        e = explainer.explain(x, method=method, target=targets)
        assert max_abs_diff(e.scores, expected) <= TOL[family] * max(1.0, expected.abs().max().item()), method


def head_of(family: str, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The classifier on one last-stage block's output, written out: final norm, mean of the tokens, head."""
    if family.startswith("timm"):  # (B, h, w, C)
        return model.head.fc(model.norm(tokens).mean(dim=(1, 2)))
    base = getattr(model, model.base_model_prefix)
    return model.classifier(base.layernorm(tokens).mean(dim=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_legrad_reads_each_last_stage_block_through_the_head(family):
    """LeGrad's ``s^l``: each last-stage block's output through the final norm, average pooling and
    head; ``∂s^l/∂A^l`` by autograd at the reference attention of that block only."""
    model = build(family)
    x, targets = images(2, seed=4), torch.tensor([2, 3])
    probs, deltas, outputs = [], [], []

    def attention_hook(m, args, out):
        A, output = reference(family, m, args[0])
        d = torch.zeros_like(A, requires_grad=True)
        probs.append(A.detach())
        deltas.append(d)
        new = output(A + d)
        return (new, out[1]) if family == "hf_v1" else (new, *out[1:]) if family == "hf_v2" else new

    def block_hook(m, args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    blocks = last_blocks(family, model)
    handles = [attention_module(family, b).register_forward_hook(attention_hook) for b in blocks]
    handles += [b.register_forward_hook(block_hook) for b in blocks]
    try:
        with torch.enable_grad():
            logits = logits_of(model(x))
    finally:
        for h in handles:
            h.remove()
    scores = [head_of(family, model, t).gather(1, targets[:, None]).sum() for t in outputs]
    assert max_abs_diff(head_of(family, model, outputs[-1]), logits) <= TOL[family]
    maps = [torch.autograd.grad(s, d, retain_graph=True)[0].clamp(min=0).mean(dim=(1, 2)) for s, d in zip(scores, deltas)]
    expected = sum(maps) / len(maps)  # the default: the last two layers, here the whole last stage
    e = attnx.explain(model, x, method="legrad", target=targets)
    assert max_abs_diff(e.scores, expected) <= TOL[family] * max(1.0, expected.abs().max().item())
    assert max_abs_diff(expected, maps[-1]) > 1e-3 * expected.abs().max()  # not the last layer's map


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_x_input_equals_autograd(family):
    model = build(family)
    x, targets = images(2, seed=5), [0, 3]
    xx = x.clone().requires_grad_(True)
    y = logits_of(model(xx))[torch.arange(2), torch.tensor(targets)].sum()
    (g,) = torch.autograd.grad(y, xx)
    e = attnx.explain(model, x, method="gradient_x_input", target=targets)
    expected = (x * g).sum(1)
    assert max_abs_diff(e.pixel_relevance, expected) <= 1e-12 * max(1.0, expected.abs().max().item())


# --------------------------------------------------------------------------------------------
# batched = alone, state, LRP
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_samples_alone(family):
    model = build(family)
    x, targets = images(3, seed=6), [1, 4, 2]
    explainer = attnx.Explainer(model)
    runs = [(m, {}) for m in attnx.list_methods() if m != "lrp" and m not in REFUSED] + [("lrp", {"preset": p}) for p in presets]
    for method, options in runs:
        batch = explainer.explain(x, method=method, target=targets, **options)
        for i in range(3):
            alone = explainer.explain(x[i : i + 1], method=method, target=targets[i], **options)
            assert max_abs_diff(batch.scores[i : i + 1], alone.scores) <= 1e-5, (method, options)
            if batch.pixel_relevance is not None:
                assert max_abs_diff(batch.pixel_relevance[i : i + 1], alone.pixel_relevance) <= 1e-5, method


@pytest.mark.parametrize("family", FAMILIES)
def test_model_left_as_found(family):
    model = mixed_mode(build(family, strict_img_size=False) if family.startswith("timm") else build(family))
    if family == "timm_v1":
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
    if family == "hf_v1":
        model.set_attn_implementation("sdpa")
    x = images(2)
    before = snapshot(model)
    explainer = attnx.Explainer(model)
    for method in ("rollout", "generic", "transformer_attribution", "lrp", "gradient_x_input"):
        explainer.explain(x, method=method)
        assert_unchanged(before, model)
    with pytest.raises(UnsupportedModelError):  # refused mid-way (a size with windows): still as found
        explainer.explain(images(2, size=64), method="generic")
    assert_unchanged(before, model)


def zero_biases_(model: nn.Module) -> list[str]:
    zeroed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "relative_position_bias_table" in name:
                p.zero_()
                zeroed.append(name)
    return zeroed


@pytest.mark.parametrize("family", FAMILIES)
def test_cplrp_conserves_the_target_logit(family):
    model = build(family)
    x, targets = images(2, seed=8), [1, 3]
    e = attnx.explain(model, x, method="lrp", preset="cplrp", target=targets, strict=True)
    y = e.logits.gather(1, e.targets[:, None])[:, 0]
    assert (e.input_relevance.sum((1, 2, 3)) - y).abs().max() > 1e-3 * y.abs().max()  # biases take a share
    assert zero_biases_(model)
    e = attnx.explain(model, x, method="lrp", preset="cplrp", target=targets, strict=True)
    y = e.logits.gather(1, e.targets[:, None])[:, 0]
    assert y.abs().min() > 1e-3
    assert (e.input_relevance.sum((1, 2, 3)) - y).abs().max() <= 1e-8 * y.abs().max()


@pytest.mark.parametrize("preset", list(presets))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_covers_swin_strictly(family, preset):
    model = build(family)
    e = attnx.explain(model, images(2), method="lrp", preset=preset, strict=True)
    report = e.coverage.report()
    assert "NO RULE" not in report and not e.coverage.uncovered
    ops = {line.split()[0] for line in report.splitlines()[1:] if line.strip()}
    assert "roll" in ops  # the shifted block of stage 0
    if family.endswith("v2"):
        assert any(line.split()[:2] == ["normalize", "identity"] for line in report.splitlines())
    assert torch.isfinite(e.pixel_relevance).all() and e.pixel_relevance.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------
def test_the_named_methods_are_those_that_read_no_attention():
    reads_none = {
        m for m in attnx.list_methods()
        if not (get_method(m).needs.attentions or get_method(m).needs.gradients or get_method(m).needs.attention_relevance)
    }
    assert reads_none == set(INPUT_METHODS)


@pytest.mark.parametrize("family", FAMILIES)
def test_windowed_last_stage_is_refused_with_the_methods_that_work(family):
    model = build(family, strict_img_size=False) if family.startswith("timm") else build(family)
    x = images(2, size=64)  # last stage 8x8, attended in 4x4 windows
    explainer = attnx.Explainer(model)
    for method in ATTENTION_METHODS:
        with pytest.raises(UnsupportedModelError, match=r"8x8 feature map attended in windows of 4x4.*lrp, gradient_x_input"):
            explainer.explain(x, method=method)
    e = explainer.explain(x, method="lrp", strict=True)
    assert e.grid == (16, 16) and e.pixel_relevance.shape == (2, 64, 64)
    for method in REFUSED:  # at every size, in one line
        with pytest.raises(UnsupportedModelError, match=r"^[^\n]+$"):
            explainer.explain(x, method=method)


def test_timm_size_mismatch_and_pooling_are_clear():
    model = build("timm_v1")
    with pytest.raises(attnx.errors.AttnxValueError, match="expects 32x32 images, got 64x64"):
        attnx.explain(model, images(1, size=64), method="lrp")
    model = build("timm_v1", global_pool="max")
    with pytest.raises(UnsupportedModelError, match="does not average.*lrp, gradient_x_input"):
        attnx.explain(model, images(1), method="rollout")
    assert attnx.explain(model, images(1), method="gradient_x_input").scores.shape == (1, 64)


@pytest.mark.parametrize("preset", list(presets))
def test_other_windowed_models_explain_at_the_pixels_through_intercept(preset):
    """timm's SwinTransformerV2Cr has no adapter: the intercept adapter sees its windows and
    refuses the attention methods, while LRP (strict) and gradient x input explain it on the patch
    grid its patch embedding shows."""
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    torch.manual_seed(0)
    model = randomize_(SwinTransformerV2Cr(img_size=(32, 32), patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                                           num_heads=(2, 4), num_classes=CLASSES), seed=3).to(DT).eval()
    explainer = attnx.Explainer(model)
    assert explainer.adapter.name == "intercept"
    with pytest.raises(UnsupportedModelError, match="windowed or hierarchical.*lrp and gradient_x_input"):
        explainer.explain(images(2), method="rollout")
    e = explainer.explain(images(2), method="lrp", preset=preset, strict=True)
    assert e.grid == (8, 8) and not e.coverage.uncovered and torch.isfinite(e.pixel_relevance).all()
    assert explainer.explain(images(2), method="gradient_x_input").grid == (8, 8)
