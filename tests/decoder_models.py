"""The decoder matrix: tiny random Hugging Face decoders of every family attnx adapts.

Each :class:`DecoderCase` builds a three-layer, four-head model (grouped-query attention with two
key/value heads where the family has it, one for Gemma) as a causal language model
(``*ForCausalLM`` / ``GPT2LMHeadModel``) or a decoder sequence classifier, with the ``eager`` or
``sdpa`` kernel. Sliding windows of 4 tokens (shorter than the inputs) are on for Mistral, Qwen2
(layers 1-2), Gemma2 and Gemma3 (layers 0 and 2), soft-capping for Gemma2 (attention and final
logits). Weights are re-drawn so that attention is peaked (RMSNorm scales around 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from conftest import randomize_

VOCAB = 60
LENGTH = 9
CLASSES = 5
PAD = 0


def _configs() -> dict[str, Callable]:
    import transformers as tr

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, pad_token_id=PAD, max_position_embeddings=64, num_labels=CLASSES,
                  bos_token_id=1, eos_token_id=2)
    small = dict(head_dim=8, query_pre_attn_scalar=8)
    return {
        "gpt2": lambda: tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2, num_labels=CLASSES),
        "llama": lambda: tr.LlamaConfig(num_key_value_heads=2, **common),
        "mistral": lambda: tr.MistralConfig(num_key_value_heads=2, sliding_window=4, **common),
        "qwen2": lambda: tr.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1, **common),
        "qwen3": lambda: tr.Qwen3Config(num_key_value_heads=2, head_dim=8, **common),
        "gemma": lambda: tr.GemmaConfig(num_key_value_heads=1, head_dim=8, **common),
        "gemma2": lambda: tr.Gemma2Config(num_key_value_heads=2, sliding_window=4, attn_logit_softcapping=5.0,
                                          final_logit_softcapping=3.0, **small, **common),
        "gemma3": lambda: tr.Gemma3TextConfig(num_key_value_heads=2, sliding_window=4,
                                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                              **small, **common),
        "phi3": lambda: tr.Phi3Config(num_key_value_heads=2, **common),
    }


HEADS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma": ("GemmaForCausalLM", "GemmaForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
}
#: Gemma2's soft-capping has no SDPA kernel in transformers: eager only
IMPLEMENTATIONS = {family: ("eager",) if family == "gemma2" else ("eager", "sdpa") for family in HEADS}


def randomize_decoder_(model: nn.Module, seed: int) -> nn.Module:
    """:func:`conftest.randomize_`, then RMSNorm scales around 1 (Gemma stores ``scale - 1``)."""
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                base = 0.0 if "Gemma" in type(module).__name__ else 1.0
                w = module.weight
                w.copy_(base + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype))
    return model


@dataclass(frozen=True)
class DecoderCase:
    family: str
    head: str  # "lm" or "cls"
    impl: str

    @property
    def name(self) -> str:
        return f"{self.family}_{self.head}_{self.impl}"

    @property
    def is_lm(self) -> bool:
        return self.head == "lm"

    @property
    def class_name(self) -> str:
        return HEADS[self.family][0 if self.is_lm else 1]

    def model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        import transformers as tr

        cls = getattr(tr, self.class_name)
        torch.manual_seed(0)
        model = cls._from_config(_configs()[self.family](), attn_implementation=self.impl)
        seed = 100 + sorted(HEADS).index(self.family)
        return randomize_decoder_(model, seed).to(dtype).eval()

    def inputs(self, lengths=None, batch: int | None = None, side: str | None = None, seed: int = 3) -> dict:
        """Token ids 3..VOCAB-1; ``lengths`` real tokens per sample, padded with ``PAD`` on
        ``side`` (default: left for language models, right for classifiers)."""
        lengths = list(lengths) if lengths is not None else [LENGTH] * (batch or 2)
        side = side or ("left" if self.is_lm else "right")
        g = torch.Generator().manual_seed(seed)
        T = max(lengths)
        ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
        mask = torch.zeros(len(lengths), T, dtype=torch.long)
        for b, n in enumerate(lengths):
            real = torch.randint(3, VOCAB, (n,), generator=g)
            sl = slice(T - n, T) if side == "left" else slice(0, n)
            ids[b, sl] = real
            mask[b, sl] = 1
        return {"input_ids": ids, "attention_mask": mask}


CASES = [DecoderCase(f, h, i) for f in HEADS for h in ("lm", "cls") for i in IMPLEMENTATIONS[f]]
LM = [c for c in CASES if c.is_lm]
CLASSIFIERS = [c for c in CASES if not c.is_lm]
EAGER = [c for c in CASES if c.impl == "eager"]
#: the fast tier's decoders in tests marked ``matrix``: the first of each family (its eager language
#: model), and the classifier head and the sdpa kernel of the first family; the slow tier runs the others
FAST = [next(c for c in CASES if c.family == f) for f in HEADS] + [DecoderCase("gpt2", "cls", "eager"),
                                                                   DecoderCase("gpt2", "lm", "sdpa")]


def params(cases) -> list:
    return [pytest.param(c, id=c.name) for c in cases]


def real_tokens(inputs: dict, b: int) -> dict:
    """Sample ``b`` alone, padding removed."""
    keep = inputs["attention_mask"][b].bool()
    return {k: v[b][keep][None] for k, v in inputs.items()}


def word_tokenizer():
    """A word-level tokenizer over ``w3 .. w59`` (``<pad>`` = 0, ``<bos>`` = 1, ``<unk>`` = 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
