#!/usr/bin/env python
"""Long contexts: time and peak memory of attnx's methods by prompt length, as ratios to the model's
own forward + backward.

The model: a random Hugging Face ``LlamaForCausalLM`` (hidden 256, 4 layers, 8 query heads
sharing 2 key/value heads, intermediate 1024, vocabulary 32000, float32, the default ``sdpa``
attention, ``eval()``), batch 1, random tokens; the explained output is the next-token logit of a
fixed token at the last position. Modes:

* ``fwd+bwd``: the model's forward (``logits_to_keep=1``, as attnx runs it) and one
  ``torch.autograd.grad`` of that logit to the output of the input embeddings (the reference);
* ``lrp:attnlrp``, ``lrp:cplrp``: ``attnx.explain(..., method="lrp", preset=...)``;
* ``lrp:attnlrp-written-out``: the same with ``F.scaled_dot_product_attention`` written out
  (``Decompose``), attnx's path before :class:`attnx.lrp.FusedAttention`;
* ``fwd+bwd:eager``: the same as ``fwd+bwd`` with the model's ``eager`` attention kernel (the one
  that returns the probabilities, which the attention-graph methods switch to); the reference of
  their memory target;
* ``generic``, ``grad_rollout``, ``attn_gradcam``: ``attnx.explain(..., method=...)``, the model's
  ``sdpa`` kernel left running and each layer's ``A`` recomputed and folded as the backward reaches
  it (:mod:`attnx.adapters.fused_kernel`, :mod:`attnx.core.layer_fold`);
* ``generic:eager`` (and the others): the same with the model switched to its ``eager`` kernel
  first, each layer folded from the probabilities that kernel keeps: attnx before the fused path;
* ``generic:full-trace`` (and the others): the same method on a trace of every layer's attention
  and gradient (``Explainer.trace`` without a fold, then the method): attnx before layer folds;
* ``rollout``: ``attnx.explain(..., method="rollout")``, each layer's ``A`` computed beside the
  ``sdpa`` kernel in the forward and its heads fused (no backward); ``rollout:eager``: the same with
  the model switched to its ``eager`` kernel first, every layer's map kept (attnx before);
* ``lxt``: lxt 2.1's efficient AttnLRP (its Llama patches, its attention wrapper around the
  ``sdpa`` kernel: gradients of ``q, k`` / 4 and ``v`` / 2), and the same gradient as
  ``fwd+bwd``, where lxt is installed.

Every (mode, length) runs in a **fresh process**: build the model, run the mode once on 64 tokens
(one-time initialisation; attnx's methods run through one ``Explainer``, whose check that the
explained forward is the model's own runs on that first call), then on CPU ``malloc_trim``, read
``VmRSS``, reset the kernel's peak (``/proc/self/clear_refs``), run the mode once (timed) and read
``VmHWM``: the peak resident memory increase of one call, weights excluded (``ru_maxrss`` where
``clear_refs`` is missing, a lower bound). On CUDA (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated`` above what
was allocated before the call. A mode whose call takes longer than ``--budget`` seconds is not run
at larger lengths. Growth exponents are least-squares slopes of log(value) on log(length) over the
lengths ≥ 512 (all lengths when fewer than two are).

    HF_HUB_OFFLINE=1 python benchmarks/long_context.py                        # 128 ... 4096
    python benchmarks/long_context.py --lengths 128 256 --modes fwd+bwd lrp:attnlrp
    python benchmarks/long_context.py --device cuda --lengths 1024 4096 16384
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REFERENCE = "fwd+bwd"
EAGER = "fwd+bwd:eager"
GRAPH_METHODS = ("generic", "grad_rollout", "attn_gradcam")
MODES = (REFERENCE, "lrp:attnlrp", "lrp:cplrp", "lxt", *GRAPH_METHODS, "lrp:attnlrp-written-out", EAGER,
         *(f"{m}:eager" for m in GRAPH_METHODS), *(f"{m}:full-trace" for m in GRAPH_METHODS), "rollout", "rollout:eager")
LENGTHS = (128, 256, 512, 1024, 2048, 4096)
TOKEN = 7  # the explained next token
CONFIG = dict(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=1024, max_position_embeddings=65536)


# --------------------------------------------------------------------------------------------
# one measurement (in its own process)
# --------------------------------------------------------------------------------------------
def patch_lxt() -> None:
    """lxt 2.1's efficient AttnLRP for Llama: its module patches, and its attention wrapper around
    transformers' ``sdpa`` kernel (lxt's own dict swap does not work with transformers 5)."""
    import importlib
    import types

    import lxt

    base = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    for name, path in (("lxt.efficient", base), ("lxt.efficient.models", os.path.join(base, "models"))):
        stub = types.ModuleType(name)  # its package __init__ imports patches for transformers 4
        stub.__path__ = [path]
        sys.modules[name] = stub
    from lxt.efficient.patches import wrap_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for target, patch in importlib.import_module("lxt.efficient.models.llama").attnLRP.items():
        if isinstance(target, type):
            patch(target)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = wrap_attention_forward(ALL_ATTENTION_FUNCTIONS["sdpa"])


def make_op(mode: str, model, device: str):
    """``op(ids) -> result``: one call of ``mode`` on token ids ``(1, N)``."""
    import torch
    import torch.nn.functional as F

    import attnx

    if mode in (REFERENCE, "lxt", EAGER):
        if mode == EAGER:
            model.set_attn_implementation("eager")

        def op(ids):
            box = []

            def hook(module, args, output):
                box.append(output.detach().requires_grad_(True))
                return box[-1]

            handle = model.get_input_embeddings().register_forward_hook(hook)
            try:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1).logits
            finally:
                handle.remove()
            (g,) = torch.autograd.grad(logits[:, -1, TOKEN].sum(), box[0])
            return box[0] * g

        return op
    method, _, preset = mode.partition(":")
    if preset == "full-trace":
        return full_trace_op(method, model)
    options = {}
    if preset == "eager":
        model.set_attn_implementation("eager")
    elif preset == "attnlrp-written-out":
        reg = attnx.lrp.get_preset("attnlrp").copy("attnlrp-written-out")
        options["preset"] = reg.register(F.scaled_dot_product_attention, attnx.lrp.rules.Decompose(attnx.lrp.rules.sdpa_decomposition))
    elif preset:
        options["preset"] = preset

    explainer = attnx.Explainer(model)  # as a user explaining many prompts: the forward check runs on the first call

    def op(ids):
        return explainer.explain({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, method=method,
                                 target=TOKEN, **options).scores

    return op


def full_trace_op(method: str, model):
    """``op(ids)``: ``method`` on a trace of every layer's attention and gradient (no fold)."""
    import torch

    import attnx
    from attnx.methods import get_method

    spec = get_method(method)
    method_options, _ = spec.resolve({})

    explainer = attnx.Explainer(model)

    def op(ids):
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        trace = explainer.trace(inputs, TOKEN, spec.needs, first_layer=spec.first_layer_for(method_options))
        readout, _ = explainer.readout_for(trace, spec.needs, inputs, TOKEN)
        return spec.fn(trace, readout, **method_options)

    return op


def worker(spec: dict) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import _malloc_trim, _reset_peak, _status_kb

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "lxt":
        patch_lxt()
    import transformers as tr

    import attnx  # noqa: F401  (imported before the memory baseline, whatever the mode)

    device = spec["device"]
    torch.manual_seed(0)
    model = tr.LlamaForCausalLM._from_config(tr.LlamaConfig(**CONFIG), attn_implementation="sdpa").to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CONFIG["vocab_size"], (1, spec["length"]), generator=g).to(device)
    op = make_op(spec["mode"], model, device)
    op(ids[:, :64])  # one-time initialisation, not charged to the call
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _malloc_trim()
        before = _status_kb("VmRSS") * 1024
        exact = _reset_peak()
    t0 = time.perf_counter()
    out = op(ids)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak, exact = torch.cuda.max_memory_allocated(), True
    else:
        hwm = _status_kb("VmHWM") if exact else None
        if hwm is None:
            import resource

            exact, hwm = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = hwm * 1024
    del out
    return {"seconds": seconds, "peak_mb": max(peak - before, 0) / 2**20, "exact": exact}


def measure(mode: str, length: int, args: argparse.Namespace) -> dict:
    spec = {"mode": mode, "length": length, "threads": args.threads, "device": args.device}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.live_memory:  # glibc maps every block >= 64 KiB on its own and unmaps it when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("LONGCTX "):
            return json.loads(line[len("LONGCTX "):])
    return {"error": ((proc.stderr.strip().splitlines() or ["no output"])[-1])[:160]}


# --------------------------------------------------------------------------------------------
# the sweep and its report
# --------------------------------------------------------------------------------------------
def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) on log(length) over lengths >= 512 (or all)."""
    big = [(n, v) for n, v in points if n >= 512 and v > 0]
    pts = big if len(big) >= 2 else [(n, v) for n, v in points if v > 0]
    if len(pts) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in pts], [math.log(v) for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def load() -> str:
    try:
        return open("/proc/loadavg").read().split()[:3].__str__()
    except OSError:
        return "unknown"


def report(results: dict, modes: list[str], lengths: list[int], args: argparse.Namespace, loads: tuple[str, str]) -> str:
    allocator = ", live memory (MALLOC_MMAP_THRESHOLD_=65536)" if getattr(args, "live_memory", False) else ""
    lines = [f"device {args.device}, {args.threads} thread(s), batch 1{allocator}; load average (1, 5, 15 min) at start "
             f"{loads[0]}, at end {loads[1]}", ""]
    head = "| tokens | " + " | ".join(f"{m} s (x) | {m} MB (x)" if m != REFERENCE else f"{m} s | {m} MB" for m in modes) + " |"
    lines += [head, "|---:|" + "---:|---:|" * len(modes)]
    for n in lengths:
        base = results.get((REFERENCE, n), {})
        cells = []
        for m in modes:
            r = results.get((m, n))
            if r is None or "error" in r:
                cells += ["—" if r is None else "error", "—" if r is None else r["error"][:40]]
                continue
            if m == REFERENCE or "seconds" not in base:
                cells += [f"{r['seconds']:.2f}", f"{r['peak_mb']:.0f}"]
            else:
                cells += [f"{r['seconds']:.2f} ({r['seconds'] / base['seconds']:.2f}x)",
                          f"{r['peak_mb']:.0f} ({r['peak_mb'] / base['peak_mb']:.2f}x)"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| growth exponent (lengths >= 512) | time | peak memory |", "|---|---:|---:|"]
    for m in modes:
        ok = [(n, results[(m, n)]) for n in lengths if "error" not in results.get((m, n), {"error": 1})]
        et, em = exponent([(n, r["seconds"]) for n, r in ok]), exponent([(n, r["peak_mb"]) for n, r in ok])
        lines.append(f"| {m} | {'—' if et is None else f'{et:.2f}'} | {'—' if em is None else f'{em:.2f}'} |")
    if any(m != EAGER and m.partition(":")[0] in GRAPH_METHODS for m in modes) and EAGER in modes:
        lines += eager_report(results, modes, lengths)
    return "\n".join(lines)


def eager_report(results: dict, modes: list[str], lengths: list[int]) -> list[str]:
    """The attention-graph methods against forward + backward with the eager kernel: time and
    peak ratios, and the peak above it in units of one ``(N, N)`` float32 map per layer
    (``4·L·N²`` bytes: the target allows 1)."""
    L = CONFIG["num_hidden_layers"]
    graph = [m for m in modes if m != EAGER and m.partition(":")[0] in GRAPH_METHODS]
    lines = ["", f"Against {EAGER} (time x, peak x, peak above it in units of 4·L·N² bytes):", "",
             "| tokens | " + " | ".join(graph) + " |", "|---:|" + "---:|" * len(graph)]
    for n in lengths:
        base = results.get((EAGER, n), {})
        cells = []
        for m in graph:
            r = results.get((m, n), {})
            if "seconds" not in r or "seconds" not in base:
                cells.append("—")
                continue
            extra = (r["peak_mb"] - base["peak_mb"]) * 2**20 / (4 * L * n * n)
            cells.append(f"{r['seconds'] / base['seconds']:.2f}x / {r['peak_mb'] / base['peak_mb']:.2f}x / {extra:+.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=90.0, help="seconds of one call above which a mode stops growing")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement process")
    p.add_argument("--live-memory", action="store_true",
                   help="glibc returns every freed block of 64 KiB or more at once, so the peak resident memory is the "
                        "peak of live tensors (to check memory formulas; without it, the default allocator's reuse)")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--table-from", default=None, metavar="LOG",
                   help="print the report of the points a sweep logged to stderr (e.g. one stopped early)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("LONGCTX " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.table_from:
        return table_from(args)
    modes = [m for m in args.modes if m != "lxt" or _has_lxt()]
    if REFERENCE not in modes:
        modes.insert(0, REFERENCE)
    loads0, results, stopped = load(), {}, set()
    for n in args.lengths:
        for m in modes:
            if m in stopped:
                continue
            results[(m, n)] = r = measure(m, n, args)
            print(f"# {n} tokens, {m}: {json.dumps(r)}", file=sys.stderr, flush=True)
            if "error" in r or r["seconds"] > args.budget:
                stopped.add(m)
    text = report(results, modes, args.lengths, args, (loads0, load()))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def table_from(args: argparse.Namespace) -> int:
    """The report of the ``# N tokens, mode: {...}`` lines of a sweep's stderr log."""
    results: dict = {}
    for line in open(args.table_from):
        if line.startswith("# ") and " tokens, " in line:
            head, _, data = line[2:].partition(": ")
            n, _, mode = head.partition(" tokens, ")
            results[(mode, int(n))] = json.loads(data)
    modes = [m for m in MODES if any(k[0] == m for k in results)]
    lengths = sorted({k[1] for k in results})
    print(report(results, modes, lengths, args, ("see the log", "see the log")))
    return 0


def _has_lxt() -> bool:
    import importlib.util

    return importlib.util.find_spec("lxt") is not None


if __name__ == "__main__":
    raise SystemExit(main())
