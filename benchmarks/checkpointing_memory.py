#!/usr/bin/env python
"""Peak memory of attnx's methods on a model with and without gradient checkpointing.

The model: a random Hugging Face ``LlamaForCausalLM`` (hidden 256, 8 layers, 8 query heads sharing
2 key/value heads, intermediate 1024, vocabulary 32000, float32, ``sdpa``, ``eval()``), batch 1,
random tokens, the next-token logit of a fixed token explained; ``checkpointing``: the same model
after ``gradient_checkpointing_enable()``, which attnx keeps on (:mod:`attnx.core.checkpointing`).
Every (method, checkpointing, length) runs in a fresh process and reports the peak resident
memory increase of one call (as ``benchmarks/long_context.py`` measures it: ``VmHWM`` after
``clear_refs``), with the maps of both runs compared.

    HF_HUB_OFFLINE=1 python benchmarks/checkpointing_memory.py
    python benchmarks/checkpointing_memory.py --lengths 512 1024 --methods generic lrp
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

METHODS = ("fwd+bwd", "generic", "grad_rollout", "lrp", "gradient_x_input")
TOKEN = 7
CONFIG = dict(vocab_size=32000, hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=1024, max_position_embeddings=65536)


def worker(spec: dict) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import _malloc_trim, _reset_peak, _status_kb

    torch.set_num_threads(1)
    import transformers as tr

    import attnx

    torch.manual_seed(0)
    model = tr.LlamaForCausalLM._from_config(tr.LlamaConfig(**CONFIG), attn_implementation="sdpa").eval()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.eval()
    ids = torch.randint(3, CONFIG["vocab_size"], (1, spec["length"]), generator=torch.Generator().manual_seed(1))

    def op(ids):
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if spec["method"] == "fwd+bwd":  # the model's own forward and backward, checkpointed when on
            model.train(spec["checkpointing"])  # Hugging Face checkpoints in training mode only (no dropout here)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, attention_mask=x["attention_mask"], use_cache=False, logits_to_keep=1).logits
            (g,) = torch.autograd.grad(logits[:, -1, TOKEN].sum(), emb)
            model.eval()
            return (emb * g).sum(-1)
        return attnx.explain(model, x, method=spec["method"], target=TOKEN).scores

    op(ids[:, :64])
    gc.collect()
    _malloc_trim()
    before = _status_kb("VmRSS") * 1024
    exact = _reset_peak()
    out = op(ids)
    peak = (_status_kb("VmHWM") if exact else 0) * 1024
    return {"peak_mb": max(peak - before, 0) / 2**20, "exact": exact, "map": out.detach().flatten().tolist()}


def measure(method: str, checkpointing: bool, length: int) -> dict:
    spec = json.dumps({"method": method, "checkpointing": checkpointing, "length": length})
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec], capture_output=True, text=True)
    if run.returncode:
        return {"error": run.stderr.strip().splitlines()[-1][:120]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    print(f"load: {os.getloadavg()}")
    print("| method | tokens | peak MB, plain | peak MB, checkpointing | ratio | max abs map difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        for method in args.methods:
            plain, ckpt = measure(method, False, length), measure(method, True, length)
            if "error" in plain or "error" in ckpt:
                print(f"| {method} | {length} | error: {plain.get('error') or ckpt.get('error')} | | | |", flush=True)
                continue
            diff = float((torch.tensor(plain["map"]) - torch.tensor(ckpt["map"])).abs().max())
            print(f"| {method} | {length} | {plain['peak_mb']:.0f} | {ckpt['peak_mb']:.0f} | "
                  f"{ckpt['peak_mb'] / max(plain['peak_mb'], 1e-9):.2f} | {diff:.2g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
