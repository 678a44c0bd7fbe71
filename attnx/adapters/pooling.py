"""What a classifier head reads: the pooling of timm ViT-like models, and attention-pool probes.

The readout of an explanation is the weighting of the last layer's token rows that the head
reads. timm declares it in attributes of the model (``global_pool``, ``pool_include_prefix``,
``num_prefix_tokens``, ``attn_pool``, ``head_dist``), the same for ``VisionTransformer``,
``Eva`` (EVA, EVA-02) and ``Beit``, also when the model sits inside a wrapper
(``nn.Sequential``). :class:`TimmPooling` turns those into a readout:

* ``token``: the class token (row 0);
* ``avg``: the mean of the patch rows (of every row with ``pool_include_prefix=True``);
* distilled DeiT in eval mode returns ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``: rows 0 and 1,
  each with weight 1/2;
* ``max``: row ``i`` weighs the share of the channels whose maximum it holds (the rows the
  head's gradient reaches, in the proportion of the channels through which it does);
  ``avgmax`` is half the mean and half that;
* ``map`` (an attention-pool probe): the probe's attention over the rows, averaged over its
  heads and latent queries, recorded in the same forward.

The weights of ``max``, ``avgmax`` and ``map`` depend on the input: they are read from the
pooling's input during the forward (:meth:`TimmPooling.capture`) and filled in afterwards
(:meth:`TimmPooling.complete`), outside any LRP pass.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core.layout import Layout
from ..errors import UnsupportedModelError

__all__ = ["TimmPooling", "probe_attention", "probe_weights"]


def probe_weights(attention: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` float64 readout of a probe's attention ``(B, [H,] Q, N)``: the mean over heads and queries."""
    a = attention.detach().to(torch.float64)
    a = a.flatten(1, -2).mean(1)
    return a / a.sum(-1, keepdim=True)


@contextlib.contextmanager
def probe_attention(head: nn.Module, attention_of: Callable[[nn.Module, tuple, Any], torch.Tensor | None],
                    store: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Record the attention of an attention-pooling ``head`` over the tokens while active.

    ``attention_of(module, args, output)`` returns the probe's attention ``(B, [H,] Q, N)`` (or
    ``None`` when the head did not give it, which is refused); ``store`` receives its
    :func:`probe_weights`.
    """

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        attention = attention_of(module, args, output)
        if attention is None or attention.dim() < 3:
            raise UnsupportedModelError(f"the attention pooling head {type(module).__name__} gave no probe attention")
        store(probe_weights(attention))

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _is_timm_vit_like(module: nn.Module) -> bool:
    return (
        type(module).__module__.startswith("timm.")
        and isinstance(getattr(module, "global_pool", None), str)
        and hasattr(module, "num_prefix_tokens")
        and hasattr(module, "patch_embed")
        and hasattr(module, "forward_head")
        and isinstance(getattr(module, "blocks", None), nn.Module)
    )


class TimmPooling:
    """The head pooling of a timm ViT-like model (``VisionTransformer``, ``Eva``, ``Beit``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._pool_input: torch.Tensor | None = None
        self.check()

    # read from the model on every use: reset_classifier(global_pool=...) changes them
    @property
    def pool(self) -> str:
        return self.model.global_pool

    @property
    def prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def include_prefix(self) -> bool:
        return bool(getattr(self.model, "pool_include_prefix", False))

    @property
    def attn_pool(self) -> nn.Module | None:
        return getattr(self.model, "attn_pool", None)

    @property
    def distilled(self) -> bool:
        return getattr(self.model, "head_dist", None) is not None

    def check(self) -> None:
        """Refuse a model whose head pools nothing (no class logits)."""
        if self.attn_pool is None and self.pool not in ("token", "avg", "max", "avgmax"):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} with global_pool={self.pool!r} has no class logits to explain "
                "(timm returns unpooled token features); create it with a pooling head"
            )

    @classmethod
    def find(cls, model: nn.Module) -> "TimmPooling | None":
        """The pooling of ``model``, or of the timm ViT-like model inside it (a wrapper)."""
        for module in model.modules():
            if _is_timm_vit_like(module) and (module.global_pool or getattr(module, "attn_pool", None) is not None):
                return cls(module)
        return None

    @property
    def dynamic(self) -> bool:
        """Whether the weights depend on the input (read during the forward)."""
        return not self.distilled and (self.attn_pool is not None or self.pool in ("max", "avgmax"))

    def pooled_rows(self, num_tokens: int) -> slice:
        """The rows the pooling reduces over (the attention pool's input too, except EVA's,
        which takes every token)."""
        return slice(0, num_tokens) if self.include_prefix else slice(self.prefix_tokens, num_tokens)

    def apply(self, layout: Layout) -> Layout:
        """``layout`` with the declared readout (input-dependent weights left to :meth:`complete`)."""
        self.check()
        N, p = layout.num_tokens, self.prefix_tokens
        if self.distilled and not (self.model.training and getattr(self.model, "distilled_training", False)):
            weights = torch.zeros(1, N, dtype=torch.float64)
            weights[0, :2] = 0.5
            layout.readout, layout.readout_name = weights, "mean of class and distillation tokens"
        elif self.attn_pool is not None:
            layout.readout, layout.readout_name = None, "probe attention (MAP head)"
        elif self.pool == "token":
            layout.readout, layout.readout_name = 0, "class token" if p > 0 else "token 0"
        elif self.include_prefix and p > 0:
            layout.readout = torch.full((1, N), 1.0 / N, dtype=torch.float64)
            layout.readout_name = f"mean of all {N} tokens (prefix tokens included)"
        else:
            pooled = N - p
            name = {"avg": f"mean of {pooled} patch tokens", "max": f"max over {pooled} patch tokens",
                    "avgmax": f"mean + max over {pooled} patch tokens"}[self.pool]
            layout.readout, layout.readout_name = None, name
        layout.readout_declared = True
        return layout

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the pooling's input of the forward run while active (input-dependent weights)."""
        self._pool_input = None
        if not self.dynamic:
            yield
            return
        if self.attn_pool is not None:
            def pre_hook(module: nn.Module, args: tuple) -> None:
                self._pool_input = args[0].detach()
            handle = self.attn_pool.register_forward_pre_hook(pre_hook)
        else:  # max / avgmax reduce the output of the final norm (forward_features)
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                self._pool_input = output.detach()
            handle = self.model.norm.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def complete(self, layout: Layout) -> Layout:
        """Fill in the input-dependent weights of the readout from the captured pooling input."""
        if not self.dynamic or self._pool_input is None:
            return layout
        x, N = self._pool_input, layout.num_tokens
        rows = self.pooled_rows(N)
        if self.attn_pool is not None and x.shape[1] == N:  # EVA's probe attends to every token
            rows = slice(0, N)
        weights = torch.zeros(x.shape[0], N, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            if self.attn_pool is not None:
                weights[:, rows] = probe_weights(self._timm_probe(x))
            else:
                weights[:, rows] = self._max_share(x[:, rows])
        layout.readout = weights
        return layout

    def _max_share(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` the share of the channels whose maximum each of the ``M`` pooled rows holds
        (``avgmax``: averaged with the uniform mean)."""
        B, M, D = tokens.shape
        winners = tokens.argmax(dim=1)  # (B, D): the row amax reads for each channel
        share = torch.zeros(B, M, dtype=torch.float64, device=tokens.device)
        share.scatter_add_(1, winners, torch.ones(B, D, dtype=torch.float64, device=tokens.device))
        share = share / D
        return 0.5 * share + 0.5 / M if self.pool == "avgmax" else share

    def _timm_probe(self, x: torch.Tensor) -> torch.Tensor:
        """The attention ``(B, H, Q, M)`` of timm's ``AttentionPoolLatent`` probe over its input ``x``."""
        m = self.attn_pool
        B, M, C = x.shape
        if getattr(m, "pos_embed", None) is not None:
            x = x + m.pos_embed.unsqueeze(0).to(x.dtype)
        H, d = m.num_heads, m.head_dim
        q = m.q(m.latent.expand(B, -1, -1)).reshape(B, m.latent_len, H, d).transpose(1, 2)
        k = m.kv(x).reshape(B, M, 2, H, d).permute(2, 0, 3, 1, 4)[0]
        q, k = m.q_norm(q), m.k_norm(k)
        return ((q * m.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
