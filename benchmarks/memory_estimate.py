#!/usr/bin/env python
"""Measured peak memory of ``attnx.explain`` against ``attnx.estimate``, on small random models.

Every (model, method, size) runs in a **fresh process**: build the model, run the method once on a
small input (one-time initialisation), then ``malloc_trim``, read ``VmRSS``, reset the kernel's peak
(``/proc/self/clear_refs``), run the call and read ``VmHWM``: the peak resident memory increase of
one call, weights excluded. The call is then run once more under ``torch.profiler`` (memory
events): the peak of the bytes torch's allocator holds above the bytes before the call, which,
unlike the resident memory, does not depend on how the C allocator reuses its arenas (the resident
peak of one point varies by up to ~35 % between identical processes). Both are compared with the
estimate's bytes beyond the weights (``MemoryEstimate.pass_bytes``). Models (random weights, float32):

* ``llama``: the ``LlamaForCausalLM`` of ``benchmarks/long_context.py`` (hidden 256, 4 layers, 8
  query heads sharing 2 key/value heads, intermediate 1024, vocabulary 32000, ``sdpa``), batch 1;
* ``vit``: timm ``vit_tiny_patch16_224`` (12 layers, 3 heads, hidden 192) at the size given, batch 2;
* ``bert``: a Hugging Face ``BertForSequenceClassification`` (hidden 128, 4 layers, 4 heads,
  intermediate 512, ``sdpa``), batch 2.

    HF_HUB_OFFLINE=1 python benchmarks/memory_estimate.py                 # the points of docs/memory.md
    python benchmarks/memory_estimate.py --points llama:generic:512 vit:lrp:384
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

METHODS = ("gradient_x_input", "lrp", "generic", "rollout", "transformer_attribution")
#: the points of docs/memory.md's table: model:method:size (tokens; the image side for vit)
POINTS = (
    *(f"llama:{m}:512" for m in METHODS), "llama:lrp:1024", "llama:generic:1024", "llama:transformer_attribution:1024",
    *(f"bert:{m}:512" for m in METHODS),
    *(f"vit:{m}:224" for m in METHODS), "vit:generic:384", "vit:transformer_attribution:384",
)
LLAMA = dict(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1024, max_position_embeddings=65536)
BERT = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=4096)


def build(kind: str, size: int):
    """``(model, inputs(size), target)`` for one of the three models."""
    import torch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, dynamic_img_size=True).eval()
        return model, lambda n: torch.randn(2, 3, n, n, generator=g), 3
    import transformers as tr

    if kind == "llama":
        model = tr.LlamaForCausalLM._from_config(tr.LlamaConfig(**LLAMA), attn_implementation="sdpa").eval()
        batch = 1
    else:
        model = tr.BertForSequenceClassification._from_config(tr.BertConfig(**BERT), attn_implementation="sdpa").eval()
        batch = 2

    def inputs(n: int) -> dict:
        ids = torch.randint(3, 30000, (batch, n), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, inputs, 7 if kind == "llama" else 1


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M).group(1))


def allocator_peak(call) -> int:
    """Peak bytes torch's allocator holds during ``call()`` above what it held before, read from
    the profiler's memory events (each carries the running total after it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def worker(point: str) -> dict:
    import torch

    import attnx

    torch.set_num_threads(1)
    kind, method, size = point.split(":")
    model, inputs, target = build(kind, int(size))
    small = 64 if kind == "vit" else 32
    attnx.explain(model, inputs(small), method=method, target=target)  # one-time initialisation
    x = inputs(int(size))
    plan = attnx.estimate(model, x, method=method)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = attnx.explain(model, x, method=method, target=target, check_memory=False)
    peak = _status_kb("VmHWM")
    del out
    measured = max(peak - before, 0) * 1024
    gc.collect()
    allocated = allocator_peak(lambda: attnx.explain(model, x, method=method, target=target, check_memory=False))
    return {"point": point, "measured_mb": measured / 2**20, "estimated_mb": plan.pass_bytes / 2**20,
            "allocated_mb": allocated / 2**20,
            "error": plan.pass_bytes / measured - 1 if measured else None,
            "over_allocated": plan.pass_bytes / allocated - 1 if allocated else None,
            "terms_mb": {k: round(v / 2**20, 1) for k, v in plan.terms.items()}}


def measure(point: str, timeout: float = 600.0) -> dict:
    """Run :func:`worker` for ``point`` in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", point]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("MEMEST "):
            return json.loads(line[len("MEMEST "):])
    raise RuntimeError(f"{point}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="+", default=list(POINTS), help="model:method:size")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("MEMEST " + json.dumps(worker(args.worker)), flush=True)
        return 0
    print("| model | method | size | resident MiB | allocated MiB | estimated MiB | vs resident | vs allocated |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for point in args.points:
        r = measure(point)
        kind, method, size = point.split(":")
        print(f"| {kind} | {method} | {size} | {r['measured_mb']:.0f} | {r['allocated_mb']:.0f} | {r['estimated_mb']:.0f} "
              f"| {r['error']:+.0%} | {r['over_allocated']:+.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
