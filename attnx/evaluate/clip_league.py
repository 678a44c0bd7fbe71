"""The ``clip`` league: every method on the embedded CLIP's image tower, zero-shot on the scenes.

Each garment of the shipped two-garment scenes is explained as its own target, the prompt
``"a photo of a {class}"`` among the ten class prompts (:mod:`attnx.evaluate.image_text`). Per
(scene, garment) map: class discrimination against the other garment, the relevance mass on the
explained garment's exact mask, SaCo and RISE deletion on the zero-shot probability (the softmax of
the CLIP logits over the ten prompts), and the explanation's wall time. Every cell is the mean over
the maps ± its standard error (:mod:`attnx.evaluate.sample_table`).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import attnx

from .. import metrics, zoo
from ..core.runtime import evaluation_mode
from ..data.captions import class_prompt
from .columns import (
    RANDOMISATION_SEED,
    SACO_GROUPS,
    SANITY_METHOD,
    SANITY_ROW,
    Column,
    completeness_column,
    saco_column,
)
from .image_text import PROMPT, two_garment_maps
from .rows import parse_row
from .runner import METHOD_FAILURES, failure_reason, method_list
from .sample_table import SampleTable, stack
from .tasks import completeness

__all__ = ["COLUMNS", "evaluate_clip"]

COLUMNS = [
    Column("discrimination", "discrim.", True, "share of (scene, garment) maps with more positive relevance on the explained "
           "garment than on the other one (a class-blind map scores 0.5)"),
    Column("mass", "mass", True, "share of the positive relevance inside the explained garment's mask"),
    saco_column(),
    Column("deletion_auc", "deletion", False, "RISE deletion, most relevant pixels first (16 steps): area under the zero-shot "
           "probability of the explained prompt"),
    completeness_column(),
    Column("ms_per_map", "ms/map", False, "wall time of the explanation alone per (scene, garment) map", digits=1, timing=True),
]


class ZeroShotLogits(torch.nn.Module):
    """Images -> ``(B, P)`` CLIP logits to fixed prompt embeddings (the metrics' model)."""

    def __init__(self, clip: torch.nn.Module, text: torch.Tensor) -> None:
        super().__init__()
        self.clip = clip
        self.text = torch.nn.functional.normalize(text, dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        e = self.clip.get_image_features(pixel_values=pixel_values)
        e = getattr(e, "pooler_output", e)
        return self.clip.logit_scale.exp() * torch.nn.functional.normalize(e, dim=-1) @ self.text.T


def _maps_of(loaded: zoo.ZooModel, explainer: Any, x: torch.Tensor, target: torch.Tensor, row: tuple[str, dict],
             prompts: list[str]):
    method, options = row
    return explainer(x, method=method, text=prompts, target=target, towers="image", **options).image


def evaluate_clip(methods: Any = None, *, limit: int | None = None, batch_size: int = 16, baselines: bool = True,
                  sanity: bool = True, progress: bool = False) -> SampleTable:
    """The ``clip`` league on the first ``limit`` shipped two-garment scenes (two maps each;
    ``None``: all 48). ``methods`` as in :func:`attnx.evaluate.evaluate`."""
    names = method_list(methods, baselines, allow_empty=sanity)
    loaded = zoo.clip_model()
    scenes = zoo.scenes()
    maps = two_garment_maps(scenes, limit)
    prompts = [class_prompt(c, PROMPT) for c in range(len(loaded.class_names))]
    with torch.no_grad():
        tok = loaded.tokenizer(prompts, padding=True, return_tensors="pt")
        text = loaded.model.get_text_features(**tok)
        text = getattr(text, "pooler_output", text)
    scorer = ZeroShotLogits(loaded.model, text)
    explainers = {m: attnx.Explainer(loaded.model, tokenizer=loaded.tokenizer) for m in names}
    run_as = {m: parse_row(m) for m in names}
    failed: dict[str, str] = {}
    if sanity:
        run_as[SANITY_ROW] = (SANITY_METHOD, {})
        try:
            explainers[SANITY_ROW] = attnx.Explainer(metrics.randomised_copy(loaded.model, RANDOMISATION_SEED),
                                                     tokenizer=loaded.tokenizer)
        except METHOD_FAILURES as exc:
            failed[SANITY_ROW] = failure_reason(exc)
    parts: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in run_as if m not in failed}
    with evaluation_mode(loaded.model):
        for start in range(0, len(maps["scene"]), batch_size):
            rows = slice(start, start + batch_size)
            x = loaded.preprocess(scenes.images[maps["scene"][rows]])
            target, mask, other = maps["target"][rows], maps["mask"][rows], maps["mask_other"][rows]
            for m in [m for m in parts if m not in failed]:
                try:
                    t0 = time.perf_counter()
                    e = _maps_of(loaded, explainers[m], x, target, run_as[m], prompts)
                    seconds = time.perf_counter() - t0
                    cd = metrics.class_discrimination(e, mask, other)
                    part = {
                        "discrimination": (cd.mass_target > cd.mass_other).double().numpy(),
                        "mass": metrics.relevance_mass(e, mask).double().numpy(),
                        "saco": metrics.saco(scorer, x, e, target, groups=SACO_GROUPS, measure="probability").numpy(),
                        "deletion_auc": metrics.deletion_curve(scorer, x, e, target, steps=16, measure="probability").auc().numpy(),
                        "completeness": completeness(e),
                        "ms_per_map": np.full(len(target), 1000 * seconds / len(target)),
                    }
                except METHOD_FAILURES as exc:
                    failed[m] = failure_reason(exc)
                    continue
                parts[m].append(part)
            if progress:
                print(f"clip: {min(start + batch_size, len(maps['scene']))}/{len(maps['scene'])} maps", flush=True)
    values = {m: stack(p) for m, p in parts.items() if m not in failed}
    n = len(maps["scene"])
    title = (f"clip: the embedded CLIP's image tower (attnx.zoo) on {n // 2} shipped two-garment scenes ({n} (scene, garment) "
             f"maps); target: the garment's prompt '{PROMPT.format(a='a {class}')}' among the ten class prompts")
    notes = [f"- {SANITY_ROW}: {SANITY_METHOD} computed on a copy of the CLIP with every parameter re-drawn, scored on the real "
             "model (a sanity row: a faithful method falls to the level of random there)." if sanity else "",
             "- Every cell: mean over the maps ± its standard error."]
    items = {"scene": maps["scene"].numpy(), "target": maps["target"].numpy()}
    meta = {"limit": limit, "batch_size": batch_size, "prompt": PROMPT, "sanity": sanity}
    return SampleTable("clip", title, list(COLUMNS), values, failed, [n for n in notes if n], items, meta)

