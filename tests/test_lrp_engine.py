"""The LRP engine and its registries: coverage reporting, strict mode, rule lookup, and leaving
the model exactly as found (DESIGN.md §5-§6).

* An op that carries relevance and matches no rule (and is not linear) is reported: a warning
  naming it by default, :class:`attnx.lrp.UncoveredOpError` with ``strict=True``; registering a
  rule for it silences both.
* Registry lookup: later ``register()`` calls win, function aliases are one key, ``within=``
  restricts a rule to ops inside an enclosing module (a type or a predicate), and the presets'
  ``in_mlp`` picks exactly the feed-forward linear layers of the stock models.
* After every LRP method (each preset), and after an exception raised mid-forward, inside a
  rule, by strict mode or by a bad target: no hook on any module, the same training flags,
  ``fused_attn`` flags and Hugging Face ``_attn_implementation``, parameters' ``.grad`` still
  ``None``, ``requires_grad`` unchanged, no torch function mode left active.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

import attnx
from attnx.lrp import LRPEngine, Registry, UncoveredOpError, in_mlp, presets, rules
from conftest import CASES, ids, max_abs_diff

DT = torch.float64


# --------------------------------------------------------------------------------------------
# coverage and strict mode
# --------------------------------------------------------------------------------------------
class Net(nn.Module):
    """conv patches -> ``activation`` -> linear head: a tiny image classifier (generic adapter)."""

    def __init__(self, activation):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.head = nn.Linear(16, 5)
        self.activation = activation
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 16).reshape(4, 2, 2))
        self.to(DT)

    def forward(self, x):
        return self.head(self.activation(self, self.conv(x)).flatten(1))


def sin(self, h):
    return torch.sin(h)


def swish(self, h):
    return h * torch.sigmoid(h)


def scaled(self, h):  # products with constants are linear: nothing to report
    return F.gelu(h * self.scale * 3.0)


def images(batch=2):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=DT)


def explain(model, preset, strict=False):
    return attnx.explain(model, images(), method="lrp", preset=preset, target=[1, 3], patch_size=4, strict=strict)


def test_uncovered_op_warns_by_default_and_raises_in_strict_mode():
    model = Net(sin)
    with pytest.warns(UserWarning, match=r"'sin': 1") as record:
        e = explain(model, presets["cplrp"]())
    assert "NO RULE" in str(record[0].message)
    assert torch.isfinite(e.input_relevance).all()
    assert any(line.split()[:3] == ["sin", "NO", "RULE"] for line in e.coverage.report().splitlines())
    with pytest.raises(UncoveredOpError, match="sin"):
        explain(model, presets["cplrp"](), strict=True)


def test_registering_a_rule_removes_the_warning():
    model = Net(sin)
    reg = presets["cplrp"]().register(torch.sin, rules.Identity())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = explain(model, reg, strict=True)
    assert any(line.split()[:2] == ["sin", "identity"] for line in e.coverage.report().splitlines())
    # the identity rule on sin: the relevance arriving at sin's output reaches the conv output,
    # so with the conv and head bias-free, cplrp conserves the logit
    with torch.no_grad():
        model.conv.bias.zero_()
        model.head.bias.zero_()
    e = explain(model, reg, strict=True)
    y = e.logits.gather(1, e.targets[:, None])[:, 0]
    assert max_abs_diff(e.input_relevance.sum((1, 2, 3)), y) <= 1e-9 * y.abs().max().item()


def test_sigmoid_gate_is_reported_under_chefer2021():
    """chefer2021 has no rule for ``sigmoid`` (its identity rule needs ``f(0) = 0``): in
    ``h * sigmoid(h)`` the sigmoid is reported, the product of two carrying tensors is the gate rule."""
    with pytest.warns(UserWarning) as record:
        explain(Net(swish), presets["chefer2021"]())
    message = str(record[0].message)
    assert "'sigmoid': 1" in message and "'mul'" not in message.split("\n")[0]
    with pytest.raises(UncoveredOpError, match="sigmoid") as raised:
        explain(Net(swish), presets["chefer2021"](), strict=True)
    # the error names the op, where it ran, how to register a rule and how to proceed anyway
    text = str(raised.value)
    assert "'sigmoid': 1 call(s) in model (Net)" in text
    assert "reg.register(" in text and "attnx.lrp.get_preset('chefer2021').copy()" in text and "strict=False" in text
    # without the gate rule the product is reported too
    bare = presets["chefer2021"]()
    bare.entries = [e for e in bare.entries if e.key is not torch.mul]
    with pytest.raises(UncoveredOpError, match="'mul': 1"):
        explain(Net(swish), bare, strict=True)
    # with a rule for the sigmoid, the same model passes strict mode
    reg = presets["chefer2021"]().register(torch.sigmoid, rules.Identity())
    e = explain(Net(swish), reg, strict=True)
    assert e.coverage.rule_of("mul") == ["bilinear"]


def test_products_with_constants_are_not_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = explain(Net(scaled), presets["chefer2021"](), strict=True)
    assert "mul" in e.coverage.report() and "NO RULE" not in e.coverage.report()


def test_engine_reports_without_a_method():
    """Driving the engine directly: ``check_coverage`` raises by default (strict), warns with
    ``strict=False``, and names the op."""
    model = Net(sin)
    engine = LRPEngine(model, presets["attnlrp"]())
    with engine:
        x = engine.track(images())
        model(x)
    assert engine.uncovered == {"sin": 1}
    assert engine.summary().where == {"sin": ("model (Net)",)}
    with pytest.raises(UncoveredOpError, match="sin"):
        engine.check_coverage()
    engine.strict = False
    with pytest.warns(UserWarning, match="sin"):
        engine.check_coverage()


# --------------------------------------------------------------------------------------------
# registry lookup
# --------------------------------------------------------------------------------------------
class Spy(rules.Rule):
    """Wraps a rule and logs which module (or function) it was applied to."""

    def __init__(self, inner: rules.Rule, log: list):
        self.inner, self.log, self.name = inner, log, inner.name

    def __call__(self, op):
        self.log.append((op.module if op.module is not None else op.func, self.name))
        return self.inner(op)


def spied(reg: Registry) -> tuple[Registry, list]:
    log: list = []
    for entry in reg.entries:
        entry.rule = Spy(entry.rule, log)
    return reg, log


def linear_rules(model: nn.Module, log: list) -> dict:
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: r for m, r in log if isinstance(m, nn.Linear)}


class MyMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 6)
        self.mlp = MyMlp()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Softmax(-1))
        self.head = nn.Linear(6, 3)
        self.to(DT)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp(h)
        return self.head(h + self.block(h))


def lrp_pass(model, reg, x):
    engine = LRPEngine(model, reg)
    with engine:
        xt = engine.track(x)
        out = model(xt)
    (g,) = torch.autograd.grad(out, xt, torch.ones_like(out))
    return engine, xt.detach() * g


def test_later_registration_wins():
    model, x = Tower(), torch.randn(2, 4, dtype=DT)
    reg = Registry("t").register(nn.Linear, rules.Epsilon()).register(nn.Linear, rules.AlphaBeta(1.0, 0.0))
    engine, _ = lrp_pass(model, reg, x)
    assert engine.coverage[("Linear", "alpha-beta")] == 5 and ("Linear", "epsilon") not in engine.coverage
    # function keys and their aliases: F.softmax then torch.softmax are one key; the later wins,
    # also for nn.Softmax, whose forward calls Tensor.softmax
    reg.register(F.softmax, rules.Identity()).register(torch.softmax, rules.Constant())
    engine, _ = lrp_pass(model, reg, x)
    assert engine.coverage[("softmax", "constant")] == 1 and ("softmax", "identity") not in engine.coverage
    # copies are independent
    copy = reg.copy().register(nn.Linear, rules.Gamma())
    assert isinstance(reg.rule_for_module(model.head, []), rules.AlphaBeta)
    assert isinstance(copy.rule_for_module(model.head, []), rules.Gamma)


@pytest.mark.parametrize(
    "within",
    [MyMlp, lambda name, module: name == "mlp", in_mlp],
    ids=["type", "predicate", "in_mlp"],
)
def test_within_restricts_a_rule_to_an_enclosing_module(within):
    model, x = Tower(), torch.randn(2, 4, dtype=DT)
    reg, log = spied(
        Registry("t").register(nn.Linear, rules.Epsilon()).register(nn.Linear, rules.Gamma(0.25), within=within)
    )
    engine, _ = lrp_pass(model, reg, x)
    assert linear_rules(model, log) == {
        "embed": "epsilon", "mlp.fc1": "gamma", "mlp.fc2": "gamma", "block.0": "epsilon", "head": "epsilon",
    }
    assert engine.coverage[("Linear", "gamma")] == 2 and engine.coverage[("Linear", "epsilon")] == 3
    # a later unrestricted entry overrides the restricted one everywhere
    reg.register(nn.Linear, rules.Passthrough())
    engine, _ = lrp_pass(model, reg, x)
    assert {k: n for k, n in engine.coverage.items() if k[0] == "Linear"} == {("Linear", "gradient"): 5}


def test_within_applies_to_function_rules():
    model, x = Tower(), torch.randn(2, 4, dtype=DT)
    reg, log = spied(Registry("t").register(F.gelu, rules.Identity(), within=Tower))
    lrp_pass(model, reg, x)
    assert log == [(F.gelu, "identity")]
    reg, log = spied(Registry("t").register(F.gelu, rules.Identity(), within=nn.Sequential))
    engine, _ = lrp_pass(model, reg, x)
    assert log == [] and engine.uncovered["gelu"] == 1


#: which Linear modules of the stock models are feed-forward layers (γ under attnlrp-gamma)
FFN = {
    "timm_vit": lambda n: ".mlp.fc" in n,
    "torchvision_vit": lambda n: ".mlp." in n,
    "hf_bert_sdpa": lambda n: n.endswith("intermediate.dense") or (n.endswith(".output.dense") and "attention" not in n),
    "hf_roberta_sdpa": lambda n: n.endswith("intermediate.dense") or (n.endswith(".output.dense") and "attention" not in n),
    "hf_distilbert_sdpa": lambda n: ".ffn.lin" in n,
    "hf_vit_sdpa": lambda n: ".mlp.fc" in n or n.endswith("intermediate.dense") or (n.endswith(".output.dense") and "attention" not in n),
}


@pytest.mark.parametrize("name", list(FFN))
def test_attnlrp_gamma_puts_gamma_on_the_feed_forward_layers_only(name):
    case = CASES[name]
    model = case.model(DT)
    reg, log = spied(presets["attnlrp-gamma"]())
    attnx.explain(model, case.inputs(1, dtype=DT), method="lrp", preset=reg, strict=True)
    got = linear_rules(model, log)
    expected = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n in got:
            expected[n] = "gamma" if FFN[name](n) else "epsilon"
    assert got == expected
    assert sum(r == "gamma" for r in got.values()) == 2 * 3  # two per layer, three layers
    if name == "torchvision_vit":  # attention projections run as F.linear inside the MHA kernel
        assert sum(1 for f, r in log if f is F.linear and r == "epsilon") == 4 * 3


# --------------------------------------------------------------------------------------------
# the model is left exactly as found
# --------------------------------------------------------------------------------------------
HOOKS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)
GLOBAL_HOOKS = sorted(k for k in dir(module_globals) if k.startswith("_global_") and k.endswith("hooks"))


def state(model: nn.Module) -> dict:
    return {
        "modules": {
            n: (
                {h: list(getattr(m, h, {}) or {}) for h in HOOKS},
                m.training,
                getattr(m, "fused_attn", None),
                sorted(k for k in m.__dict__ if "attnx" in k),
            )
            for n, m in model.named_modules()
        },
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "params": {
            n: (p.requires_grad, p.grad is None, dict(p._backward_hooks or {}), hasattr(p, "_attnx_relevance"), p.detach().clone())
            for n, p in model.named_parameters()
        },
        "globals": {k: dict(getattr(module_globals, k)) for k in GLOBAL_HOOKS},
        "function_modes": torch._C._len_torch_function_stack(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_as_found(before: dict, model: nn.Module) -> None:
    after = state(model)
    assert after["function_modes"] == 0, "a torch function mode is still active"
    assert after["grad_enabled"] == before["grad_enabled"]
    assert after["globals"] == before["globals"]
    assert after["attn_implementation"] == before["attn_implementation"]
    assert after["modules"].keys() == before["modules"].keys()
    for n, m in after["modules"].items():
        assert m == before["modules"][n], f"module {n or 'model'} changed: {before['modules'][n]} -> {m}"
    for n, (req, no_grad, hooks, marked, value) in after["params"].items():
        b = before["params"][n]
        assert req == b[0], f"requires_grad of {n} changed"
        assert no_grad, f"{n}.grad was left"
        assert not hooks and not marked, f"{n} carries a hook or an attnx marker"
        assert torch.equal(value, b[4]), f"{n} changed"


STATE_CASES = [CASES[n] for n in ("timm_vit", "timm_vit_unfused", "torchvision_vit", "hf_bert_sdpa", "hf_bert_eager")]
LRP_METHODS = [("lrp", p) for p in presets] + [("transformer_attribution", "chefer2021"), ("partial_lrp", "attnlrp")]


def unsettled(case):
    """The case's model in mixed train/eval mode with some parameters frozen."""
    model = case.model()
    model.train()
    for i, m in enumerate(model.modules()):
        if i % 3 == 1:
            m.eval()
    for i, p in enumerate(model.parameters()):
        if i % 4 == 2:
            p.requires_grad_(False)
    return model


def inputs_of(case):
    return case.inputs(2, lengths=[9, 5] if case.is_text else None)


@pytest.mark.parametrize("method,preset", LRP_METHODS, ids=[f"{m}-{p}" for m, p in LRP_METHODS])
@pytest.mark.parametrize("case", STATE_CASES, ids=ids(STATE_CASES))
def test_model_left_as_found_after_lrp_methods(case, method, preset):
    model = unsettled(case)
    before = state(model)
    e = attnx.Explainer(model).explain(inputs_of(case), method=method, target=[1, 2], preset=preset)
    assert torch.isfinite(e.scores).all()
    assert_as_found(before, model)


class Boom(RuntimeError):
    pass


class Raising(rules.Rule):
    name = "raising"

    def __call__(self, op):
        raise Boom("boom in a rule")


def attention_module(case, model):
    if case.family == "timm":
        return model.blocks[1].attn
    if case.family == "torchvision":
        return model.encoder.layers[1].self_attention
    return model.bert.encoder.layer[1].attention


FAILURES = ["mid_forward", "in_rule", "strict", "bad_target", "constant_attention"]


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("case", STATE_CASES, ids=ids(STATE_CASES))
def test_model_left_as_found_after_an_exception(case, failure):
    model = unsettled(case)
    x = inputs_of(case)
    explainer = attnx.Explainer(model)
    reference = explainer.explain(x, method="lrp", target=[1, 2], preset="attnlrp")
    before = state(model)
    if failure == "mid_forward":
        def hook(module, args, output):
            raise Boom("boom in layer 1")

        handle = attention_module(case, model).register_forward_hook(hook)
        try:
            for method in ("lrp", "transformer_attribution"):
                with pytest.raises(Boom):
                    explainer.explain(x, method=method, target=[1, 2])
        finally:
            handle.remove()
    elif failure == "in_rule":
        reg = presets["cplrp"]().register(F.softmax, Raising())
        with pytest.raises(Boom):
            explainer.explain(x, method="lrp", target=[1, 2], preset=reg)
    elif failure == "strict":
        bare = Registry("bare").register(F.scaled_dot_product_attention, rules.Decompose(rules.sdpa_decomposition))
        bare.register(F.multi_head_attention_forward, rules.Decompose(rules.mha_decomposition))
        with pytest.raises(UncoveredOpError, match="gelu"):
            explainer.explain(x, method="lrp", target=[1, 2], preset=bare, strict=True)
    elif failure == "bad_target":
        with pytest.raises(ValueError, match="out of range"):
            explainer.explain(x, method="lrp", target=[1, 99])
    else:  # cplrp holds the attention probabilities constant: no relevance at the attentions
        for method in ("partial_lrp", "transformer_attribution"):
            with pytest.raises(ValueError, match="holds the attention probabilities constant"):
                explainer.explain(x, method=method, target=[1, 2], preset="cplrp")
    assert_as_found(before, model)
    # and explaining afterwards gives what it gave before
    again = explainer.explain(x, method="lrp", target=[1, 2], preset="attnlrp")
    assert torch.equal(again.input_relevance, reference.input_relevance)
    assert_as_found(before, model)


def test_engine_context_cleans_up_on_an_exception():
    model = Net(sin)
    before = state(model)
    with pytest.raises(Boom):
        with LRPEngine(model, "cplrp") as engine:
            assert torch._C._len_torch_function_stack() == 1
            assert all(len(m._forward_hooks) == 1 and len(m._forward_pre_hooks) == 1 for m in model.modules())
            model(engine.track(images()))
            raise Boom("boom inside the engine")
    assert_as_found(before, model)
