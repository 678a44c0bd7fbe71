"""``attnx explain``: images, texts, a dual encoder's images and prompts, a language model's answer.

:func:`cmd_explain` chooses the kind of explanation from the arguments; each kind checks the cheap
things (methods, options, adapter, ``--out``, input files) before it loads a model, explains, and
writes its pictures or page. matplotlib, tqdm, the report and the zoo load inside the functions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import AttnxValueError
from ..viz.terminal import escape, say
from . import generation
from .args import chosen_methods, class_targets, method_options, parse_options
from .help import EPILOG
from .loading import (
    add_model_file_arguments,
    check_adapter,
    check_num_scenes,
    embedded_vision,
    explainer_for,
    load_model,
    model_title,
    open_images,
    preprocess_images,
    scenes,
)
from .paths import HTML_SUFFIXES, PICTURE_SUFFIXES, check_out, is_html, out_path

__all__ = ["DEFAULT_METHOD", "EMBEDDED_CLIP", "add_parser", "cmd_explain"]

#: the method ``attnx explain`` uses without --method; not the library's ``rollout``: the command
#: is where a user asks for one class (--target), and rollout's map is the same for every class
DEFAULT_METHOD = "transformer_attribution"

#: the ``--model`` of the embedded CLIP, explained on the shipped scenes when no image is given
EMBEDDED_CLIP = "default-clip"


def _checked(args: argparse.Namespace) -> tuple[list[str], dict[str, dict]]:
    """The methods and their parsed options, the adapter checked: the first checks of every kind."""
    methods = chosen_methods(args.method)
    options = method_options(methods, parse_options(args.option))
    check_adapter(args.adapter)
    return methods, options


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    say(f"wrote {path}")


def _save_stacked(figs: Sequence[Any], path: Path) -> None:
    """Several images or methods into one --out file: the figures one under the other."""
    from .. import viz

    viz.save_stacked(figs, path, dpi=110)
    say(f"wrote {path}")


def explain_images(args: argparse.Namespace) -> int:
    """Image files (or the shipped scenes) of an image classifier: one picture per method and target."""
    # cheap checks first: no model is loaded (or downloaded) to learn about a typo
    methods, options = _checked(args)
    if not args.images and args.model not in (None, "default"):
        raise AttnxValueError("give image files to explain with --model")
    check_out(args.out, PICTURE_SUFFIXES + HTML_SUFFIXES, "image explanations")
    if not args.images:
        check_num_scenes(args.num_scenes)
    pictures = open_images(args.images)
    loaded = load_model(args, "image")
    if args.images:
        if args.model in (None, "default"):  # a user's photo, the garment model: say so
            say(f"explaining {len(args.images)} image file(s) with the embedded vision model: {embedded_vision(loaded)}")
        images, names = preprocess_images(args.images, pictures, loaded)
    else:  # the embedded scenes: --model is the embedded vision model
        images, names = scenes(loaded, args.num_scenes)
    explainer = explainer_for(args, loaded)
    targets = class_targets(args.target, loaded.class_names)
    kw = dict(class_names=loaded.class_names, mean=loaded.mean, std=loaded.std, multi_label=loaded.multi_label)
    if is_html(args.out):
        return _image_report(args, explainer, images, names, methods, options, targets, loaded, kw)
    from tqdm.auto import tqdm

    from .. import viz

    if targets and len(targets) > 1:  # class-specific maps side by side, per image and method
        figs = []
        for i in tqdm(range(len(images)), desc="images", disable=len(images) < 2 or args.quiet):
            for m in methods:
                fig = viz.class_maps(explainer, images[i], targets, method=m, **kw, **options[m])
                if args.out and Path(args.out).suffix:  # one file: the rows stacked
                    figs.append(fig)
                else:  # a folder (or none): one file per image and method
                    _save(fig, out_path(args.out, f"attnx_{names[i]}_{m}_classes.png", f"_{names[i]}_{m}_classes.png"))
        if figs:
            _save_stacked(figs, out_path(args.out, "attnx_classes.png", "_classes.png"))
        return 0
    target = targets[0] if targets else None
    if len(methods) > 1:
        fig = viz.method_grid(explainer, images, methods, target=target, **kw,
                              options=options, progress=not args.quiet)
        _save(fig, out_path(args.out, "attnx_methods.png", "_methods.png"))
        return 0
    e = explainer(images, method=methods[0], target=target, **options[methods[0]])
    if e.readout is not None and not args.quiet:
        say(f"readout: {e.readout} (the rows of the last layer the model's head reads)")
    fig = viz.show(e, images, **kw, max_images=len(images))
    _save(fig, out_path(args.out, f"attnx_{methods[0]}.png", f"_{methods[0]}.png"))
    return 0


def _image_report(args, explainer, images, names, methods, options, targets, loaded, kw) -> int:
    """``--out FILE.html``: one interactive page, every method x target over the images."""
    from tqdm.auto import tqdm

    from .. import report

    groups = {}
    jobs = [(t, m) for t in (targets or [None]) for m in methods]
    for t, m in tqdm(jobs, desc="explaining", disable=args.quiet or len(jobs) < 2):
        label = "predicted" if t is None else (kw["class_names"][t] if kw["class_names"] and t < len(kw["class_names"]) else f"class {t}")
        groups.setdefault(label, []).append(explainer(images, method=m, target=t, **options[m]))
    path = report.write_report(out_path(args.out, "", ""), groups, images, names=names,
                               title=model_title(args.model, loaded), page_title="attnx report", **kw)
    say(f"wrote {path}")
    return 0


def explain_text(args: argparse.Namespace) -> int:
    """``--text`` of a text classifier or a causal language model: a page and the terminal."""
    methods, options = _checked(args)
    check_out(args.out, HTML_SUFFIXES, "text explanations")
    loaded = load_model(args, "text")
    if loaded.kind == "image_text":
        raise AttnxValueError(f"{args.model} is a dual encoder: give image files with the --text prompts")
    if loaded.kind != "text":
        raise AttnxValueError(f"{args.model} is not a text classifier")
    if loaded.tokenizer is None:
        raise AttnxValueError(f"{args.model} has no tokenizer: give the Hugging Face folder with its tokenizer files as --arch")
    language_model = bool(loaded.info.get("language_model"))
    if args.continuation and not language_model:
        raise AttnxValueError("--continuation needs a causal language model (--model of a *ForCausalLM)")
    if language_model:
        batch, target = _language_model_inputs(args, loaded.tokenizer)
    else:
        batch = loaded.tokenizer(list(args.text), padding=True, truncation=True, return_tensors="pt")
        targets = class_targets(args.target, loaded.class_names)
        target = targets[0] if targets and len(targets) == 1 else targets
    explainer = explainer_for(args, loaded)
    if target is not None and isinstance(target, list) and len(target) != len(args.text):
        raise AttnxValueError("give one --target for all texts, or one per text")
    explained = [explainer(batch, method=m, target=target, **options[m]) for m in methods]
    from .. import report, viz

    path = out_path(args.out, "attnx_text.html", "_text.html")
    if language_model:  # the page that shows the explained token after the prompt
        path.write_text(viz.text_html(explained, loaded.tokenizer, class_names=loaded.class_names))
    else:  # the interactive page: methods side by side, the value under the pointer
        report.write_report(path, explained, tokenizer=loaded.tokenizer, class_names=loaded.class_names,
                            title=model_title(args.model, loaded), page_title="attnx report")
    # the page is complete before anything goes to stdout: a closed pipe (| head) cannot lose it
    color = not args.no_color and sys.stdout.isatty()
    for m, e in zip(methods, explained):
        say(f"[{m}]")  # the tokens are escaped by text_terminal, around its own colour codes
        say(viz.text_terminal(e, loaded.tokenizer, class_names=loaded.class_names, color=color), escaped=color)
    say(f"wrote {path}")
    return 0


def _language_model_inputs(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any]:
    """A language model's prompts, left-padded (the generation convention), and its target: the
    next token (default), --target tokens (ids or text, its first token) or --continuation."""
    from attnx.core.targets import Continuation

    if tokenizer.pad_token is None:  # GPT-2-style vocabularies have none; any id works, it is masked
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    batch = tokenizer(list(args.text), padding=True, return_tensors="pt")
    if args.continuation:
        if args.target:
            raise AttnxValueError("give --target (a next token) or --continuation, not both")
        if len(args.continuation) not in (1, len(args.text)):
            raise AttnxValueError("give one --continuation for all texts, or one per text")
        conts = args.continuation * len(args.text) if len(args.continuation) == 1 else args.continuation
        return batch, Continuation(list(conts))
    if not args.target:
        return batch, None
    targets = [int(v) if v.isdigit() else v for v in args.target]
    return batch, targets[0] if len(targets) == 1 else targets


def explain_image_text(args: argparse.Namespace) -> int:
    """Images and --text prompts of a dual encoder (CLIP, SigLIP, OpenCLIP): one map per image and
    prompt, for each method; the prompts' probabilities per image in the terminal."""
    methods, options = _checked(args)
    if args.target or args.continuation:
        raise AttnxValueError("a dual encoder explains every image with every --text prompt; --target and --continuation do not apply")
    check_out(args.out, PICTURE_SUFFIXES, "image-text maps")
    if not args.images:
        check_num_scenes(args.num_scenes)
    pictures = open_images(args.images)
    loaded = load_model(args, "image")
    if loaded.kind != "image_text":
        raise AttnxValueError("give either images or --text, not both (both only for a CLIP-style --model)")
    if args.images:
        images, names = preprocess_images(args.images, pictures, loaded)
    else:  # the embedded CLIP: the shipped scenes
        images, names = scenes(loaded, args.num_scenes)
    from .. import viz

    explainer = explainer_for(args, loaded)
    figs = []
    for m in methods:
        pair = explainer(images, method=m, text=list(args.text), **options[m])
        probs = pair.logits_per_image.float().softmax(-1)
        for b, name in enumerate(names):
            ranked = ", ".join(f"{escape(repr(t))} {probs[b, p]:.2f}" for p, t in enumerate(args.text))
            say(f"[{m}] {escape(name)}: {ranked}")
        figs.append(viz.image_text_maps(pair, images, mean=loaded.mean, std=loaded.std))
    path = out_path(args.out, "attnx_image_text.png", "_image_text.png")
    if len(figs) == 1:
        _save(figs[0], path)
    else:
        _save_stacked(figs, path)
    return 0


def explain_answer(args: argparse.Namespace) -> int:
    """``--text PROMPT --generate N [--chat]``: a language model's answer, explained token by token."""
    methods, options = _checked(args)
    return generation.explain_answer(args, lambda: load_model(args, "text"), methods, options)


def cmd_explain(args: argparse.Namespace) -> int:
    """``attnx explain``: the kind of explanation the arguments ask for."""
    if args.text and (args.images or args.model == EMBEDDED_CLIP):  # a dual encoder (no images: the shipped scenes)
        return explain_image_text(args)
    if generation.wanted(args):  # a language model's answer, explained token by token
        return explain_answer(args)
    if args.text:
        return explain_text(args)
    return explain_images(args)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """``attnx explain`` and its flags, on the command's sub-parsers ``sub``."""
    e = sub.add_parser("explain", help="explain images or texts and write pictures",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    e.add_argument("images", nargs="*", help="image files (none: the embedded default scenes)")
    e.add_argument("--text", action="extend", nargs="+", help="texts to explain; with images and a CLIP-style --model, "
                   "the prompts each image is explained for (one map per prompt)")
    e.add_argument("--model", default=None, help="see `attnx models`; default: the embedded model")
    e.add_argument("--method", default=DEFAULT_METHOD, help=f"a method name, a comma list, or 'all' (default {DEFAULT_METHOD}): not the "
                   "library's default rollout, because rollout's map is the same for every --target class")
    e.add_argument("--adapter", default=None, help="the adapter that makes the model's attention observable, e.g. "
                   "intercept (any softmax-attention model); default: the first that matches the model")
    e.add_argument("--target", nargs="+", help="class indices or names; several give class-specific maps side by side "
                   "(language models: token ids or texts, the next token to explain)")
    e.add_argument("--continuation", action="append", help="language models: explain this continuation of --text "
                   "(its summed log-probability; repeat for one per text)")
    e.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    e.add_argument("--out", default=None, help="output file or folder: PNG for images, or FILE.html for an interactive "
                   "page (images or text)")
    e.add_argument("--num-scenes", type=int, default=4, help="default scenes to explain when no image is given "
                   "(1 to the number of shipped scenes)")
    add_model_file_arguments(e)
    generation.add_arguments(e)
    e.add_argument("--no-color", action="store_true", help="plain terminal output for text")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_explain)
    return e
