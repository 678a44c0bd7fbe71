#!/usr/bin/env python
"""Where an explanation's time goes, op by op (torch.profiler), against forward + input-backward.

For each model and method: one profiled call after a warm-up, on the models of
``benchmarks/bench.py`` (random-init timm ViT-B/16 and BERT-base). Reported: the matrix products
(``aten::mm`` / ``addmm`` / ``bmm`` / convolutions) as call counts and FLOPs relative to the
baseline's (batch-independent: the op-count side of the cost), and the ten ops with the largest
share of self CPU time (relative shares: absolute times on a shared machine mean little).

Usage::

    python benchmarks/profile_ops.py --models vit,bert --batch 16
    python benchmarks/profile_ops.py --quick
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001 (progress shows in logs)

from bench import FORWARD_BACKWARD, Bench, build_model, make_inputs, seq_len_of  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution_backward", "aten::_convolution")
METHODS = ["transformer_attribution", "partial_lrp", "lrp:attnlrp", "lrp:cplrp", "lrp:chefer2021", "lrp:attnlrp-gamma"]


def profiled(fn) -> tuple[dict, dict, float]:
    """``({product op: (calls, flops)}, {op: self cpu us}, total self cpu us)`` of one call of ``fn``."""
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    products: dict = collections.defaultdict(lambda: [0, 0])
    times: dict = collections.Counter()
    for e in prof.key_averages():
        times[e.key] += e.self_cpu_time_total
        if e.key in PRODUCTS:
            products[e.key][0] += e.count
            products[e.key][1] += e.flops or 0
    return dict(products), dict(times), float(sum(times.values()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit,bert")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        model = build_model(name, args.quick, 0)
        bench = Bench(name, model, make_inputs(name, model, args.batch, seq_len_of(args, name), 0))
        base_products, base_times, base_total = profiled(bench.op(FORWARD_BACKWARD))
        base_calls = sum(c for c, _ in base_products.values())
        base_flops = sum(f for _, f in base_products.values())
        print(f"\n## {name}, batch {args.batch}\n")
        print(f"baseline forward + input-backward: {base_calls} matrix-product calls, {base_flops / 1e9:.1f} GFLOP")
        for method in args.methods.split(","):
            products, times, total = profiled(bench.method(method))
            calls = sum(c for c, _ in products.values())
            flops = sum(f for _, f in products.values())
            print(f"\n### {method}: products {calls} calls ({calls / base_calls:.2f}x), {flops / 1e9:.1f} GFLOP "
                  f"({flops / base_flops:.2f}x the baseline's); self CPU {total / base_total:.2f}x the baseline's")
            print("  " + ", ".join(f"{k} {c} calls / {f / 1e9:.1f} GFLOP" for k, (c, f) in sorted(products.items())))
            for op, t in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {100 * t / total:5.1f}%  {op}")


if __name__ == "__main__":
    main()
