"""Where a block's feed-forward (MLP) sublayer reads the residual stream and what it adds to it.

A method that measures how the MLP transforms every token (``Needs.mlp_branches``, tokentm) reads,
per block, the tokens the sublayer takes from the residual stream ``E'`` (before its norm in a
pre-norm block; the attention sublayer's normalised output in a post-norm one) and the branch's
output ``Ẽ'`` (what is added to ``E'`` before the residual sum, layer scale included). The modules
are found by their names inside a block, one pair per family, first match wins.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import hidden_states_argument

__all__ = ["MLP_SUBLAYERS", "named_mlp_branches"]

#: ``(module read at its input, module read at its output)`` inside a block, in the order tried
MLP_SUBLAYERS = (
    ("norm2", "ls2"),                           # timm ViT Block (ls2: the layer scale, an Identity without one)
    ("norm2", "layer_scale2"),                  # Hugging Face DINOv2 (its layer scale)
    ("layernorm_after", "mlp"),                 # Hugging Face ViT / DeiT
    ("layernorm_after", "output.dense"),        # Hugging Face ViT / DeiT (older transformers)
    ("layer_norm2", "mlp"),                     # Hugging Face CLIP / SigLIP towers
    ("post_attention_layernorm", "mlp"),        # Llama, Mistral, Qwen (pre-norm decoders)
    ("ln_2", "ls_2"),                           # OpenCLIP ResidualAttentionBlock
    ("ln_2", "mlp"),                            # torchvision EncoderBlock, GPT-2
    ("intermediate", "output.dense"),           # BERT-family post-norm encoders
    ("ffn", "ffn"),                             # DistilBERT
)

#: per block: ``(input module, reader of E' from (args, kwargs), output module, reader of Ẽ' from its output)``
Branch = tuple[nn.Module, Callable[[tuple, dict], Any], nn.Module, Callable[[Any], Any]]


def first_output(output: Any) -> Any:
    """A module's output tensor (the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def named_mlp_branches(blocks: list, transpose: bool = False) -> list[Branch]:
    """Per block of ``blocks`` (``(block, reader)`` pairs of ``Adapter.block_inputs``) its MLP
    sublayer's input and output modules, ``[]`` when a block has no pair of :data:`MLP_SUBLAYERS`.
    ``transpose``: the tokens are ``(N, B, D)`` (a tower that is not batch first)."""

    def read_in(args: tuple, kwargs: dict) -> Any:
        x = hidden_states_argument(args, kwargs)
        return x.transpose(0, 1) if transpose and isinstance(x, torch.Tensor) else x

    def read_out(output: Any) -> Any:
        y = first_output(output)
        return y.transpose(0, 1) if transpose and isinstance(y, torch.Tensor) else y

    out = []
    for block, _ in blocks:
        modules = dict(block.named_modules())
        pair = next(((modules[i], modules[o]) for i, o in MLP_SUBLAYERS if i in modules and o in modules), None)
        if pair is None:
            return []
        out.append((pair[0], read_in, pair[1], read_out))
    return out
