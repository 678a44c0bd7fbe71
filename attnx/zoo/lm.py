"""The embedded language model: a small Llama trained on movie-critic snippets, shipped whole.

:func:`language_model` returns a **stock** ``transformers.LlamaForCausalLM`` (RMSNorm, rotary
positions, grouped-query attention, SiLU-gated MLP, tied input / output embeddings; 0.78 M
parameters, float16 on disk) trained from scratch to predict the next word of Rotten Tomatoes
critic snippets (the train split of :mod:`attnx.data.rotten_tomatoes`), with its word-level
tokenizer (lowercase, punctuation split, ``[BOS]`` prepended, left padding). Nothing is downloaded
and nothing but ``transformers`` is needed. ``training/train_lm.py`` wrote it; its JSON sidecar
records the configuration, the held-out perplexity next to a unigram baseline and the command::

    import attnx
    from attnx import zoo

    lm = zoo.language_model()
    batch = lm.tokenizer(["this movie is", "the acting was"], padding=True, return_tensors="pt")
    e = attnx.Explainer(lm.model, tokenizer=lm.tokenizer)(batch, method="generic")
    e.scores                   # (2, T): one value per prompt word, padding 0
    e.explained_tokens         # the predicted next word of each prompt

It is small and its vocabulary is the 3000 most frequent words of the train split (rarer words
read as ``[UNK]``): a model to see the methods at work on a decoder in seconds, not a model of
English.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .assets import ASSETS, asset
from .bundle import ZooModel

__all__ = ["EXAMPLE_PROMPTS", "INFO_FILE", "TOKENIZER_FILE", "WEIGHTS_FILE", "describe", "example_prompts",
           "language_model", "read_info"]

NAME = "lm_llama_rotten_tomatoes"
WEIGHTS_FILE = ASSETS / f"{NAME}.safetensors"
INFO_FILE = ASSETS / f"{NAME}.json"
TOKENIZER_FILE = ASSETS / f"{NAME}_tokenizer.json"
FORMAT = "attnx-lm-1"

#: prompts the demo explains: the model's next word after each
EXAMPLE_PROMPTS = ("this movie is", "the acting was", "a beautifully shot but")


def example_prompts() -> list[str]:
    """Prompts the demo and the CLI explain with the embedded language model."""
    return list(EXAMPLE_PROMPTS)


def read_info(path: str | Path | None = None) -> dict[str, Any]:
    """The JSON sidecar of the shipped weights."""
    with open(path if path is not None else asset(INFO_FILE.name), encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(path: str | Path | None = None):
    """The model's ``PreTrainedTokenizerFast`` (word level, ``[BOS]`` prepended, left padding)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path if path is not None else asset(TOKENIZER_FILE.name)),
        pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        padding_side="left", model_max_length=128,
    )


def language_model(device: str | torch.device = "cpu") -> ZooModel:
    """The embedded language model, offline.

    Returns
    -------
    ZooModel
        ``model``: a stock ``transformers.LlamaForCausalLM`` in eval mode, float32 (the float16
        weights widened: exactly the model the sidecar's perplexity was measured on);
        ``kind``: ``"text"``; ``tokenizer``: its ``PreTrainedTokenizerFast``; ``class_names``:
        ``None`` (the classes are the vocabulary); ``info``: the sidecar, with
        ``language_model=True`` and ``name``.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    info = read_info()
    if info.get("format") != FORMAT:
        raise RuntimeError(f"{INFO_FILE} has format {info.get('format')!r}, this attnx reads {FORMAT!r}: reinstall attnx")
    config = LlamaConfig(**info["config"])
    model = LlamaForCausalLM(config)
    state = {k: v.float() for k, v in load_file(str(asset(WEIGHTS_FILE.name))).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the output embedding is tied to the input embedding, so the file does not repeat it
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{WEIGHTS_FILE.name} does not fit {info['config']}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the output embedding of the embedded language model is not tied to the input embedding")
    model.eval().to(device)
    tokenizer = load_tokenizer()
    if len(tokenizer) != config.vocab_size:
        raise RuntimeError(f"{TOKENIZER_FILE.name} has {len(tokenizer)} tokens, the model {config.vocab_size}")
    info = dict(info, language_model=True, name="attnx default language model")
    return ZooModel(model, "text", None, tokenizer=tokenizer, info=info)


def describe() -> str:
    """One line for ``attnx models``, from the sidecar (no model is built)."""
    t = read_info()
    c, ppl = t.get("config", {}), t.get("perplexity", {})
    line = (f"default-lm (text): LlamaForCausalLM, {c.get('num_hidden_layers')} layers, hidden {c.get('hidden_size')}, "
            f"{c.get('vocab_size')} words; {t.get('task', '')}")
    if "test" in ppl:
        line += f"; held-out perplexity {ppl['test']:.0f} (unigram {ppl.get('test_unigram', float('nan')):.0f})"
    return line
