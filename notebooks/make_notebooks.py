"""Write (and with ``--execute`` run) the example notebooks of attnx.

    HF_HUB_OFFLINE=1 python notebooks/make_notebooks.py --execute

The notebooks are generated from the cells below so that they stay reviewable as code; the
committed ``.ipynb`` files carry their outputs (figures inline). They need no network: they use the
embedded default models (:mod:`attnx.zoo`). ``tests/test_contract_notebooks.py`` executes them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PRELUDE = """\
%matplotlib inline
# JPEG keeps the stored notebook small (noisy scenes and heat maps compress badly as PNG)
%config InlineBackend.figure_formats = ["jpeg"]
%config InlineBackend.print_figure_kwargs = {"bbox_inches": "tight", "pil_kwargs": {"quality": 85}}
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets: plain bars
import matplotlib.pyplot as plt
import numpy as np
import torch

import attnx
from attnx import viz, zoo

torch.set_num_threads(1)          # the embedded models are tiny: more threads only add overhead
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 72   # modest inline figures
T0 = time.time()
"""

# ------------------------------------------------------------------------------------------------
# the vision notebook
# ------------------------------------------------------------------------------------------------
VISION = [
    ("md", """\
# Explaining a Vision Transformer with attnx

This notebook explains the vision model that ships with attnx: a **stock timm `VisionTransformer`**
(64×64 RGB input, 8×8 patches, i.e. an 8×8 grid of patch tokens plus a class token) trained to
recognise [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) garments placed on
cluttered backgrounds — one or two garments per scene, **multi-label** (one sigmoid per class).
The scenes are synthetic, so the exact pixel mask of every garment is known: we can *measure*
whether a heat map lands on the garment it claims to explain. Nothing is downloaded.

1. the model and the held-out scenes
2. every method side by side
3. two garments in one image: class-specific maps, and how much relevance falls inside each garment
4. attention rollout: head fusion and discard ratio
5. doing the same with your own timm model
"""),
    ("code", PRELUDE + """
loaded = zoo.vision_model()                   # an attnx.zoo.ZooModel: .model, .preprocess, .class_names, .mean, .std, ...
model, names = loaded.model, loaded.class_names
kw = dict(class_names=names, mean=loaded.mean, std=loaded.std, multi_label=True)   # for the viz functions
print(zoo.describe()[0])
print(f"{type(model).__module__}.{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
print("classes:", ", ".join(f"{i}={n}" for i, n in enumerate(names)))
"""),
    ("code", """\
scenes = zoo.scenes()           # held-out scenes: .images in [0, 1], multi-hot .labels, exact per-class .masks
images, labels, masks = loaded.preprocess(scenes.images), scenes.labels, scenes.masks   # images: normalised for the model
with torch.no_grad():
    probs = model(images).sigmoid()            # multi-label: a class is present where sigmoid > 0.5
correct = ((probs > 0.5) == (labels > 0.5)).all(1)
single = [i for i in range(len(images)) if labels[i].sum() == 1]
double = [i for i in range(len(images)) if labels[i].sum() == 2]
print(f"{len(images)} scenes: {len(single)} with one garment ({correct[single].float().mean():.0%} exactly right), "
      f"{len(double)} with two ({correct[double].float().mean():.0%} exactly right)")

# the scenes used below: two one-garment and two two-garment scenes the model gets exactly right
pick = lambda idx, k: ([i for i in idx if correct[i]] + [i for i in idx if not correct[i]])[:k]
show = pick(single, 2) + pick(double, 2)
fig, axes = plt.subplots(1, len(show), figsize=(2.4 * len(show), 2.7))
for ax, i in zip(axes, show):
    ax.imshow(viz.to_rgb(scenes.images[i]))
    ax.set_axis_off()
    predicted = [f"{names[c]} {probs[i, c]:.2f}" for c in torch.nonzero(probs[i] > 0.5).flatten().tolist()]
    true = " + ".join(names[c] for c in scenes.classes[i].tolist() if c >= 0)
    ax.set_title(f"#{i} true: {true}\\npredicted: {', '.join(predicted) or '-'}", fontsize=8)
"""),
    ("md", """\
`attnx.Explainer(model)` picks the adapter (here `timm_vit`: it switches timm's fused attention
off while explaining and hooks the attention probabilities) and keeps it for repeated calls. An
explanation holds one score per patch (`scores`, row-major over the patch grid) and turns them
into heat maps at the input size (`heatmap()`, min-max normalised per image). `target=None`
explains the highest logit; pass a class index (or one per image) to ask about a given class.
"""),
    ("code", """\
explainer = attnx.Explainer(model)
e = explainer(images[show], method="rollout")
print(e)
print("scores", tuple(e.scores.shape), "-> one value per patch of the", e.grid, "grid;",
      "heatmap()", tuple(e.heatmap().shape))
"""),
    ("md", """\
## 1. Every method side by side

| method | what it computes | reference |
|---|---|---|
| `raw_attention` | the last layer's attention from the class token, heads averaged | — |
| `rollout` | attention (+ identity for the residual) multiplied through the layers; not class-specific | Abnar & Zuidema, *Quantifying Attention Flow in Transformers*, ACL 2020 |
| `grad_rollout` | rollout of attention weighted by its gradient, `(mean_h A ⊙ ∂y/∂A)⁺` | Gildenblat, [vit-explain](https://github.com/jacobgil/vit-explain) |
| `generic` | `R ← R + E_h[(∇A ⊙ A)⁺] R`, layer by layer | Chefer, Gur & Wolf, *Generic Attention-model Explainability*, ICCV 2021 |
| `attn_gradcam` | GradCAM on the last attention map: heads weighted by their mean gradient | baseline in Chefer et al., CVPR 2021 |
| `transformer_attribution` | LRP relevance of each attention map × its gradient, rolled out | Chefer, Gur & Wolf, *Transformer Interpretability Beyond Attention Visualization*, CVPR 2021 |
| `partial_lrp` | LRP relevance at the last attention map only | Voita et al., ACL 2019 (baseline in Chefer et al.) |
| `lrp` | relevance propagated to the pixels (preset `attnlrp`) | Bach et al., PLoS ONE 2015; Achtibat et al., *AttnLRP*, ICML 2024 |
| `attention_flow` | maximum flow from the class token to each patch through the attention graph (residual included) | Abnar & Zuidema, ACL 2020 |
| `random` | seeded random scores: the floor any method should beat | — |
| `gradient_x_input` | plain gradient × input at the pixels, summed per patch | e.g. Shrikumar et al. 2016 |

**What to look for.** The first column names the class explained (the top logit) and its
probability (the sigmoid: the model is multi-label, hence `multi_label=True`). Attention-only
maps (`raw_attention`, `rollout`) show where the class token *looks*; they often include clutter
and are the same whichever class you ask about. Gradient- and relevance-based maps
(`grad_rollout`, `generic`, `transformer_attribution`, `lrp`) are class-specific: in a
two-garment scene they should light up the garment of the explained class. `lrp` is a pixel-level
map (sharp garment outlines); the others live on the 8×8 patch grid and are upsampled.
"""),
    ("code", """\
t = time.time()
fig = viz.method_grid(explainer, images[show], attnx.list_methods(), **kw)
print(f"{len(attnx.list_methods())} methods x {len(show)} scenes in {time.time() - t:.1f}s")
"""),
    ("md", """\
## 2. Two garments, two classes

A class-specific method should give a *different* map for each class present. `viz.class_maps`
explains one image for several targets side by side. The scene's masks tell us where each garment
really is, so we also print the share of the relevance that falls inside each garment
(the mask's share of the image is the level a uniform map would reach). The mass is that of the
positive relevance: the patch scores spread over their 8×8 pixels, or for `lrp` the pixel relevance.
"""),
    ("code", """\
# the two-garment scene where the model is most confident about both garments
both = lambda i: probs[i, torch.nonzero(labels[i]).flatten()].min()
k = max(double, key=both)
a, b = torch.nonzero(labels[k]).flatten().tolist()
print(f"scene #{k}: {names[a]} (p={probs[k, a]:.2f}) and {names[b]} (p={probs[k, b]:.2f})")
CLASS_METHODS = ["transformer_attribution", "grad_rollout", "generic", "lrp"]
for m in CLASS_METHODS:
    viz.class_maps(explainer, images[k], [a, b], method=m, **kw)
"""),
    ("code", """\
def mass_inside(e, region):
    \"\"\"Share of each sample's positive relevance inside a boolean region (B, H, W).\"\"\"
    if e.input_relevance is not None and e.input_relevance.dim() == 4:     # lrp: relevance of every pixel
        rel = e.input_relevance.sum(1)
    else:                                                                  # one score per patch
        rel = torch.nn.functional.interpolate(e.patch_map()[:, None], size=tuple(region.shape[-2:]), mode="nearest")[:, 0]
    rel = rel.double().clamp_min(0)
    return ((rel * region).flatten(1).sum(1) / rel.flatten(1).sum(1).clamp_min(1e-30)).tolist()

area = {c: masks[k, c].float().mean().item() for c in (a, b)}
print(f"garment area: {names[a]} {area[a]:.1%}, {names[b]} {area[b]:.1%} of the image\\n")
print(f"{'method':<25} {'explained class':<16} {'mass in ' + names[a]:>18} {'mass in ' + names[b]:>18}")
for m in CLASS_METHODS:
    e = explainer(images[[k, k]], method=m, target=[a, b])
    in_a = mass_inside(e, masks[[k, k], a])
    in_b = mass_inside(e, masks[[k, k], b])
    for j, c in enumerate((a, b)):
        print(f"{m:<25} {names[c]:<16} {in_a[j]:>18.1%} {in_b[j]:>18.1%}")
"""),
    ("md", """\
One scene is an anecdote. Over **all** shipped two-garment scenes, explain each garment's class
and count how often the map puts more mass on that garment than on the other one (50% = no class
sensitivity); the mean "own / other" ratio says by how much. Rollout is included as the
class-agnostic reference.
"""),
    ("code", """\
t = time.time()
idx = torch.tensor(double).repeat_interleave(2)                 # every two-garment scene, twice
own = torch.stack([torch.nonzero(labels[i]).flatten() for i in double]).flatten()      # garment 1, garment 2
other = torch.stack([torch.nonzero(labels[i]).flatten().flip(0) for i in double]).flatten()
own_mask, other_mask = masks[idx, own], masks[idx, other]
print(f"{len(idx)} (scene, garment) pairs")
print(f"{'method':<25} {'own > other':>12} {'mean own/other':>15}")
for m in ["rollout"] + CLASS_METHODS:
    e = explainer(images[idx], method=m, target=own)
    o, x = torch.tensor(mass_inside(e, own_mask)), torch.tensor(mass_inside(e, other_mask))
    print(f"{m:<25} {(o > x).float().mean().item():>12.0%} {(o / x.clamp_min(1e-6)).mean().item():>15.2f}")
print(f"({time.time() - t:.1f}s)")
"""),
    ("md", """\
## 3. Attention rollout: head fusion and discard ratio

Rollout fuses the heads of each layer (`head_fusion`: `mean`, `max` or `min`) and can drop the
weakest attention entries of every layer before multiplying (`discard_ratio`: the fraction of
token pairs set to zero; the class token's own row is kept). Averaging blurs; `max` keeps each
head's strongest links and sharpens the map; discarding low values removes the diffuse "background
flow" that otherwise dominates deep products. One row per setting; each panel's title gives the
share of the relevance on the garments (all garment masks of the scene together).
"""),
    ("code", """\
settings = [("mean", 0.0), ("mean", 0.5), ("mean", 0.9), ("max", 0.0), ("max", 0.9), ("min", 0.0)]
garments = masks[show].any(1)                                   # (n, H, W): any garment
fig, axes = plt.subplots(len(settings), len(show), figsize=(1.9 * len(show), 1.9 * len(settings)))
for r, (fusion, ratio) in enumerate(settings):
    e = explainer(images[show], method="rollout", head_fusion=fusion, discard_ratio=ratio)
    share = mass_inside(e, garments)
    viz.overlay_maps(e, images[show], axes[r], colorbar=False, mean=loaded.mean, std=loaded.std,
                     titles=[f"{share[c]:.0%} on garments" for c in range(len(show))])
    axes[r, 0].text(-0.08, 0.5, f"{fusion}\\ndiscard {ratio}", transform=axes[r, 0].transAxes,
                    ha="right", va="center", fontsize=9)
fig.suptitle("rollout: head_fusion / discard_ratio (rows) on four scenes (columns)", fontsize=10)
fig.tight_layout()
print(f"garment area: {', '.join(f'{v:.0%}' for v in garments.float().mean((1, 2)).tolist())} of each image")
"""),
    ("md", """\
## 4. Your own timm model (needs a network the first time)

Everything above works on any timm / torchvision / Hugging Face Vision Transformer, unchanged. For
example with ImageNet weights (the cell is not executed here because it downloads weights):

```python
import timm, torch, attnx
from PIL import Image
from attnx import viz

model = timm.create_model("vit_base_patch16_224", pretrained=True).eval()    # your model, unchanged
cfg = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**cfg)
x = transform(Image.open("dog_and_cat.jpg").convert("RGB"))                  # (3, 224, 224)
imagenet = timm.data.ImageNetInfo().label_descriptions()

explainer = attnx.Explainer(model)
e = explainer(x[None], method="transformer_attribution")                     # the top class
viz.show(e, x[None], class_names=imagenet, mean=cfg["mean"], std=cfg["std"])
viz.class_maps(explainer, x, [243, 282], method="transformer_attribution",   # bull mastiff vs tiger cat
               class_names=imagenet, mean=cfg["mean"], std=cfg["std"])
viz.method_grid(explainer, x[None], attnx.list_methods(), class_names=imagenet, mean=cfg["mean"], std=cfg["std"])
```

The same from the shell: `attnx explain dog_and_cat.jpg --model vit_base_patch16_224 --target 243 282 --out dogcat.png`
(`attnx models` lists what `--model` accepts: timm names, `torchvision:vit_b_16`, Hugging Face ids
such as `google/vit-base-patch16-224`). Models with patch 16 at 224 px have a 14×14 grid, so their
maps are finer than the 8×8 grid of the small model above.
"""),
    ("code", """\
print(f"notebook ran in {time.time() - T0:.0f}s")
"""),
]

# ------------------------------------------------------------------------------------------------
# the text notebook
# ------------------------------------------------------------------------------------------------

TEXT = [
    ("md", """\
# Explaining a BERT sentiment classifier with attnx

This notebook explains the text model that ships with attnx: a **stock Hugging Face
`BertForSequenceClassification`** (MiniLM-L6: 6 layers, 12 heads, hidden size 384) fine-tuned to
tell positive from negative movie-critic snippets (Rotten Tomatoes). It is built offline from a
pretrained encoder package plus a small fine-tuning delta shipped with attnx; nothing is downloaded.

1. the model and some review snippets
2. Transformer Attribution (BERT form) on a padded batch
3. positive vs negative evidence: the same sentence explained for each class
4. methods compared: `transformer_attribution`, `generic`, `grad_rollout`, `lrp` (AttnLRP)
5. padded batches: same scores as one sentence at a time, padding gets 0
6. using any Hugging Face classifier
"""),
    ("code", PRELUDE + """\
from IPython.display import HTML, display

loaded = zoo.text_model()                     # an attnx.zoo.ZooModel: .model, .tokenizer, .class_names
model, tok, names = loaded.model, loaded.tokenizer, loaded.class_names
print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads, "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; classes {names}")
accuracy = loaded.info.get("accuracy", {})
if accuracy:
    print("held-out accuracy:", {k: v for k, v in accuracy.items() if isinstance(v, (int, float))})
POS, NEG = names.index("positive"), names.index("negative")
"""),
    ("code", """\
texts = zoo.example_texts()                  # six short review-like sentences
batch = tok(texts, padding=True, truncation=True, return_tensors="pt")   # padded to the longest snippet
with torch.no_grad():
    p = model(**batch).logits.softmax(-1)
for t, row in zip(texts, p):
    print(f"{names[int(row.argmax())]:>9} {row.max():.2f}  {t}")
print("\\nbatch:", tuple(batch["input_ids"].shape), "tokens per snippet:", batch["attention_mask"].sum(1).tolist())
"""),
    ("md", """\
## 1. Transformer Attribution on a batch

`attnx.Explainer(model)` picks the Hugging Face adapter (eager attention kernel,
`output_attentions=True`, restored afterwards). For text, `transformer_attribution` runs in its
**BERT form** automatically (`form="auto"`): like Chefer et al.'s BERT code it normalises every
`Ā + I` and rolls out from the last layer. `e.scores` is `(B, T)`: one relevance per word piece,
special tokens included, padding 0. `viz.text_html` colours tokens green (for the explained class)
or red (against it), each row scaled by its largest absolute value among the tokens that are not
special: the `[CLS]` readout keeps much of the attention-based relevance for itself, so special
tokens never set the scale (`skip_special=True` hides `[CLS]`/`[SEP]`).
"""),
    ("code", """\
explainer = attnx.Explainer(model)
e = explainer(batch, method="transformer_attribution")            # target=None: the predicted class
print(e, e.options)
display(HTML(viz.text_html(e, tok, class_names=names, skip_special=True)))
"""),
    ("md", """\
## 2. Positive vs negative evidence

Ask the same question for each class: *what in this sentence speaks for "positive"?* and *what for
"negative"?* First with Transformer Attribution, as HTML (`viz.text_html`, shown with
`IPython.display.HTML`):
"""),
    ("code", """\
e_pos = explainer(batch, method="transformer_attribution", target=POS)
e_neg = explainer(batch, method="transformer_attribution", target=NEG)
print("target = positive"); display(HTML(viz.text_html(e_pos, tok, class_names=names, skip_special=True)))
print("target = negative"); display(HTML(viz.text_html(e_neg, tok, class_names=names, skip_special=True)))
"""),
    ("md", """\
Transformer Attribution is **non-negative**: it ranks the words the model *relies on*, weighted for
the class asked about. For a two-class model the two maps therefore often share their top words —
in a review the model finds clearly negative, the decisive complaint also tops the "positive" map.
LRP (`lrp`, preset `attnlrp`) is **signed**: it splits the logit into evidence for (green) and
against (red) the class, so the two targets give (nearly) mirror images and a mixed review separates
into its praise and its complaints. `viz.text_figure` draws both as one matplotlib figure (e.g. for
a paper); the first three snippets:
"""),
    ("code", """\
def top_words(e, i, k=3):
    \"\"\"The k tokens with the highest score (the strongest evidence *for* the explained class).\"\"\"
    toks = viz.token_strings(e, tok, i)
    s = e.scores[i, : len(toks)].clone()
    special = [j for j, t in enumerate(toks) if t in tok.all_special_tokens]
    s[special] = -float("inf")
    return [toks[j] for j in s.topk(min(k, len(toks) - len(special))).indices.tolist()]

few = {k: v[:3] for k, v in batch.items()}
l_pos = explainer(few, method="lrp", preset="attnlrp", target=POS)
l_neg = explainer(few, method="lrp", preset="attnlrp", target=NEG)
for i, t in enumerate(texts):
    print(t)
    print(f"    transformer_attribution   for positive: {top_words(e_pos, i)}   for negative: {top_words(e_neg, i)}")
    if i < 3:
        print(f"    lrp (attnlrp)             for positive: {top_words(l_pos, i)}   for negative: {top_words(l_neg, i)}")
fig = viz.text_figure([e_pos, e_neg], tok, class_names=names, width=10)
fig = viz.text_figure([l_pos, l_neg], tok, class_names=names, width=10)
"""),
    ("md", """\
## 3. Methods compared

The same snippets with four class-specific methods:

| method | idea | reference |
|---|---|---|
| `transformer_attribution` (BERT form) | LRP relevance × gradient at each attention map, rolled out | Chefer, Gur & Wolf, CVPR 2021 |
| `generic` | `R ← R + E_h[(∇A ⊙ A)⁺] R` | Chefer, Gur & Wolf, ICCV 2021 |
| `grad_rollout` | rollout of `(mean_h A ⊙ ∇A)⁺` | Gildenblat, vit-explain |
| `lrp`, preset `attnlrp` | signed relevance propagated to the token embeddings | Achtibat et al., *AttnLRP*, ICML 2024 |

Each explains the predicted class. `lrp` is the only **signed** method here: red tokens push
*against* the explained class — in the mixed review, look at how the praise is treated when the
model explains its *negative* verdict. The attention-based methods are non-negative and give the
`[CLS]` token much of the mass (it is the readout; `generic` keeps almost all of it there), which is
why special tokens are hidden in the pictures and each row is scaled by the words shown.
"""),
    ("code", """\
t = time.time()
METHODS = {"transformer_attribution": {}, "generic": {}, "grad_rollout": {}, "lrp": {"preset": "attnlrp"}}
explanations = {m: explainer(few, method=m, **opts) for m, opts in METHODS.items()}
print(f"{len(METHODS)} methods in {time.time() - t:.1f}s")
fig = viz.text_figure(list(explanations.values()), tok, class_names=names, width=10)
"""),
    ("code", """\
for m, e in explanations.items():
    print(f"{m:<24} " + " | ".join(", ".join(top_words(e, i)) for i in range(len(e))))
display(HTML(viz.text_html(explanations["lrp"], tok, class_names=names, skip_special=True)))
"""),
    ("md", """\
## 4. Padded batches

Tokenizers pad a batch to its longest sentence. attnx passes the `attention_mask` to the model,
gives padded positions exactly 0 and keeps them out of every normalisation, so explaining a
sentence inside a padded batch gives the same scores as explaining it alone, without padding.
In float64 they agree to rounding; in float32 the LRP-based methods (which divide by activations)
amplify the different summation order of a differently shaped batch to ~1e-3 relative — far below
anything visible, but worth knowing before comparing numbers across batches.
"""),
    ("code", """\
import copy

print("attention_mask:\\n", batch["attention_mask"])
explainer64 = attnx.Explainer(copy.deepcopy(model).double())
print(f"{'':<24} max relative difference, padded batch vs one at a time")
print(f"{'method':<24} {'float32':>9} {'float64':>9}")
for m, opts in METHODS.items():
    worst = {}
    for dtype, ex in (("float32", explainer), ("float64", explainer64)):
        together = ex(batch, method=m, **opts)
        worst[dtype] = 0.0
        for i, t in enumerate(texts):
            alone = ex(tok([t], return_tensors="pt"), method=m, **opts)      # no padding at all
            n = alone.scores.shape[1]
            diff = (together.scores[i, :n] - alone.scores[0]).abs().max() / alone.scores[0].abs().max()
            worst[dtype] = max(worst[dtype], diff.item())
            assert (together.scores[i, n:] == 0).all()                     # padded positions get 0
    print(f"{m:<24} {worst['float32']:>9.1e} {worst['float64']:>9.1e}")
print("padded positions: all exactly 0")
"""),
    ("md", """\
## 5. Any Hugging Face classifier (needs a network the first time)

Nothing above is specific to the embedded model: any `*ForSequenceClassification` of the Hub (BERT,
RoBERTa, DistilBERT, ...) is explained the same way (not executed here, it downloads weights):

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
import attnx
from attnx import viz
from IPython.display import HTML

name = "textattack/bert-base-uncased-SST-2"          # or a local folder saved with save_pretrained
model = AutoModelForSequenceClassification.from_pretrained(name).eval()
tok = AutoTokenizer.from_pretrained(name)
batch = tok(["a gripping, beautifully shot film", "dull and far too long"], padding=True, return_tensors="pt")

explainer = attnx.Explainer(model)
e = explainer(batch, method="transformer_attribution")           # BERT form, predicted class
HTML(viz.text_html(e, tok, class_names=[model.config.id2label[i] for i in range(model.config.num_labels)]))
```

`attnx.zoo.load(name)` does the loading in one call (a `ZooModel`: `.model`, `.tokenizer`,
`.class_names`), and from the shell:
`attnx explain --model textattack/bert-base-uncased-SST-2 --text "dull and far too long" --out review.html`.
With `HF_HUB_OFFLINE=1` a Hub id is read from the local Hugging Face cache only.
"""),
    ("code", """\
print(f"notebook ran in {time.time() - T0:.0f}s")
"""),
]

NOTEBOOKS = {"vit_explainability.ipynb": VISION, "bert_explainability.ipynb": TEXT}


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--execute", action="store_true", help="run the notebooks and store their outputs")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("names", nargs="*", help="notebooks to write (default: all)")
    args = p.parse_args(argv)
    for name, cells in NOTEBOOKS.items():
        if args.names and name not in args.names:
            continue
        nb = build(cells)
        if args.execute:
            t = time.time()
            execute(nb, args.out)
            print(f"{name}: executed in {time.time() - t:.0f}s")
        path = args.out / name
        nbformat.write(nb, str(path))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
