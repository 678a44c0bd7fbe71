"""Train attnx's embedded CLIP: a stock Hugging Face ``CLIPModel`` with small towers, contrastively, on
captioned garment scenes.

Images are the scenes of one or two Fashion-MNIST garments on clutter of :func:`attnx.data.make_scenes`
(train split of Fashion-MNIST; every step composes a fresh batch, seeded by the step), each paired
with one caption drawn by :func:`attnx.data.captions.sample_caption` ("a bag and a coat", "where is
the sneaker?", "a coat to the left of a bag", ...). The loss is CLIP's: the symmetric InfoNCE
(cross-entropy image -> text and text -> image over the batch) of cosine similarities times a
learnt temperature ``exp(logit_scale)`` (capped at 100). A caption that is equally true of another
scene of the batch (e.g. "where is the bag?" and two scenes with a bag) does not count that scene
among its negatives (both directions).

The model is a stock ``transformers.CLIPModel``: vision tower a ViT on 64x64 RGB input with 8x8
patches, text tower a causal Transformer over a word-level vocabulary of the caption templates
(``tokenizers`` ``WordLevel``: lowercase, whitespace and punctuation split keeping hyphens,
``[BOS] words [EOS]``, right padding; the pooled text token is the first ``[EOS]``). By default
the vision tower takes the shape and the weights of the embedded ViT (``attnx.zoo.vision_model()``,
trained on the same scenes; see :func:`init_from_vit`), frozen for the first 100 steps and then
trained at a quarter of the learning rate, as in LiT (Zhai et al. 2022); ``--init-vision none``
trains it from random weights.

Writes to ``--out`` (default ``attnx/zoo/assets``):

* ``clip_fashion_scenes.safetensors``   float16 weights (the ``CLIPModel`` state dict)
* ``clip_fashion_scenes.json``          the ``CLIPConfig``, normalisation, class names and words,
                                        held-out metrics, the training command and its wall time
* ``clip_fashion_scenes_tokenizer.json``  the tokenizer (``tokenizers`` JSON)

Held-out metrics (scenes composed from the Fashion-MNIST *t10k* split, float16 weights as shipped):
retrieval among groups of 16 scenes with distinct garment sets, image -> text and text -> image
(chance 1/16); the garment set among all 55 ("a photo of a bag and a coat", chance 1/55); zero-shot
classification of one-garment scenes with "a photo of a {class}" (chance 1/10); the two garments
of two-garment scenes as the two best of the ten prompts "a {class}" (chance 1/45).

The shipped model: ``python training/train_clip.py --eval-every 100`` (the defaults: 400 steps of
128 scenes; 0.65 M parameters, 1.3 MB), 18 min of wall time and 293 s of CPU time on 2 cores shared
with other jobs. Held-out: retrieval among 16 81.4 % image -> text, 85.2 % text -> image; garment
set 67.9 %; zero-shot 79.7 %; two-garment top-2 58.2 %. The same 400 steps from random vision
weights (``--init-vision none``): retrieval 30.4 % / 31.3 %, zero-shot 32.3 % (on 300 + 300 scenes).

Needs the Fashion-MNIST IDX files (``apt-get install dataset-fashion-mnist``). One thread, low
priority::

    nice -n 19 python training/train_clip.py
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

import numpy as np
import torch
import torch.nn.functional as F

from attnx.data import CLASS_NAMES, make_scenes
from attnx.data.captions import CLASS_WORDS, class_prompt, label_set_caption, sample_caption, template_texts
from attnx.data.scenes import Scenes
from attnx.zoo.clip import FORMAT, INFO_FILE, SPECIALS, TOKENIZER_FILE, WEIGHTS_FILE, caption_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
# seeds: training batches are seed * 1_000_003 + step; the held-out sets use other streams
TEST_SEEDS = (9_200_001, 9_200_002, 9_200_003)   # t10k garments: one-, two-garment scenes; captions
VAL_SEEDS = (7_200_001, 7_200_002, 7_200_003)    # train-split garments, for monitoring only
GROUP = 16                            # retrieval candidates


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def build_config(args, tokenizer):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=args.text_width, intermediate_size=2 * args.text_width,
                num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
                max_position_embeddings=args.max_length, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=args.width, intermediate_size=int(args.mlp_ratio * args.width),
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, image_size=SIZE,
                  patch_size=args.patch, num_channels=3)
    if args.init_vision == "vit":  # the embedded ViT's activation and LayerNorm epsilon
        vision.update(hidden_act="gelu", layer_norm_eps=1e-6)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection)


def vit_geometry(args) -> None:
    """Make the vision tower's shape that of the embedded ViT (its weights initialise the tower)."""
    from attnx.zoo.vision import read_info

    k = read_info()["model_kwargs"]
    if k["img_size"] != SIZE:
        raise SystemExit(f"the embedded ViT takes {k['img_size']}px input, the scenes are {SIZE}px")
    args.width, args.layers, args.heads = k["embed_dim"], k["depth"], k["num_heads"]
    args.patch, args.mlp_ratio = k["patch_size"], k["mlp_ratio"]


@torch.no_grad()
def init_from_vit(model, x: torch.Tensor) -> dict:
    """Initialise the vision tower from the embedded timm ViT (same width, depth, heads, patches).

    Exact but for one module: timm adds the patch projection's bias, CLIP has none (folded into
    the patch position embeddings); CLIP normalises the embeddings before the first layer
    (``pre_layrnorm``), timm does not. Its gain and bias are set to the mean standard deviation and
    mean of the ViT's embedding tokens over ``x``: the first layer's normalised input is then
    unchanged, the residual stream is scaled per token by a constant instead of each token's own
    statistics. Returns the ViT's held-out-free check: its class logits through the initialised
    tower's pooled output (the ViT's head), next to the ViT's own, on ``x``.
    """
    from attnx import zoo

    vit = zoo.vision_model().model
    tower = model.vision_model
    emb = tower.embeddings
    emb.patch_embedding.weight.copy_(vit.patch_embed.proj.weight)
    emb.class_embedding.copy_(vit.cls_token[0, 0])
    pos = vit.pos_embed[0].clone()
    pos[vit.num_prefix_tokens:] += vit.patch_embed.proj.bias
    emb.position_embedding.weight.copy_(pos)
    tokens = torch.cat([vit.cls_token.expand(len(x), -1, -1), vit.patch_embed(x)], 1) + vit.pos_embed
    tower.pre_layrnorm.weight.fill_(tokens.std(-1, unbiased=False).mean().item())
    tower.pre_layrnorm.bias.fill_(tokens.mean().item())
    for block, layer in zip(vit.blocks, tower.encoder.layers):
        att = layer.self_attn
        for proj, w, b in zip((att.q_proj, att.k_proj, att.v_proj), block.attn.qkv.weight.chunk(3),
                              block.attn.qkv.bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        pairs = [(att.out_proj, block.attn.proj), (layer.layer_norm1, block.norm1), (layer.layer_norm2, block.norm2),
                 (layer.mlp.fc1, block.mlp.fc1), (layer.mlp.fc2, block.mlp.fc2)]
        for ours, theirs in pairs:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    tower.post_layernorm.weight.copy_(vit.norm.weight)
    tower.post_layernorm.bias.copy_(vit.norm.bias)
    ours = vit.head(tower(pixel_values=x).pooler_output)
    theirs = vit(x)
    return {"agreement_top1": float((ours.argmax(1) == theirs.argmax(1)).float().mean())}


def clip_loss(logits_per_text: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; ``same[t, i]``: caption ``t`` is also true of image ``i != t`` (not a negative)."""
    eye = torch.eye(len(same), dtype=torch.bool)
    logits = logits_per_text.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(same))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def batch(args, step: int, tokenizer, mean: torch.Tensor, std: torch.Tensor):
    """Scenes, their captions' token ids and the caption-fits-scene matrix of training step ``step``."""
    seed = args.seed * 1_000_003 + step
    s = make_scenes(args.batch_size, "train", seed=seed, size=SIZE, p_two=args.p_two)
    rng = random.Random(seed)
    caps = [sample_caption(s.classes[i], s.boxes[i], SIZE, rng, p_partial=args.p_partial, p_where=args.p_where)
            for i in range(len(s))]
    same = torch.tensor([[c.fits(s.classes[i], s.boxes[i], SIZE) for i in range(len(s))] for c in caps])
    tokens = tokenizer([c.text for c in caps], padding=True, return_tensors="pt")
    return (s.images - mean) / std, tokens, same


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_images(model, images: torch.Tensor, mean, std, chunk: int = 500) -> torch.Tensor:
    out = [model.get_image_features(pixel_values=(images[i:i + chunk] - mean) / std).pooler_output
           for i in range(0, len(images), chunk)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], chunk: int = 500) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), chunk):
        t = tokenizer(texts[i:i + chunk], padding=True, return_tensors="pt")
        out.append(model.get_text_features(**t).pooler_output)
    return F.normalize(torch.cat(out).float(), dim=-1)


def distinct_groups(classes: torch.Tensor, size: int) -> list[list[int]]:
    """Scenes in groups of ``size`` with pairwise different garment sets, greedily in order."""
    keys = [tuple(sorted(int(c) for c in row if c >= 0)) for row in classes]
    left = list(range(len(keys)))
    groups = []
    while True:
        group, seen = [], set()
        for i in left:
            if keys[i] not in seen:
                group.append(i)
                seen.add(keys[i])
                if len(group) == size:
                    break
        if len(group) < size:
            return groups
        groups.append(group)
        taken = set(group)
        left = [i for i in left if i not in taken]


def label_sets() -> list[tuple[int, ...]]:
    n = len(CLASS_NAMES)
    return [(c,) for c in range(n)] + [(a, b) for a in range(n) for b in range(a + 1, n)]


def evaluate(model, tokenizer, scenes: Scenes, captions: list[str], mean, std, group: int = GROUP) -> dict:
    """Held-out metrics of a scene set (see the module docstring)."""
    model.eval()
    img = embed_images(model, scenes.images, mean, std)
    out = {}
    # retrieval within groups of distinct garment sets
    txt = embed_texts(model, tokenizer, captions)
    i2t = t2i = n = 0
    for g in distinct_groups(scenes.classes, group):
        sim = img[g] @ txt[g].t()
        target = torch.arange(len(g))
        i2t += int((sim.argmax(1) == target).sum())
        t2i += int((sim.argmax(0) == target).sum())
        n += len(g)
    out.update(retrieval_i2t=i2t / n, retrieval_t2i=t2i / n, retrieval_candidates=group, retrieval_scenes=n)
    # the garment set among all 55
    sets = label_sets()
    set_txt = embed_texts(model, tokenizer, [label_set_caption(s) for s in sets])
    keys = [tuple(sorted(int(c) for c in row if c >= 0)) for row in scenes.classes]
    best = (img @ set_txt.t()).argmax(1)
    out["label_set_top1"] = float(np.mean([sets[int(b)] == k for b, k in zip(best, keys)]))
    # zero-shot classes: one-garment scenes, "a photo of a {class}"; two-garment scenes, top-2 of "a {class}"
    one = scenes.num_objects == 1
    if one.any():
        prompts = embed_texts(model, tokenizer, [class_prompt(c) for c in range(len(CLASS_NAMES))])
        pred = (img[one] @ prompts.t()).argmax(1)
        out["zero_shot_top1"] = float((pred == scenes.classes[one, 0]).float().mean())
    two = scenes.num_objects == 2
    if two.any():
        prompts = embed_texts(model, tokenizer, [class_prompt(c, "{a}") for c in range(len(CLASS_NAMES))])
        top2 = (img[two] @ prompts.t()).topk(2, dim=1).indices.sort(1).values
        out["zero_shot_two_top2"] = float((top2 == scenes.classes[two].sort(1).values).all(1).float().mean())
    return out


def scene_set(n: int, split: str, seeds: tuple[int, int, int]) -> tuple[Scenes, list[str]]:
    """``n`` one-garment and ``n`` two-garment scenes and an exhaustive or positional caption of each."""
    one = make_scenes(n, split, seed=seeds[0], size=SIZE, objects=1)
    two = make_scenes(n, split, seed=seeds[1], size=SIZE, objects=2)
    scenes = Scenes(*(torch.cat([a, b]) for a, b in zip(
        (one.images, one.labels, one.masks, one.classes, one.boxes),
        (two.images, two.labels, two.masks, two.classes, two.boxes))))
    rng = random.Random(seeds[2])
    caps = [sample_caption(scenes.classes[i], scenes.boxes[i], SIZE, rng, kinds=("exhaustive", "positional")).text
            for i in range(len(scenes))]
    return scenes, caps


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--init-vision", choices=("vit", "none"), default="vit",
                   help="vit: the vision tower takes the shape and the weights of the embedded ViT "
                        "(attnx.zoo.vision_model(), trained on the same scenes) and --patch/--width/--layers/"
                        "--heads/--mlp-ratio are ignored; none: random initialisation")
    p.add_argument("--width", type=int, default=96, help="vision tower width")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-heads", type=int, default=2)
    p.add_argument("--projection", type=int, default=64)
    p.add_argument("--max-length", type=int, default=32, help="text positions (the templates need at most 14)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--p-two", type=float, default=0.6, help="share of two-garment training scenes")
    p.add_argument("--p-partial", type=float, default=0.25, help="share of captions naming one garment only")
    p.add_argument("--p-where", type=float, default=0.3, help="share of positional captions, where one is true")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vision-lr-scale", type=float, default=0.25,
                   help="learning rate of the vision tower (not its projection) relative to --lr")
    p.add_argument("--locked-steps", type=int, default=100,
                   help="first steps with the vision tower frozen (its projection trains), as in LiT")
    p.add_argument("--min-lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-scenes", type=int, default=1000, help="held-out scenes per garment count")
    p.add_argument("--eval-every", type=int, default=0, help="monitor on 200 scenes of train-split garments (not the training scenes) every N steps (0: never)")
    p.add_argument("--out", type=Path, default=ROOT / "attnx" / "zoo" / "assets")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start, cpu_start = time.time(), time.process_time()
    from transformers import CLIPModel

    if args.init_vision == "vit":
        vit_geometry(args)
    tokenizer = caption_tokenizer(template_texts(), args.max_length)
    config = build_config(args, tokenizer)
    model = CLIPModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocabulary {len(tokenizer)} tokens; CLIPModel {n_params / 1e6:.3f} M parameters", flush=True)
    probe = make_scenes(512, "train", seed=args.seed * 1_000_003 - 1, size=SIZE)
    if args.init_vision == "vit":  # the ViT's normalisation
        from attnx.zoo.vision import read_info

        mean_l, std_l = read_info()["mean"], read_info()["std"]
    else:  # per-channel statistics of training scenes, rounded (as for the embedded ViT)
        mean_l = [round(float(v), 3) for v in probe.images.mean((0, 2, 3))]
        std_l = [round(float(v), 3) for v in probe.images.std((0, 2, 3))]
    mean, std = torch.tensor(mean_l).view(1, 3, 1, 1), torch.tensor(std_l).view(1, 3, 1, 1)
    init_check = init_from_vit(model, (probe.images - mean) / std) if args.init_vision == "vit" else None
    if init_check:
        print(f"vision tower from the embedded ViT: {init_check}", flush=True)

    groups = []
    for tower, scale in ((True, args.vision_lr_scale), (False, 1.0)):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("vision_model.") == tower]
        decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
        groups += [{"params": decay, "weight_decay": args.weight_decay, "scale": scale},
                   {"params": rest, "weight_decay": 0.0, "scale": scale}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    monitor = None
    if args.eval_every:
        monitor = scene_set(100, "train", VAL_SEEDS)
    history, running = [], None
    for step in range(args.steps):
        model.train()
        model.vision_model.requires_grad_(step >= args.locked_steps)
        x, tokens, same = batch(args, step, tokenizer, mean, std)
        for group in opt.param_groups:
            group["lr"] = lr_at(step) * group["scale"]
        out = model(pixel_values=x, **tokens)
        loss = clip_loss(out.logits_per_text, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}/{args.steps} loss {running:.3f} scale {model.logit_scale.exp().item():.1f} "
                  f"{time.time() - start:.0f}s", flush=True)
        if monitor is not None and (step + 1) % args.eval_every == 0:
            m = evaluate(model, tokenizer, *monitor, mean, std, group=8)
            history.append({"step": step + 1, "loss": round(running, 4), **{k: round(v, 4) for k, v in m.items()}})
            print("  validation (200 scenes of train-split garments, groups of 8): " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
    train_seconds, train_cpu_seconds = time.time() - start, time.process_time() - cpu_start

    # ---- the shipped model: float16 weights, measured as loaded ----
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / WEIGHTS_FILE), metadata={"format": FORMAT})
    shipped = CLIPModel(config)
    shipped.load_state_dict({k: v.float() for k, v in state.items()})
    shipped.eval()
    scenes, captions = scene_set(args.eval_scenes, "test", TEST_SEEDS)
    metrics = evaluate(shipped, tokenizer, scenes, captions, mean, std)
    print("held-out (t10k garments, float16 weights): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    from attnx.zoo import scenes as shipped_scenes

    committed = shipped_scenes()
    metrics_committed = evaluate(shipped, tokenizer, committed, [label_set_caption(c) for c in committed.classes],
                                 mean, std, group=8)
    print("committed scenes (groups of 8, label-set captions): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics_committed.items()), flush=True)

    tokenizer.backend_tokenizer.save(str(args.out / TOKENIZER_FILE))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)]
                                                + (argv if argv is not None else sys.argv[1:]))
    info = {
        "format": FORMAT,
        "model_class": "transformers.CLIPModel",
        "config": {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"},
        "parameters": n_params,
        "dtype": "float16",
        "image_size": [SIZE, SIZE],
        "mean": mean_l,
        "std": std_l,
        "class_names": list(CLASS_NAMES),
        "class_words": list(CLASS_WORDS),
        "tokenizer": {"file": TOKENIZER_FILE, "kind": "word level (tokenizers WordLevel) built from every sentence "
                      "of the caption templates; NFKC + lowercase, whitespace and punctuation split (hyphens kept), "
                      "[BOS] words [EOS], right padding", "specials": list(SPECIALS), "vocab_size": len(tokenizer)},
        "data": "scenes of 1-2 Fashion-MNIST garments on clutter (attnx.data.make_scenes), train split, fresh every "
                "step; one caption per scene from attnx.data.captions.sample_caption",
        "metrics": {
            "held_out": {
                "scenes": f"{args.eval_scenes} one-garment + {args.eval_scenes} two-garment, t10k garments, "
                          f"make_scenes seeds {TEST_SEEDS[:2]}; captions: exhaustive and positional templates "
                          f"(random.Random({TEST_SEEDS[2]}))",
                "chance": {"retrieval": 1 / GROUP, "label_set_top1": 1 / 55, "zero_shot_top1": 0.1,
                           "zero_shot_two_top2": 1 / 45},
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}},
            "committed_scenes": {
                "scenes": "fashion_scenes_test.npz (attnx.zoo.scenes()): 48 one-garment + 48 two-garment; captions "
                          "attnx.data.captions.label_set_caption; retrieval in groups of 8",
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics_committed.items()}},
        },
        "training": {
            "command": command,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
            "scenes_seen": args.steps * args.batch_size,
            "vision_init": ("the embedded ViT (attnx/zoo/assets/vit_fashion_scenes.safetensors), converted; "
                            f"its head on the converted tower agrees with it on {init_check['agreement_top1']:.1%} "
                            "of 512 training scenes before training") if init_check else "random",
            "wall_seconds": round(train_seconds),
            "cpu_seconds": round(train_cpu_seconds),
            "final_loss": round(running, 4),
            "logit_scale": round(model.logit_scale.detach().exp().item(), 3),
            "history": history,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "platform": platform.platform(),
        },
    }
    (args.out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    for name in (WEIGHTS_FILE, INFO_FILE, TOKENIZER_FILE):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1e6:.3f} MB)")
    print(f"training {train_seconds:.0f}s wall, {train_cpu_seconds:.0f}s CPU; total {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
