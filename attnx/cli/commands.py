"""The ``attnx`` command: explain images and texts from the shell, list methods and models.

Every user mistake is an :class:`~attnx.errors.AttnxError`, printed as one line (escaped, see
:mod:`attnx.viz.terminal`) with exit status 2; anything else is a bug and keeps its traceback. The
cheap checks (methods, options, files, ``--out``) run before a model is loaded. torch, the zoo and
matplotlib are imported inside the subcommands: ``attnx --help`` starts at once.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import AttnxError, AttnxValueError
from ..viz.terminal import escape, say, silence_stdout
from . import generation
from .args import class_targets, non_negative_int, parse_options, positive_int
from .help import EPILOG, EVALUATE_EXAMPLES
from .paths import HTML_SUFFIXES, PICTURE_SUFFIXES, check_out, existing_files, is_html, out_path

if TYPE_CHECKING:
    import torch

    from attnx.zoo import ZooModel

#: the method ``attnx explain`` uses without --method; not the library's ``rollout``: the command
#: is where a user asks for one class (--target), and rollout's map is the same for every class
DEFAULT_METHOD = "transformer_attribution"


def embedded_vision(loaded: ZooModel) -> str:
    """What the embedded vision model is, said when it explains a user's own images."""
    size = loaded.info.get("image_size") or ("?",)
    return (f"a {size[0]}-px ViT trained on Fashion-MNIST-style garment scenes ({len(loaded.class_names or [])} "
            "garment classes); give --model for other pictures")


def _methods(arg: str, kind: str) -> list[str]:
    import attnx

    if arg == "all":
        return attnx.list_methods()
    names = [m.strip() for m in arg.split(",") if m.strip()]
    for n in names:
        attnx.get_method(n)  # raises with the list of methods
    return names


def _per_method(methods: Sequence[str], options: dict[str, str]) -> dict[str, dict]:
    """The options of each method, parsed by its declaration: with several methods (``--method
    all``) an option goes to the methods that have it; one that no method has is an error."""
    import attnx

    specs = {m: attnx.get_method(m) for m in methods}
    if len(methods) > 1:
        unused = sorted(k for k in options if not any(k in spec.options for spec in specs.values()))
        if unused:
            raise AttnxValueError(f"no method of {', '.join(methods)} has the option(s) {unused}; see `attnx methods`")
    out = {}
    for m, spec in specs.items():
        if len(methods) == 1:
            spec.check_options(options)
        out[m] = {k: spec.option(k).parse(v) for k, v in options.items() if k in spec.options}
    return out


def _check_adapter(name: str | None) -> None:
    """``--adapter`` names a registered adapter (checked before a model is loaded)."""
    if name is None:
        return
    from attnx.adapters import adapter_names

    if name not in adapter_names():
        raise AttnxValueError(f"--adapter {name!r} is not an adapter; expected one of {', '.join(adapter_names())}")


def _explainer(args: argparse.Namespace, loaded: ZooModel) -> Any:
    import attnx

    return attnx.Explainer(loaded.model, adapter=getattr(args, "adapter", None), tokenizer=loaded.tokenizer)


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


def _load(args: argparse.Namespace, kind: str) -> ZooModel:
    from .. import zoo

    spec = args.model
    if args.size is not None and len(args.size) > 2:
        raise AttnxValueError(f"--size takes N or H W, got {len(args.size)} numbers")
    size = None if args.size is None else (args.size[0] if len(args.size) == 1 else tuple(args.size))
    files = dict(arch=args.arch, trust_pickle=args.trust_pickle, mean=args.mean, std=args.std, size=size,
                 trust_remote_code=args.trust_remote_code, max_expansion=args.max_expansion)
    if spec in (None, "default", "default-lm") or not zoo.files.is_model_file(str(spec)):
        if args.arch or args.trust_pickle:
            raise AttnxValueError(f"--arch and --trust-pickle apply to model files (.pt, .pth, .ckpt, .bin, "
                                  f".safetensors), not to --model {spec or 'default'}")
    try:
        return zoo.load(spec, kind, **files)
    except AttnxError:  # said in one line already
        raise
    except Exception as exc:  # unknown names, no network: one line, not a traceback
        raise AttnxValueError(f"cannot load model {spec or 'default'!r} ({kind}): {type(exc).__name__}: {exc}; "
                              "see `attnx models` for what --model accepts") from exc


def _open_images(paths: Sequence[str]) -> list[Any]:
    """The image files as PIL images, read before any model is loaded."""
    from PIL import Image, UnidentifiedImageError

    existing_files(paths)
    images = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                images.append(img.copy())
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise AttnxValueError(f"{p} is not an image file PIL can read (expected PNG, JPEG, ...): "
                                  f"{str(exc) or type(exc).__name__}") from None
    return images


def _load_images(paths: Sequence[str], pictures: Sequence[Any], loaded: ZooModel) -> tuple[torch.Tensor, list[str]]:
    from .. import zoo

    zoo.files.require_preprocessing(loaded)
    return loaded.preprocess(list(pictures)), [Path(p).stem for p in paths]


def _scenes(loaded: ZooModel, n: int) -> tuple[torch.Tensor, list[str]]:
    """The shipped held-out scenes, preprocessed for ``loaded`` (an embedded model)."""
    from .. import zoo

    images = loaded.preprocess(zoo.scenes(n).images)
    return images, [f"scene{i}" for i in range(len(images))]


def check_num_scenes(n: int) -> None:
    """``--num-scenes`` of ``attnx explain`` counts shipped scenes: 1 to their number."""
    from .. import zoo

    total = zoo.vision.num_scenes()
    if not 1 <= n <= total:
        raise AttnxValueError(f"--num-scenes must be between 1 and {total} (the shipped held-out scenes), got {n}")


def explain_images(args: argparse.Namespace) -> int:
    # cheap checks first: no model is loaded (or downloaded) to learn about a typo
    methods = _methods(args.method, "image")
    options = _per_method(methods, parse_options(args.option))
    _check_adapter(args.adapter)
    if not args.images and args.model not in (None, "default"):
        raise AttnxValueError("give image files to explain with --model")
    check_out(args.out, PICTURE_SUFFIXES + HTML_SUFFIXES, "image explanations")
    if not args.images:
        check_num_scenes(args.num_scenes)
    pictures = _open_images(args.images)
    loaded = _load(args, "image")
    if args.images:
        if args.model in (None, "default"):  # a user's photo, the garment model: say so
            say(f"explaining {len(args.images)} image file(s) with the embedded vision model: {embedded_vision(loaded)}")
        images, names = _load_images(args.images, pictures, loaded)
    else:  # the embedded scenes: --model is the embedded vision model
        images, names = _scenes(loaded, args.num_scenes)
    explainer = _explainer(args, loaded)
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


def _model_title(spec: str | None, loaded: ZooModel) -> str:
    name = str(loaded.info.get("name") or spec or f"the embedded {loaded.kind} model")
    return name if name.startswith("attnx") else f"attnx: {name}"


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
                               title=_model_title(args.model, loaded), page_title="attnx report", **kw)
    say(f"wrote {path}")
    return 0


def explain_text(args: argparse.Namespace) -> int:
    methods = _methods(args.method, "text")
    options = _per_method(methods, parse_options(args.option))
    _check_adapter(args.adapter)
    check_out(args.out, HTML_SUFFIXES, "text explanations")
    loaded = _load(args, "text")
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
    explainer = _explainer(args, loaded)
    if target is not None and isinstance(target, list) and len(target) != len(args.text):
        raise AttnxValueError("give one --target for all texts, or one per text")
    explained = [explainer(batch, method=m, target=target, **options[m]) for m in methods]
    from .. import report, viz

    path = out_path(args.out, "attnx_text.html", "_text.html")
    if language_model:  # the page that shows the explained token after the prompt
        path.write_text(viz.text_html(explained, loaded.tokenizer, class_names=loaded.class_names))
    else:  # the interactive page: methods side by side, the value under the pointer
        report.write_report(path, explained, tokenizer=loaded.tokenizer, class_names=loaded.class_names,
                            title=_model_title(args.model, loaded), page_title="attnx report")
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


#: the ``--model`` of the embedded CLIP, explained on the shipped scenes when no image is given
EMBEDDED_CLIP = "default-clip"


def explain_image_text(args: argparse.Namespace) -> int:
    """Images and --text prompts of a dual encoder (CLIP, SigLIP, OpenCLIP): one map per image and
    prompt, for each method; the prompts' probabilities per image in the terminal."""
    methods = _methods(args.method, "image")
    options = _per_method(methods, parse_options(args.option))
    _check_adapter(args.adapter)
    if args.target or args.continuation:
        raise AttnxValueError("a dual encoder explains every image with every --text prompt; --target and --continuation do not apply")
    check_out(args.out, PICTURE_SUFFIXES, "image-text maps")
    if not args.images:
        check_num_scenes(args.num_scenes)
    pictures = _open_images(args.images)
    loaded = _load(args, "image")
    if loaded.kind != "image_text":
        raise AttnxValueError("give either images or --text, not both (both only for a CLIP-style --model)")
    if args.images:
        images, names = _load_images(args.images, pictures, loaded)
    else:  # the embedded CLIP: the shipped scenes
        images, names = _scenes(loaded, args.num_scenes)
    from .. import viz

    explainer = _explainer(args, loaded)
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


def cmd_explain(args: argparse.Namespace) -> int:
    if args.text and (args.images or args.model == EMBEDDED_CLIP):  # a dual encoder (no images: the shipped scenes)
        return explain_image_text(args)
    if generation.wanted(args):  # a language model's answer, explained token by token
        methods = _methods(args.method, "text")
        options = _per_method(methods, parse_options(args.option))
        _check_adapter(args.adapter)
        return generation.explain_answer(args, lambda: _load(args, "text"), methods, options)
    if args.text:
        return explain_text(args)
    return explain_images(args)


def cmd_methods(args: argparse.Namespace) -> int:
    import attnx

    if args.markdown:
        say(attnx.methods.methods_markdown())
        return 0
    for name in attnx.list_methods():
        m = attnx.get_method(name)
        say(f"{name:<24} {m.summary}")
        for o in m.option_specs:
            choices = f" ({'/'.join(str(c) for c in o.choices)})" if o.choices else ""
            say(f"{'':<24}   {o.describe()}{choices}: {o.doc}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .. import zoo

    for k, v in zoo.MODEL_KINDS.items():
        say(f"{k:<24} {v}")
    try:
        lines = list(zoo.describe())
    except Exception as exc:  # pragma: no cover - informative only
        lines = [f"(embedded models unavailable: {exc})"]
    for line in lines:
        say(f"{'':<24} {line}")
    return 0


def evaluate_epilog() -> str:
    """``attnx evaluate --help``: the examples, the baselines and the columns (from their declarations)."""
    from .. import evaluate

    baselines = textwrap.fill(f"The baselines {' and '.join(evaluate.BASELINES)} are always added (--no-baselines leaves "
                              "them out unless named).", width=100)
    return EVALUATE_EXAMPLES + baselines + "\n\n" + evaluate.columns_help()


def _write_league(league: Any, out: Path, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    task = league.task
    table = league.to_markdown()
    md = out / f"league_{task}.md"
    md.write_text(table + f"\nWall time: {wall:.1f} s.\n")
    league.to_csv(out / f"league_{task}.csv")
    fig = league.plot_curves(out / f"curves_{task}.png")
    del fig
    league.to_html(out / f"league_{task}.html")
    league.save(out / f"samples_{task}.npz")
    say(table)
    say(f"{task}: {len(league.methods)} methods, {len(league)} samples, wall time {wall:.1f} s")
    for name in (md.name, f"league_{task}.html", f"league_{task}.csv", f"curves_{task}.png", f"samples_{task}.npz"):
        say(f"wrote {out / name}")


def _evaluate_merge(args: argparse.Namespace) -> int:
    from .. import evaluate

    folder = Path(args.merge)
    if not folder.is_dir():
        raise AttnxValueError(f"no such folder: {folder}")
    groups: dict[str, list[Path]] = {}
    for f in sorted(folder.glob("samples_*.shard-*-of-*.npz")):
        m = re.fullmatch(r"samples_(\w+)\.shard-\d+-of-\d+\.npz", f.name)
        if m and (args.task in (None, "all") or args.task == m.group(1)):
            groups.setdefault(m.group(1), []).append(f)
    if not groups:
        raise AttnxValueError(f"no shard files (samples_<task>.shard-I-of-N.npz) in {folder}; "
                              "write them with attnx evaluate --shard I/N --out FOLDER")
    out = Path(args.out) if args.out else folder
    for files in groups.values():
        t0 = time.perf_counter()
        league = evaluate.League.merge([evaluate.League.load(f) for f in files])
        _write_league(league, out, time.perf_counter() - t0)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task == "llm" and not args.merge:  # factual recall on a language model: its own protocol
        from ..evaluate import llm_league

        check_out(args.out)
        return llm_league.run_cli(args, say)
    from .. import evaluate

    if args.merge:
        if args.shard:
            raise AttnxValueError("give --shard (evaluate one shard) or --merge (combine shards), not both")
        return _evaluate_merge(args)
    data_is_table = bool(args.data) and Path(args.data).suffix.lower() in (".csv", ".tsv", ".tab")
    task = args.task or ("text" if data_is_table else "vision")
    if task == "all" and (args.data or args.model):
        raise AttnxValueError("--task all evaluates the embedded models; give --task vision or --task text with --model/--data")
    tasks = ["vision", "text"] if task == "all" else [task]
    methods = None if args.methods == "all" else _methods(args.methods, task)  # cheap checks first
    if args.data:
        if not os.path.exists(args.data):
            raise AttnxValueError(f"no such {'file' if data_is_table or task == 'text' else 'folder'}: {args.data}")
        if task == "vision" and not os.path.isdir(args.data):
            raise AttnxValueError(f"--data for images is a folder with one sub-folder of images per class, not {args.data}")
        if task == "text" and not os.path.isfile(args.data):
            raise AttnxValueError(f"--data for text is a CSV or TSV file with a text column, not {args.data}")
    if args.model not in (None, "default") and not args.data and "vision" in tasks:
        raise AttnxValueError("the shipped scenes are for the embedded model; give --data FOLDER to evaluate --model")
    if args.num_scenes is not None and (args.data or task != "vision"):
        raise AttnxValueError("--num-scenes composes scenes for the embedded vision model (no --data, --task vision)")
    shard = evaluate.parse_shard(args.shard) if args.shard else None
    if shard is not None and evaluate.launched_distributed():
        raise AttnxValueError("under torchrun every process is a shard already; leave out --shard")
    check_out(args.out, None)
    out = Path(args.out or "attnx_evaluate")
    for t in tasks:
        model = None
        if args.model not in (None, "default"):
            model = _load(args, "text" if t == "text" else "image")
            model.info.setdefault("name", args.model)
        t0 = time.perf_counter()
        try:
            league = evaluate.evaluate(t, methods, model=model, data=args.data, limit=args.limit, batch_size=args.batch_size,
                                       num_scenes=args.num_scenes, progress=not args.quiet, baselines=not args.no_baselines,
                                       shard=shard, randomisation_samples=args.randomisation_samples)
        except (FileNotFoundError, ModuleNotFoundError) as exc:  # data or packages missing: say how to get them
            raise AttnxValueError(f"{exc}") from exc
        wall = time.perf_counter() - t0
        if evaluate.rank() != 0:  # under torchrun rank 0 writes the tables
            continue
        if shard is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = league.save(out / evaluate.shard_file(t, shard))
            say(f"wrote {path} ({len(league)} of {league.meta['total']} samples, {wall:.1f} s); "
                f"when every shard is done: attnx evaluate --merge {out}")
            continue
        _write_league(league, out, wall)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_out(args.out, None)
    from .. import demo

    demo.run(args.out, quiet=args.quiet)
    return 0


def _model_file_options(p: argparse.ArgumentParser) -> None:
    """How a --model FILE is read (see the README's "Loading your own model")."""
    g = p.add_argument_group("model files and folders (--model FILE.pt / .pth / .ckpt / .bin / .safetensors, "
                             "--model FOLDER)")
    g.add_argument("--arch", default=None, help="the architecture of a state dict: a timm name (e.g. vit_small_patch16_224) "
                   "or a Hugging Face model folder / config.json")
    g.add_argument("--trust-pickle", action="store_true", help="unpickle a whole model saved with torch.save(model); "
                   "a pickle can execute arbitrary code: only for files you trust")
    g.add_argument("--trust-remote-code", action="store_true", help="run the Python code a Hugging Face folder or id "
                   "ships for its model (config.json auto_map); without it such a model is refused, never run")
    g.add_argument("--max-expansion", type=positive_int, default=None, metavar="N", help="refuse a zipped model file "
                   "(.pt, .bin, ...) that unpacks to more than N times its size (default: "
                   "attnx.zoo.files.MAX_EXPANSION; a deflate bomb is refused before it is unpacked)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar="M", help="per-channel mean of [0, 1] inputs "
                   "(default: the model's own)")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar="S", help="per-channel std (default: the model's own)")
    g.add_argument("--size", type=positive_int, nargs="+", default=None, metavar="N", help="input size: N or H W "
                   "(default: the model's own)")


def build_parser(evaluate_help: bool = True) -> argparse.ArgumentParser:
    """The parser; ``evaluate_help=False`` leaves out ``attnx evaluate --help``'s epilog and
    baselines (read from :mod:`attnx.evaluate`, which imports torch)."""
    p = argparse.ArgumentParser(
        prog="attnx",
        description="Explain stock pretrained Transformers (ViT, DeiT, BERT, ...) with attention rollout, "
        "gradient rollout, Transformer Attribution and LRP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    e = sub.add_parser("explain", help="explain images or texts and write pictures",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    e.add_argument("images", nargs="*", help="image files (none: the embedded default scenes)")
    e.add_argument("--text", action="extend", nargs="+", help="texts to explain; with images and a CLIP-style --model, "
                   "the prompts each image is explained for (one map per prompt)")
    e.add_argument("--model", default=None, help="see `attnx models`; default: the embedded model")
    e.add_argument("--method", default=DEFAULT_METHOD, help=f"a method name, a comma list, or 'all' (default {DEFAULT_METHOD})")
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
    _model_file_options(e)
    generation.add_arguments(e)
    e.add_argument("--no-color", action="store_true", help="plain terminal output for text")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_explain)
    m = sub.add_parser("methods", help="list the explanation methods and their options")
    m.add_argument("--markdown", action="store_true", help="the README's methods table")
    m.set_defaults(func=cmd_methods)
    mo = sub.add_parser("models", help="list what --model accepts and the embedded models")
    mo.set_defaults(func=cmd_models)
    d = sub.add_parser("demo", help="the main job: every method on the embedded vision and text models, pictures to --out")
    d.add_argument("--out", default="attnx_demo", help="output folder (default attnx_demo/)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    ev = sub.add_parser("evaluate", help="score the methods: faithfulness, localisation and speed, one table row per method",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=evaluate_epilog() if evaluate_help else None)
    ev.add_argument("--task", choices=["vision", "text", "llm", "all"], default=None,
                    help="vision (default; text for a .csv/.tsv --data), text, llm (factual recall on --model, default "
                    "smollm2; see docs/league_llm.md), or all (the embedded vision and text models)")
    ev.add_argument("--methods", default="all", help="a comma list of methods, or 'all' (default)")
    ev.add_argument("--model", default=None, help="see `attnx models`; default: the embedded model of the task")
    _model_file_options(ev)
    ev.add_argument("--data", default=None, help="an image folder (one sub-folder per class) or a CSV/TSV file with text,label columns")
    ev.add_argument("--num-scenes", type=positive_int, default=None, help="compose N new held-out scenes (needs Fashion-MNIST)")
    ev.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N scenes / images / texts only")
    ev.add_argument("--batch-size", type=positive_int, default=16, help="samples per batch (default 16)")
    ev.add_argument("--randomisation-samples", metavar="N", type=non_negative_int, default=16,
                    help="the model-parameter randomisation sanity check (columns rand. ρ and head ρ) runs on the "
                    "first N samples (default 16; 0: leave it out)")
    ev.add_argument("--out", default=None, help="output folder (default attnx_evaluate/; with --merge: the merged folder)")
    ev.add_argument("--shard", metavar="I/N", default=None, help="evaluate shard I of N (batches I, I+N, ...) and save its samples")
    ev.add_argument("--merge", metavar="DIR", default=None, help="merge the shard files in DIR into the tables")
    ev.add_argument("--no-baselines", action="store_true", help="do not add the baselines" + (
        f" {' and '.join(evaluate_baselines())}" if evaluate_help else ""))
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_evaluate)
    return p


def evaluate_baselines() -> tuple[str, ...]:
    from .. import evaluate

    return tuple(evaluate.BASELINES)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(evaluate_help="evaluate" in argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is not an error
        return status
    except AttnxError as exc:  # a user's mistake, said in one line; anything else keeps its traceback
        print(f"attnx: error: {escape(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `attnx methods | head`: the reader went away, not an error
        silence_stdout()
        return 0


def command() -> int:
    """The ``attnx`` command: its own process, so freed memory is kept for reuse (batched LRP
    passes on CPU run at full speed with it; see :mod:`attnx.core.allocator`)."""
    import attnx  # light: its names are imported on first use

    attnx.reuse_freed_memory()
    return main()

