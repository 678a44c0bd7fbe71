"""The readout is what the head reads: checked against the head's own gradient and by hand.

Each model here once had its explanation read at a row its head never reads (the class token of
an average-pooled BEiT / EVA, token 0 of a distilled DeiT, a register row of a wrapped model,
a mean for a max pool, ...). The reference is independent of attnx: the gradient of the target
logit with respect to the last block's token states (a forward hook in the test), or the head
replicated by hand.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import transformers as T
from torch import nn

import attnx
from attnx.adapters import TimmViTAdapter
from attnx.errors import ReadoutMismatchError, UnsupportedModelError
from attnx.core.layout import Layout

SMALL = dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
TARGET = [1, 3]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: DegenerateMapWarning is not what is tested here
        yield


def images(seed: int = 0, B: int = 2) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def timm_model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **kw}).eval()


def state_gradient(model: nn.Module, block: nn.Module, x: torch.Tensor, target: list[int]):
    """``(B, N, D)`` gradient of each sample's target logit with respect to ``block``'s output."""
    kept = {}

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        kept["states"] = out
        return None

    handle = block.register_forward_hook(hook)
    try:
        out = model(x)
        logits = getattr(out, "logits", out)
    finally:
        handle.remove()
    score = logits[torch.arange(len(target)), torch.tensor(target)].sum()
    (g,) = torch.autograd.grad(score, kept["states"])
    return g.detach().to(torch.float64)


def linear_pooling_weights(g: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` pooling weights from row gradients that are parallel (rank 1): each row's
    coefficient along the common direction, normalised to sum 1."""
    out = []
    for gb in g:
        U, S, V = torch.linalg.svd(gb, full_matrices=False)
        assert S[1] <= 1e-6 * S[0], "the rows' gradients are not parallel: not a linear pooling"
        c = gb @ V[0]
        out.append(c / c.sum())
    return torch.stack(out)


def raw_from(e, attentions, weights) -> torch.Tensor:
    """The raw attention map read with ``weights`` ``(B, N)``: the content columns of w @ mean_h(A_L)."""
    fused = attentions[-1].to(torch.float64).mean(1)
    return torch.einsum("bn,bnm->bm", weights, fused)[:, e.layout.prefix_tokens:]


def check_linear_readout(model, block, x, explainer=None):
    """The explanation's readout equals the pooling weights measured from the head's gradient,
    and raw attention is read with them."""
    explainer = explainer or attnx.Explainer(model)
    w = linear_pooling_weights(state_gradient(model, block, x, TARGET))
    e = explainer(x, method="raw_attention", target=TARGET)
    torch.testing.assert_close(e.readout.weights, w, atol=1e-6, rtol=1e-5)
    captured = explainer.capture(x, target=TARGET)
    torch.testing.assert_close(e.scores.to(torch.float64), raw_from(e, captured.attentions, w), atol=1e-6, rtol=1e-5)
    return e


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "eva02_tiny_patch14_224"])
def test_timm_beit_and_eva_average_pool_is_read_as_the_patch_mean(name):
    model = timm_model(name)
    e = check_linear_readout(model, model.blocks[-1], images())
    assert e.readout.description == "mean of 16 patch tokens"
    assert e.readout.rows(0) == list(range(1, 17))


def test_pool_include_prefix_reads_every_token():
    model = timm_model("vit_tiny_patch16_224", global_pool="avg", pool_include_prefix=True)
    e = check_linear_readout(model, model.blocks[-1], images())
    assert e.readout.rows(1) == list(range(17))


@pytest.mark.parametrize("wrapped", [False, True])
def test_register_tokens_with_average_pool_are_not_read_also_when_wrapped(wrapped):
    """In an nn.Sequential the fallback adapter once read a register row (token 0)."""
    model = timm_model("vit_base_patch16_reg4_gap_256")
    outer = nn.Sequential(model) if wrapped else model
    e = check_linear_readout(outer, model.blocks[-1], images())
    assert e.readout.rows(0) == list(range(4, 20))
    assert (attnx.Explainer(outer).adapter.name == "intercept") == wrapped


def distilled_by_hand(model, x):
    """timm's distilled DeiT in eval mode, replicated: (head(x[:, 0]) + head_dist(x[:, 1])) / 2."""
    t = model.forward_features(x)  # the normalised token states
    return (model.head(t[:, 0]) + model.head_dist(t[:, 1])) / 2


def test_timm_distilled_deit_reads_class_and_distillation_tokens_equally():
    model = timm_model("deit_tiny_distilled_patch16_224")
    x = images()
    torch.testing.assert_close(distilled_by_hand(model, x), model(x), atol=1e-5, rtol=1e-5)  # the head, by hand
    g = state_gradient(model, model.blocks[-1], x, TARGET)
    read = g.abs().sum(-1) > 0
    assert read[:, :2].all() and not read[:, 2:].any()  # the head reads rows 0 and 1 only
    explainer = attnx.Explainer(model)
    e = explainer(x, method="raw_attention", target=TARGET)
    assert e.readout.description == "mean of class and distillation tokens"
    w = torch.zeros(2, 18, dtype=torch.float64)
    w[:, :2] = 0.5
    torch.testing.assert_close(e.readout.weights, w)
    captured = explainer.capture(x, target=TARGET)
    torch.testing.assert_close(e.scores.to(torch.float64), raw_from(e, captured.attentions, w), atol=1e-6, rtol=1e-5)


def hf_small(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=5, **kw)
    return model_cls(cfg).eval()


def test_hf_deit_with_teacher_reads_class_and_distillation_tokens_equally():
    model = hf_small(T.DeiTConfig, T.DeiTForImageClassificationWithTeacher)
    x = images()
    out = model(pixel_values=x)
    torch.testing.assert_close(out.logits, (out.cls_logits + out.distillation_logits) / 2)
    e = attnx.explain(model, x, method="generic", target=TARGET)
    assert e.readout.rows(0) == [0, 1] and torch.equal(e.readout.weights[:, :2], torch.full((2, 2), 0.5, dtype=torch.float64))


def test_hf_beit_mean_pooling_is_read_as_the_patch_mean():
    model = hf_small(T.BeitConfig, T.BeitForImageClassification, use_mean_pooling=True)
    e = check_linear_readout(model, model.beit.layers[-1], images(), attnx.Explainer(model))
    assert e.readout.rows(0) == list(range(1, 17))


def test_hf_dinov2_classifier_reads_the_class_token_and_the_patch_mean():
    """[CLS; mean(patches)]: the class row weighs the share of the target's classifier weight on
    the CLS half. With the patch half zeroed the head reads the class token only, with the CLS
    half zeroed the patch mean only: the gradient at the last layer agrees both times."""
    model = hf_small(T.Dinov2Config, T.Dinov2ForImageClassification)
    x = images()
    D = 32
    e = attnx.explain(model, x, method="generic", target=TARGET)
    assert e.readout.rows(0) == list(range(17))
    W = model.classifier.weight.detach().double()
    for b, t in enumerate(TARGET):
        a, m = W[t, :D].norm(), W[t, D:].norm()
        assert e.readout.weights[b, 0].item() == pytest.approx((a / (a + m)).item())
        assert torch.allclose(e.readout.weights[b, 1:], ((1 - a / (a + m)) / 16).expand(16))
    with torch.no_grad():
        model.classifier.weight[TARGET, D:] = 0  # the target rows read the CLS half only
    e = attnx.explain(model, x, method="generic", target=TARGET)
    assert e.readout.rows(0) == [0] and e.readout.rows(1) == [0]
    with torch.no_grad():
        model.classifier.weight[TARGET, :D] = 0
        model.classifier.weight[TARGET, D:] = torch.randn(2, D, generator=torch.Generator().manual_seed(1))
    e = attnx.explain(model, x, method="generic", target=TARGET)
    assert e.readout.rows(0) == list(range(1, 17))


def test_max_pool_weighs_each_row_by_the_channels_it_wins():
    """global_pool='max' was read as a mean. The gradient at the pooled tokens is non-zero on
    row i exactly in the channels whose maximum row i holds."""
    model = timm_model("vit_tiny_patch16_224", global_pool="max")
    x = images()
    g = state_gradient(model, model.blocks[-1], x, TARGET)
    share = (g != 0).sum(-1).double() / g.shape[-1]
    e = attnx.explain(model, x, method="generic", target=TARGET)
    assert e.readout.description == "max over 16 patch tokens"
    torch.testing.assert_close(e.readout.weights, share)
    assert not torch.allclose(share[:, 1:], torch.full_like(share[:, 1:], 1 / 16))  # not the mean


class SoftmaxCatcher(torch.overrides.TorchFunctionMode):
    """Records the outputs of every softmax (the test's own view of the probe's attention)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax):
            self.outputs.append(out.detach())
        return out


def test_map_head_is_read_with_its_probe_attention():
    """Attention-pool heads were refused; the readout is the probe's attention over the tokens
    (mean over heads), here taken from the model's own softmax with the fused kernel off."""
    model = timm_model("vit_tiny_patch16_224", global_pool="map", class_token=False)
    x = images()
    model.attn_pool.fused_attn = False
    with SoftmaxCatcher() as catcher:
        model.forward_head(model.forward_features(x))
    model.attn_pool.fused_attn = True
    probe = catcher.outputs[-1].double().mean(1)[:, 0]  # (B, N)
    e = attnx.explain(model, x, method="generic", target=TARGET)
    assert e.readout.description == "probe attention (MAP head)"
    torch.testing.assert_close(e.readout.weights, probe / probe.sum(-1, keepdim=True))
    wrapped = attnx.explain(nn.Sequential(model), x, method="generic", target=TARGET)
    torch.testing.assert_close(wrapped.readout.weights, e.readout.weights)


class ClassTokenOnlyAdapter(TimmViTAdapter):
    """A wrong declaration: the class token of an average-pooled model."""

    name = "class_token_only"

    def prepare(self, inputs):
        batch = super().prepare(inputs)
        batch.layout.readout, batch.layout.readout_name = 0, "class token"
        return batch


@pytest.mark.parametrize("method", ["generic", "rollout"])
def test_a_declared_readout_the_head_does_not_read_is_refused(method):
    model = timm_model("vit_tiny_patch16_224", global_pool="avg")
    explainer = attnx.Explainer(model, adapter=ClassTokenOnlyAdapter(model))
    with pytest.raises(ReadoutMismatchError, match=r"class token: rows \[0\]\) is not what its head reads"):
        explainer(images(), method=method)


def test_the_check_runs_once_per_explainer_and_layout_for_methods_without_gradients():
    model = timm_model("vit_tiny_patch16_224")
    calls = []

    class Counting(TimmViTAdapter):
        name = "counting"

        def prepare(self, inputs):
            calls.append(1)
            return super().prepare(inputs)

    explainer = attnx.Explainer(model, adapter=Counting(model))
    explainer(images(), method="rollout")
    explainer(images(1), method="rollout")
    assert len(calls) == 3  # the first call measures once, the second does not
    explainer(images(), method="grad_rollout")
    assert len(calls) == 4  # a method with gradients is its own measurement


class ResearchViT(nn.Module):
    """A model no adapter knows: its head reads the rows in ``read`` (equal weights)."""

    def __init__(self, read):
        super().__init__()
        torch.manual_seed(0)
        self.read = read
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = nn.ModuleList([nn.MultiheadAttention(16, 2, batch_first=True) for _ in range(2)])
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1)
        for a in self.attn:
            t = t + a(t, t, t)[0]
        t = torch.tanh(self.mlp(t))
        return self.head(t[:, self.read].mean(1))


def test_the_fallback_measures_what_an_unknown_head_reads():
    e = attnx.explain(ResearchViT([5]), images(), method="rollout")  # the head reads patch 4
    assert e.readout.rows(0) == [5] and "measured" in e.readout.description
    e = attnx.explain(ResearchViT(list(range(1, 17))), images(), method="generic")
    assert e.readout.rows(0) == list(range(1, 17)) and "mean of 16 patch tokens" in e.readout.description
    with pytest.raises(UnsupportedModelError, match=r"reads rows \[0, 2\]"):
        attnx.explain(ResearchViT([0, 2]), images(), method="generic")


def test_methods_without_a_readout_say_so_and_descriptions():
    model = timm_model("vit_tiny_patch16_224")
    assert attnx.explain(model, images(), method="lrp").readout is None  # starts at the logits
    from attnx.core.readout import describe

    assert describe(Layout(17, 1, 0, (4, 4))) == "class token"
    assert describe(Layout(16, 0, None, (4, 4))) == "mean of 16 patch tokens"


def test_the_command_line_says_the_readout_in_one_line(tmp_path, capsys):
    from attnx.cli import main

    assert main(["explain", "--method", "rollout", "--out", str(tmp_path / "x.png"), "--num-scenes", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("readout:")]
    assert lines == ["readout: class token (the rows of the last layer the model's head reads)"]


def test_the_readout_follows_a_head_changed_after_the_explainer_was_made():
    model = timm_model("vit_tiny_patch16_224")
    explainer = attnx.Explainer(model)
    assert explainer(images(), method="rollout").readout.description == "class token"
    model.reset_classifier(5, global_pool="avg")
    e = explainer(images(), method="rollout")
    assert e.readout.description == "mean of 16 patch tokens" and e.readout.rows(0) == list(range(1, 17))


class ProbePooledViT(ResearchViT):
    """Research code with an attention-pool head: a learned query attends over the tokens."""

    def __init__(self):
        super().__init__([0])
        self.query = nn.Parameter(torch.randn(1, 1, 16))
        self.pool = nn.MultiheadAttention(16, 2, batch_first=True)

    def states(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1)
        for a in self.attn:
            t = t + a(t, t, t)[0]
        return torch.tanh(self.mlp(t))

    def forward(self, x):
        t = self.states(x)
        q = self.query.expand(len(x), -1, -1)
        return self.head(self.pool(q, t, t, need_weights=False)[0][:, 0])


def test_the_fallback_reads_an_attention_pool_probe_with_its_attention():
    model = ProbePooledViT().eval()
    x = images()
    with torch.no_grad():
        t = model.states(x)
        _, probe = model.pool(model.query.expand(2, -1, -1), t, t, need_weights=True, average_attn_weights=True)
    e = attnx.explain(model, x, method="generic", target=TARGET)
    assert e.readout.description == "probe attention (attention-pool head)"
    torch.testing.assert_close(e.readout.weights, probe[:, 0].double(), atol=1e-6, rtol=1e-5)
    assert len(attnx.Explainer(model).capture(x).attentions) == 2  # the probe is not a layer of the stack
