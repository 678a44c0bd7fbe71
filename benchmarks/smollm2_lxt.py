"""AttnLRP on SmolLM2-135M-Instruct: attnx's ``lrp`` (preset ``attnlrp``) beside lxt 2.1, by prompt length.

For each prompt length (default 128, 256, 512, 1024 tokens) and each of

* ``fwd+bwd``: the model's forward and one plain gradient to the input embeddings (the reference cost),
* ``attnx``: ``attnx.explain(model, batch, method="lrp", preset="attnlrp")`` (the next token explained),
* ``lxt``: lxt 2.1's efficient AttnLRP (its Llama patch map, eager attention) and one gradient,

a **fresh subprocess** loads the model (float32), runs once to warm up, then times ``--repeats`` runs
(the median is reported) and reports its peak resident memory above what it held after the warm-up's
start (``ru_maxrss``: the process's high-water mark, so every measurement has its own process).
Times are printed as ratios to ``fwd+bwd`` at the same length.

    python benchmarks/smollm2_lxt.py                       # the table, markdown on stdout
    python benchmarks/smollm2_lxt.py --lengths 128 256 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

MODES = ("fwd+bwd", "attnx", "lxt")
#: lxt is loaded by the tests' helper (tests/lxt_reference.py)
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")

WORKER = textwrap.dedent(
    """
    import json, resource, statistics, sys, time
    import torch
    mode, length, repeats = {mode!r}, {length}, {repeats}
    torch.manual_seed(0)
    sys.path[:0] = [{tests!r}]
    from lxt_reference import input_relevance, patch_attnlrp
    if mode == "lxt":  # lxt's Llama patch map, loaded as the parity tests load it
        patch_attnlrp("llama")
    from transformers import AutoModelForCausalLM
    from attnx.zoo import smollm2
    folder = str(smollm2.cached_folder())
    impl = "eager" if mode == "lxt" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (1, length))
    batch = {{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}

    import attnx  # imported before the memory baseline, whatever the mode

    def run():
        if mode == "attnx":
            return attnx.explain(model, batch, method="lrp", preset="attnlrp").input_relevance
        # fwd+bwd: a plain gradient × input of the unpatched model; lxt: the same on lxt's patched one
        return input_relevance(model, {{**batch, "logits_to_keep": 1}}, lambda logits: logits[:, -1].max(-1).values)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps({{"seconds": statistics.median(times), "peak_mb": peak / 1024}}))
    """
)


def measure(mode: str, length: int, repeats: int) -> dict:
    """Time and peak memory of one mode at one length, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = WORKER.format(mode=mode, length=length, repeats=repeats, tests=TESTS)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} at {length} tokens failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    for length in args.lengths:
        r = {m: measure(m, length, args.repeats) for m in MODES}
        rows.append((length, r))
        print(f"# {length} tokens: " + json.dumps(r), file=sys.stderr, flush=True)
    print("| tokens | fwd+bwd s | attnx lrp (attnlrp) × | lxt × | fwd+bwd peak MB | attnx peak MB | lxt peak MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length, r in rows:
        base = r["fwd+bwd"]["seconds"]
        print(f"| {length} | {base:.2f} | {r['attnx']['seconds'] / base:.2f} | {r['lxt']['seconds'] / base:.2f} | "
              f"{r['fwd+bwd']['peak_mb']:.0f} | {r['attnx']['peak_mb']:.0f} | {r['lxt']['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
