"""Hugging Face decoders: causal language models and decoder sequence classifiers.

GPT-2, Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, Phi-3 and any other Hugging Face
decoder: ``*ForCausalLM`` (and ``GPT2LMHeadModel``), and ``*ForSequenceClassification`` whose
attention modules are causal (``is_causal``).

Attention is observed as for the encoders (:mod:`attnx.adapters.hf`): the model is switched to the
``eager`` kernel and run with ``output_attentions=True``. The eager kernels return the very
probabilities the attention product consumes, one map per query head (keys and values of
grouped-query attention are repeated before the product), over all ``N`` keys: causal and
sliding-window masks give exact zeros, and soft-capped scores (Gemma2) are capped before the
softmax as in the forward itself.

The explained position (the readout row) is where the model decides:

* a causal language model predicts the next token at the last real token of each sample
  (``T - 1`` with left padding, the generation convention; per sample with right padding). A
  padded batch is run with position ids counted over the real tokens, as ``generate`` does, so
  that a padded prompt is read as the prompt alone (GPT-2's absolute positions need it);
* a decoder sequence classifier pools what Hugging Face pools: the rightmost token that is not
  ``config.pad_token_id`` (the last position when the model has no pad token); a warning says
  when that is a padding token of the attention mask.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from ..core.batch import READOUT_LOGITS_ONLY, Batch, check_text_inputs
from ..core.layer_readout import LayerReadout
from ..core.layout import Layout
from ..core.targets import BoundContinuation
from ..errors import AttnxTypeError, AttnxValueError, UnsupportedModelError
from .base import block_output, refuse_pooling
from .hf import HFAdapter
from .loaded import loaded_class

__all__ = ["HFDecoderAdapter", "last_real_token", "pooled_token", "positions_from_mask"]

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
#: the names of a decoder's final norm, after its last layer
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def has_causal_attention(model: nn.Module) -> bool:
    """Whether the attention modules of a Hugging Face model are causal (``is_causal``)."""
    return any(getattr(m, "is_causal", None) is True for m in model.modules() if m is not model)


def last_real_token(valid: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the rightmost real token of each row of a ``(B, T)`` bool mask."""
    T = valid.shape[1]
    return (torch.arange(T, device=valid.device) * valid.long()).argmax(dim=1)


def pooled_token(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """``(B,)`` the token a Hugging Face decoder classifier pools: the rightmost one that is not
    ``pad_token_id`` (the last position without a pad token)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    return last_real_token(input_ids != pad_token_id)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens of ``mask`` ``(B, T)``, as ``generate`` makes
    them (padding gets 1, an arbitrary valid position)."""
    positions = mask.long().cumsum(dim=-1) - 1
    return positions.masked_fill(mask == 0, 1)


class HFDecoderAdapter(HFAdapter):
    """Adapter for Hugging Face causal language models and decoder sequence classifiers."""

    name = "hf_decoder"
    expects = "the dict a Hugging Face tokenizer returns (input_ids, attention_mask, ...)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        hf_model = loaded_class("transformers.modeling_utils", "PreTrainedModel")
        if hf_model is None or not isinstance(model, hf_model):
            return False
        name = type(model).__name__
        if name.endswith(CAUSAL_LM_SUFFIXES):
            return True
        return name.endswith("ForSequenceClassification") and has_causal_attention(model)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.is_text = True
        #: a language model (next-token logits at every position), not a classifier
        self.is_lm = type(model).__name__.endswith(CAUSAL_LM_SUFFIXES)
        self._forward_parameters: set[str] | None = None

    def pad_token_id(self) -> int | None:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "pad_token_id", None)

    # layout -------------------------------------------------------------------------------
    def prepare(self, inputs: Any) -> Batch:
        kwargs = check_text_inputs(inputs)
        ids = kwargs["input_ids"]
        B, T = ids.shape
        mask = kwargs.get("attention_mask")
        valid = None if mask is None else mask.bool()
        extra: dict = {}
        if self.is_lm:
            position = last_real_token(valid) if valid is not None else torch.full((B,), T - 1, dtype=torch.long, device=ids.device)
            if valid is not None and not valid.all() and "position_ids" not in kwargs:
                kwargs["position_ids"] = positions_from_mask(mask)
                extra["positions_from_mask"] = True
        else:
            position = pooled_token(ids, self.pad_token_id())
            if valid is not None:
                read = valid.gather(1, position[:, None]).squeeze(1)
                if not read.all():
                    bad = torch.nonzero(~read).flatten().tolist()
                    warnings.warn(
                        f"{type(self.model).__name__} reads sample(s) {bad} at a padding token of the attention "
                        f"mask (it pools the rightmost token that is not config.pad_token_id="
                        f"{self.pad_token_id()}); pad with the model's pad token so that it reads the last real token",
                        stacklevel=4,
                    )
        layout = Layout(num_tokens=T, prefix_tokens=0, readout=position, valid=valid, causal=True)
        return Batch(args=(), kwargs=kwargs, batch_size=B, layout=layout, device=ids.device, extra=extra)

    def append_continuation(self, batch: Batch, continuation: list[list[int]]) -> tuple[Batch, BoundContinuation]:
        """Append each sample's continuation after its last real token.

        The prompts are laid out left-padded (real tokens ending at ``T - 1``; a right-padded
        batch is rotated per sample), the continuations follow from position ``T`` (shorter ones
        right-padded), position ids count the real tokens. The layout reads the mean of the
        rows that predict the continuation tokens and maps the score columns back to the
        prompt as given (``Layout.columns``).
        """
        if not self.is_lm:
            raise AttnxTypeError(
                f"a continuation target needs a causal language model; {type(self.model).__name__} is a sequence classifier"
            )
        kwargs = batch.kwargs
        own = {"input_ids", "attention_mask"} | ({"position_ids"} if batch.extra.get("positions_from_mask") else set())
        other = sorted(k for k, v in kwargs.items() if k not in own and isinstance(v, torch.Tensor))
        if other:
            raise AttnxValueError(f"a continuation target rebuilds the token inputs; pass input_ids and attention_mask only, not {other}")
        ids = kwargs["input_ids"]
        B, T = ids.shape
        device = ids.device
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.dtype)
        valid = mask.bool()
        first = valid.long().argmax(dim=1)
        last = last_real_token(valid)
        if ((last - first + 1) != valid.sum(dim=1)).any():
            raise AttnxValueError("a continuation needs the real tokens of each prompt in one piece (padding only at the ends)")
        vocab = self.model.get_input_embeddings().num_embeddings
        for b, row in enumerate(continuation):
            if min(row) < 0 or max(row) >= vocab:
                raise AttnxValueError(f"continuation token ids of sample {b} must be in 0..{vocab - 1}, got {row}")
        shift = (T - 1 - last)[:, None]
        columns = (torch.arange(T, device=device)[None, :] + shift) % T  # where user column t goes
        rolled_ids = torch.empty_like(ids).scatter_(1, columns, ids)
        rolled_mask = torch.empty_like(mask).scatter_(1, columns, mask)
        K = max(len(row) for row in continuation)
        pad = self.pad_token_id()
        cont = torch.full((B, K), 0 if pad is None else pad, dtype=ids.dtype, device=device)
        cont_mask = torch.zeros(B, K, dtype=torch.bool, device=device)
        for b, row in enumerate(continuation):
            cont[b, : len(row)] = torch.tensor(row, dtype=ids.dtype, device=device)
            cont_mask[b, : len(row)] = True
        full_ids = torch.cat([rolled_ids, cont], dim=1)
        full_mask = torch.cat([rolled_mask, cont_mask.to(mask.dtype)], dim=1)
        positions = (T - 1 + torch.arange(K, device=device)).expand(B, K)
        weights = torch.zeros(B, T + K, dtype=torch.float64, device=device)
        weights[:, T - 1 : T - 1 + K] = cont_mask.to(torch.float64) / cont_mask.sum(dim=1, keepdim=True)
        layout = Layout(
            num_tokens=T + K,
            prefix_tokens=0,
            readout=weights,
            valid=full_mask.bool(),
            causal=True,
            columns=torch.where(valid, columns, torch.full_like(columns, -1)),
        )
        new = Batch(
            args=(),
            kwargs={"input_ids": full_ids, "attention_mask": full_mask, "position_ids": positions_from_mask(full_mask)},
            batch_size=B,
            layout=layout,
            device=device,
            extra={"input_ids": ids},
        )
        return new, BoundContinuation(positions.clone(), cont, cont_mask)

    def logits_window(self, batch: Batch) -> int | None:
        """How many last positions a language model needs logits for, when the target reads only
        the explained positions (:data:`attnx.core.batch.READOUT_LOGITS_ONLY`): from the first explained
        position on. The output layer is then applied to those positions only (Hugging Face's
        ``logits_to_keep``), which saves a (B, T, vocabulary) product and its backward."""
        layout = batch.layout
        if not (self.is_lm and batch.extra.get(READOUT_LOGITS_ONLY) and layout is not None):
            return None
        if "logits_to_keep" in batch.kwargs or "logits_to_keep" not in self.forward_parameters():
            return None
        readout = layout.readout
        if isinstance(readout, int):
            first = readout
        elif isinstance(readout, torch.Tensor) and readout.dim() == 1:
            first = int(readout.min())
        elif isinstance(readout, torch.Tensor) and readout.dim() == 2:
            read = torch.nonzero(readout.ne(0).any(dim=0)).flatten()
            first = int(read[0]) if read.numel() else 0
        else:
            return None
        first %= layout.num_tokens
        return layout.num_tokens - first if first > 0 else None

    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each layer's output through the decoder's final norm and its output layer (``lm_head``,
        on the positions the target reads, soft-capped as the model caps its logits; a classifier's
        ``score`` at the pooled token)."""
        refuse_pooling(self, pooling)
        model = self.model
        base = model.base_model
        norms = [getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)]
        if len(norms) != 1:
            raise UnsupportedModelError(
                f"{type(model).__name__}: found {len(norms)} final norms ({', '.join(FINAL_NORMS)}), expected one; its "
                "layers' outputs cannot be read through its head (legrad with start_layer=-1 reads the last layer only)"
            )
        norm = norms[0]
        blocks = [(block, block_output) for block, _ in self.block_inputs(batch)]
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        cap = getattr(text, "final_logit_softcapping", None)
        if self.is_lm:
            from transformers.modeling_outputs import CausalLMOutputWithPast as Output

            output_layer, window = model.get_output_embeddings(), self.logits_window(batch)

            def read(x: torch.Tensor) -> torch.Tensor:
                logits = output_layer(norm(x if window is None else x[:, -window:]))
                return logits if not cap else torch.tanh(logits / cap) * cap
        else:
            from transformers.modeling_outputs import SequenceClassifierOutputWithPast as Output

            position = batch.layout.readout

            def read(x: torch.Tensor) -> torch.Tensor:
                logits = model.score(norm(x))
                return logits[torch.arange(x.shape[0], device=logits.device), position.to(logits.device)]

        def head(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
            logits = read(tokens)
            return Output(logits=logits), logits

        return LayerReadout(blocks, head)

    def forward_parameters(self) -> set[str]:
        if self._forward_parameters is None:
            self._forward_parameters = set(inspect.signature(self.model.forward).parameters)
        return self._forward_parameters

    # capture (observe: the hf adapter's eager switch) ------------------------------------------
    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        kwargs = dict(batch.kwargs)
        kwargs.setdefault("use_cache", False)  # one forward over the whole sequence: no cache to build
        window = self.logits_window(batch)
        if window is not None:
            kwargs["logits_to_keep"] = window
        if self._recorder is not None:
            kwargs["output_attentions"] = True
        out = self.model(**kwargs, return_dict=True)
        self.record_attentions(out)
        return out, out.logits
