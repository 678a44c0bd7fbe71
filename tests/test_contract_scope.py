"""Scope by type: encoder-decoders and models without attention are refused with one line naming
what attnx explains; an Explainer follows structural edits of its model."""
from __future__ import annotations

import pytest
import timm
import torch
import transformers as T
from torch import nn

import attnx
from attnx.errors import UnsupportedModelError

SUPPORTED = r"attnx explains encoders .* decoders .* dual encoders"


def bart_classifier() -> nn.Module:
    cfg = T.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return T.BartForSequenceClassification(cfg).eval()


def t5_lm() -> nn.Module:
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    return T.T5ForConditionalGeneration(cfg).eval()


def marian_lm() -> nn.Module:
    cfg = T.MarianConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                         pad_token_id=0, decoder_start_token_id=0)
    return T.MarianMTModel(cfg).eval()


class TorchSeq2Seq(nn.Module):
    """A research encoder-decoder on nn.Transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.transformer = nn.Transformer(32, 4, 1, 1, 64, batch_first=True)
        self.head = nn.Linear(32, 100)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(self.transformer(h, h)[:, -1])


ENCODER_DECODERS = {"bart": bart_classifier, "t5": t5_lm, "marian": marian_lm, "nn.Transformer": TorchSeq2Seq}


@pytest.mark.parametrize("adapter", [None, "intercept", "hf_decoder"])
@pytest.mark.parametrize("name", list(ENCODER_DECODERS))
def test_encoder_decoders_are_refused_by_type(name, adapter):
    model = ENCODER_DECODERS[name]()
    ids = {"input_ids": torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(UnsupportedModelError, match=f"{type(model).__name__} is an encoder-decoder.*{SUPPORTED}") as info:
        attnx.Explainer(model, adapter=adapter)(ids, method="rollout")
    assert "\n" not in str(info.value)


def test_mamba_is_refused_without_suggesting_intercept():
    model = T.MambaForCausalLM(T.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    for adapter in (None, "intercept"):
        with pytest.raises(UnsupportedModelError, match=f"MambaForCausalLM has no attention layers.*{SUPPORTED}") as info:
            attnx.Explainer(model, adapter=adapter)
        assert "intercept" not in str(info.value)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


def test_model_without_attention_is_refused_with_a_typed_error():
    with pytest.raises(UnsupportedModelError, match="no attention was observed in MLP.*need a model with attention") as info:
        attnx.explain(MLP(), torch.randn(2, 3, 8, 8), method="rollout")
    assert "try" not in str(info.value)


# --- Explainers follow the model -----------------------------------------------------------------
def vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=3, **kw).eval()


def test_rollout_after_a_block_is_replaced_equals_a_fresh_explainer():
    model = vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kept = attnx.Explainer(model)
    before = kept(x, method="rollout").scores
    torch.manual_seed(5)
    donor = vit(init_values=None)
    with torch.no_grad():
        for p in donor.blocks[1].parameters():
            p.mul_(3.0)
    model.blocks[1] = donor.blocks[1]
    after = kept(x, method="rollout").scores
    fresh = attnx.Explainer(model)(x, method="rollout").scores
    assert torch.allclose(after, fresh, atol=1e-7)
    assert (after - before).abs().max() > 1e-4  # the new block changed the map


def test_reset_classifier_is_followed():
    """reset_classifier(global_pool='avg'): the head now reads the mean of the patches; a kept
    explainer explains the new model as a fresh one does (its logits are the new head's)."""
    model = vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kept = attnx.Explainer(model)
    kept(x, method="generic")
    model.reset_classifier(3, global_pool="avg")
    with torch.no_grad():
        own = model(x)
    e = kept(x, method="generic", target=1)
    fresh = attnx.Explainer(model)(x, method="generic", target=1)
    assert e.logits.shape == (2, 3) and torch.allclose(e.logits, own, atol=1e-6)
    assert torch.allclose(e.scores, fresh.scores, atol=1e-7)


def test_a_given_adapter_instance_is_not_silently_stale():
    model = vit()
    x = torch.randn(1, 3, 32, 32)
    adapter = attnx.adapters.TimmViTAdapter(model)
    explainer = attnx.Explainer(model, adapter=adapter)
    explainer(x, method="rollout")
    model.blocks[0] = vit().blocks[0]
    with pytest.raises(ValueError, match="modules of VisionTransformer changed since this Explainer was made"):
        explainer(x, method="rollout")
