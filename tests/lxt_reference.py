"""lxt 2.1's "efficient" AttnLRP (the authors' code), loaded for comparisons with attnx.

Used in subprocesses only (``tests/test_lrp_registry.py``, ``tests/test_contract_lxt.py`` and
``benchmarks/smollm2_lxt.py``, which imports it by path): lxt's patches replace transformers' model
modules and torch's classes for good. lxt's package ``__init__`` imports its BERT patches, written
for transformers 4, so only the model patch maps are loaded, without it. lxt 2.1 swaps
``ALL_ATTENTION_FUNCTIONS`` for a dict transformers 5 cannot use, so only the eager attention
function is wrapped: run the models with ``attn_implementation="eager"``.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Callable

import torch


def patch_attnlrp(family: str) -> None:
    """Apply lxt's AttnLRP patch map of one transformers family (``"llama"``, ``"gpt2"``, ...).

    torch's classes (Dropout, LayerNorm) are patched once per process: patching them again for a
    second family is a no-op."""
    import lxt

    base = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    for name, path in (("lxt.efficient", base), ("lxt.efficient.models", os.path.join(base, "models"))):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    from lxt.efficient.patches import wrap_attention_forward

    for target, patch in importlib.import_module("lxt.efficient.models." + family).attnLRP.items():
        if isinstance(target, type):
            assert patch(target) or target.__module__.startswith("torch"), target
        else:
            target.eager_attention_forward = wrap_attention_forward(target.eager_attention_forward)


def input_relevance(model: torch.nn.Module, batch: dict, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """lxt's relevance at the input embeddings: gradient × input of ``score(logits)`` (one scalar per
    sample, summed over the batch) on a model patched by :func:`patch_attnlrp`."""
    store: list[torch.Tensor] = []

    def hook(module, args, output):
        store.append(output.detach().requires_grad_(True))
        return store[-1]

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        y = score(model(**batch).logits)
        (g,) = torch.autograd.grad(y.sum(), store[0])
    finally:
        handle.remove()
    return store[0] * g
