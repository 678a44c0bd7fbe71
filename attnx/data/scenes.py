"""Cluttered Fashion-MNIST scenes with exact per-class ground-truth masks.

Each scene is an RGB canvas with one or two garments of *different* classes, each at a random
position, scale and tint, on a cluttered background: smooth colour noise, random strokes and blobs
and faint fragments of other garments (ignored by the labels). Garments never overlap and the clutter
lies behind them, so the mask of a garment is exact: the pixels where its resampled Fashion-MNIST
intensity (before tinting) exceeds :data:`MASK_THRESHOLD`.

Training scenes draw garments from the Fashion-MNIST train split, held-out scenes from the t10k
split. Everything is deterministic given ``seed`` (one ``torch.Generator``, CPU float32 arithmetic).

>>> s = make_scenes(8, split="test", seed=0)
>>> s.images.shape, s.labels.shape, s.masks.shape
(torch.Size([8, 3, 64, 64]), torch.Size([8, 10]), torch.Size([8, 10, 64, 64]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AttnxValueError
from .fashion import CLASS_NAMES, load_fashion_mnist

__all__ = ["CLASS_NAMES", "MASK_THRESHOLD", "Scenes", "make_scenes", "render_scenes"]

NUM_CLASSES = len(CLASS_NAMES)
MASK_THRESHOLD = 0.08
"""A pixel belongs to a garment where its resampled intensity (in [0, 1], before tint) exceeds this."""


@dataclass
class Scenes:
    """A batch of scenes.

    Attributes
    ----------
    images:
        ``(N, 3, H, W)`` float32 in ``[0, 1]``.
    labels:
        ``(N, 10)`` float32 multi-hot: 1 for every garment class in the scene.
    masks:
        ``(N, 10, H, W)`` bool: the pixels of the garment of each class (empty for absent classes).
    classes:
        ``(N, 2)`` int64 class of each object slot, ``-1`` for an empty second slot.
    boxes:
        ``(N, 2, 4)`` float32 ``(x0, y0, width, height)`` in pixels of each garment's 28x28 source
        square on the canvas (zeros for an empty slot).
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    classes: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_objects(self) -> torch.Tensor:
        """``(N,)`` number of garments per scene."""
        return (self.classes >= 0).sum(1)

    def __getitem__(self, index) -> "Scenes":
        return Scenes(*(t[index] for t in (self.images, self.labels, self.masks, self.classes, self.boxes)))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Compact arrays (uint8 images, bit-packed masks) for ``np.savez_compressed``."""
        return {
            "images": (self.images * 255).round().clamp(0, 255).to(torch.uint8).numpy(),
            "labels": self.labels.to(torch.uint8).numpy(),
            "masks": np.packbits(self.masks.numpy(), axis=-1),
            "classes": self.classes.numpy(),
            "boxes": self.boxes.numpy(),
        }

    @classmethod
    def from_numpy(cls, arrays) -> "Scenes":
        """Inverse of :meth:`to_numpy` (images are then quantised to 1/255)."""
        images = torch.from_numpy(np.asarray(arrays["images"])).float() / 255
        width = images.shape[-1]
        masks = np.unpackbits(np.asarray(arrays["masks"]), axis=-1, count=width).astype(bool)
        return cls(
            images=images,
            labels=torch.from_numpy(np.asarray(arrays["labels"])).float(),
            masks=torch.from_numpy(masks),
            classes=torch.from_numpy(np.asarray(arrays["classes"])).long(),
            boxes=torch.from_numpy(np.asarray(arrays["boxes"])).float(),
        )


# --------------------------------------------------------------------------------------------
# sampling helpers (all draws go through one torch.Generator)
# --------------------------------------------------------------------------------------------
def _uniform(g: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (high - low) + low


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(...,)`` hue/saturation/value in [0, 1] -> ``(..., 3)`` RGB."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = (torch.minimum(k, 4 - k)).clamp(0, 1)
    return v[..., None] - v[..., None] * s[..., None] * f


def _random_colors(g: torch.Generator, shape, sat: tuple[float, float], val: tuple[float, float]) -> torch.Tensor:
    h = torch.rand(shape, generator=g)
    return _hsv_to_rgb(h, _uniform(g, shape, *sat), _uniform(g, shape, *val))


def _paste(sources: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
           window: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``(N, 1, h, w)`` sources into ``(N, 1, size, size)`` canvases, bilinearly.

    ``boxes`` ``(N, 4)`` is where the source (or its sub-``window`` ``(N, 4)`` in source-normalised
    ``(x0, y0, w, h)`` coordinates, default the whole source) lands on the canvas, in pixels.
    Outside the box the result is 0.
    """
    n = sources.shape[0]
    x0, y0, bw, bh = boxes.unbind(-1)
    if window is None:
        window = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(n, 4)
    wx, wy, ww, wh = window.unbind(-1)
    # canvas normalised coordinate u in [-1, 1] (align_corners=False) -> source normalised coordinate
    sx = size / bw * ww
    sy = size / bh * wh
    tx = ((size - 2 * x0) / bw - 1) * ww + (2 * wx + ww - 1)
    ty = ((size - 2 * y0) / bh - 1) * wh + (2 * wy + wh - 1)
    if flip is not None:  # mirror the source horizontally about its window's centre
        centre = 2 * wx + ww - 1
        sx = torch.where(flip, -sx, sx)
        tx = torch.where(flip, 2 * centre - tx, tx)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _place_boxes(g: torch.Generator, k: torch.Tensor, size: int, scale: tuple[float, float],
                 margin: float) -> torch.Tensor:
    """``(N, 2, 4)`` square boxes, the second (if ``k == 2``) disjoint from the first by ``margin``."""
    n = k.shape[0]
    boxes = torch.zeros(n, 2, 4)
    lo, hi = scale
    side = _uniform(g, (n, 2), lo, hi)
    # two objects: shrink so that two always fit side by side
    two_hi = min(hi, (size - margin) / 2)
    side[k == 2] = _uniform(g, (int((k == 2).sum()), 2), min(lo, two_hi), two_hi)
    side = side.clamp(max=size)
    pos = torch.rand(n, 2, 2, generator=g) * (size - side)[..., None]
    pending = k == 2
    for _ in range(100):
        a, b = pos[:, 0], pos[:, 1]
        sa, sb = side[:, 0:1], side[:, 1:2]
        disjoint = ((a + sa + margin <= b) | (b + sb + margin <= a)).any(-1)
        pending = pending & ~disjoint
        if not pending.any():
            break
        fresh = torch.rand(n, 2, generator=g) * (size - side[:, 1:2])
        pos[:, 1] = torch.where(pending[:, None], fresh, pos[:, 1])
    if pending.any():  # fall back to a side-by-side layout (rare)
        idx = pending.nonzero()[:, 0]
        pos[idx, 0, 0] = 0.0
        pos[idx, 1, 0] = size - side[idx, 1]
    boxes[..., :2] = pos
    boxes[..., 2] = side
    boxes[..., 3] = side
    boxes[:, 1][k < 2] = 0.0
    return boxes


def _background(g: torch.Generator, n: int, size: int, clutter: float, fragments: torch.Tensor | None,
                fragment_alpha: float) -> torch.Tensor:
    """``(N, 3, size, size)`` cluttered background in [0, 1]."""
    base = _random_colors(g, (n,), (0.0, 0.8), (0.05, 0.5))[..., None, None]  # (n, 3, 1, 1)
    coarse = torch.randn(n, 3, 4, 4, generator=g) * 0.10 * clutter
    fine = torch.randn(n, 3, 8, 8, generator=g) * 0.05 * clutter
    bg = base.expand(n, 3, size, size) + F.interpolate(coarse, size=size, mode="bicubic", align_corners=False) \
        + F.interpolate(fine, size=size, mode="bilinear", align_corners=False)
    if clutter <= 0:
        return bg.clamp(0, 1)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5)
    yy, xx = coords[:, None], coords[None, :]
    # blobs: soft ellipses of random colour
    nb = 3
    c = torch.rand(n, nb, 2, generator=g) * size
    sig = _uniform(g, (n, nb, 2), 2.0, size / 6)
    a = _uniform(g, (n, nb), 0.2, 0.7) * clutter * (torch.rand(n, nb, generator=g) < 0.8)
    col = _random_colors(g, (n, nb), (0.0, 1.0), (0.2, 0.9))
    for i in range(nb):
        d = ((xx - c[:, i, 0, None, None]) / sig[:, i, 0, None, None]) ** 2 \
            + ((yy - c[:, i, 1, None, None]) / sig[:, i, 1, None, None]) ** 2
        alpha = (a[:, i, None, None] * torch.exp(-0.5 * d))[:, None]
        bg = bg * (1 - alpha) + col[:, i, :, None, None] * alpha
    # strokes: anti-aliased line segments, 1-3 px wide, possibly bright
    ns = 4
    p0 = torch.rand(n, ns, 2, generator=g) * size
    length = _uniform(g, (n, ns), 6.0, size * 0.6)
    angle = torch.rand(n, ns, generator=g) * 2 * math.pi
    p1 = p0 + length[..., None] * torch.stack([angle.cos(), angle.sin()], -1)
    width = _uniform(g, (n, ns), 0.6, 1.6)
    a = _uniform(g, (n, ns), 0.4, 1.0) * clutter * (torch.rand(n, ns, generator=g) < 0.8)
    col = _random_colors(g, (n, ns), (0.0, 1.0), (0.3, 1.0))
    for i in range(ns):
        ax, ay = p0[:, i, 0, None, None], p0[:, i, 1, None, None]
        dx, dy = (p1[:, i, 0] - p0[:, i, 0])[:, None, None], (p1[:, i, 1] - p0[:, i, 1])[:, None, None]
        t = (((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
        dist = torch.sqrt((xx - ax - t * dx) ** 2 + (yy - ay - t * dy) ** 2)
        alpha = (a[:, i, None, None] * (width[:, i, None, None] + 0.5 - dist).clamp(0, 1))[:, None]
        bg = bg * (1 - alpha) + col[:, i, :, None, None] * alpha
    # faint fragments of random garments (any class; not in the labels)
    if fragments is not None and fragment_alpha > 0:
        nf = 2
        for _ in range(nf):
            src = fragments[torch.randint(fragments.shape[0], (n,), generator=g)][:, None].float() / 255
            wsz = _uniform(g, (n, 2), 0.2, 0.4)                        # a piece of the garment ...
            wpos = torch.rand(n, 2, generator=g) * (1 - wsz)
            wh = wsz * _uniform(g, (n, 1), size * 0.3, size * 0.55)     # ... at a garment's scale
            pos = torch.rand(n, 2, generator=g) * (size - wh)
            boxes = torch.cat([pos, wh], -1)
            frag = _paste(src, boxes, size, window=torch.cat([wpos, wsz], -1))
            a = _uniform(g, (n,), 0.2, 1.0) * fragment_alpha * clutter * (torch.rand(n, generator=g) < 0.7)
            col = _random_colors(g, (n,), (0.0, 1.0), (0.3, 0.9))[..., None, None]
            alpha = (frag * 3).clamp(0, 1) * a[:, None, None, None]
            bg = bg * (1 - alpha) + col * (0.4 + 0.6 * frag) * alpha
    return bg.clamp(0, 1)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def render_scenes(garments: torch.Tensor, classes: torch.Tensor, g: torch.Generator, *, size: int = 64,
                  scale: tuple[float, float] = (26.0, 40.0), clutter: float = 1.0,
                  fragments: torch.Tensor | None = None, fragment_alpha: float = 0.3,
                  noise: float = 0.03, flip: bool = True, margin: float = 2.0) -> Scenes:
    """Compose scenes from given garments.

    Parameters
    ----------
    garments:
        ``(N, 2, 28, 28)`` uint8 Fashion-MNIST images for the two object slots.
    classes:
        ``(N, 2)`` their classes; ``-1`` in the second slot for a one-garment scene.
    g:
        The random generator for layout, tint and clutter.
    size, scale, clutter, fragments, fragment_alpha, noise, flip, margin:
        See :func:`make_scenes`.
    """
    n = garments.shape[0]
    k = (classes >= 0).sum(1)
    boxes = _place_boxes(g, k, size, scale, margin)
    mirror = (torch.rand(n, 2, generator=g) < 0.5) if flip else torch.zeros(n, 2, dtype=torch.bool)
    tints = _random_colors(g, (n, 2), (0.0, 0.9), (0.75, 1.0))        # (n, 2, 3)
    shade = _uniform(g, (n, 2), 0.3, 0.55)                              # darkest garment tone
    images = _background(g, n, size, clutter, fragments, fragment_alpha)
    labels = torch.zeros(n, NUM_CLASSES)
    masks = torch.zeros(n, NUM_CLASSES, size, size, dtype=torch.bool)
    rows = torch.arange(n)
    for j in range(2):
        present = classes[:, j] >= 0
        src = garments[:, j, None].float() / 255
        box = torch.where(present[:, None], boxes[:, j], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        intensity = _paste(src, box, size, flip=mirror[:, j])[:, 0]                 # (n, H, W)
        intensity = torch.where(present[:, None, None], intensity, 0.0)
        mask = intensity > MASK_THRESHOLD
        alpha = ((intensity - 0.02) / (2 * MASK_THRESHOLD - 0.02)).clamp(0, 1)[:, None]
        tone = shade[:, j, None, None] + (1 - shade[:, j, None, None]) * intensity.clamp(0, 1)
        colour = tints[:, j, :, None, None] * tone[:, None]
        images = images * (1 - alpha) + colour * alpha
        cls = classes[:, j].clamp(min=0)
        masks[rows[present], cls[present]] = mask[present]
        labels[rows[present], cls[present]] = 1.0
    if noise > 0:
        images = images + torch.randn(images.shape, generator=g) * noise
    return Scenes(images=images.clamp(0, 1), labels=labels, masks=masks, classes=classes.clone(), boxes=boxes)


def make_scenes(n: int, split: str = "test", seed: int = 0, *, size: int = 64, objects: int | None = None,
                p_two: float = 0.5, scale: tuple[float, float] = (26.0, 40.0), clutter: float = 1.0,
                fragment_alpha: float = 0.3, noise: float = 0.03, flip: bool = True,
                margin: float = 2.0) -> Scenes:
    """``n`` scenes of one or two Fashion-MNIST garments of different classes on clutter.

    Parameters
    ----------
    n:
        Number of scenes.
    split:
        ``"train"`` draws garments (and background fragments) from the Fashion-MNIST train split,
        ``"test"`` from the t10k split.
    seed:
        Seed of the scene generator: the same arguments give the same scenes.
    size:
        Canvas side in pixels.
    objects:
        ``1`` or ``2`` garments in every scene, or ``None`` for two with probability ``p_two``.
    scale:
        Range of the side, in pixels, of a garment's 28x28 square (two-garment scenes cap it at
        ``(size - margin) / 2`` so that they fit side by side).
    clutter:
        Strength of the background clutter (0: smooth colour only).
    fragment_alpha:
        Opacity of the background fragments of other garments (0: none).
    noise:
        Standard deviation of the pixel noise added over the whole scene.
    flip:
        Mirror garments horizontally at random.
    margin:
        Minimum gap in pixels between the two garments' squares.

    Returns
    -------
    Scenes
        ``images (n, 3, size, size)`` in [0, 1], multi-hot ``labels (n, 10)``, ``masks
        (n, 10, size, size)`` bool, per-slot ``classes (n, 2)`` and ``boxes (n, 2, 4)``.
    """
    if objects not in (None, 1, 2):
        raise AttnxValueError(f"objects must be 1, 2 or None, got {objects!r}")
    pool, pool_labels = load_fashion_mnist(split)
    g = torch.Generator().manual_seed(int(seed))
    if objects is None:
        k = 1 + (torch.rand(n, generator=g) < p_two).long()
    else:
        k = torch.full((n,), objects, dtype=torch.long)
    first = torch.randint(NUM_CLASSES, (n,), generator=g)
    second = (first + 1 + torch.randint(NUM_CLASSES - 1, (n,), generator=g)) % NUM_CLASSES
    classes = torch.stack([first, torch.where(k == 2, second, torch.full_like(second, -1))], 1)
    # one random image of the requested class for each slot
    order = np.argsort(pool_labels, kind="stable")
    counts = np.bincount(pool_labels, minlength=NUM_CLASSES)
    starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
    counts_t = torch.from_numpy(counts)
    cls = classes.clamp(min=0)
    offset = (torch.rand(n, 2, generator=g) * counts_t[cls]).long().clamp(max=counts_t[cls] - 1)
    index = torch.from_numpy(order)[starts[cls] + offset]
    pool_t = torch.from_numpy(pool.copy())
    garments = pool_t[index]                                            # (n, 2, 28, 28)
    return render_scenes(garments, classes, g, size=size, scale=scale, clutter=clutter, fragments=pool_t,
                         fragment_alpha=fragment_alpha, noise=noise, flip=flip, margin=margin)
