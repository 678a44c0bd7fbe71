"""The relevance pass (``attnx.core.relevance_pass``): one typed request, and a model that embeds
its inputs more than once refused with an attnx error (not a bare RuntimeError)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import attnx
from attnx.adapters import Adapter
from attnx.core.batch import Batch
from attnx.core.layout import Layout
from attnx.core.relevance_pass import RelevanceRequest
from attnx.core.trace_types import FirstLayer, Needs
from attnx.errors import AttnxError, UnsupportedModelError
from attnx.lrp import get_preset


class TwiceEmbedded(nn.Module):
    """Token ids embedded twice (two calls of one ``nn.Embedding``), averaged, classified."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head((self.embed(ids) + self.embed(ids.flip(1))).mean(1))


class TokenAdapter(Adapter):
    name = "twice_embedded"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, TwiceEmbedded)

    def prepare(self, inputs) -> Batch:
        layout = Layout(num_tokens=inputs.shape[1], prefix_tokens=0, readout=0)
        return Batch(args=(), kwargs={"input_ids": inputs}, batch_size=inputs.shape[0], layout=layout, device=inputs.device)

    @contextlib.contextmanager
    def observe(self, recorder):
        yield

    def call(self, batch: Batch):
        out = self.model(batch.kwargs["input_ids"])
        return out, out

    def input_embeddings(self) -> nn.Module:
        return self.model.embed


def test_a_model_embedding_its_inputs_twice_is_an_unsupported_model():
    model = TwiceEmbedded().eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    explainer = attnx.Explainer(model, adapter=TokenAdapter(model))
    with pytest.raises(UnsupportedModelError, match="called its input embeddings .*2 times in one forward") as info:
        explainer.explain(ids, method="lrp", target=[0, 1])
    assert isinstance(info.value, AttnxError) and not isinstance(info.value, RuntimeError)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_the_request_serves_a_methods_needs_in_one_forward():
    registry = get_preset("chefer2021")
    first = FirstLayer(lambda options, layout, n: options["start_layer"], {"start_layer": 1})
    request = RelevanceRequest.from_needs(Needs(gradients=True, attention_relevance=True), registry, first_layer=first)
    assert request.registry is registry and request.strict is True
    assert request.attention_relevance and request.gradients and request.attentions and request.observes
    assert not request.input_relevance and request.first_layer is first
    only_input = RelevanceRequest.from_needs(Needs(input_relevance=True), registry)
    assert only_input.input_relevance and not only_input.observes


@pytest.mark.parametrize("value, expected", [(0, 0), (2, 2), (-1, 3), (-4, 0), (4, 0), (1.5, 0)])
def test_first_layer_index(value, expected):
    """A valid layer (negative from the end) is that layer; anything else is 0 (every layer), the
    method then reports its bad option itself."""
    assert FirstLayer(lambda options, layout, n: options["layer"], {"layer": value}).index(None, 4) == expected
