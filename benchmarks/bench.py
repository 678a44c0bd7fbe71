#!/usr/bin/env python
"""attnx speed and memory benchmark on stock (random-init) models.

Measures, in ONE run and side by side, every explanation method of ``attnx.list_methods()`` against
the plain model on the same model object, batch and inputs:

* ``vit``  -- timm ``vit_base_patch16_224`` (``pretrained=False``, 1000 classes, default fused
  attention, ``eval()``), 224x224 random images; ``vit_s`` the same with ``vit_small_patch16_224``;
* ``bert`` -- Hugging Face ``BertForSequenceClassification(BertConfig())`` (12 layers, 768 hidden,
  12 heads, default ``sdpa`` attention, ``eval()``), ``--seq-len`` random word pieces
  ([CLS] ... [SEP], attention mask of ones);
* ``llama`` -- a Llama-shaped Hugging Face ``LlamaForCausalLM`` (random init: 12 layers, 768
  hidden, 12 query heads sharing 4 key/value heads (grouped-query attention), intermediate 2048,
  vocabulary 32000, default ``sdpa`` attention, ``eval()``), ``--seq-len`` (default 512) random
  tokens; the explained output is the next-token logit at the last position.

Baselines (the same ones for every method of a kind):

* ``forward``: ``model(inputs)`` under ``torch.no_grad()``; the baseline of methods that need no
  gradients nor relevance (``get_method(name).needs``: raw_attention, rollout, attention_flow,
  random).
* ``forward+backward``: ``model(inputs)`` with grad enabled, then
  ``torch.autograd.grad(sum_b logits[b, t_b], input)`` where the input is the image tensor (vit)
  or the output of ``get_input_embeddings()`` (bert, llama; a forward hook makes it require grad;
  for llama the logits of the last position, run with ``use_cache=False`` as attnx runs it); the
  baseline of gradient methods, of every method that needs an LRP pass or reads the gradients at
  the block tokens (attcat), and of the perturbation methods (integrated_gradients, occlusion, atman:
  many forwards of the batch); bt_h and bt_t run 20 more forward+backward passes (the integrated
  gradient of the last attention map), so expect about 21x this baseline.

Every method is called as a user would: ``attnx.Explainer(model)(inputs, method=name,
target=targets)``, with the targets ``t_b`` (the predicted classes, fixed once) given explicitly
so the method and the baseline differentiate the same logits.

Timing
------
For each (model, batch, method) series: ``--warmup`` untimed rounds of (baseline, method), then
``--repeats`` timed rounds in which the baseline and the method alternate (B M, M B, B M, ...),
so slow drift and other load hit both equally. Reported: seconds per sample = median time / batch
size; ``x base`` = median over rounds of t_method / t_baseline of the same round (a paired ratio,
robust to load changes between rounds); the baseline rows pool all baseline timings of that kind.
Batch scaling: per-sample time at the smallest batch size / per-sample time at the largest.
Every method also gets ``x fwd+bwd``: its seconds per sample over the forward+backward baseline's
(the pooled median), one scale for all methods. The perturbation methods (``needs.forward``:
occlusion, AtMan, integrated gradients) get a table of their cost per input token: the tokens
(image patches, text tokens) they perturb one by one, the forwards per sample (the rows the model's
forward saw in one untimed call, counted by a pre-hook, over the batch size) and the time per token.
A method may be given with options, as a league row: ``integrated_gradients(n_steps=8)``.

Memory (``--memory``)
---------------------
Each (model, batch, method-or-baseline) is measured in a fresh subprocess: build the model (same
seed), build the inputs, run one plain no-grad forward (which fixes the targets) and one untimed
call of the measured operation (so one-time lazy initialisation is not charged to it), drop the
result, ``gc.collect()`` and ``malloc_trim(0)`` (give freed heap back to the OS so resident memory
is live memory), read ``VmRSS``, reset the kernel's peak-RSS counter (``echo 5 >
/proc/self/clear_refs``), run the operation once, and read ``VmHWM``. The reported number is
``VmHWM - VmRSS_before`` in MB (MiB): the peak resident memory increase of one call, model weights
and inputs excluded. If ``clear_refs`` is not available, ``ru_maxrss`` is used instead (then the
number is a lower bound: the warm-up peaks count as the "before" peak).

Usage
-----
::

    HF_HUB_OFFLINE=1 python benchmarks/bench.py --quick                 # tiny models, smoke test
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --memory --out benchmarks/results.md
    python benchmarks/bench.py --models vit --batch-sizes 1,8 --methods rollout,generic --repeats 3
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import attnx  # noqa: E402

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
BASELINES = (FORWARD, FORWARD_BACKWARD)

# targets from the brief (x of the own baseline; batch scaling for gradient methods)
MAX_RATIO = {FORWARD: 1.3, FORWARD_BACKWARD: 1.5}
# LRP methods have their own targets (x forward+backward); None: no target stated
METHOD_MAX_RATIO = {"transformer_attribution": 2.7, "lrp": 1.4, "partial_lrp": 2.5,
                    # perturbation methods: no target, their cost is stated per step / token / patch
                    # (integrated_gradients ~ n_steps x forward+backward; occlusion ~ (patches or
                    # tokens + 1) forwards; atman ~ (tokens + 2) forwards, no backward)
                    "integrated_gradients": None, "occlusion": None, "atman": None}
#: LRP to the input per preset (``lrp`` alone runs its default preset, attnlrp)
PRESET_MAX_RATIO = {"lrp:attnlrp": 1.4, "lrp:cplrp": 1.2, "lrp:chefer2021": 2.7, "lrp:attnlrp-gamma": 2.7}
#: peak memory, x that of forward + input-backward
METHOD_MAX_MEMORY_RATIO = {"transformer_attribution": 2.0}
# per-model targets that differ from or add to the above: time (x baseline) and peak memory (x baseline)
MODEL_MAX_RATIO = {"llama": {"lrp": 1.6, "generic": 1.5}}
MODEL_MAX_MEMORY_RATIO = {"llama": {"lrp": 1.5}}
#: text tokens per sample when --seq-len is not given
DEFAULT_SEQ_LEN = {"llama": 512}


def max_ratio(method: str, base: str, model: str | None = None) -> float | None:
    name = split_method(method)[0]
    if name in MODEL_MAX_RATIO.get(model, {}):
        return MODEL_MAX_RATIO[model][name]
    if method in PRESET_MAX_RATIO:
        return PRESET_MAX_RATIO[method]
    return METHOD_MAX_RATIO[name] if name in METHOD_MAX_RATIO else MAX_RATIO[base]


def max_memory_ratio(method: str, model: str) -> float | None:
    name = split_method(method)[0]
    return MODEL_MAX_MEMORY_RATIO.get(model, {}).get(name, METHOD_MAX_MEMORY_RATIO.get(name))


def seq_len_of(args: argparse.Namespace, model: str) -> int:
    if args.seq_len is not None:
        return args.seq_len
    return 16 if args.quick else DEFAULT_SEQ_LEN.get(model, 128)
MIN_BATCH_SPEEDUP = 2.0

MODEL_LABELS = {
    "vit": "timm vit_base_patch16_224",
    "vit_s": "timm vit_small_patch16_224",
    "bert": "HF BertForSequenceClassification (bert-base)",
    "llama": "HF LlamaForCausalLM (12 layers, 768 hidden, GQA 12/4 heads, random init)",
}
#: the image models (timm ViTs): image inputs, patches as the perturbed units, no text length
IMAGE_MODELS = ("vit", "vit_s")
QUICK_LABELS = {
    "vit": "timm ViT tiny (quick: 32px, 2 layers, 48 dim)",
    "vit_s": "timm ViT tiny (quick: 32px, 2 layers, 48 dim)",
    "bert": "HF BERT tiny (quick: 2 layers, 48 hidden)",
    "llama": "HF Llama tiny (quick: 2 layers, 48 hidden, GQA 4/2 heads)",
}


# --------------------------------------------------------------------------------------------
# models, inputs, operations
# --------------------------------------------------------------------------------------------
def build_model(name: str, quick: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name in IMAGE_MODELS:
        if quick:
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
        else:
            import timm

            arch = "vit_base_patch16_224" if name == "vit" else "vit_small_patch16_224"
            model = timm.create_model(arch, pretrained=False, num_classes=1000)
    elif name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        if quick:
            config = BertConfig(
                vocab_size=1000,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=3,
                intermediate_size=96,
                max_position_embeddings=64,
            )
        else:
            config = BertConfig()  # bert-base: 12 layers, 768 hidden, 12 heads; sdpa attention
        model = BertForSequenceClassification(config)
    elif name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        if quick:
            config = LlamaConfig(vocab_size=1000, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
        else:
            config = LlamaConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=2048)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_LABELS)}")
    return model.eval()  # as a user explaining a trained model has it


def make_inputs(name: str, model: torch.nn.Module, batch: int, seq_len: int, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed + 1000 * batch)
    if name in IMAGE_MODELS:
        size = tuple(int(s) for s in model.patch_embed.img_size)
        return torch.randn(batch, 3, *size, generator=gen)
    vocab = model.config.vocab_size
    if name == "llama":
        ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cls_id, sep_id = (101, 102) if vocab > 1000 else (1, 2)
    ids = torch.randint(1000 if vocab > 2000 else 3, vocab, (batch, seq_len), generator=gen)
    ids[:, 0] = cls_id
    ids[:, -1] = sep_id
    return {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
    }


def to_device(inputs: Any, device: str) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def run_model(model: torch.nn.Module, inputs: Any, lm_logits: str = "all") -> torch.Tensor:
    """The explained logits ``(B, C)``: a language model's next-token logits at the last position,
    computed at every position (``lm_logits="all"``, the model called as users call it) or at the
    last one only (``"last"``: ``logits_to_keep=1``, as attnx runs it for a next-token target)."""
    if isinstance(inputs, dict):
        if type(model).__name__.endswith("ForCausalLM"):
            keep = {"logits_to_keep": 1} if lm_logits == "last" else {}
            return model(**inputs, use_cache=False, **keep).logits[:, -1]
        return model(**inputs).logits
    return model(inputs)


class Bench:
    """One model and one batch: the baselines and the method calls as zero-argument callables."""

    def __init__(self, name: str, model: torch.nn.Module, inputs: Any, dtype: str = "float32", lm_logits: str = "all",
                 sub_batch: Any = "auto") -> None:
        self.name = name
        self.sub_batch = sub_batch
        self.model = model
        self.inputs = inputs
        self.dtype = dtype
        self.lm_logits = lm_logits
        self.explainer = attnx.Explainer(model)
        with torch.no_grad(), self.precision():  # also the warm-up forward
            self.targets = run_model(model, inputs, lm_logits).argmax(dim=1)

    def precision(self) -> Any:
        """bfloat16 autocast when asked for (an opt-in: the model's weights stay float32)."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=getattr(torch, self.dtype))

    def forward(self) -> Any:
        with torch.no_grad(), self.precision():
            return run_model(self.model, self.inputs, self.lm_logits)

    def forward_backward(self) -> Any:
        with torch.enable_grad(), self.precision():
            if isinstance(self.inputs, dict):
                box: list[torch.Tensor] = []

                def hook(module, args, output):
                    out = output.detach().requires_grad_(True)
                    box.append(out)
                    return out

                handle = self.model.get_input_embeddings().register_forward_hook(hook)
                try:
                    logits = run_model(self.model, self.inputs, self.lm_logits)
                finally:
                    handle.remove()
                wrt = box[0]
            else:
                wrt = self.inputs.detach().requires_grad_(True)
                logits = run_model(self.model, wrt, self.lm_logits)
            score = logits.gather(1, self.targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, wrt)
        return grad

    def method(self, name: str) -> Callable[[], Any]:
        method, options = split_method(name)

        def call() -> Any:
            with self.precision():
                return self.explainer(self.inputs, method=method, target=self.targets, sub_batch=self.sub_batch, **options)

        return call

    def op(self, name: str) -> Callable[[], Any]:
        if name == FORWARD:
            return self.forward
        if name == FORWARD_BACKWARD:
            return self.forward_backward
        return self.method(name)


def split_method(name: str) -> tuple[str, dict]:
    """``"lrp:cplrp"`` -> ``("lrp", {"preset": "cplrp"})``: a method with its LRP preset;
    ``"method(option=value, ...)"`` -> the method and its parsed options (as a league row)."""
    if "(" in name:
        from attnx.evaluate.rows import parse_row

        return parse_row(name)
    if ":" in name:
        method, preset = name.split(":", 1)
        return method, {"preset": preset}
    return name, {}


def input_tokens(name: str, model: torch.nn.Module, inputs: Any) -> int:
    """The units a perturbation method perturbs one by one: image patches (vit) or text tokens."""
    if name in IMAGE_MODELS:
        return int(model.patch_embed.num_patches)
    return int(inputs["input_ids"].shape[1])


def rows_forwarded(model: torch.nn.Module, call: Callable[[], Any]) -> int:
    """The samples (rows) the model's forward saw during one ``call`` (a pre-hook on the model)."""
    count = [0]

    def hook(module, args, kwargs):
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        count[0] += int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return count[0]


def baseline_of(method: str) -> str:
    spec = attnx.get_method(split_method(method)[0])
    # gradients, relevance, block tokens, path; perturbation methods (needs.forward) as the gradient methods
    return FORWARD_BACKWARD if (spec.needs.backward or spec.needs.forward) else FORWARD


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()
    t = time.perf_counter() - t0
    del out
    return t


def time_series(base: Callable[[], Any], meth: Callable[[], Any], repeats: int, warmup: int):
    """Alternate baseline and method; return (baseline times, method times) of the timed rounds."""
    for _ in range(warmup):
        base()
        meth()
    tb, tm = [], []
    for r in range(repeats):
        gc.collect()
        if r % 2 == 0:
            tb.append(timed(base))
            tm.append(timed(meth))
        else:
            tm.append(timed(meth))
            tb.append(timed(base))
    return tb, tm


# --------------------------------------------------------------------------------------------
# memory (fresh subprocess per measurement)
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict) -> dict:
    if spec["allocator"] == "reuse":
        attnx.reuse_freed_memory()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], spec["quick"], spec["seed"]).to(spec["device"])
    inputs = to_device(make_inputs(spec["model"], model, spec["batch"], spec["seq_len"], spec["seed"]), spec["device"])
    bench = Bench(spec["model"], model, inputs, spec["dtype"], spec["lm_logits"], spec["sub_batch"])  # includes the plain warm-up forward
    op = bench.op(spec["op"])
    out = op()  # warm-up call of the measured operation
    del out
    gc.collect()
    if spec["device"].startswith("cuda"):  # device memory: the allocator's peak
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = op()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"rss_before_kb": before // 1024, "peak_kb": peak // 1024, "increase_kb": (peak - before) // 1024, "exact": True}
    _malloc_trim()
    rss_before = _status_kb("VmRSS")
    exact = _reset_peak() and rss_before is not None
    if not exact:
        rss_before = rss_before or 0
    out = op()
    peak = _status_kb("VmHWM") if exact else None
    if peak is None:
        exact = False
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    del out
    return {"rss_before_kb": rss_before, "peak_kb": peak, "increase_kb": max(peak - rss_before, 0), "exact": exact}


def measure_memory(args: argparse.Namespace, model: str, batch: int, op: str) -> dict:
    spec = {
        "model": model,
        "quick": args.quick,
        "batch": batch,
        "seq_len": seq_len_of(args, model),
        "lm_logits": args.lm_logits,
        "op": op,
        "threads": args.threads,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "sub_batch": args.sub_batch,
        "allocator": args.allocator,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("ATTNX_MEM "):
            return json.loads(line[len("ATTNX_MEM "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:120]}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 1:
        return f"{x:.3f}"
    if x >= 0.01:
        return f"{x:.4f}"
    return f"{x * 1000:.3f} ms"


def fmt_x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def fmt_mb(kb: float | None) -> str:
    if kb is None:
        return "–"
    mb = kb / 1024
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def allocator_note(choice: str) -> str:
    if choice == "reuse":
        return "freed memory kept for reuse (`attnx.reuse_freed_memory()`)"
    preload = os.environ.get("LD_PRELOAD")
    tuned = [k for k in os.environ if k.startswith("MALLOC_")]
    return "default" + (f", LD_PRELOAD={preload}" if preload else "") + (f", {', '.join(sorted(tuned))} set" if tuned else "")


def parse_list(text: str, cast=str) -> list:
    if cast is str:  # method rows may carry options with commas: name(a=1, b=2)
        from attnx.evaluate.rows import split_rows

        return split_rows(text)
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def sub_batch_arg(text: str) -> Any:
    return None if text == "none" else text if text == "auto" else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit,bert", help="comma list from: vit, vit_s, bert, llama (default vit,bert)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,16; --quick: 1,4)")
    p.add_argument("--methods", default=None, help="comma list (default: all of attnx.list_methods())")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per series (default 5; --quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per series (default 1)")
    p.add_argument("--seq-len", type=int, default=None, help="text tokens per sample (default 128, llama 512; --quick: 16)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="also measure peak RSS increase (fresh subprocess each)")
    p.add_argument("--quick", action="store_true", help="tiny models, small batches: a smoke test")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--lm-logits", choices=("all", "last"), default="all",
                   help="the llama baseline's logits: at every position, as the model is usually called "
                        "(default), or at the last one only (logits_to_keep=1, as attnx computes them for a "
                        "next-token target)")
    p.add_argument("--device", default="cpu", help="torch device of the model and inputs (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: every call under torch.autocast (opt-in; weights stay float32)")
    p.add_argument("--allocator", default="default", choices=("default", "reuse"),
                   help="reuse: attnx.reuse_freed_memory() first (glibc keeps freed memory for reuse; see "
                        "attnx/core/allocator.py); default: the C library's own setting")
    p.add_argument("--sub-batch", type=sub_batch_arg, default="auto",
                   help="attnx.explain's sub_batch: auto (default: shares whose temporaries glibc reuses, "
                        "attnx/core/sub_batches.py), none (the batch whole) or a number of samples")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker is not None:
        print("ATTNX_MEM " + json.dumps(memory_worker(json.loads(args.memory_worker))), flush=True)
        return 0
    if args.batch_sizes is None:
        args.batch_sizes = "1,4" if args.quick else "1,16"
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    models = parse_list(args.models)
    batch_sizes = parse_list(args.batch_sizes, int)
    methods = parse_list(args.methods) if args.methods else attnx.list_methods()
    for m in methods:
        attnx.get_method(split_method(m)[0])  # unknown names fail early with the list of methods
    for m in models:
        if m not in MODEL_LABELS:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(MODEL_LABELS)}")
    labels = QUICK_LABELS if args.quick else MODEL_LABELS
    torch.set_num_threads(args.threads)
    reused = args.allocator == "reuse" and attnx.reuse_freed_memory()
    if args.allocator == "reuse" and not reused:
        raise SystemExit("--allocator reuse needs glibc (Linux); this C library allocates differently")

    start = time.time()
    load_start = os.getloadavg()
    log = lambda msg: print(f"[{time.time() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    # ---- timing ---------------------------------------------------------------------------
    # res[(model, batch, op)] = dict(per_sample, base_per_sample, ratio, base, error)
    res: dict[tuple, dict] = {}
    for name in models:
        model = build_model(name, args.quick, args.seed).to(args.device)
        for bs in batch_sizes:
            inputs = to_device(make_inputs(name, model, bs, seq_len_of(args, name), args.seed), args.device)
            bench = Bench(name, model, inputs, args.dtype, args.lm_logits, args.sub_batch)
            pooled: dict[str, list[float]] = {b: [] for b in BASELINES}
            for meth in methods:
                base = baseline_of(meth)
                log(f"{name} B={bs} {meth} vs {base}")
                try:
                    tb, tm = time_series(bench.op(base), bench.method(meth), args.repeats, args.warmup)
                except Exception as exc:  # report, do not abort the whole run
                    res[(name, bs, meth)] = {"base": base, "error": f"{type(exc).__name__}: {exc}"[:100]}
                    continue
                pooled[base] += tb
                res[(name, bs, meth)] = {
                    "base": base,
                    "per_sample": statistics.median(tm) / bs,
                    "base_per_sample": statistics.median(tb) / bs,
                    "ratio": statistics.median(m / b for m, b in zip(tm, tb)),
                }
                r = res[(name, bs, meth)]
                log(f"{name} B={bs} {meth}: {r['ratio']:.2f}x {base} ({fmt_s(r['per_sample'])} vs "
                    f"{fmt_s(r['base_per_sample'])} s/sample, rounds {[round(m / b, 2) for m, b in zip(tm, tb)]})")
            for b in BASELINES:
                if not pooled[b]:  # no method of that kind ran: time the baseline on its own
                    log(f"{name} B={bs} {b} (alone)")
                    op = bench.op(b)
                    for _ in range(args.warmup):
                        op()
                    pooled[b] = [timed(op) for _ in range(args.repeats)]
                res[(name, bs, b)] = {"base": b, "per_sample": statistics.median(pooled[b]) / bs, "n": len(pooled[b])}
            fb = res[(name, bs, FORWARD_BACKWARD)]["per_sample"]
            for meth in methods:  # every method against forward + backward too (unpaired: the pooled median)
                r = res[(name, bs, meth)]
                if "error" not in r:
                    r["ratio_fb"] = r["per_sample"] / fb
                    if attnx.get_method(split_method(meth)[0]).needs.forward:  # perturbation methods: cost per token
                        r["tokens"] = input_tokens(name, model, inputs)
                        r["forwards"] = rows_forwarded(model, bench.method(meth)) / bs
            del bench, inputs
            gc.collect()
        del model
        gc.collect()
    time_elapsed = time.time() - start

    # ---- memory ---------------------------------------------------------------------------
    mem: dict[tuple, dict] = {}
    if args.memory:
        for name in models:
            for bs in batch_sizes:
                for op in (*BASELINES, *methods):
                    log(f"memory {name} B={bs} {op}")
                    mem[(name, bs, op)] = measure_memory(args, name, bs, op)
    total_elapsed = time.time() - start
    load_end = os.getloadavg()

    # ---- report ---------------------------------------------------------------------------
    ops = [*BASELINES, *methods]
    lines = []
    lines.append("# attnx benchmark")
    lines.append("")
    lines.append(
        f"{datetime.datetime.now().isoformat(timespec='seconds')} · torch {torch.__version__} · "
        f"attnx {attnx.__version__} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} CPUs, torch threads {args.threads} · seed {args.seed} · "
        f"repeats {args.repeats} (warm-up {args.warmup}) · allocator: {allocator_note(args.allocator)} · sub_batch {args.sub_batch} · text length "
        + ", ".join(f"{m} {seq_len_of(args, m)}" for m in models if m not in IMAGE_MODELS) + " tokens"
        + (" · **--quick (tiny models)**" if args.quick else "")
    )
    lines.append("")
    lines.append("Command: `" + " ".join(["python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]) + "`")
    lines.append("")
    lines.append(
        f"1-min load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (a busy machine inflates "
        f"and scatters the timings) · timing {time_elapsed:.0f} s"
        + (f", memory {total_elapsed - time_elapsed:.0f} s" if args.memory else "")
    )
    lines.append("")
    lines.append(
        "s/sample = median seconds per call / batch size. × base = median over alternating rounds of "
        "t(method) / t(baseline) on the same model, batch and inputs; × fwd+bwd = every method's s/sample over "
        "the forward+backward baseline's (its pooled median), one scale for all methods. Baselines: forward = no-grad "
        "forward; forward+backward = forward + `autograd.grad(target logits, input)` (image / embedding "
        f"output; llama's logits computed at {'the last position only' if args.lm_logits == 'last' else 'every position'}). Targets: ≤ 1.3× forward (non-gradient methods), ≤ 1.5× forward+backward (gradient "
        "methods); at batch 16 transformer_attribution ≤ 2.7× (peak memory ≤ 2×), partial_lrp ≤ 2.5×, lrp "
        "(attnlrp) ≤ 1.4×, cplrp ≤ 1.2×, chefer2021 and attnlrp-gamma ≤ 2.7×; llama: lrp ≤ 1.6× "
        "time and ≤ 1.5× peak memory, generic ≤ 1.5× time. `lrp:NAME` is lrp with the LRP preset NAME."
        + (
            " Peak MB = peak RSS increase of one call over the RSS before it (fresh subprocess, model "
            "and inputs resident, after warm-up; VmHWM reset via /proc/self/clear_refs)."
            if args.memory
            else ""
        )
    )
    lines.append("")
    header = ["model", "batch", "method", "baseline", "s/sample", "baseline s/sample", "× base", "× fwd+bwd", "time target"]
    if args.memory:
        header += ["peak MB", "baseline peak MB", "mem × base", "memory target"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---"] + ["---:"] * 4 + ["---"] + (["---:"] * 3 + ["---"] if args.memory else [])) + "|")
    for name in models:
        for bs in batch_sizes:
            for op in ops:
                r = res.get((name, bs, op))
                if r is None:
                    continue
                is_base = op in BASELINES
                row = [labels[name], str(bs), f"*{op}*" if is_base else op, "–" if is_base else r["base"]]
                if "error" in r:
                    row += ["error", "–", "–", "–", r["error"]]
                elif is_base:
                    fb = res[(name, bs, FORWARD_BACKWARD)]["per_sample"]
                    row += [fmt_s(r["per_sample"]), "–", "1.00×", fmt_x(r["per_sample"] / fb), "–"]
                else:
                    lim = max_ratio(op, r["base"], name)
                    row += [
                        fmt_s(r["per_sample"]),
                        fmt_s(r["base_per_sample"]),
                        fmt_x(r["ratio"]),
                        fmt_x(r.get("ratio_fb")),
                        "–" if lim is None else f"≤ {lim}× {verdict(r['ratio'] <= lim)}",
                    ]
                if args.memory:
                    m = mem.get((name, bs, op), {})
                    mb = mem.get((name, bs, r["base"]), {})
                    if "error" in m:
                        row += ["error: " + m["error"], "–", "–", "–"]
                    elif is_base:
                        row += [fmt_mb(m.get("increase_kb")), "–", "1.00×", "–"]
                    else:
                        inc, binc = m.get("increase_kb"), mb.get("increase_kb")
                        ratio = inc / binc if inc is not None and binc else None
                        mlim = max_memory_ratio(op, name)
                        target = "–" if mlim is None or ratio is None else f"≤ {mlim}× {verdict(ratio <= mlim)}"
                        row += [fmt_mb(inc), fmt_mb(binc), fmt_x(ratio), target]
                lines.append("| " + " | ".join(row) + " |")
    costs = [(name, bs, op, res[(name, bs, op)]) for name in models for bs in batch_sizes for op in methods
             if "forwards" in res.get((name, bs, op), {})]
    if costs:
        lines.append("")
        lines.append("## Perturbation methods: cost per input token (patch)")
        lines.append("")
        lines.append("Forwards / sample = the rows the model's forward saw in one call / batch size (counted by a pre-hook "
                     "on the model); tokens = the units perturbed one by one (image patches, text tokens); ms / token = "
                     "s/sample / tokens. Occlusion and AtMan cost about one forward per token: their time grows with the "
                     "input's length (integrated gradients: n_steps forwards and backwards, whatever the length).")
        lines.append("")
        lines.append("| model | batch | method | tokens | forwards / sample | ms / token | × fwd+bwd |")
        lines.append("|---|---|---|---:|---:|---:|---:|")
        for name, bs, op, r in costs:
            lines.append(f"| {labels[name]} | {bs} | {op} | {r['tokens']} | {r['forwards']:.1f} | "
                         f"{1000 * r['per_sample'] / r['tokens']:.3f} | {fmt_x(r['ratio_fb'])} |")
    if args.memory and any(not v.get("exact", True) for v in mem.values() if "error" not in v):
        lines.append("")
        lines.append("Note: /proc/self/clear_refs was unavailable; memory numbers use ru_maxrss (lower bounds).")

    if len(batch_sizes) > 1:
        lo, hi = min(batch_sizes), max(batch_sizes)
        lines.append("")
        lines.append(f"## Batch scaling: per-sample speed-up of batch {hi} over batch {lo}")
        lines.append("")
        lines.append(f"Target for gradient methods: ≥ {MIN_BATCH_SPEEDUP:g}× faster per sample at batch {hi}.")
        lines.append("")
        lines.append(f"| model | method | s/sample B={lo} | s/sample B={hi} | speed-up | target |")
        lines.append("|---|---|---:|---:|---:|---|")
        for name in models:
            for op in ops:
                a, b = res.get((name, lo, op)), res.get((name, hi, op))
                if not a or not b or "error" in a or "error" in b:
                    continue
                sp = a["per_sample"] / b["per_sample"]
                grad = op == FORWARD_BACKWARD or (op not in BASELINES and baseline_of(op) == FORWARD_BACKWARD)
                target = "–"
                if grad and op not in BASELINES:
                    target = f"≥ {MIN_BATCH_SPEEDUP:g}× {verdict(sp >= MIN_BATCH_SPEEDUP)}"
                shown = f"*{op}*" if op in BASELINES else op
                lines.append(
                    f"| {labels[name]} | {shown} | {fmt_s(a['per_sample'])} | {fmt_s(b['per_sample'])} | "
                    f"{sp:.2f}× | {target} |"
                )

    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        log(f"wrote {args.out}")
    log(f"done in {total_elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
