"""The league's class-discrimination column on the embedded CLIP, beside the embedded ViT.

On two-garment scenes, each garment is explained as its own target and
:func:`attnx.metrics.class_discrimination` compares the relevance on the explained garment with the
relevance on the other one, aggregated as the league does (``discrim.``: share of maps with more
relevance on the explained garment; ``mass ratio``: relevance on the explained garments / on the
other ones). The ViT's target is the garment's class logit; the CLIP's is the garment's zero-shot
prompt, ``"a photo of a {class}"`` among the ten class prompts (the image tower explained for that
prompt, :func:`attnx.image_text.explain_pairs`). Both models see the same scenes.

::

    python -m attnx.evaluate.image_text --limit 48      # the README's table, markdown on stdout
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

import attnx

from .. import metrics, zoo
from ..core.runtime import evaluation_mode
from ..data import Scenes
from ..data.captions import class_prompt
from ..errors import AttnxValueError

__all__ = ["MODELS", "METHODS", "PROMPT", "class_discrimination_column", "main", "to_markdown", "two_garment_maps"]

#: the zero-shot prompt template of the CLIP's targets
PROMPT = "a photo of {a}"
#: the models compared: the embedded CLIP (image tower, text-prompt targets) and the embedded ViT
MODELS = ("clip", "vision")
#: methods that apply to both (a class-agnostic method, e.g. rollout, scores 0.5 by construction);
#: ``gradient_x_input`` is left out: its relevance is seeded with ``z · ds/dz``, which sums to 0 for a
#: cosine target (the CLIP's), and attnx warns about that
METHODS = ("rollout", "grad_rollout", "attn_gradcam", "generic", "transformer_attribution", "partial_lrp", "lrp", "random")


def two_garment_maps(scenes: Scenes, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The (scene, garment) maps of the first ``limit`` two-garment scenes: ``scene`` (row -> scene
    index), ``target`` and ``other`` (classes) and their masks ``mask`` / ``mask_other``."""
    double = torch.nonzero(scenes.num_objects == 2).flatten()
    if limit is not None:
        double = double[:limit]
    if double.numel() == 0:
        raise AttnxValueError("no two-garment scene to evaluate")
    scene = double.repeat_interleave(2)
    classes = scenes.classes[double]  # (S, 2), both >= 0
    target = classes.flatten()
    other = classes.flip(1).flatten()
    return {"scene": scene, "target": target, "other": other,
            "mask": scenes.masks[scene, target], "mask_other": scenes.masks[scene, other]}


def _explain(name: str, loaded: zoo.ZooModel, explainer: Any, x: torch.Tensor, target: torch.Tensor,
             method: str, options: Mapping[str, Any]):
    if name == "clip":
        prompts = [class_prompt(c, PROMPT) for c in range(len(loaded.class_names))]
        return explainer(x, method=method, text=prompts, target=target, towers="image", **options).image
    return explainer(x, method=method, target=target, **options)


def class_discrimination_column(
    methods: Sequence[str] = METHODS,
    *,
    models: Sequence[str] = MODELS,
    limit: int | None = 24,
    batch_size: int = 16,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    scenes: Scenes | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``[model][method]``: ``discrimination``, ``mass_ratio``, ``maps`` and ``seconds`` (explanation
    wall time) over the (scene, garment) maps of :func:`two_garment_maps`.

    Parameters
    ----------
    methods:
        Method names.
    models:
        Among :data:`MODELS`.
    limit:
        Two-garment scenes (two maps each); ``None``: all of ``scenes``.
    batch_size:
        Maps per explanation call.
    options:
        Method options per method, for both models: ``{"generic": {"start_layer": -1}}``.
    scenes:
        Default: the shipped held-out scenes (:func:`attnx.zoo.scenes`).
    """
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise AttnxValueError(f"models must be among {MODELS}, got {unknown}")
    for m in methods:
        attnx.get_method(m)
    options = {k: dict(v) for k, v in (options or {}).items()}
    maps = two_garment_maps(zoo.scenes() if scenes is None else scenes, limit)
    images = (zoo.scenes() if scenes is None else scenes).images
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in models:
        loaded = zoo.clip_model() if name == "clip" else zoo.vision_model()
        explainer = attnx.Explainer(loaded.model, tokenizer=loaded.tokenizer)
        out[name] = {}
        with evaluation_mode(loaded.model):
            for method in methods:
                mass, other, seconds = [], [], 0.0
                for start in range(0, len(maps["scene"]), batch_size):
                    rows = slice(start, start + batch_size)
                    x = loaded.preprocess(images[maps["scene"][rows]])
                    t0 = time.perf_counter()
                    e = _explain(name, loaded, explainer, x, maps["target"][rows], method, options.get(method, {}))
                    seconds += time.perf_counter() - t0
                    cd = metrics.class_discrimination(e, maps["mask"][rows], maps["mask_other"][rows])
                    mass.append(cd.mass_target.double())
                    other.append(cd.mass_other.double())
                a, b = torch.cat(mass).numpy(), torch.cat(other).numpy()
                # aggregated as attnx.evaluate.League.row
                out[name][method] = {"discrimination": float(np.mean(a > b)),
                                     "mass_ratio": float(a.sum() / b.sum()) if b.sum() > 0 else math.nan,
                                     "maps": int(a.size), "seconds": seconds}
    return out


def to_markdown(results: Mapping[str, Mapping[str, Mapping[str, float]]], labels: Mapping[str, str] | None = None) -> str:
    """A markdown table: one row per method, ``discrim.`` and ``mass ratio`` per model."""
    labels = dict(labels or {})
    models = list(results)
    names = {"clip": "CLIP", "vision": "ViT"}
    head = ["method"] + [f"{names.get(m, m)} {c}" for m in models for c in ("discrim. ↑", "mass ratio ↑")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in results[models[0]]:
        cells = [labels.get(method, f"`{method}`")]
        for m in models:
            r = results[m][method]
            cells += [f"{r['discrimination']:.3f}", f"{r['mass_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnx.evaluate.image_text``: the table on the shipped scenes, markdown on stdout."""
    parser = argparse.ArgumentParser(prog="python -m attnx.evaluate.image_text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=24, help="two-garment scenes (two maps each); 0: all 48 shipped")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    torch.manual_seed(0)
    results = class_discrimination_column(methods, limit=args.limit or None, batch_size=args.batch_size)
    # Chefer et al.'s CLIP setting as an extra row: the last layer only
    if "generic" in methods:
        last = class_discrimination_column(["generic"], limit=args.limit or None, batch_size=args.batch_size,
                                    options={"generic": {"start_layer": -1}})
        for m in results:
            results[m]["generic_last"] = last[m]["generic"]
    n = next(iter(results.values()))[methods[0]]["maps"]
    print(f"{n} (scene, garment) maps of {n // 2} shipped two-garment scenes; CLIP target: "
          f"'{PROMPT.format(a='a {class}')}' among the ten class prompts; ViT target: the class logit\n")
    print(to_markdown(results, {"generic_last": "`generic`, `start_layer=-1`"}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
