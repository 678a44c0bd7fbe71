"""Swin Transformers (hierarchical, windowed attention): timm ``SwinTransformer`` /
``SwinTransformerV2`` and Hugging Face ``SwinForImageClassification`` /
``Swinv2ForImageClassification``.

A Swin block attends within windows of its stage's feature map (shifted every other block), and
stages are joined by patch merging (2x2 tokens concatenated, then a linear layer). Attention
methods need one token-by-token matrix per layer over one token set, which a windowed layer has
only when its window covers the whole feature map: one window, no shift, no padding. So:

* methods that read no attention (``lrp``, ``gradient_x_input``) explain the whole model at the
  pixels; their layout is the patch-embedding grid;
* attention methods read the blocks of the **last stage** -- the tokens the classifier averages --
  when its window is global at the input size (Swin-T at 224 px: one 7x7 window). Their layout is
  that stage's grid, the readout the mean of its tokens (the model's average pooling). Otherwise
  they raise, naming the methods that work.

Only the last-stage attention modules are switched (timm V1's ``fused_attn`` off, Hugging Face
Swin to the eager kernel) and hooked, and Hugging Face Swin's per-forward window clamp
(``set_shift_and_window_size`` writes to the layers) is undone after the call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..core.batch import Batch, check_image_batch
from ..core.layer_readout import LayerReadout
from ..core.layout import Layout
from ..core.recorder import AttentionRecorder
from ..errors import AttnxValueError, UnsupportedModelError
from .base import Adapter, block_output, refuse_pooling
from .loaded import loaded_class
from .switches import attn_implementation, attribute_switch

__all__ = ["TimmSwinAdapter", "HFSwinAdapter", "INPUT_METHODS"]

#: the methods that read no attention, hence explain any Swin at any input size
INPUT_METHODS = ("lrp", "gradient_x_input", "integrated_gradients", "occlusion")
_HF_SWIN = ("SwinForImageClassification", "Swinv2ForImageClassification")


@dataclass(frozen=True)
class Geometry:
    """Where the tokens of one input size go.

    Attributes
    ----------
    patch_grid:
        ``(h, w)`` of the patch embedding.
    stage_grid:
        ``(h, w)`` feature map of the last stage.
    windows:
        ``(window, shift)`` of every last-stage block at this size, each an ``(h, w)`` pair.
    """

    patch_grid: tuple[int, int]
    stage_grid: tuple[int, int]
    windows: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    @property
    def is_global(self) -> bool:
        """Every last-stage block attends over the whole feature map (one window, no shift, no padding)."""
        return all(w == self.stage_grid and not any(s) for w, s in self.windows)


def merged(grid: tuple[int, int]) -> tuple[int, int]:
    """The grid after patch merging (odd sizes are padded by one)."""
    return ((grid[0] + 1) // 2, (grid[1] + 1) // 2)


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if not isinstance(v, (tuple, list)) else (int(v[0]), int(v[1]))


class SwinAdapter(Adapter):
    """What every Swin family shares: the layouts and the global-window check.

    Subclasses give ``geometry(x)``, the last-stage taps (``taps``: modules to hook and how to read
    the probabilities from their output), the switches that make them materialise (``switches``)
    and ``run``.
    """

    expects = "an image batch tensor (B, C, H, W)"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._geometry: Geometry | None = None

    # to implement ---------------------------------------------------------------------------
    def geometry(self, x: torch.Tensor) -> Geometry:  # pragma: no cover - abstract
        raise NotImplementedError

    def taps(self) -> list[tuple[nn.Module, Callable[[Any], torch.Tensor]]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def switches(self) -> contextlib.AbstractContextManager:  # pragma: no cover - abstract
        raise NotImplementedError

    def pooled(self) -> bool:
        """Whether the classifier averages the last stage's tokens (the readout attention methods use)."""
        return True

    # layout ---------------------------------------------------------------------------------
    def image(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, Mapping):
            if "pixel_values" not in inputs:
                raise AttnxValueError(f"expected 'pixel_values' in the image inputs, got keys {sorted(inputs)}")
            inputs = inputs["pixel_values"]
        return check_image_batch(inputs, None)

    def prepare(self, inputs: Any) -> Batch:
        x = self.image(inputs)
        self._geometry = self.geometry(x)
        layout = Layout.for_image(x, self._geometry.patch_grid, prefix_tokens=0, readout=None)
        return Batch(args=(x,), kwargs={}, batch_size=x.shape[0], layout=layout, device=x.device)

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        """Attention passes read the last stage: its grid, read at the mean of its tokens."""
        g = self.geometry(batch.args[0]).stage_grid
        if num_tokens != g[0] * g[1]:
            raise RuntimeError(f"adapter {self.name!r} expected {g[0] * g[1]} last-stage tokens, the attention saw {num_tokens}")
        return Layout.for_image(batch.args[0], g, prefix_tokens=0, readout=None)

    def refuse(self, why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{type(self.model).__name__}: {why}; attention methods read the last stage of a Swin "
            f"model only when one window covers its whole feature map. Methods that work for this "
            f"model at this size: {', '.join(INPUT_METHODS)} (relevance at the pixels)"
        )

    # capture --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        g = self._geometry
        if g is None:
            raise RuntimeError("observe() before prepare()")
        if not self.pooled():
            raise self.refuse("its classifier does not average the last stage's tokens")
        if not g.is_global:
            sizes = sorted({f"{w[0]}x{w[1]}" + (f" shifted {s[0]},{s[1]}" if any(s) else "") for w, s in g.windows})
            raise self.refuse(
                f"at this input size its last stage is a {g.stage_grid[0]}x{g.stage_grid[1]} feature map "
                f"attended in windows of {', '.join(sizes)}"
            )

        def hook(module: nn.Module, args: tuple, output: Any, read: Callable[[Any], torch.Tensor]) -> None:
            recorder.record(read(output))

        handles = []
        try:
            with self.switches():
                for module, read in self.taps():
                    handles.append(module.register_forward_hook(lambda m, a, o, read=read: hook(m, a, o, read)))
                yield
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
class TimmSwinAdapter(SwinAdapter):
    """timm ``SwinTransformer`` and ``SwinTransformerV2``: the last stage's ``attn.attn_drop``
    (an ``nn.Dropout``, the identity in eval mode) outputs the probabilities ``A @ v`` consumes;
    V1's ``fused_attn`` is switched off on those blocks while observing."""

    name = "timm_swin"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        swins = (loaded_class("timm.models.swin_transformer", "SwinTransformer"),
                 loaded_class("timm.models.swin_transformer_v2", "SwinTransformerV2"))
        return isinstance(model, tuple(c for c in swins if c is not None))

    def blocks(self) -> list[nn.Module]:
        return list(self.model.layers[-1].blocks)

    def geometry(self, x: torch.Tensor) -> Geometry:
        pe = self.model.patch_embed
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if getattr(self.model, "dynamic_img_size", False):
            grid = pair(pe.dynamic_feat_size((H, W)))
        else:
            expected = pair(pe.img_size)
            if (H, W) != expected:
                raise AttnxValueError(
                    f"the model expects {expected[0]}x{expected[1]} images, got {H}x{W}; create it with "
                    "strict_img_size=False (or dynamic_img_size=True) to explain other sizes"
                )
            grid = pair(pe.grid_size)
        patch = grid
        for stage in self.model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                grid = merged(grid)
        windows = tuple((pair(b.window_size), pair(b.shift_size)) for b in self.blocks())
        return Geometry(patch, grid, windows)

    def pooled(self) -> bool:
        return getattr(self.model, "global_pool", "avg") == "avg"

    def taps(self):
        return [(b.attn.attn_drop, lambda out: out) for b in self.blocks()]

    def switches(self):
        return attribute_switch([(b.attn, "fused_attn", False) for b in self.blocks() if hasattr(b.attn, "fused_attn")])

    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each last-stage block's output (``(B, h, w, C)``, read as ``(B, h·w, C)``) through the
        model's ``norm`` and ``forward_head`` (average pooling and the head)."""
        refuse_pooling(self, pooling)
        model = self.model
        grid: dict[str, tuple[int, int]] = {}

        def tokens(args: tuple, kwargs: dict, output: Any) -> Any:
            x = block_output(args, kwargs, output)
            if isinstance(x, torch.Tensor) and x.dim() == 4:
                grid["hw"] = (x.shape[1], x.shape[2])
                return x.flatten(1, 2)
            return x

        def head(t: torch.Tensor) -> tuple[Any, torch.Tensor]:
            h, w = grid["hw"]
            out = model.forward_head(model.norm(t.reshape(t.shape[0], h, w, t.shape[-1])))
            return out, out

        return LayerReadout([(b, tokens) for b in self.blocks()], head)

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        out = self.model(*batch.args)
        return out, out


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------
class HFSwinAdapter(SwinAdapter):
    """Hugging Face ``SwinForImageClassification`` (the last stage's ``SwinAttention`` returns its
    probabilities with the eager kernel) and ``Swinv2ForImageClassification`` (the probabilities
    pass through ``attention.self.dropout``, an ``nn.Dropout``)."""

    name = "hf_swin"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in _HF_SWIN and hasattr(model, "config")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.v2 = type(model).__name__.startswith("Swinv2")
        self.base = getattr(model, model.base_model_prefix)

    def layers(self) -> list[nn.Module]:
        return [b for stage in self.base.encoder.layers for b in stage.blocks]

    def blocks(self) -> list[nn.Module]:
        return list(self.base.encoder.layers[-1].blocks)

    def geometry(self, x: torch.Tensor) -> Geometry:
        p = pair(self.base.embeddings.patch_embeddings.patch_size)
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if H % p[0] or W % p[1]:
            raise AttnxValueError(f"image size {H}x{W} is not a multiple of the model's patch size {p[0]}x{p[1]}")
        grid = patch = (H // p[0], W // p[1])
        for stage in list(self.base.encoder.layers)[:-1]:
            if stage.downsample is not None:
                grid = merged(grid)
        windows = []
        for b in self.blocks():
            ws, shift = int(b.window_size), int(b.shift_size)
            if not self.v2 and min(grid) <= ws:  # what SwinLayer.set_shift_and_window_size does at each call
                ws, shift = min(grid), 0
            windows.append(((ws, ws), (shift, shift)))
        return Geometry(patch, grid, tuple(windows))

    def taps(self):
        if self.v2:
            return [(b.attention.self.dropout, lambda out: out) for b in self.blocks()]
        return [(b.attention, lambda out: out[1]) for b in self.blocks()]

    def switches(self):
        return contextlib.nullcontext() if self.v2 else attn_implementation(self.model, "eager")

    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """Each last-stage block's output through the model's ``layernorm``, average ``pooler`` and
        ``classifier``."""
        refuse_pooling(self, pooling)
        from transformers.modeling_outputs import ImageClassifierOutput

        model, base = self.model, self.base

        def head(t: torch.Tensor) -> tuple[Any, torch.Tensor]:
            logits = model.classifier(torch.flatten(base.pooler(base.layernorm(t).transpose(1, 2)), 1))
            return ImageClassifierOutput(logits=logits), logits

        return LayerReadout([(b, block_output) for b in self.blocks()], head)

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        # Swin V1 layers clamp their own window_size / shift_size to the input at every call
        state = [(b, n, getattr(b, n)) for b in self.layers() for n in ("window_size", "shift_size")]
        with attribute_switch(state):
            out = self.model(pixel_values=batch.args[0], return_dict=True)
        return out, out.logits
