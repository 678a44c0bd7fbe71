"""The model matrix of the test suite: small random-init models of every family attnx adapts.

Every entry is a :class:`Case`: a factory for a tiny model (a few thousand parameters, three
layers, four heads), a factory for inputs of that model, and what the token layout of those
inputs must be. Tests take the ``case`` fixture (parametrised over the whole matrix) or pick
entries by name from ``CASES``.

The models are re-initialised with weights large enough that attention is far from uniform and
the gradients are not tiny (stock initialisations give near-uniform attention, on which many
wrong implementations would pass), and so that torchvision's zero-initialised head is random.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

import attnx

# the models are tiny: intra-op threads only add synchronisation cost (100x on a busy 2-core box)
torch.set_num_threads(1)

NUM_CLASSES = 7
TEXT_CLASSES = 5
TEXT_LENGTH = 9
VOCAB = 60


# --------------------------------------------------------------------------------------------
# random re-initialisation
# --------------------------------------------------------------------------------------------
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every parameter so that attention is peaked and gradients are O(1)."""
    g = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std + mean)

    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__:
                    normal(p, 0.1, 1.0 if name == "weight" else 0.0)
                elif isinstance(module, nn.Embedding):
                    normal(p, 1.0)
                elif p.dim() == 1:  # biases
                    normal(p, 0.1)
                elif isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) or name.endswith("weight"):
                    fan_in = p[0].numel()
                    normal(p, 1.6 / math.sqrt(fan_in))
                else:  # class / distillation / register tokens, position embeddings
                    normal(p, 0.5)
    return model


# --------------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One model of the matrix.

    Attributes
    ----------
    name:
        Test id.
    family:
        ``timm`` | ``torchvision`` | ``hf_vision`` | ``hf_text``.
    adapter:
        Name of the adapter attnx must choose for it.
    build:
        ``build()`` returns a fresh float32 model (deterministic weights).
    image_size:
        ``(H, W)`` of the inputs the case uses (images only).
    prefix_tokens, readout, grid:
        The token layout attnx must report for those inputs; ``readout`` is the row the head
        reads, a tuple of rows it averages with equal weights (distilled DeiT's class and
        distillation tokens), or ``None`` for the mean of the content rows.
    fused:
        For timm models: the ``fused_attn`` flag every attention module has before the call.
    attn_implementation:
        For Hugging Face models: the kernel the model was created with.
    """

    name: str
    family: str
    adapter: str
    build: Callable[[], nn.Module]
    image_size: tuple[int, int] | None = None
    prefix_tokens: int = 0
    readout: int | tuple[int, ...] | None = 0
    grid: tuple[int, int] | None = None
    fused: bool | None = None
    attn_implementation: str | None = None
    num_classes: int = NUM_CLASSES
    pad_token_id: int = 0

    @property
    def is_text(self) -> bool:
        return self.family == "hf_text"

    @property
    def num_tokens(self) -> int:
        if self.is_text:
            return TEXT_LENGTH
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def readout_rows(self) -> tuple[int, ...]:
        """The rows the head reads with one equal weight each (empty for a content mean)."""
        if self.readout is None:
            return ()
        return self.readout if isinstance(self.readout, tuple) else (self.readout,)

    def model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        model = self.build().to(dtype)
        model.eval()
        if self.fused is not None:
            for m in model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = self.fused
        return model

    def inputs(self, batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32, lengths=None):
        """Inputs for ``batch`` samples; for text, ``lengths`` gives each sample's real length
        (the rest is padding with the model's pad token and attention_mask 0)."""
        g = torch.Generator().manual_seed(seed)
        if not self.is_text:
            return torch.randn(batch, 3, *self.image_size, generator=g, dtype=torch.float64).to(dtype)
        return text_inputs(batch, g, self.pad_token_id, lengths)


def text_inputs(batch: int, g: torch.Generator, pad_token_id: int, lengths=None, length: int = TEXT_LENGTH) -> dict:
    """A tokenizer-like dict; real ids avoid the pad id, padded positions hold it."""
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    ids[:, 0] = 2  # a [CLS]-like first token
    mask = torch.ones(batch, length, dtype=torch.long)
    if lengths is not None:
        for b, n in enumerate(lengths):
            mask[b, n:] = 0
            ids[b, n:] = pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


def timm_vit(**kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=NUM_CLASSES)
        args.update(kw)
        return randomize_(VisionTransformer(**args), seed=10)

    return build


def timm_deit_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=NUM_CLASSES
    )
    return randomize_(model, seed=11)


def torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=NUM_CLASSES
    )
    return randomize_(model, seed=12)  # also makes the zero-initialised head random


def hf_vit(impl: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, num_labels=NUM_CLASSES,
        )
        torch.manual_seed(0)
        return randomize_(ViTForImageClassification._from_config(cfg, attn_implementation=impl), seed=13)

    return build


def hf_deit(impl: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

        cfg = DeiTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, num_labels=NUM_CLASSES,
        )
        torch.manual_seed(0)
        return randomize_(DeiTForImageClassificationWithTeacher._from_config(cfg, attn_implementation=impl), seed=14)

    return build


def hf_text(kind: str, impl: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tr

        common = dict(vocab_size=VOCAB, num_labels=TEXT_CLASSES)
        if kind == "bert":
            cfg = tr.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=32, **common)
            cls = tr.BertForSequenceClassification
        elif kind == "roberta":
            cfg = tr.RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=34, pad_token_id=1, **common)
            cls = tr.RobertaForSequenceClassification
        else:
            cfg = tr.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=32,
                                      pad_token_id=0, **common)
            cls = tr.DistilBertForSequenceClassification
        torch.manual_seed(0)
        return randomize_(cls._from_config(cfg, attn_implementation=impl), seed=15)

    return build


def _cases() -> list[Case]:
    cases = [
        Case("timm_vit", "timm", "timm_vit", timm_vit(), (32, 32), 1, 0, (4, 4), fused=True),
        Case("timm_vit_unfused", "timm", "timm_vit", timm_vit(), (32, 32), 1, 0, (4, 4), fused=False),
        Case("timm_deit_distilled", "timm", "timm_vit", timm_deit_distilled, (32, 32), 2, (0, 1), (4, 4), fused=True),
        Case("timm_reg4", "timm", "timm_vit", timm_vit(reg_tokens=4), (32, 32), 5, 0, (4, 4), fused=True),
        Case("timm_avgpool", "timm", "timm_vit", timm_vit(class_token=False, global_pool="avg"), (32, 32), 0, None,
             (4, 4), fused=True),
        Case("timm_avgpool_reg4", "timm", "timm_vit", timm_vit(class_token=False, reg_tokens=4, global_pool="avg"),
             (32, 32), 4, None, (4, 4), fused=True),
        Case("timm_dynamic_40x56", "timm", "timm_vit", timm_vit(dynamic_img_size=True), (40, 56), 1, 0, (5, 7),
             fused=True),
        Case("timm_dynamic_40x56_unfused", "timm", "timm_vit", timm_vit(dynamic_img_size=True), (40, 56), 1, 0,
             (5, 7), fused=False),
        Case("torchvision_vit", "torchvision", "torchvision_vit", torchvision_vit, (32, 32), 1, 0, (4, 4)),
    ]
    for impl in ("sdpa", "eager"):
        cases += [
            Case(f"hf_vit_{impl}", "hf_vision", "hf", hf_vit(impl), (32, 32), 1, 0, (4, 4), attn_implementation=impl),
            Case(f"hf_vit_{impl}_40x56", "hf_vision", "hf", hf_vit(impl), (40, 56), 1, 0, (5, 7),
                 attn_implementation=impl),
            Case(f"hf_deit_teacher_{impl}", "hf_vision", "hf", hf_deit(impl), (32, 32), 2, (0, 1), (4, 4),
                 attn_implementation=impl),
        ]
    for kind, pad in (("bert", 0), ("roberta", 1), ("distilbert", 0)):
        for impl in ("sdpa", "eager"):
            cases.append(Case(f"hf_{kind}_{impl}", "hf_text", "hf", hf_text(kind, impl), readout=0,
                              attn_implementation=impl, num_classes=TEXT_CLASSES, pad_token_id=pad))
    return cases


CASES: dict[str, Case] = {c.name: c for c in _cases()}
ALL = list(CASES.values())
IMAGE = [c for c in ALL if not c.is_text]
TEXT = [c for c in ALL if c.is_text]
#: model instances the intercept adapter can see: all of them (SDPA / MHA kernel calls, and
#: attention written out by timm with fused_attn=False and Hugging Face's eager kernel)
GENERIC_OK = list(ALL)


def with_adapters(cases) -> list:
    """``pytest.param(case, adapter)`` for the native adapter of every case and the generic one
    where it applies."""
    return [pytest.param(c, "native", id=f"{c.name}-native") for c in cases] + [
        pytest.param(c, "intercept", id=f"{c.name}-intercept") for c in cases if c in GENERIC_OK
    ]


#: methods that use dy/dA
GRADIENT_METHODS = [m for m in attnx.list_methods() if attnx.get_method(m).gradients]


def ids(cases):
    return [c.name for c in cases]


@pytest.fixture(params=ALL, ids=ids(ALL))
def case(request) -> Case:
    return request.param


@pytest.fixture(params=attnx.list_methods())
def method(request) -> str:
    return request.param


# --------------------------------------------------------------------------------------------
# helpers shared by the tests
# --------------------------------------------------------------------------------------------
def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def with_batch(inputs, index):
    """Samples ``index`` (a list) of image or text inputs."""
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def run_model(case: Case, model: nn.Module, inputs) -> torch.Tensor:
    """The logits of ``model`` on ``inputs``, called the way the library's users call it."""
    if case.is_text:
        out = model(**inputs)
    elif case.family == "hf_vision":
        out = model(pixel_values=inputs, interpolate_pos_encoding=tuple(inputs.shape[-2:]) != (32, 32))
    else:
        out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


#: kinds of test that run whole programs (the demo, notebooks, a browser, several processes): part of
#: the slow tier, which ``python -m pytest -q -m slow`` runs and the default run leaves out
SLOW_KINDS = ("demo", "notebooks", "browser", "distributed", "subprocess")


#: the fast tier's model of each architecture of the matrix (the first of each in ``CASES``); tests
#: marked ``matrix`` run the other cases in the slow tier
FAST_CASES = ("timm_vit", "timm_deit_distilled", "torchvision_vit", "hf_vit_sdpa", "hf_deit_teacher_sdpa",
              "hf_bert_sdpa", "hf_roberta_sdpa", "hf_distilbert_sdpa")
assert set(FAST_CASES) <= set(CASES)


def in_fast_tier(value) -> bool:
    """Whether a parameter of a ``matrix`` test is a model of the fast tier: a case of ``FAST_CASES``
    (or its name), a decoder of ``decoder_models.FAST``; every other parameter (a method, a preset,
    an adapter) is."""
    if isinstance(value, Case):
        return value.name in FAST_CASES
    if isinstance(value, str) and value in CASES:
        return value in FAST_CASES
    from decoder_models import FAST, DecoderCase  # decoder_models imports this module

    if isinstance(value, DecoderCase):
        return value in FAST
    return True


#: methods that run the model many times per map (integrated gradients' steps, one forward per
#: patch or token, 20 scaled passes): in tests over models x methods, the fast tier runs them on
#: one vision and one text model of the matrix, the slow tier on the others
MANY_PASSES = ("integrated_gradients", "occlusion", "atman", "bt_h", "bt_t")
MANY_PASSES_FAST_CASES = ("timm_vit", "hf_bert_sdpa")


def many_passes_elsewhere(params: dict) -> bool:
    """Whether a test's parameters pair a :data:`MANY_PASSES` method with a model outside
    :data:`MANY_PASSES_FAST_CASES`."""
    values = list(params.values())
    if not any(isinstance(v, str) and v in MANY_PASSES for v in values):
        return False
    models = [v.name if isinstance(v, Case) else v for v in values if isinstance(v, Case) or (isinstance(v, str) and v in CASES)]
    return any(m not in MANY_PASSES_FAST_CASES for m in models)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)
        elif hasattr(item, "callspec") and many_passes_elsewhere(item.callspec.params):
            item.add_marker(pytest.mark.slow)
        elif item.get_closest_marker("matrix") and hasattr(item, "callspec"):
            if not all(in_fast_tier(v) for v in item.callspec.params.values()):
                item.add_marker(pytest.mark.slow)


# --------------------------------------------------------------------------------------------
# a headless browser for the tests of the HTML pages
# --------------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000", "--force-device-scale-factor=1"]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by selenium; skipped, with the reason, where one of them is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="attnx-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # the driver is given: selenium-manager (which would download one) is not asked
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
