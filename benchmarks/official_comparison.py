#!/usr/bin/env python
"""attnx's transformer_attribution against the official Transformer-Explainability code.

Builds the reference's ``ViT_LRP`` ViT-B/16 and timm's ``vit_base_patch16_224`` with the same
random weights (timm's random initialisation, copied into the reference model; the reference's
final LayerNorm takes timm's eps 1e-6), then

1. checks that the maps are equal, in float32 and in float64 (max relative difference per image:
   ``max |attnx - reference| / max |reference|``), for the reference's predicted class;
2. times attnx at batch ``--batch`` against the reference at batch 1 (it handles one image per
   call), alternating calls, with the same number of threads, and reports images per second and
   their ratio, and each against the plain forward + input-backward at its batch size.

The reference is read from ``--reference`` (a checkout of hila-chefer/Transformer-Explainability;
it needs ``einops``) and is run as its own ``generate_LRP`` runs it, on the CPU: a forward, the
one-hot backward (which records ``dy/dA``), then ``relprop(..., method="transformer_attribution",
alpha=1)``.

Usage::

    python benchmarks/official_comparison.py --reference /tmp/Transformer-Explainability --quick
    python benchmarks/official_comparison.py --reference /tmp/Transformer-Explainability --threads 2 --repeats 5
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def load_reference(path: str):
    """The reference's ``baselines.ViT.ViT_LRP`` module."""
    if not os.path.isdir(os.path.join(path, "baselines", "ViT")):
        raise SystemExit(f"{path} is not a Transformer-Explainability checkout (no baselines/ViT)")
    sys.path.insert(0, os.path.abspath(path))
    return importlib.import_module("baselines.ViT.ViT_LRP")


def build_models(ref, depth: int, img_size: int, seed: int):
    """``(reference, timm)`` ViT-B/16 models with the same random weights, in eval mode."""
    import timm

    torch.manual_seed(seed)
    stock = timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth, img_size=img_size).eval()
    official = ref.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4, qkv_bias=True
    ).eval()
    missing, unexpected = official.load_state_dict(stock.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"state dicts do not match: missing {missing}, unexpected {unexpected}")
    official.norm.eps = stock.norm.eps
    return official, stock


def official_map(model, x: torch.Tensor, index: int, start_layer: int = 0) -> torch.Tensor:
    """The reference's ``LRP.generate_LRP`` on the CPU for one image: ``(1, P)``."""
    output = model(x)
    one_hot = torch.zeros_like(output)
    one_hot[0, index] = 1
    model.zero_grad()
    (one_hot * output).sum().backward(retain_graph=True)
    cam = model.relprop(one_hot, method="transformer_attribution", start_layer=start_layer, alpha=1)
    model.zero_grad(set_to_none=True)
    return cam.detach()


def compare(official, stock, images: torch.Tensor, dtype: torch.dtype, start_layer: int) -> float:
    """Max over images of the relative difference of the two maps in ``dtype``."""
    import attnx

    official, stock, x = official.to(dtype), stock.to(dtype), images.to(dtype)
    with torch.no_grad():
        targets = stock(x).argmax(-1).tolist()
    ours = attnx.Explainer(stock).explain(x, method="transformer_attribution", target=targets, start_layer=start_layer).scores
    worst = 0.0
    for b, t in enumerate(targets):
        theirs = official_map(official, x[b : b + 1], t, start_layer)[0]
        worst = max(worst, ((ours[b].flatten() - theirs.flatten()).abs().max() / theirs.abs().max()).item())
    return worst


def forward_backward(model, x: torch.Tensor, targets: list[int]) -> None:
    """The baseline: a forward and the target logits' gradient with respect to the image."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    torch.autograd.grad(logits.gather(1, torch.tensor(targets)[:, None]).sum(), x)


def timing(official, stock, images: torch.Tensor, repeats: int) -> dict:
    """Alternating timed calls: attnx at the batch of ``images``, the reference at batch 1."""
    import attnx

    official, stock = official.float(), stock.float()
    with torch.no_grad():
        targets = stock(images).argmax(-1).tolist()
    explainer = attnx.Explainer(stock)
    one = images[:1]
    calls = {
        "attnx": lambda: explainer.explain(images, method="transformer_attribution", target=targets),
        "official": lambda: official_map(official, one, targets[0]),
        "fwd+bwd batch": lambda: forward_backward(stock, images, targets),
        "fwd+bwd batch 1": lambda: forward_backward(stock, one, targets[:1]),
    }
    for fn in calls.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(repeats):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for k in order:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="path to a Transformer-Explainability checkout")
    p.add_argument("--depth", type=int, default=12, help="transformer blocks (12: ViT-B/16)")
    p.add_argument("--batch", type=int, default=16, help="attnx's batch size in the timing")
    p.add_argument("--check-images", type=int, default=2, help="images of the exactness check")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (0: the exactness check only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 blocks, 112x112 images, batch 2, 1 repeat: a smoke test")
    p.add_argument("--allocator", default="default", choices=("default", "reuse"),
                   help="reuse: attnx.reuse_freed_memory() first, for both codes (the same process)")
    args = p.parse_args(argv)
    if args.allocator == "reuse":
        import attnx

        if not attnx.reuse_freed_memory():
            raise SystemExit("--allocator reuse needs glibc (Linux)")
        print("allocator: freed memory kept for reuse (attnx.reuse_freed_memory())")
    img = 224
    if args.quick:
        args.depth, args.batch, args.repeats, img = 2, 2, 1, 112
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    official, stock = build_models(ref, args.depth, img, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    check = torch.randn(args.check_images, 3, img, img, generator=g)
    print(f"ViT-B/16, {args.depth} blocks, {img}x{img}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.float64):
        err = compare(official, stock, check, dtype, args.start_layer)
        print(f"exactness {str(dtype).replace('torch.', '')}: max relative difference {err:.2e} over {args.check_images} images")
    if args.repeats == 0:  # exactness only
        return
    images = torch.randn(args.batch, 3, img, img, generator=g)
    t = timing(official, stock, images, args.repeats)
    ours, theirs = args.batch / t["attnx"], 1 / t["official"]
    print(f"attnx batch {args.batch}: {t['attnx']:.3f} s, {ours:.2f} images/s, {t['attnx'] / t['fwd+bwd batch']:.2f}x fwd+bwd")
    print(f"official batch 1: {t['official']:.3f} s, {theirs:.2f} images/s, {t['official'] / t['fwd+bwd batch 1']:.2f}x fwd+bwd")
    print(f"throughput ratio attnx / official: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
