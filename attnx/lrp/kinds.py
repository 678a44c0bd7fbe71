"""Module kinds: families of modules recognised by what they are, not by one class.

A :class:`ModuleKind` is a registry key matching every module for which its predicate
``(qualified_name, module) -> bool`` holds. The kinds below cover the modules that modern decoder
models write with several elementary ops (so that, keyed by type, one rule handles the whole
module and its internal ``pow`` / ``rsqrt`` / ``tanh`` never show as uncovered):

* :data:`RMS_NORM` -- RMSNorm, ``x * rsqrt(mean(x²) + ε) * weight``: every class whose name ends
  in ``RMSNorm`` (Llama, Qwen2/3, Mistral, Gemma 1-3 with their ``(1 + weight)``, Phi-3, ...),
  ``torch.nn.RMSNorm`` and the T5-family ``*LayerNorm`` that are RMS normalisations (no bias, a
  ``variance_epsilon``). The rule checks on the actual output that it is one;
* :data:`ACTIVATION` -- Hugging Face elementwise activations written out in several ops
  (``NewGELUActivation`` = ``gelu_new``, ``GELUTanh``, ``FastGELUActivation``, ...);
* :data:`HF_CONV1D` -- ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers: an
  ``addmm`` with an ``(in, out)`` weight);
* :data:`MOE_ROUTER` -- the routers of mixture-of-experts blocks (classes named ``*Router``, and
  Qwen-MoE's ``shared_expert_gate``), whose routing weights are held constant.

Hugging Face types are resolved only once ``transformers`` is imported, so attnx never imports it
for them.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

import torch
from torch import nn

__all__ = [
    "ModuleKind", "RMS_NORM", "ACTIVATION", "HF_CONV1D", "MOE_ROUTER", "is_hf_conv1d", "rms_epsilon", "rms_norm_spread",
]


class ModuleKind:
    """A registry key matching the modules for which ``predicate(qualified_name, module)`` holds.

    Parameters
    ----------
    name:
        Shown in the registry's repr and the docs.
    predicate:
        ``(qualified_name, module) -> bool``.
    """

    def __init__(self, name: str, predicate: Callable[[str, nn.Module], bool]) -> None:
        self.__name__ = name
        self.predicate = predicate

    def matches(self, name: str, module: nn.Module) -> bool:
        return bool(self.predicate(name, module))

    def __repr__(self) -> str:
        return f"ModuleKind({self.__name__!r})"


_RESOLVED: dict[tuple, tuple[type, ...]] = {}


def transformers_types(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``transformers.<module>`` that exist, once transformers is imported."""
    key = (module, names)
    if key in _RESOLVED:
        return _RESOLVED[key]
    if "transformers" not in sys.modules:
        return ()
    try:
        mod = importlib.import_module(f"transformers.{module}")
    except Exception:  # pragma: no cover - a broken or very old transformers
        return ()
    _RESOLVED[key] = tuple(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type))
    return _RESOLVED[key]


def rms_epsilon(module: nn.Module) -> float:
    """The ε of an RMS normalisation module (``variance_epsilon`` or ``eps``; 0 when it has none)."""
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def is_rms_norm(name: str, module: nn.Module) -> bool:
    """``module`` computes ``x * rsqrt(mean(x²) + ε) * weight`` over its last dimension."""
    torch_rms = getattr(nn, "RMSNorm", None)
    if torch_rms is not None and isinstance(module, torch_rms):
        return True
    cls = type(module).__name__
    if cls.lower().endswith("rmsnorm"):
        return True
    # T5LayerNorm and its copies (MT5, LongT5, UMT5, Pix2Struct, ...) are RMS normalisations
    return cls.endswith("LayerNorm") and hasattr(module, "variance_epsilon") and getattr(module, "bias", None) is None


def rms_norm_spread(x: torch.Tensor, y: torch.Tensor, eps: float, rows: int = 64) -> float:
    """How far ``y`` is from an RMS normalisation of ``x``: the spread over rows of the per-feature
    weight ``w = y ⊙ rms(x) / x``, relative to its largest value (0 for ``y = x / rms(x) ⊙ w``).
    At most ``rows`` rows, evenly spaced, are compared: enough to tell a normalisation from
    anything else at a fraction of the cost of the layer."""
    xd, yd = x.detach().flatten(0, -2), y.detach().flatten(0, -2)
    if xd.shape[0] > rows:
        pick = torch.linspace(0, xd.shape[0] - 1, rows, device=xd.device).round().long()
        xd, yd = xd.index_select(0, pick), yd.index_select(0, pick)
    xd, yd = xd.double(), yd.double()
    rms = (xd.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    defined = (xd != 0) & torch.isfinite(yd)
    w = yd * rms / torch.where(defined, xd, torch.ones_like(xd))
    big = torch.finfo(torch.float64).max
    hi = torch.where(defined, w, torch.full_like(w, -big)).amax(0)
    lo = torch.where(defined, w, torch.full_like(w, big)).amin(0)
    seen = defined.any(0)
    spread = torch.where(seen, hi - lo, torch.zeros_like(hi)).amax()
    scale = torch.where(seen, torch.maximum(hi.abs(), lo.abs()), torch.zeros_like(hi)).amax()
    return 0.0 if scale == 0 else (spread / scale).item()


#: Hugging Face activations written with several elementwise ops (their rule: identity)
_HF_ACTIVATIONS = (
    "NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "AccurateGELUActivation",
    "GELUActivation", "QuickGELUActivation", "SiLUActivation", "MishActivation",
)


def is_elementwise_activation(name: str, module: nn.Module) -> bool:
    """``module`` is a Hugging Face GELU / SiLU / Mish activation (``f(0) = 0``, elementwise)."""
    return isinstance(module, transformers_types("activations", *_HF_ACTIVATIONS))


def is_hf_conv1d(module: nn.Module) -> bool:
    """``module`` is ``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W`` of shape (in, out)."""
    return isinstance(module, transformers_types("pytorch_utils", "Conv1D"))


def is_moe_router(name: str, module: nn.Module) -> bool:
    """``module`` computes the routing weights of a mixture-of-experts block."""
    return type(module).__name__.lower().endswith("router") or name.rsplit(".", 1)[-1] == "shared_expert_gate"


RMS_NORM = ModuleKind("RMSNorm", is_rms_norm)
ACTIVATION = ModuleKind("HF elementwise activation", is_elementwise_activation)
HF_CONV1D = ModuleKind("HF Conv1D", lambda name, module: is_hf_conv1d(module))
MOE_ROUTER = ModuleKind("MoE router", is_moe_router)
