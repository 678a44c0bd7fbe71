"""Explaining generation: every generated token against the context before it (attnx.core.generation).

The reference for a row is attnx explaining that token alone: the prompt and the earlier generated
tokens as one unpadded sample, the generated token as the next-token target. The answer's span is
checked against a Continuation target, generation against a hand-written greedy loop, the sink
shares against their formula.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.errors import AttnxTypeError, AttnxValueError
from attnx.core.generation import explain_generation, share
from decoder_models import DecoderCase, word_tokenizer

METHODS = ["rollout", "grad_rollout", "generic", "attn_gradcam", "transformer_attribution", "lrp",
           "gradient_x_input", "raw_attention"]
PROMPT = [1, 7, 23, 41, 9, 15]  # <bos> w7 w23 w41 w9 w15
ANSWER = [33, 4, 18, 50]


@pytest.fixture(scope="module")
def llama():
    # float32: transformers' padding mask gives NaN for float64 Llama models (a padded batch of one)
    return DecoderCase("llama", "lm", "eager").model()


def alone(model, ids: list[int], target: int, method: str) -> torch.Tensor:
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    return attnx.explain(model, batch, method=method, target=target).scores[0].double()


@pytest.mark.parametrize("method", METHODS)
def test_each_row_equals_explaining_that_token_alone(llama, method):
    g = explain_generation(llama, None, PROMPT, method=method, continuation=ANSWER, batch_size=3, span=False)
    T0, G = len(PROMPT), len(ANSWER)
    assert g.matrix.shape == (G, T0 + G - 1) and g.generated_ids == ANSWER
    full = PROMPT + ANSWER
    for k in range(G):
        expected = alone(llama, full[: T0 + k], full[T0 + k], method)
        scale = float(expected.abs().max())
        torch.testing.assert_close(g.matrix[k, : T0 + k], expected, rtol=1e-4, atol=1e-5 * scale)
        assert torch.isnan(g.matrix[k, T0 + k:]).all()  # the model does not see these when it predicts token k
    with torch.no_grad():
        logits = llama(input_ids=torch.tensor([full])).logits[0]
    positions = torch.arange(T0 - 1, T0 + G - 1)
    torch.testing.assert_close(g.target_scores, logits[positions, ANSWER].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.probabilities, logits[positions].softmax(-1)[torch.arange(G), ANSWER].double(),
                               rtol=1e-5, atol=1e-6)


def test_span_is_the_answers_log_probability(llama):
    g = explain_generation(llama, None, PROMPT, method="generic", continuation=ANSWER)
    e = attnx.explain(llama, {"input_ids": torch.tensor([PROMPT])}, method="generic",
                      target=attnx.Continuation(ANSWER))
    torch.testing.assert_close(g.span_scores, e.scores[0].double())  # the same unpadded pass
    with torch.no_grad():
        logp = llama(input_ids=torch.tensor([PROMPT + ANSWER])).logits[0].log_softmax(-1)
    expected = sum(float(logp[len(PROMPT) - 1 + k, t]) for k, t in enumerate(ANSWER))
    assert g.span_log_probability == pytest.approx(expected, rel=1e-5)


def test_greedy_generation_is_the_argmax_chain(llama):
    ids = list(PROMPT)
    for _ in range(5):  # a hand-written greedy loop, without the cache
        with torch.no_grad():
            ids.append(int(llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    expected = ids[len(PROMPT):]
    stop = next((k for k, t in enumerate(expected) if t == 2), len(expected))  # eos_token_id=2 ends the answer
    assert stop > 0, "the tiny model ends at once: pick another prompt"
    g = explain_generation(llama, None, PROMPT, max_new_tokens=5, method="rollout")
    assert g.generated_ids == expected[:stop]
    assert g.tokens == [f"#{t}" for t in PROMPT + expected[:stop]]


def test_text_prompt_tokens_and_sinks(llama):
    tok = word_tokenizer()
    g = explain_generation(llama, tok, "w7 w23 w41", continuation="w33 w4", method="generic")
    assert g.token_ids.tolist() == [7, 23, 41, 33, 4] and g.generated_tokens == ["w33", "w4"]
    assert g.sinks == [0]  # the first token; no special token in the context
    with_bos = explain_generation(llama, tok, [1, 7, 1, 23], continuation=[33, 4], method="generic")
    assert with_bos.sinks == [0, 2]  # <bos> is a special token wherever it stands
    m = with_bos.matrix.abs().nan_to_num(0.0)
    torch.testing.assert_close(with_bos.sink_share, (m[:, 0] + m[:, 2]) / m.sum(1))
    torch.testing.assert_close(with_bos.first_token_share, m[:, 0] / m.sum(1))


def test_scaled_leaves_the_sinks_out_of_the_scale():
    from attnx.core.generation import GenerationExplanation

    nan = float("nan")
    matrix = torch.tensor([[8.0, -1.0, 2.0, nan], [4.0, 1.0, -0.5, 2.0]], dtype=torch.float64)
    g = GenerationExplanation("m", {}, torch.arange(6), [f"#{i}" for i in range(6)], 4, matrix,
                              torch.zeros(2), torch.zeros(2), sinks=[0])
    out = g.scaled()
    torch.testing.assert_close(out[0, :3], torch.tensor([4.0, -0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor([2.0, 0.5, -0.25, 1.0], dtype=torch.float64))
    assert torch.isnan(out[0, 3])
    torch.testing.assert_close(g.scaled(include_sinks=True)[0, :3], torch.tensor([1.0, -0.125, 0.25], dtype=torch.float64))
    torch.testing.assert_close(g.sink_share, torch.tensor([8 / 11, 4 / 7.5], dtype=torch.float64))
    assert g.top(0, 2) == [(2, "#2", 2.0), (1, "#1", -1.0)]
    assert g.top(0, 1, include_sinks=True) == [(0, "#0", 8.0)]
    assert share(torch.zeros(1, 3), torch.tensor([True, False, False])).tolist() == [0.0]


def test_model_left_as_found(llama):
    llama.train()
    try:
        explain_generation(llama, None, PROMPT, method="lrp", continuation=ANSWER)
        assert llama.training and all(p.grad is None for p in llama.parameters())
        assert llama.config._attn_implementation == "eager"
    finally:
        llama.eval()


def test_bad_inputs(llama):
    tok = word_tokenizer()
    with pytest.raises(AttnxValueError, match="empty"):
        explain_generation(llama, tok, "  ")
    with pytest.raises(AttnxValueError, match="chat template"):
        explain_generation(llama, tok, "w7 w8", chat=True)
    with pytest.raises(AttnxValueError, match="tokenizer"):
        explain_generation(llama, None, "w7 w8")
    with pytest.raises(AttnxValueError, match="max_new_tokens"):
        explain_generation(llama, None, PROMPT, max_new_tokens=0)
    classifier = DecoderCase("llama", "cls", "eager").model()
    with pytest.raises(AttnxTypeError, match="causal language model"):
        explain_generation(classifier, None, PROMPT)
