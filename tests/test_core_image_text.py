"""A dual encoder's embeddings (``attnx.core.image_text.embeddings``) come from the one pass
(``attnx.core.trace.run_trace``): the model held for the call, eval mode, float32 for half
precision, every flag and mode of the model restored."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from attnx.adapters import get_adapter  # noqa: E402
from attnx.core import image_text, trace  # noqa: E402

from clip_models import IMAGE, WordTokenizer, hf_clip  # noqa: E402


def images(n: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, IMAGE, IMAGE, generator=g).to(dtype)


def reference_image_embeddings(model, x: torch.Tensor) -> torch.Tensor:
    """The projected image embedding computed independently: the vision tower's pooled output
    through the projection, in eval mode without gradients."""
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=x).pooler_output
        return model.visual_projection(pooled)


def test_embeddings_run_through_the_pass(monkeypatch):
    model = hf_clip()
    adapter = get_adapter(model)
    calls = []
    original = trace.run_trace

    def counting(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(image_text, "run_trace", counting)
    x = images()
    emb = image_text.embeddings(adapter, x)
    assert len(calls) == 1 and not calls[0].relevance and not calls[0].attentions
    assert torch.allclose(emb, reference_image_embeddings(model, x), atol=1e-5)


def test_embeddings_restore_the_model_flags_and_modes():
    model = hf_clip()
    model.train()
    model.vision_model.encoder.layers[0].eval()  # a mixed state, restored module by module
    flags = {n: m.training for n, m in model.named_modules()}
    implementation = model.config._attn_implementation
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    adapter = get_adapter(model)
    x = images()
    emb = image_text.embeddings(adapter, x)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.config._attn_implementation == implementation
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())
    model.eval()  # the embeddings are those of eval mode (no dropout), whatever the model's mode was
    assert torch.allclose(emb, reference_image_embeddings(model, x), atol=1e-5)


def test_half_precision_embeddings_are_computed_in_float32():
    model = hf_clip().to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    adapter = get_adapter(model)
    x = images(dtype=torch.bfloat16)
    emb = image_text.embeddings(adapter, x)
    assert emb.dtype == torch.float32
    # the same weights (rounded to bfloat16 once) computed in float32
    expected = reference_image_embeddings(hf_clip().to(torch.bfloat16).float(), x.float())
    assert torch.allclose(emb, expected, atol=1e-4)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_text_embeddings_run_through_the_pass_too():
    model = hf_clip()
    adapter = get_adapter(model)
    tokens = WordTokenizer()(["a photo of a cat", "a dog"])
    emb = image_text.embeddings(adapter, tokens)
    with torch.no_grad():
        expected = model.get_text_features(**tokens)
    expected = getattr(expected, "pooler_output", expected)
    assert torch.allclose(emb, expected, atol=1e-5)
