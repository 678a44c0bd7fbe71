"""Architecture adapters: everything attnx knows about particular model families.

Adapters are looked up in registration order; the first whose ``matches(model)`` is true is
used. The ``intercept`` adapter (attention kernels intercepted, see :mod:`.kernels`) is the
fallback and can be forced with ``adapter="intercept"``. Register your own with
:func:`register_adapter`.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..errors import AttnxTypeError, AttnxValueError, UnsupportedModelError
from .base import Adapter, missing_methods
from .dual_encoder import DualEncoderAdapter, HFDualEncoderAdapter, OpenCLIPAdapter
from .hf import HFAdapter
from .hf_decoder import HFDecoderAdapter
from .intercept import InterceptAdapter
from .loaded import loaded_class
from .swin import HFSwinAdapter, TimmSwinAdapter
from .timm_vit import TimmViTAdapter
from .torchvision_vit import TorchvisionViTAdapter

__all__ = [
    "Adapter",
    "DualEncoderAdapter",
    "HFDualEncoderAdapter",
    "OpenCLIPAdapter",
    "HFAdapter",
    "HFDecoderAdapter",
    "HFSwinAdapter",
    "InterceptAdapter",
    "TimmSwinAdapter",
    "TimmViTAdapter",
    "TorchvisionViTAdapter",
    "adapter_names",
    "get_adapter",
    "refuse_out_of_scope",
    "register_adapter",
    "user_kernel",
]

_REGISTRY: dict[str, type[Adapter]] = {}
#: the fallback adapter's former name, still accepted
DEPRECATED_NAMES = {"generic": InterceptAdapter.name}


def register_adapter(cls: type[Adapter], *, first: bool = False) -> type[Adapter]:
    """Register an adapter class (usable as a decorator). ``first=True`` gives it priority."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise AttnxTypeError(f"expected an Adapter subclass, got {cls!r}")
    missing = missing_methods(cls)
    if missing:
        raise AttnxTypeError(
            f"adapter {cls.__name__} does not implement {', '.join(missing)} of the adapter protocol "
            "(attnx.adapters.Adapter: matches, prepare, observe and call)"
        )
    global _REGISTRY
    _REGISTRY.pop(cls.name, None)
    _REGISTRY = {cls.name: cls, **_REGISTRY} if first else {**_REGISTRY, cls.name: cls}
    return cls


for _cls in (TimmViTAdapter, TimmSwinAdapter, TorchvisionViTAdapter, HFDualEncoderAdapter, OpenCLIPAdapter, HFDecoderAdapter, HFSwinAdapter, HFAdapter):
    register_adapter(_cls)


def adapter_names() -> list[str]:
    """Names of the registered adapters, in lookup order, then ``intercept``."""
    return [*_REGISTRY, InterceptAdapter.name]


def family_adapter(model: nn.Module) -> Adapter | None:
    """The first registered adapter that matches ``model``, or ``None``."""
    for cls in _REGISTRY.values():
        if cls.matches(model):
            return cls(model)
    return None


def block_namer(model: nn.Module) -> Adapter | None:
    """An adapter that names the blocks of ``model``: its family's, or for a bare Hugging Face
    backbone (``Dinov2Model``, ``BertModel``: no head, so no family adapter) the Hugging Face
    adapter, whose blocks, value and feed-forward projections are found the same way."""
    adapter = family_adapter(model)
    if adapter is None and _is_hf(model) and getattr(getattr(model, "config", None), "num_hidden_layers", None):
        adapter = HFAdapter(model)
    return adapter


def wrapped_family(model: nn.Module) -> Adapter | None:
    """The :func:`block_namer` of a model no family adapter knows: of the model itself (a bare
    Hugging Face backbone), else of the one known model inside it (a user's module around a timm or
    Hugging Face backbone: its outermost such submodule); ``None`` when there is none or more than
    one, or it is a dual encoder (which tower runs is the wrapper's)."""
    found: list[Adapter] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            adapter = block_namer(child)
            if adapter is None:
                visit(child)
            else:
                found.append(adapter)

    itself = block_namer(model)
    if itself is not None:
        found.append(itself)
    else:
        visit(model)
    if len(found) != 1 or isinstance(found[0], DualEncoderAdapter):
        return None
    return found[0]


#: what attnx explains, named when it refuses a model
SUPPORTED = (
    "attnx explains encoders (ViT/DeiT/BEiT image classifiers, BERT-family text classifiers), decoders "
    "(causal language models and their sequence classifiers) and dual encoders (CLIP, SigLIP)"
)
#: Hugging Face attention kernels that compute what ``eager`` computes
STOCK_KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def user_kernel(model: nn.Module) -> str | None:
    """The name of the attention kernel a user registered (``AttentionInterface.register`` and
    ``set_attn_implementation``) on a Hugging Face model, or ``None`` for a stock kernel."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not isinstance(impl, str) or impl.removeprefix("paged|") in STOCK_KERNELS:
        return None
    return impl


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` has an encoder and a decoder with cross-attention (BART, T5, Marian,
    Whisper, ``nn.Transformer``)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True:
        return True
    return any(isinstance(m, (nn.Transformer, nn.TransformerDecoderLayer)) for m in model.modules())


def has_attention_modules(model: nn.Module) -> bool:
    """Whether any module of ``model`` is named as an attention (``*Attention*``, ``*Attn*``)."""
    return any("attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower() for m in model.modules())


def refuse_out_of_scope(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` for models whose attention attnx cannot explain as one
    stack of self-attention: encoder-decoders, and Hugging Face models without attention (Mamba)."""
    name = type(model).__name__
    if is_encoder_decoder(model):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder (encoder self-attention, decoder self-attention and cross-attention), "
            f"which attnx does not explain yet; {SUPPORTED}"
        )
    if _is_hf(model) and not has_attention_modules(model):
        raise UnsupportedModelError(
            f"{name} has no attention layers (a state-space or recurrent model?), so attention methods do not "
            f"apply; {SUPPORTED}"
        )


def _is_hf(model: nn.Module) -> bool:
    pretrained = loaded_class("transformers.modeling_utils", "PreTrainedModel")  # no import: see .loaded
    return pretrained is not None and isinstance(model, pretrained)


def get_adapter(model: nn.Module, adapter: str | Adapter | None = None) -> Adapter:
    """Select the adapter for ``model``.

    ``adapter`` may be ``None`` (automatic: the first matching adapter, else ``intercept``), the
    name of a registered adapter, ``"intercept"``, or an ``Adapter`` instance. Encoder-decoders
    and models without attention are refused (:func:`refuse_out_of_scope`). A Hugging Face model
    running an attention kernel its user registered is explained through ``intercept``, which keeps
    that kernel (a family adapter would switch it to ``eager``).
    """
    if not isinstance(model, nn.Module):
        raise AttnxTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(adapter, Adapter):
        return adapter
    refuse_out_of_scope(model)
    if adapter is None:
        family = family_adapter(model)
        if family is not None and user_kernel(model) is not None:
            return InterceptAdapter(model, layout_from=family)
        return family or InterceptAdapter(model, blocks_from=wrapped_family(model))
    if adapter in DEPRECATED_NAMES:
        warnings.warn(
            f"adapter={adapter!r} is now called {DEPRECATED_NAMES[adapter]!r}", DeprecationWarning, stacklevel=3
        )
        adapter = DEPRECATED_NAMES[adapter]
    if adapter == InterceptAdapter.name:
        family = family_adapter(model)
        return InterceptAdapter(model, layout_from=family, blocks_from=None if family else wrapped_family(model))
    if adapter not in _REGISTRY:
        raise AttnxValueError(f"unknown adapter {adapter!r}; available: {adapter_names()}")
    cls = _REGISTRY[adapter]
    if not cls.matches(model):
        raise UnsupportedModelError(f"adapter {adapter!r} does not apply to {type(model).__name__}")
    return cls(model)
