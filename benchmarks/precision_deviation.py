#!/usr/bin/env python
"""How far a half-precision model's maps computed in its own precision are from float32.

For each model (``attnx.zoo.vision_model()`` on held-out fashion scenes, ``attnx.zoo.text_model()``
— the MiniLM sentiment classifier — on Rotten Tomatoes snippets, ``attnx.zoo.smollm2_model()`` on
short prompts), cast to the dtype, each method runs twice on the same rounded weights:
``precision="model"`` (the model computes in bfloat16 / float16, the method's arithmetic in
float32) and ``precision="float32"`` (the exact float32 computation of those weights). Reported per
method: the smallest per-sample Spearman rank correlation and the largest per-sample relative L2
distance of the maps (``|model - float32| / |float32|``), and whether every map is finite. The
targets are the float32 predictions, fixed for both runs. The tolerance is
:data:`attnx.core.precision.TOLERANCE`. Text maps are compared on each sample's own tokens (its
padding, zero in both maps, would be ranked in an arbitrary order), ties ranked by their mean rank.

    HF_HUB_OFFLINE=1 python benchmarks/precision_deviation.py
    python benchmarks/precision_deviation.py --models vision text --dtypes bfloat16 float16 --samples 8
"""
from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import attnx  # noqa: E402
from attnx import zoo  # noqa: E402
from attnx.core.precision import TOLERANCE  # noqa: E402

METHODS = ["raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam", "legrad", "transformer_attribution",
           "partial_lrp", "lrp:attnlrp", "lrp:cplrp", "gradient_x_input"]
# long enough for a rank correlation to say something (20 to 30 tokens)
PROMPTS = [
    "The Eiffel Tower was built for the world fair of 1889 and it stands in the centre of the capital of France, "
    "which is called",
    "Water is heated in a pot on the stove until it starts to boil, and at sea level this happens at a temperature "
    "of one hundred degrees",
    "When the sun goes down in the evening the sky gets darker and the air outside becomes colder, which is the "
    "opposite of",
    "A cat is a small animal with soft fur and sharp claws that many families keep at home as a",
]


def load(kind: str, n: int):
    if kind == "vision":
        b = zoo.vision_model()
        return b, b.preprocess(zoo.scenes(n).images)
    if kind == "text":
        from attnx.data.rotten_tomatoes import load_reviews

        b = zoo.text_model()
        enc = b.tokenizer([r.text for r in load_reviews()[:n]], padding=True, truncation=True, return_tensors="pt")
        return b, dict(enc)
    b = zoo.smollm2_model()
    return b, dict(b.tokenizer(PROMPTS[:n], padding=True, return_tensors="pt"))


def deviation(low: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """The smallest per-sample Spearman correlation and the largest relative L2 distance, on the
    positions ``mask`` keeps (each sample's tokens) when given."""
    low, ref = low.flatten(1).double(), ref.flatten(1).double()
    keep = torch.ones_like(ref, dtype=torch.bool) if mask is None else mask.flatten(1).bool()
    rhos, l2s = [], []
    for a, b, k in zip(low, ref, keep):
        a, b = a[k], b[k]
        if a.unique().numel() == 1 or b.unique().numel() == 1:  # a constant map has no ranking to compare
            rhos.append(1.0 if torch.equal(a, b) else 0.0)
        else:
            rhos.append(float(spearmanr(a.numpy(), b.numpy()).statistic))
        l2s.append(((a - b).norm() / b.norm().clamp(min=1e-30)).item())
    return float(min(rhos)), max(l2s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vision", "text", "smollm2"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    print(f"load: {os.getloadavg()}; tolerance: Spearman >= {TOLERANCE['spearman']}, "
          f"relative L2 <= {TOLERANCE['relative_l2']}")
    print("| model | dtype | method | min Spearman | max relative L2 | finite | within |\n|---|---|---|---:|---:|---|---|")
    for kind in args.models:
        bundle, x = load(kind, args.samples)
        for dtype_name in args.dtypes:
            if kind == "smollm2" and dtype_name == "float16":
                continue  # SmolLM2 was released in bfloat16
            dtype = getattr(torch, dtype_name)
            model = bundle.model.to(dtype)
            xs = x.to(dtype) if isinstance(x, torch.Tensor) else x
            ref_ex = attnx.Explainer(model, tokenizer=bundle.tokenizer, precision="float32")
            low_ex = attnx.Explainer(model, tokenizer=bundle.tokenizer, precision="model")
            with torch.no_grad():
                targets = ref_ex.trace(xs, needs=attnx.Needs()).logits.argmax(-1).tolist()
            for method in args.methods.split(","):
                name, _, preset = method.partition(":")
                options = {"preset": preset} if preset else {}
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ref = ref_ex.explain(xs, method=name, target=targets, **options).scores
                        low = low_ex.explain(xs, method=name, target=targets, **options).scores
                except Exception as exc:  # report and go on
                    print(f"| {kind} | {dtype_name} | {method} | error: {type(exc).__name__}: {str(exc)[:90]} | | | |",
                          flush=True)
                    continue
                mask = x.get("attention_mask") if isinstance(x, dict) else None
                rho, l2 = deviation(low, ref, mask if mask is not None and mask.shape == ref.shape else None)
                finite = bool(torch.isfinite(low).all())
                ok = finite and rho >= TOLERANCE["spearman"] and l2 <= TOLERANCE["relative_l2"]
                print(f"| {kind} | {dtype_name} | {method} | {rho:.4f} | {l2:.3g} | {finite} | {'yes' if ok else 'no'} |",
                      flush=True)
        bundle.model.float()


if __name__ == "__main__":
    main()
