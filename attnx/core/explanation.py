"""The result of explaining a batch."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch

from .. import viz
from ..errors import AttnxValueError, NonFiniteMapError
from ..lrp.coverage import Coverage
from .layout import Layout, normalize_per_sample, scores_to_map

__all__ = ["Explanation"]


@dataclass
class Explanation:
    """Relevance of the content tokens of a batch for the explained class of each sample.

    Attributes
    ----------
    scores:
        ``(B, P)`` relevance of the readout token's row over the content tokens: image patches
        in row-major grid order (prefix tokens excluded), or all ``T`` text tokens (special ones
        included, padding set to 0).
    grid:
        ``(h, w)`` patch grid for images, ``None`` for text.
    targets:
        ``(B,)`` class (or, for a language model, token id) explained for each sample (``None``
        for a callable or a continuation target).
    logits:
        ``(B, C)`` logits of the model on the batch; for a language model the next-token logits
        at the explained position.
    method:
        Name of the method, and ``options`` the options it ran with.
    token_relevance:
        ``(B, N)`` relevance of every token, prefix tokens included.
    layout:
        The token layout (prefix tokens, readout token, padding mask, input size).
    input_ids:
        ``(B, T)`` token ids for text, ``None`` for images.
    input_relevance:
        Relevance at the input for LRP-style methods: ``(B, C, H, W)`` pixels or ``(B, T, D)``
        token embeddings.
    pixel_relevance:
        ``(B, H, W)`` relevance per pixel (channels summed) for LRP-style methods on images;
        their heat map is drawn from it.
    coverage:
        What the LRP pass did with every relevance-carrying op (LRP-style methods).
    target_scores:
        ``(B,)`` the explained scalars (the target logit, a callable's value, a continuation's
        summed log-probability).
    explained_tokens:
        ``(B, K)`` for language models: the explained token(s) after the prompt, the next token
        (``K = 1``) or a continuation (``-1`` pads shorter ones); ``None`` otherwise.
    readout:
        The rows of the last layer the explanation reads, as the model's head does:
        ``readout.description`` ("class token", "mean of 196 patch tokens", "probe attention (MAP
        head)", ...) and ``readout.weights`` ``(B, N)``; ``None`` for methods that read no
        attention row (LRP to the input starts at the logits). See :mod:`attnx.core.readout`.
    class_names, multi_label:
        The class names the model carries and whether its head is multi-label (one sigmoid per
        class); the pictures title with them (:func:`attnx.viz.target_label`).
    claimed_total:
        ``(B,)`` float64: what the method claims the relevance of each sample sums to (its
        ``conserves`` declaration, :func:`attnx.register_method`: LRP under a conserving preset,
        the relevance put on the logits; integrated gradients, ``y_t(x) − y_t(x')``); ``None``
        for a method that claims no conservation. See :meth:`completeness_error`.
    """

    scores: torch.Tensor
    grid: tuple[int, int] | None
    targets: torch.Tensor | None
    logits: torch.Tensor
    method: str
    options: dict = field(default_factory=dict)
    token_relevance: torch.Tensor | None = None
    layout: Layout | None = None
    input_ids: torch.Tensor | None = None
    input_relevance: torch.Tensor | None = None
    pixel_relevance: torch.Tensor | None = None
    coverage: Coverage | None = None
    target_scores: torch.Tensor | None = None
    explained_tokens: torch.Tensor | None = None
    readout: Any = None
    class_names: list[str] | None = None
    multi_label: bool = False
    claimed_total: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.scores.shape[0]

    @classmethod
    def concatenate(cls, parts: Sequence["Explanation"]) -> "Explanation":
        """One explanation of consecutive sub-batches explained with the same method and options
        (:mod:`attnx.core.sub_batches`): the per-sample fields joined along the batch."""
        first = parts[0]
        if any(p.method != first.method or p.grid != first.grid for p in parts):
            raise AttnxValueError("only explanations of one method on inputs of one size are concatenated")
        sizes = [len(p) for p in parts]
        joined = {f.name: join_per_sample([getattr(p, f.name) for p in parts], sizes) for f in fields(cls)
                  if f.name not in ("layout", "coverage", "readout")}
        joined["layout"] = join_layouts([p.layout for p in parts], sizes)
        joined["coverage"] = join_coverage([p.coverage for p in parts])
        readouts = [p.readout for p in parts]
        joined["readout"] = None if first.readout is None else replace(
            first.readout, description=", ".join(dict.fromkeys(r.description for r in readouts)),
            weights=torch.cat([r.weights for r in readouts]),
        )
        return cls(**joined)

    @property
    def probabilities(self) -> torch.Tensor:
        """``(B, C)`` softmax of the logits."""
        return self.logits.float().softmax(dim=-1)

    @property
    def relevance_total(self) -> torch.Tensor:
        """``(B,)`` float64: the relevance of each sample summed: over ``input_relevance`` (every
        pixel and channel, or every token embedding entry) when the method has it, else over the
        token relevance (prefix tokens included), else over the scores."""
        for r in (self.input_relevance, self.token_relevance, self.scores):
            if r is not None:
                return r.detach().to(torch.float64).reshape(r.shape[0], -1).sum(1)
        raise AttnxValueError("this explanation holds no relevance")  # pragma: no cover - scores always exist

    def completeness_error(self) -> torch.Tensor | None:
        """``(B,)`` float64: the relative completeness error ``|Σ R − claimed| / |claimed|`` of each
        sample against the total the method claims (:attr:`claimed_total`; NaN where the claim is
        0), or ``None`` for a method that claims no conservation."""
        if self.claimed_total is None:
            return None
        claimed = self.claimed_total.detach().to(torch.float64).cpu()
        gap = (self.relevance_total.cpu() - claimed).abs()
        return torch.where(claimed != 0, gap / claimed.abs(), torch.full_like(gap, float("nan")))

    @property
    def input_size(self) -> tuple[int, int] | None:
        return None if self.layout is None else self.layout.input_size

    def patch_map(self) -> torch.Tensor:
        """``(B, h, w)`` raw scores on the patch grid."""
        if self.grid is None:
            raise AttnxValueError("this explanation is of text: it has token scores but no patch grid")
        return self.scores.reshape(self.scores.shape[0], *self.grid)

    def heatmap(self, size: tuple[int, int] | int | None = None) -> torch.Tensor:
        """``(B, H, W)`` heat map, bilinearly upsampled and min-max normalised per sample.

        Parameters
        ----------
        size:
            Output ``(H, W)`` (or one int for a square map); default the input image size.
        """
        if self.grid is None:
            raise AttnxValueError("this explanation is of text: use .scores (one value per token) instead of a heat map")
        if size is None:
            size = self.input_size or self.grid
        elif isinstance(size, int):
            size = (size, size)
        pixels = self.pixel_relevance
        if pixels is not None:  # pixel-level methods (LRP to the input) draw their own map
            maps = pixels[:, None].to(self.scores.dtype)
            if tuple(size) != tuple(maps.shape[-2:]):
                maps = torch.nn.functional.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
            maps = maps[:, 0]
        else:
            maps = scores_to_map(self.scores, self.grid, size)
        bad = torch.nonzero(~torch.isfinite(maps.flatten(1)).all(1)).flatten().tolist()
        if bad:  # min-max normalisation would turn them into a blank picture
            raise NonFiniteMapError(f"the {self.method!r} map of sample(s) {bad} has NaN or infinite values: no heat map")
        return normalize_per_sample(maps)

    def show(self, images: torch.Tensor | None = None, tokenizer: Any = None, **kwargs: Any) -> Any:
        """A picture of the explanation: heat-map overlays on ``images`` (a matplotlib figure), or
        for text, HTML with signed token colouring (needs the ``tokenizer``; displayed inline in a
        notebook). See :mod:`attnx.viz` for the options."""
        if self.grid is not None:
            if images is None:
                raise AttnxValueError("pass the images the explanation was computed on: e.show(images)")
            return viz.show(self, images, **kwargs)
        if tokenizer is None:
            raise AttnxValueError("pass the tokenizer to show a text explanation: e.show(tokenizer=tok)")
        page = viz.text_html(self, tokenizer, **kwargs)
        try:
            from IPython.display import HTML

            return HTML(page)
        except ImportError:
            return page

    def _repr_html_(self) -> str:
        """The interactive view in a notebook: the maps (the images are not stored on an
        explanation: ``attnx.report.explanation_html(e, images)`` draws the maps over them), or for
        text the token ids on signed colours (``attnx.report.explanation_html(e, tokenizer=tok)``
        shows the word pieces)."""
        from ..report import explanation_html

        return explanation_html(self)

    def __repr__(self) -> str:
        kind = f"grid={self.grid}" if self.grid is not None else f"tokens={self.scores.shape[1]}"
        t = None if self.targets is None else self.targets.tolist()
        return f"Explanation(method={self.method!r}, batch={len(self)}, {kind}, targets={t})"


def join_layouts(layouts: list[Layout | None], sizes: list[int]) -> Layout | None:
    """The layout of consecutive sub-batches of one token layout (their per-sample tensors joined)."""
    first = layouts[0]
    if first is None:
        return None
    if any(lay.num_tokens != first.num_tokens for lay in layouts):
        raise AttnxValueError("explanations of inputs of different token counts are not concatenated")
    valid = None
    if any(lay.valid is not None for lay in layouts):
        valid = torch.cat([lay.valid_mask(n, lay.valid.device if lay.valid is not None else "cpu")
                           for lay, n in zip(layouts, sizes)])
    return replace(first, readout=join_per_sample([lay.readout for lay in layouts], sizes), valid=valid,
                   columns=join_per_sample([lay.columns for lay in layouts], sizes))


def join_per_sample(values: list[Any], sizes: list[int]) -> Any:
    """Per-sample tensors (one row per sample of each part, ``sizes``) joined along the batch;
    anything else is the same in every part and taken from the first: the method, its options,
    an ``int`` readout, a layout tensor with one row for every sample (a readout weighting the
    same rows in each)."""
    first = values[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return first
    if all(v.shape[0] == n for v, n in zip(values, sizes)):
        return torch.cat(values)
    return first


def join_coverage(coverages: list[Coverage | None]) -> Coverage | None:
    """The coverage of the parts' LRP passes: the calls of each rule and uncovered op summed."""
    if coverages[0] is None:
        return None
    handled: dict = {}
    uncovered: dict = {}
    where: dict = {}
    for c in coverages:
        for k, v in c.handled.items():
            handled[k] = handled.get(k, 0) + v
        for k, v in c.uncovered.items():
            uncovered[k] = uncovered.get(k, 0) + v
        for k, v in c.where.items():
            where[k] = tuple(dict.fromkeys(where.get(k, ()) + v))
    return Coverage(coverages[0].preset, handled, uncovered, where)
