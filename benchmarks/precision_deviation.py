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
:data:`attnx.core.precision.TOLERANCE`.

    HF_HUB_OFFLINE=1 python benchmarks/precision_deviation.py
    python benchmarks/precision_deviation.py --models vision text --dtypes bfloat16 float16 --samples 8
"""
from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import attnx  # noqa: E402
from attnx import zoo  # noqa: E402
from attnx.core.precision import TOLERANCE  # noqa: E402

METHODS = ["raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam", "legrad", "transformer_attribution",
           "partial_lrp", "lrp:attnlrp", "lrp:cplrp", "gradient_x_input"]
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The opposite of hot is",
           "A cat is an animal that"]


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


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp(min=1e-30)


def deviation(low: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    low, ref = low.flatten(1).double(), ref.flatten(1).double()
    l2 = ((low - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-30)).max().item()
    return spearman(low, ref).min().item(), l2


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
                rho, l2 = deviation(low, ref)
                finite = bool(torch.isfinite(low).all())
                ok = finite and rho >= TOLERANCE["spearman"] and l2 <= TOLERANCE["relative_l2"]
                print(f"| {kind} | {dtype_name} | {method} | {rho:.4f} | {l2:.3g} | {finite} | {'yes' if ok else 'no'} |",
                      flush=True)
        bundle.model.float()


if __name__ == "__main__":
    main()
