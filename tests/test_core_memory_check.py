"""The memory check before a pass: a call whose estimate exceeds the free memory is refused in
one line, before anything runs; ``check_memory=False`` skips it."""
from __future__ import annotations

import pytest
import torch
import transformers as tr

import attnx
from attnx.core import explainer as explainer_module
from attnx.core import free_memory, memory_check
from attnx.errors import InsufficientMemoryError

from contracts import assert_unchanged, snapshot

BERT = dict(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=512)


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return tr.BertForSequenceClassification._from_config(tr.BertConfig(**BERT), attn_implementation="sdpa").eval()


def tokens(n: int = 64) -> dict:
    ids = torch.randint(3, 400, (2, n), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def free_between(monkeypatch):
    """Free memory between what gradient_x_input and generic need on the model and inputs."""
    model, x = bert(), tokens()
    low = attnx.estimate(model, x, method="gradient_x_input", available=0).pass_bytes
    high = attnx.estimate(model, x, method="generic", available=0).pass_bytes
    assert low < high
    free = (low + high) // 2
    monkeypatch.setattr(free_memory, "free_memory", lambda device: free)
    return model, x, free


def test_a_call_that_does_not_fit_is_refused_before_the_pass(free_between, monkeypatch):
    model, x, free = free_between
    before = snapshot(model)

    def no_pass(*args, **kwargs):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(explainer_module, "run_trace", no_pass)
    need = attnx.estimate(model, x, method="generic").needed
    with pytest.raises(InsufficientMemoryError) as info:
        attnx.explain(model, x, method="generic")
    message = str(info.value)
    assert "\n" not in message
    assert f"{need:,} bytes" in message and f"{free:,} bytes" in message and "free on cpu" in message
    fits = message.split("methods that fit: ")[1].split(" (")[0].split(", ")
    assert "gradient_x_input" in fits and "generic" not in fits and "transformer_attribution" not in fits
    assert "check_memory=False" in message
    assert isinstance(info.value, MemoryError)
    assert_unchanged(before, model)


def test_the_check_can_be_skipped(free_between):
    model, x, _ = free_between
    e = attnx.explain(model, x, method="generic", check_memory=False)
    assert e.scores.shape[0] == 2
    e = attnx.Explainer(model).explain(x, method="generic", check_memory=False)
    assert e.scores.shape[0] == 2


def test_a_call_that_fits_runs(free_between):
    model, x, _ = free_between
    assert attnx.explain(model, x, method="gradient_x_input").scores.shape[0] == 2


def test_a_model_without_an_estimate_is_not_checked(monkeypatch):
    monkeypatch.setattr(free_memory, "free_memory", lambda device: 0)
    memory_check.check_memory(torch.nn.Sequential(torch.nn.Linear(3, 3)), torch.zeros(1, 3), "rollout", {})
