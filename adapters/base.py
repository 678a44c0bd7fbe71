"""The adapter protocol: what attnx needs to know about one architecture family.

An adapter answers four questions about a model (see ``Adapter``):

1. ``matches(model)`` -- is this model mine?
2. ``observe(recorder)`` -- how to make the post-softmax attention probabilities of every layer
   observable during a forward, as tensors inside the autograd graph, and how to undo every
   change afterwards (also on exceptions).
3. ``prepare(inputs)`` -- the token layout for these inputs (prefix tokens, patch grid, padding).
4. ``call(batch)`` -- run the model and return the classification logits ``(B, C)``.

Adapters hold architecture knowledge only; they never do explanation math.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "Adapter",
    "AttentionRecorder",
    "Batch",
    "Layout",
    "UnsupportedModelError",
    "check_image_batch",
    "temporarily_set",
]


class UnsupportedModelError(TypeError):
    """Raised when no adapter can make a model's attention observable."""


@dataclass
class Layout:
    """Where the tokens of a batch come from.

    Attributes
    ----------
    num_tokens:
        N, the sequence length seen by the attention layers.
    prefix_tokens:
        Number of leading tokens that are not content (class, distillation and register tokens).
        For text this is 0: every word piece, special ones included, is content.
    readout:
        Index of the token whose row is read (the class token), or ``None`` when the model pools
        the content tokens; then the mean of the content rows is read.
    grid:
        ``(h, w)`` patch grid of the content tokens in row-major order, ``None`` for text.
    input_size:
        ``(H, W)`` of the input images, ``None`` for text.
    valid:
        ``(B, N)`` bool mask of real (non-padding) tokens, or ``None`` when every token is real.
    """

    num_tokens: int
    prefix_tokens: int
    readout: int | None
    grid: tuple[int, int] | None = None
    input_size: tuple[int, int] | None = None
    valid: torch.Tensor | None = None

    @property
    def num_content(self) -> int:
        return self.num_tokens - self.prefix_tokens

    def valid_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``(B, N)`` bool mask of real tokens."""
        if self.valid is not None:
            return self.valid.to(device=device, dtype=torch.bool)
        return torch.ones(batch_size, self.num_tokens, dtype=torch.bool, device=device)

    def content_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``(B, N)`` bool mask of real content tokens (prefix tokens and padding excluded)."""
        mask = self.valid_mask(batch_size, device).clone()
        mask[:, : self.prefix_tokens] = False
        return mask


@dataclass
class Batch:
    """Validated inputs, ready to be passed to the model."""

    args: tuple
    kwargs: dict
    batch_size: int
    layout: Layout
    device: torch.device
    extra: dict = field(default_factory=dict)

    def select(self, index: torch.Tensor | Sequence[int]) -> "Batch":
        """The sub-batch of the given samples (used to explain sample by sample)."""
        index = torch.as_tensor(index, dtype=torch.long)

        def take(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.batch_size:
                return v[index.to(v.device)]
            return v

        layout = Layout(**{**self.layout.__dict__, "valid": take(self.layout.valid)})
        return Batch(
            args=tuple(take(a) for a in self.args),
            kwargs={k: take(v) for k, v in self.kwargs.items()},
            batch_size=len(index),
            layout=layout,
            device=self.device,
            extra={k: take(v) for k, v in self.extra.items()},
        )


class AttentionRecorder:
    """Collects the attention probabilities of one forward pass, in call order.

    Each entry holds the probabilities ``A`` as ``(B, H, N, N)`` and the tensor to differentiate
    the target with respect to (usually ``A`` itself; for ``nn.MultiheadAttention`` the head-flat
    ``(B*H, N, N)`` tensor that the attention product actually consumed).
    """

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.grad_wrt: list[torch.Tensor] = []

    def record(self, probs: torch.Tensor, grad_wrt: torch.Tensor | None = None) -> None:
        if probs.dim() != 4:
            raise ValueError(f"attention probabilities must be (B, H, N, N), got shape {tuple(probs.shape)}")
        self.probs.append(probs)
        self.grad_wrt.append(probs if grad_wrt is None else grad_wrt)

    def __len__(self) -> int:
        return len(self.probs)

    def gradients(self, score: torch.Tensor) -> list[torch.Tensor]:
        """``d score / d A`` for every recorded layer, shaped like the probabilities."""
        needs = [t.requires_grad for t in self.grad_wrt]
        if not any(needs):
            raise RuntimeError(
                "the recorded attention probabilities are not part of an autograd graph; "
                "was the forward run under torch.no_grad() or torch.inference_mode()?"
            )
        wrt = [t for t, n in zip(self.grad_wrt, needs) if n]
        grads = iter(torch.autograd.grad(score, wrt, allow_unused=True))
        out = []
        for probs, n in zip(self.probs, needs):
            g = next(grads) if n else None
            out.append(torch.zeros_like(probs) if g is None else g.reshape(probs.shape))
        return out


@contextlib.contextmanager
def temporarily_set(items: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set ``obj.name = value`` for each triple, restoring every old value on exit."""
    saved = []
    try:
        for obj, name, value in items:
            saved.append((obj, name, obj.__dict__[name] if name in obj.__dict__ else getattr(obj, name)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def check_image_batch(inputs: Any, channels: int | None) -> torch.Tensor:
    """Validate an image batch ``(B, C, H, W)`` and return it."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"expected an image batch tensor of shape (B, C, H, W), got {type(inputs).__name__}"
        )
    if inputs.dim() == 3:
        raise ValueError(
            f"expected an image batch of shape (B, C, H, W), got a single image of shape "
            f"{tuple(inputs.shape)}; add a batch dimension with x.unsqueeze(0)"
        )
    if inputs.dim() != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError("the image batch is empty (B = 0)")
    if not inputs.is_floating_point():
        raise TypeError(f"expected a floating point image batch, got dtype {inputs.dtype}")
    if channels is not None and inputs.shape[1] != channels:
        raise ValueError(
            f"the model expects {channels} input channels, got an image batch of shape "
            f"{tuple(inputs.shape)} (B, C, H, W)"
        )
    if not torch.isfinite(inputs).all():
        raise ValueError("the image batch contains NaN or infinite values")
    return inputs


class Adapter:
    """Base class of the architecture adapters.

    Subclasses set ``name`` and implement ``matches``, ``prepare``, ``observe`` and ``call``.
    Register new ones with :func:`attnx.adapters.register_adapter`.
    """

    name: ClassVar[str] = "base"
    #: what users can pass as ``inputs``, used in error messages
    expects: ClassVar[str] = "inputs"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, inputs: Any) -> Batch:  # pragma: no cover - abstract
        """Validate ``inputs`` and describe their token layout."""
        raise NotImplementedError

    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:  # pragma: no cover - abstract
        """Make the attention probabilities observable while the context is active."""
        raise NotImplementedError
        yield

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:  # pragma: no cover - abstract
        """Run the model; return its raw output and the logits ``(B, C)``."""
        raise NotImplementedError

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        """The layout of ``batch``, checked against the token count the attention layers saw."""
        if batch.layout.num_tokens != num_tokens:
            raise RuntimeError(
                f"adapter {self.name!r} expected {batch.layout.num_tokens} tokens but the attention "
                f"layers saw {num_tokens}"
            )
        return batch.layout

    def input_embeddings(self) -> nn.Module | None:
        """The module whose output is the first relevance-carrying activation for integer inputs."""
        return None

    # helpers shared by the image adapters -------------------------------------------------
    @staticmethod
    def image_layout(
        x: torch.Tensor, grid: tuple[int, int], prefix_tokens: int, readout: int | None
    ) -> Layout:
        h, w = int(grid[0]), int(grid[1])
        return Layout(
            num_tokens=prefix_tokens + h * w,
            prefix_tokens=prefix_tokens,
            readout=readout,
            grid=(h, w),
            input_size=(int(x.shape[-2]), int(x.shape[-1])),
        )


def infer_image_layout(x: torch.Tensor, num_tokens: int) -> Layout:
    """Guess the layout of an image model nobody wrote an adapter for.

    The smallest number of prefix tokens ``p`` is chosen such that ``N - p`` patches tile the
    image with square patches (``h * w = N - p`` and ``H / h == W / w``). The first prefix token
    is taken as the readout token; with no prefix token the mean of the patch rows is read.
    """
    H, W = int(x.shape[-2]), int(x.shape[-1])
    for p in range(0, min(num_tokens, 17)):
        n = num_tokens - p
        h = math.isqrt(max(1, round(n * H / W)))
        for hh in (h - 1, h, h + 1):
            if hh <= 0 or n % hh:
                continue
            ww = n // hh
            if abs(H / hh - W / ww) < 1e-6 * max(H, W):
                return Adapter.image_layout(x, (hh, ww), p, 0 if p > 0 else None)
    raise ValueError(
        f"cannot infer the patch grid of a {H}x{W} image from {num_tokens} attention tokens; "
        "write an adapter for this model (see attnx.adapters.register_adapter)"
    )


def check_text_inputs(inputs: Any) -> dict:
    """Validate the dict a Hugging Face tokenizer returns and return a plain dict of tensors."""
    if not isinstance(inputs, Mapping):
        raise TypeError(
            "expected the dict a Hugging Face tokenizer returns (input_ids, attention_mask, ...) "
            f"with return_tensors='pt', got {type(inputs).__name__}"
        )
    inputs = dict(inputs)
    if "input_ids" not in inputs:
        raise ValueError(f"the text inputs have no 'input_ids' (got keys {sorted(inputs)})")
    for k, v in inputs.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"text input {k!r} must be a tensor (use return_tensors='pt'), got {type(v).__name__}")
    ids = inputs["input_ids"]
    if ids.dim() == 1:
        raise ValueError(
            f"expected input_ids of shape (B, T), got shape {tuple(ids.shape)}; "
            "add a batch dimension or use return_tensors='pt'"
        )
    if ids.dim() != 2:
        raise ValueError(f"expected input_ids of shape (B, T), got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError("the text batch is empty (B = 0)")
    if ids.shape[1] == 0:
        raise ValueError("the text is empty (T = 0 tokens)")
    mask = inputs.get("attention_mask")
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, expected the shape of input_ids {tuple(ids.shape)}"
            )
        if (mask.sum(-1) == 0).any():
            raise ValueError("a sample of the text batch has no tokens (its attention_mask is all zeros)")
    return inputs
