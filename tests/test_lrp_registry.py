"""LRP on stock decoder classifiers: every op covered by every preset, CP-LRP conserves, AttnLRP
is the authors' (lxt), batched equals alone.

Tiny random Hugging Face ``*ForSequenceClassification`` models of the decoder families (GPT-2,
Llama, Qwen2, Mistral, Gemma 2 with attention soft-capping, Gemma 3, Phi-3, Qwen3, Mixtral MoE),
each with the ``eager`` and the ``sdpa`` kernel (Gemma 2 has eager only):

* ``lrp`` with each preset runs in strict mode (the default): no relevance-carrying op is left
  without a rule, and the family's own modules meet their rules (RMSNorm, Conv1D, the router);
* CP-LRP with every bias (and GPT-2's position embedding) zeroed conserves: the input relevance
  of each sample sums to its target logit (float64);
* ``attnlrp`` with ε -> 0 equals lxt 2.1's "efficient" AttnLRP (the authors' code, run in a
  subprocess because it patches transformers for good), when lxt is installed;
* each sample of a right-padded batch gets the relevance it gets alone.

``lrp`` explains with input relevance only, so it does not depend on which token's attention row
the attention methods read.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import attnx
from attnx.errors import AttnxTypeError, AttnxValueError, DegenerateMapWarning
from attnx.lrp import Registry, get_preset, presets, register_preset, rules, unregister_preset
from attnx.lrp.kinds import RMS_NORM
from attnx.lrp.registry import attnlrp
from conftest import randomize_, text_inputs

tr = pytest.importorskip("transformers")

DT = torch.float64
VOCAB, CLASSES = 60, 5
FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "qwen3", "mixtral"]


def config(family: str):
    """A tiny config of ``family`` and its sequence classifier class."""
    common = dict(vocab_size=VOCAB, num_labels=CLASSES, pad_token_id=0)
    if family == "gpt2":
        return tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=1, **common), tr.GPT2ForSequenceClassification
    dec = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
               max_position_embeddings=32, bos_token_id=1, eos_token_id=1, **common)
    if family == "gemma2":  # soft-capping small enough that tanh bends the scores
        return tr.Gemma2Config(head_dim=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **dec), tr.Gemma2ForSequenceClassification
    if family == "gemma3":
        return tr.Gemma3TextConfig(head_dim=8, **dec), tr.Gemma3TextForSequenceClassification
    if family == "qwen3":
        return tr.Qwen3Config(head_dim=8, **dec), tr.Qwen3ForSequenceClassification
    if family == "mixtral":
        return tr.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **dec), tr.MixtralForSequenceClassification
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "phi3": "Phi3"}[family]
    return getattr(tr, f"{cls}Config")(**dec), getattr(tr, f"{cls}ForSequenceClassification")


def build(family: str, impl: str, dtype: torch.dtype = torch.float32, experts: str | None = None) -> nn.Module:
    """The family's classifier with random weights: attention peaked, RMSNorm weights ~ 1."""
    cfg, cls = config(family)
    kwargs = {"experts_implementation": experts} if experts else {}
    torch.manual_seed(0)
    model = randomize_(cls._from_config(cfg, attn_implementation=impl, **kwargs), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, m in model.named_modules():
            if RMS_NORM.matches(name, m):  # Gemma stores w with 1 + w applied
                base = 0.0 if "gemma" in type(m).__name__.lower() else 1.0
                m.weight.copy_(base + 0.1 * torch.randn(m.weight.shape, generator=g))
    return model.to(dtype).eval()


CASES = [(f, i) for f in FAMILIES for i in ("eager", "sdpa") if not (f == "gemma2" and i == "sdpa")]
IDS = [f"{f}-{i}" for f, i in CASES]


def inputs(batch: int = 3, lengths=(9, 6, 9), seed: int = 1) -> dict:
    return text_inputs(batch, torch.Generator().manual_seed(seed), 0, list(lengths)[:batch])


#: the rule each family's own modules must meet (module type -> rule), per preset
def expected_rules(family: str, preset: str) -> dict:
    linear = {"chefer2021": "alpha-beta", "attnlrp": "epsilon", "attnlrp-gamma": "gamma", "cplrp": "gradient",
              "libragrad": "gradient"}[preset]
    if family == "gpt2":
        return {"Conv1D": linear, "NewGELUActivation": "identity"}
    out = {f"{type_prefix(family)}RMSNorm": "rmsnorm-const-rms"}
    if family == "mixtral":
        out["MixtralTopKRouter"] = "constant"
    if family == "gemma2":
        out["tanh"] = "identity"  # the soft-capping of the attention scores
    return out


def type_prefix(family: str) -> str:
    return {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma2": "Gemma2",
            "gemma3": "Gemma3", "phi3": "Phi3", "qwen3": "Qwen3", "mixtral": "Mixtral"}[family]


@pytest.mark.parametrize("preset", list(presets))
@pytest.mark.parametrize("family,impl", CASES, ids=IDS)
def test_every_op_has_a_rule(family, impl, preset):
    model = build(family, impl)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateMapWarning)  # and the maps show something
        e = attnx.explain(model, inputs(), method="lrp", preset=preset, target=[1, 2, 0])  # strict by default
    assert e.coverage.complete, e.coverage.report()
    handled = {(op, rule) for (op, rule) in e.coverage.handled}
    for op, rule in expected_rules(family, preset).items():
        assert (op, rule) in handled, f"{op} should meet {rule}:\n{e.coverage.report()}"
    assert torch.isfinite(e.input_relevance).all()


@pytest.mark.parametrize("preset", ["attnlrp", "chefer2021"])
def test_mixtral_grouped_experts_have_a_rule(preset):
    """Mixtral's default experts kernel is one ``grouped_mm`` per projection (float32 on CPU)."""
    model = build("mixtral", "sdpa", experts="grouped_mm")
    e = attnx.explain(model, inputs(), method="lrp", preset=preset, target=[1, 2, 0])
    linear = {"chefer2021": "alpha-beta", "attnlrp": "epsilon"}[preset]
    assert e.coverage.complete and e.coverage.handled[("_grouped_mm", linear)] == 2 * 2, e.coverage.report()


def zero_biases(model: nn.Module) -> nn.Module:
    """Zero every bias and GPT-2's position embedding (additive constants absorb relevance)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("wpe.weight"):
                p.zero_()
    return model


@pytest.mark.parametrize("family,impl", CASES, ids=IDS)
def test_cplrp_conserves_the_target_logit(family, impl):
    model = zero_biases(build(family, impl, DT, experts="eager" if family == "mixtral" else None))
    e = attnx.explain(model, inputs(), method="lrp", preset="cplrp", target=[1, 2, 0])
    y = e.logits.gather(1, e.targets[:, None])[:, 0]
    total = e.input_relevance.sum((1, 2))
    assert ((total - y).abs() / y.abs()).max().item() <= 1e-9, (total.tolist(), y.tolist())
    # the attention probabilities are constants: AttnLRP, which explains through them, does not conserve
    a = attnx.explain(model, inputs(), method="lrp", preset="attnlrp", target=[1, 2, 0])
    assert ((a.input_relevance.sum((1, 2)) - y).abs() / y.abs()).max().item() > 1e-3


@pytest.mark.parametrize("preset", ["attnlrp", "chefer2021", "cplrp"])
@pytest.mark.parametrize("family,impl", CASES, ids=IDS)
def test_each_sample_gets_what_it_gets_alone(family, impl, preset):
    model = build(family, impl, DT, experts="eager" if family == "mixtral" else None)
    x = inputs(3, (9, 5, 7))
    targets = [1, 2, 0]
    batch = attnx.explain(model, x, method="lrp", preset=preset, target=targets)
    for b, n in enumerate((9, 5, 7)):
        alone = attnx.explain(model, {k: v[b : b + 1, :n] for k, v in x.items()}, method="lrp", preset=preset, target=targets[b])
        got = batch.input_relevance[b, :n]
        scale = max(1.0, alone.input_relevance.abs().max().item())
        # transformers' eager attention computes its softmax in float32 even for a float64 model:
        # the batch's and the sample's scores differ in the last float64 bits (the matmul kernels
        # block differently by batch size on some CPUs), which can flip a float32 rounding there
        # (up to 1.7e-5 measured on an AMD EPYC)
        tol = 1e-4 if impl == "eager" else 1e-9  # float32 precision on the eager path
        assert (got - alone.input_relevance[0]).abs().max().item() <= tol * scale
        if n < 9:  # right padding comes after the pooled token: a causal decoder gives it nothing
            assert batch.input_relevance[b, n:].abs().max().item() <= 1e-12 * scale


# --------------------------------------------------------------------------------------------
# AttnLRP as its authors implement it
# --------------------------------------------------------------------------------------------
LXT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path[:0] = [{tests!r}]
    from lxt_reference import input_relevance, patch_attnlrp
    from test_lrp_registry import build, inputs

    out = {{}}
    for family in {families!r}:
        model = build(family, "eager", torch.float64)
        patch_attnlrp(family)
        r = input_relevance(model, inputs(2, (9, 6)), lambda logits: logits.gather(1, torch.tensor([[1], [2]]))[:, 0])
        out[family] = r.tolist()
    print(json.dumps(out))
    """
)
LXT_FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "gemma3"]


@functools.lru_cache(maxsize=None)
def lxt_relevance() -> dict:
    """lxt's relevance for every family of ``LXT_FAMILIES``, from one subprocess."""
    script = LXT_SCRIPT.format(tests=str(Path(__file__).parent), families=LXT_FAMILIES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {f: torch.tensor(r, dtype=DT) for f, r in json.loads(out.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.subprocess
@pytest.mark.timeout(900)  # the first one runs lxt on every family
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", LXT_FAMILIES)
def test_attnlrp_is_lxt_efficient_attnlrp(family, impl):
    """lxt 2.1 (``pip install --no-deps lxt==2.1``) on the same model: agreement to ~1e-7,
    the precision of the float32 RMSNorm and softmax Hugging Face computes inside float64 models."""
    pytest.importorskip("lxt")
    reference = lxt_relevance()[family]
    model = build(family, impl, DT)
    e = attnx.explain(model, inputs(2, (9, 6)), method="lrp", preset=attnlrp(epsilon=1e-14), target=[1, 2])
    err = (e.input_relevance - reference).abs().max().item() / reference.abs().max().item()
    assert err <= 1e-6, err


# --------------------------------------------------------------------------------------------
# user presets: attnx.lrp.register_preset(name, builder)
# --------------------------------------------------------------------------------------------
class TwoLayers(nn.Module):
    """A linear head on the mean of two linear layers' outputs: relevance reaches the input in
    closed form."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


@pytest.fixture
def preset_name():
    name = "test-plain-gradient"
    yield name
    unregister_preset(name)


def plain_gradient_registry() -> Registry:
    """Every module and function by plain autograd: the input relevance is gradient x input."""
    reg = Registry("test-plain-gradient", seed="logit", conserving=False)
    reg.register(nn.Linear, rules.Passthrough())
    reg.register(nn.ReLU, rules.Passthrough())
    reg.register(torch.relu, rules.Passthrough())
    return reg


def test_a_registered_preset_is_found_by_name_and_used_by_the_lrp_engine(preset_name):
    register_preset(preset_name, plain_gradient_registry)
    assert preset_name in attnx.lrp.presets
    registry = get_preset(preset_name)
    assert isinstance(registry, Registry) and registry.name == "test-plain-gradient"
    assert get_preset(preset_name) is not registry  # each pass gets its own registry

    model = TwoLayers().double().eval()
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad(), attnx.lrp.LRPEngine(model, preset_name) as engine:
        root = engine.track(x)
        logits = model(root)
    seed = torch.zeros_like(logits)
    seed[:, 1] = 1
    (g,) = torch.autograd.grad(logits, root, seed)
    engine.release()
    xx = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(xx)[:, 1].sum(), xx)
    assert torch.allclose(root * g, x * expected, atol=1e-12)


def test_the_lrp_method_takes_a_user_preset_by_name(preset_name):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                              num_classes=3).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    built = []

    def builder() -> Registry:
        built.append(1)
        return get_preset("attnlrp").copy("mine")

    register_preset(preset_name, builder)
    mine = attnx.explain(model, x, method="lrp", preset=preset_name, target=[0, 1])
    reference = attnx.explain(model, x, method="lrp", preset="attnlrp", target=[0, 1])
    assert built == [1]  # the registry is resolved once per explanation
    assert mine.options["preset"] == "mine" and mine.coverage.preset == "mine"
    assert torch.allclose(mine.input_relevance, reference.input_relevance, atol=1e-12)


def test_unknown_and_bad_presets_are_refused(preset_name):
    with pytest.raises(AttnxValueError, match="unknown LRP preset 'nope'"):
        get_preset("nope")
    with pytest.raises(AttnxTypeError, match="expected a function returning an attnx.lrp.Registry"):
        register_preset(preset_name, get_preset("attnlrp"))
    with pytest.raises(AttnxTypeError, match="non-empty string"):
        register_preset("", plain_gradient_registry)
    register_preset(preset_name, lambda: "not a registry")
    with pytest.raises(AttnxTypeError, match="returned str, not an attnx.lrp.Registry"):
        get_preset(preset_name)
