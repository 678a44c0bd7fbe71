#!/usr/bin/env python
"""Per-image time of ``attention_flow`` next to ``rollout`` on the same model, in one run.

Models (random-init timm ``VisionTransformer``, ``eval()``, no network access):

* ``tiny`` -- ``img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2``
  (65 tokens, 4 layers), 64x64 images;
* ``vitb`` -- ``vit_base_patch16_224`` with ``pretrained=False`` (197 tokens, 12 layers), 224x224.

For each model, ``--warmup`` untimed rounds, then ``--repeats`` timed rounds in which rollout and
attention flow alternate (R F, F R, R F, ...) on the same explainer, batch and explicit targets.
Reported: median seconds per image of each method, the median over rounds of the paired ratio
t_flow / t_rollout, and the part of the flow time spent in the maximum flows themselves (the
method function minus the shared forward pass is not separated by attnx, so it is timed here by
calling :func:`attnx.methods.attention_flow.max_flows` on the captured attentions).

Random-init attention is close to uniform: every edge has a non-zero capacity, the densest and
slowest case for the maximum flows (trained models have many near-zero attentions, which
``discard_ratio`` can drop).

Usage::

    HF_HUB_OFFLINE=1 nice python benchmarks/bench_attention_flow.py
    python benchmarks/bench_attention_flow.py --models tiny --repeats 5 --networkx --threads 1
    python benchmarks/bench_attention_flow.py --models vitb --discard-ratio 0.9

On a busy machine, ``--threads 1`` avoids the synchronisation cost of intra-op threads on the
tiny model (the maximum flows are single-threaded in any case).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attnx  # noqa: E402
from attnx.core.layout import Readout  # noqa: E402
from attnx.methods.attention_flow import max_flows  # noqa: E402
from attnx.methods.propagation import fuse_heads  # noqa: E402
from attnx.methods.rollout import rollout_matrix  # noqa: E402


def build(name: str) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(0)
    if name == "tiny":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2, num_classes=10
        )
        return model.eval(), 64
    if name == "vitb":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False).eval(), 224
    raise ValueError(f"unknown model {name!r}")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flow_inputs(explainer: attnx.Explainer, x: torch.Tensor, target: list[int], discard_ratio: float):
    """The per-sample (L, N, N) capacities and readout weights attention_flow builds."""
    captured = explainer.capture(x, target)
    readout = Readout(captured.layout, x.shape[0], captured.logits.device)
    mats = torch.stack([rollout_matrix(fuse_heads(a, "mean"), discard_ratio, readout) for a in captured.attentions], 1)
    return mats.double().numpy(), readout.one_hot(mats).double().numpy()


def networkx_flows(mats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The same flows with networkx (the reference code's library), for comparison."""
    import networkx as nx

    L, n, _ = mats.shape
    g = nx.DiGraph()
    for i in np.nonzero(weights)[0]:
        g.add_edge("readout", (L, int(i)), capacity=float(weights[i]))
    for l in range(1, L + 1):
        rows, cols = np.nonzero(mats[l - 1])
        g.add_edges_from(((l, int(i)), (l - 1, int(k)), {"capacity": float(mats[l - 1][i, k])}) for i, k in zip(rows, cols))
    return np.array([nx.maximum_flow_value(g, "readout", (0, j)) for j in range(n)])


def run(name: str, args) -> None:
    model, size = build(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    with torch.no_grad():
        target = model(x).argmax(1).tolist()
    explainer = attnx.Explainer(model)
    calls = {
        "rollout": lambda: explainer(x, method="rollout", target=target),
        "attention_flow": lambda: explainer(x, method="attention_flow", target=target, discard_ratio=args.discard_ratio),
    }
    for _ in range(args.warmup):
        for fn in calls.values():
            fn()
    times = {k: [] for k in calls}
    ratios = []
    for r in range(args.repeats):
        order = ["rollout", "attention_flow"] if r % 2 == 0 else ["attention_flow", "rollout"]
        t = {k: timed(calls[k]) for k in order}
        for k, v in t.items():
            times[k].append(v)
        ratios.append(t["attention_flow"] / t["rollout"])
    mats, weights = flow_inputs(explainer, x, target, args.discard_ratio)
    solve = [timed(lambda: max_flows(mats[0], weights[0])) for _ in range(max(1, args.repeats // 2))]
    L, N = mats.shape[1], mats.shape[2]
    B = args.batch
    print(f"\n{name}: {L} layers, {N} tokens, batch {B}, {args.repeats} paired rounds, "
          f"torch threads {torch.get_num_threads()}, discard_ratio {args.discard_ratio}")
    for k in calls:
        print(f"  {k:15s} {statistics.median(times[k]) / B:8.3f} s / image")
    print(f"  ratio attention_flow / rollout (median of paired rounds): {statistics.median(ratios):.2f}x")
    per_image = statistics.median(solve)
    print(f"  maximum flows alone: {per_image:.3f} s / image ({N} flows, {1e3 * per_image / N:.2f} ms each)")
    if args.networkx:
        t = time.perf_counter()
        ref = networkx_flows(mats[0], weights[0])
        dt = time.perf_counter() - t
        ours = max_flows(mats[0], weights[0])
        print(f"  networkx maximum_flow_value on the same graph: {dt:.1f} s / image "
              f"({dt / per_image:.0f}x the scipy flows); max |difference| {np.abs(ref - ours).max():.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,vitb", help="comma-separated: tiny, vitb")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--repeats", type=int, default=6, help="timed paired rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--networkx", action="store_true", help="also time networkx on the same graph (slow for vitb)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="attention_flow's discard_ratio option")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, attnx {attnx.__version__}, load average {os.getloadavg()[0]:.1f}")
    for name in args.models.split(","):
        run(name.strip(), args)


if __name__ == "__main__":
    main()
