"""AttCAT (Qiang et al. NeurIPS 2022) against the authors' procedure written out on the models' own outputs.

The authors' ``generate_TransCAM`` reads a Hugging Face BERT's ``output_hidden_states`` (the input of
every block), the gradient of the target logit at each of them and each block's attention, and sums
``(∂y/∂h ⊙ h).sum(-1) · mean_heads mean_queries A`` over the blocks. The same steps are taken here on
stock models' own outputs (``output_hidden_states``, ``output_attentions``, ``torch.autograd.grad``)
and on a hand-run timm ViT, in float64; attnx must match to 1e-8. Every model kind runs it (Swin is
refused) and leaves the model as found; a padded batch equals each sample alone.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.adapters import InterceptAdapter
from attnx.errors import UnsupportedModelError
from conftest import CASES, max_abs_diff
from contracts import KINDS, assert_unchanged, snapshot
from decoder_models import DecoderCase, real_tokens


def authors_attcat(hidden: list[torch.Tensor], attentions: list[torch.Tensor], score: torch.Tensor) -> torch.Tensor:
    """``Σ_l (∂y/∂h^l ⊙ h^l).sum(-1) · A^l.mean(heads).mean(queries)`` (the authors' steps, no masks)."""
    grads = torch.autograd.grad(score, hidden)
    return sum((g * h).sum(-1) * a.mean(dim=1).mean(dim=1) for h, g, a in zip(hidden, grads, attentions))


def hand_run_vit(model, x: torch.Tensor):
    """A timm ViT's logits, the input tokens of every block and its attention maps (kept in the graph)."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    hidden, maps = [], []
    for blk in model.blocks:
        hidden.append(tokens)
        B, N, D = tokens.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // heads) ** 0.5, dim=-1)
        maps.append(a)
        tokens = tokens + blk.ls1(blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D)))
        tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    return model.forward_head(model.norm(tokens)), hidden, maps


@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "timm_deit_distilled"])
def test_equals_the_authors_steps_on_a_hand_run_vit_in_float64(name):
    model = CASES[name].model(torch.float64)
    x = CASES[name].inputs(3, dtype=torch.float64)
    logits, hidden, maps = hand_run_vit(model, x)
    assert max_abs_diff(logits, model(x)) < 1e-10  # the hand-run forward is the model's
    targets = torch.tensor([1, 4, 6])
    expected = authors_attcat(hidden, maps, logits.gather(1, targets[:, None]).sum())
    e = attnx.Explainer(model).explain(x, "attcat", target=targets)
    assert e.token_relevance.dtype == torch.float64
    assert max_abs_diff(e.token_relevance, expected) < 1e-8
    assert (expected.abs().sum(1) > 0).all()


def hf_reference(model, inputs: dict, score_of) -> torch.Tensor:
    """The authors' steps on a Hugging Face model's own ``hidden_states`` and ``attentions``."""
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    return authors_attcat(list(out.hidden_states[:-1]), list(out.attentions), score_of(out.logits))


def test_equals_the_authors_steps_on_a_bert_in_float64():
    """The authors' own setting: a BERT sequence classifier, one unpadded input per sample."""
    case = CASES["hf_bert_eager"]
    model = case.model(torch.float64)
    x = case.inputs(2)
    targets = torch.tensor([3, 0])
    expected = hf_reference(model, x, lambda logits: logits.gather(1, targets[:, None]).sum())
    e = attnx.Explainer(model).explain(x, "attcat", target=targets)
    assert max_abs_diff(e.token_relevance, expected) < 1e-8
    assert (expected.abs().sum(1) > 0).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_equals_the_authors_steps_on_a_decoder_in_float64(family):
    """A causal language model explained at its last token's next-token logit."""
    case = DecoderCase(family, "lm", "eager")
    model = case.model(torch.float64)
    x = case.inputs(lengths=[7, 7])
    targets = torch.tensor([5, 11])
    expected = hf_reference(model, x, lambda logits: logits[:, -1].gather(1, targets[:, None]).sum())
    e = attnx.Explainer(model).explain(x, "attcat", target=targets)
    assert max_abs_diff(e.token_relevance, expected) < 1e-8


@pytest.mark.parametrize("case", [CASES["hf_bert_sdpa"], DecoderCase("gpt2", "cls", "eager")], ids=["bert", "gpt2_cls"])
def test_a_padded_batch_equals_each_sample_alone(case):
    model = case.model()
    x = case.inputs(lengths=[9, 5])
    explainer = attnx.Explainer(model)
    e = explainer.explain(x, "attcat")
    valid = x["attention_mask"].bool()
    for b in range(2):
        alone = explainer.explain(real_tokens(x, b), "attcat").token_relevance[0]
        assert max_abs_diff(e.token_relevance[b][valid[b]], alone) <= 1e-4 * alone.abs().max()
        assert alone.abs().sum() > 0


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("swin")])
def test_every_model_kind_and_the_model_is_left_as_found(kind):
    spec = KINDS[kind]
    model = spec.build()
    before = snapshot(model)
    e = attnx.explain(model, spec.inputs(), method="attcat", **spec.call())
    # a dual encoder: the image tower explained at each image-prompt similarity
    scores = e.image.scores if hasattr(e, "image") else e.scores
    assert torch.isfinite(scores).all() and (scores.abs().sum(1) > 0).all()
    assert_unchanged(before, model)


@pytest.mark.parametrize("kind", ["swin_timm", "swin_hf"])
def test_swin_is_refused(kind):
    spec = KINDS[kind]
    with pytest.raises(UnsupportedModelError, match="attcat"):
        attnx.explain(spec.build(), spec.inputs(), method="attcat")


def test_intercept_without_a_family_is_refused():
    """``intercept`` uses the blocks of the model's family adapter; a model of no family has none."""
    model = CASES["timm_vit"].model()
    with pytest.raises(UnsupportedModelError, match="token representations"):
        attnx.Explainer(model, adapter=InterceptAdapter(model)).explain(CASES["timm_vit"].inputs(1), "attcat")
