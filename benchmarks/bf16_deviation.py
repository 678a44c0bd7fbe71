#!/usr/bin/env python
"""How far bfloat16 autocast moves attnx's maps from float32, on the embedded models.

Runs each method on ``attnx.zoo.vision_model()`` (held-out fashion scenes) and
``attnx.zoo.text_model()`` (Rotten Tomatoes snippets) twice: in float32, and with every call under
``torch.autocast(device, dtype=torch.bfloat16)`` (the opt-in of ``benchmarks/bench.py --dtype
bfloat16``; weights stay float32). Reported per method: the largest relative difference of a
sample's map (``max |bf16 - fp32| / max |fp32|``) and the smallest Pearson correlation of a
sample's map with its float32 map. The targets are the float32 predictions, fixed for both runs.

Usage::

    python benchmarks/bf16_deviation.py                  # 8 images, 8 snippets
    python benchmarks/bf16_deviation.py --samples 32 --device cuda
"""
from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import attnx  # noqa: E402
from attnx import zoo  # noqa: E402
from attnx.data.rotten_tomatoes import load_reviews  # noqa: E402

METHODS = ["generic", "transformer_attribution", "partial_lrp", "lrp:attnlrp", "lrp:cplrp", "lrp:chefer2021",
           "lrp:attnlrp-gamma"]


def inputs(kind: str, bundle, n: int, device: str):
    if kind == "vision":
        return bundle.preprocess(zoo.scenes(n).images).to(device)
    texts = [r.text for r in load_reviews()[:n]]
    enc = bundle.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def maps(explainer, x, method: str, targets, bf16: bool, device: str) -> torch.Tensor:
    name, _, preset = method.partition(":")
    options = {"preset": preset} if preset else {}
    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explainer.explain(x, method=name, target=targets, **options).scores.float()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    print("| model | method | max relative difference | min correlation |\n|---|---|---:|---:|")
    for kind, bundle in (("vision", zoo.vision_model()), ("text", zoo.text_model())):
        model = bundle.model.to(args.device)
        x = inputs(kind, bundle, args.samples, args.device)
        explainer = attnx.Explainer(model)
        with torch.no_grad():
            logits = explainer.trace(x, needs=attnx.Needs()).logits
        targets = logits.argmax(-1).tolist()
        for method in args.methods.split(","):
            try:
                ref = maps(explainer, x, method, targets, False, args.device)
                low = maps(explainer, x, method, targets, True, args.device)
            except Exception as exc:  # report and go on
                print(f"| {kind} | {method} | error: {type(exc).__name__}: {str(exc)[:80]} | |")
                continue
            rel = ((low - ref).abs().amax(1) / ref.abs().amax(1).clamp(min=1e-30)).max().item()
            a, b = ref - ref.mean(1, keepdim=True), low - low.mean(1, keepdim=True)
            corr = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-30)).min().item()
            print(f"| {kind} | {method} | {rel:.3g} | {corr:.4f} |", flush=True)


if __name__ == "__main__":
    main()
