"""The adapter protocol (``attnx.adapters.base.Adapter``): a user's adapter implementing only the
abstract methods explains its model; one missing a method is refused naming it; the defaults the
core reads are declared on the base class."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import attnx
from attnx.adapters import Adapter, register_adapter
from attnx.adapters.base import missing_methods
from attnx.core.batch import Batch
from attnx.core.layout import Layout
from attnx.errors import AttnxTypeError, UnsupportedModelError

DIM, PATCH = 8, 4


class ToyViT(nn.Module):
    """A class token and 2x2 patches of an 8x8 image, two written-out attention layers (the
    probabilities pass an ``nn.Identity`` probe), a head on the class token."""

    def __init__(self, layers: int = 2, classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.patches = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM, generator=g))
        self.qkv = nn.ModuleList(nn.Linear(DIM, 3 * DIM) for _ in range(layers))
        self.probes = nn.ModuleList(nn.Identity() for _ in range(layers))
        self.head = nn.Linear(DIM, classes)

    def attentions(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patches(x).flatten(2).transpose(1, 2)], dim=1)
        probs = []
        for qkv, probe in zip(self.qkv, self.probes):
            q, k, v = qkv(t).chunk(3, dim=-1)
            a = probe(torch.softmax(q @ k.transpose(1, 2) / DIM**0.5, dim=-1))
            probs.append(a)
            t = t + a @ v
        return self.head(t[:, 0]), probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attentions(x)[0]


class ToyAdapter(Adapter):
    """Only the four abstract methods of the protocol."""

    name = "toy"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, ToyViT)

    def prepare(self, inputs) -> Batch:
        layout = Layout.for_image(inputs, (inputs.shape[-2] // PATCH, inputs.shape[-1] // PATCH), prefix_tokens=1, readout=0)
        return Batch(args=(inputs,), kwargs={}, batch_size=inputs.shape[0], layout=layout, device=inputs.device)

    @contextlib.contextmanager
    def observe(self, recorder):
        # one head: (B, 1, N, N); the gradient is taken at the tensor the forward goes on with
        def record(module, args, out):
            recorder.record(out[:, None], grad_wrt=out)

        handles = [p.register_forward_hook(record) for p in self.model.probes]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def call(self, batch: Batch):
        out = self.model(*batch.args)
        return out, out


def rollout_reference(probs: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout written out: (A + I) / 2, rows renormalised, later layers on the
    left, the class token's row over the patch columns."""
    eye = torch.eye(probs[0].shape[-1])
    joint = None
    for a in probs:
        m = (a + eye) / 2
        m = m / m.sum(-1, keepdim=True)
        joint = m if joint is None else m @ joint
    return joint[:, 0, 1:]


def test_a_user_adapter_with_only_the_abstract_methods_explains_its_model():
    model = ToyViT().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    e = attnx.Explainer(model, adapter=ToyAdapter(model)).explain(x, method="rollout")
    with torch.no_grad():
        logits, probs = model.attentions(x)
    assert torch.allclose(e.scores, rollout_reference(probs), atol=1e-6)
    assert torch.equal(e.targets, logits.argmax(1))


def test_a_registered_user_adapter_is_chosen_and_its_gradients_flow():
    register_adapter(ToyAdapter, first=True)
    try:
        model = ToyViT().eval()
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        explainer = attnx.Explainer(model)
        assert type(explainer.adapter) is ToyAdapter
        trace = explainer.capture(x, target=[0, 2], gradients=True)
        # dy/dA of the last layer, computed independently by autograd on the model's own forward
        logits, probs = model.attentions(x)
        (expected,) = torch.autograd.grad(logits[torch.arange(2), torch.tensor([0, 2])].sum(), probs[-1])
        assert torch.allclose(trace.gradients[-1][:, 0], expected, atol=1e-6)
    finally:
        attnx.adapters._REGISTRY.pop(ToyAdapter.name, None)


def test_the_defaults_the_core_reads_are_declared_on_the_base_class():
    model = ToyViT()
    adapter = ToyAdapter(model)
    x = torch.randn(1, 3, 8, 8)
    batch = adapter.prepare(x)
    assert adapter.is_lm is False and adapter.outputs_embedding is False
    assert adapter.input_embeddings() is None
    assert adapter.target_readout(batch.layout, torch.tensor([0])) is batch.layout
    assert adapter.patch_layout(batch, (2, 2)) is batch.layout
    assert adapter.resolve_layout(batch, 5) is batch.layout
    with adapter.watch_tokens(attnx.core.recorder.AttentionRecorder(1)):
        pass


def test_a_layout_the_attention_contradicts_is_an_unsupported_model():
    model = ToyViT()
    adapter = ToyAdapter(model)
    batch = adapter.prepare(torch.randn(1, 3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="expected 5 tokens but the attention layers of ToyViT saw 7"):
        adapter.resolve_layout(batch, 7)


class NoCall(Adapter):
    name = "no_call"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False

    def prepare(self, inputs) -> Batch:
        raise NotImplementedError

    @contextlib.contextmanager
    def observe(self, recorder):
        yield


def test_an_adapter_missing_a_method_is_refused_naming_it():
    assert missing_methods(NoCall) == ["call"] and missing_methods(ToyAdapter) == []
    with pytest.raises(AttnxTypeError, match="NoCall does not implement call of the adapter protocol"):
        NoCall(ToyViT())
    with pytest.raises(AttnxTypeError, match="NoCall does not implement call"):
        register_adapter(NoCall)
    assert "no_call" not in attnx.adapters.adapter_names()
    with pytest.raises(AttnxTypeError, match="does not implement call, matches, observe, prepare"):
        Adapter(ToyViT())
