"""What the ``attnx`` command explains: the ``--model`` (zoo name, hub id or file), its adapter and
the inputs read from files or the shipped scenes.

Each check runs here once, before a model is loaded where it can: the ``--adapter`` name, the
``--size`` / ``--arch`` flags, the image files (read once, as pictures), the ``--num-scenes``
count. torch and the zoo load inside the functions.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import AttnxError, AttnxValueError
from .args import positive_int
from .paths import existing_files

if TYPE_CHECKING:
    import torch

    from attnx.zoo import ZooModel

__all__ = ["add_model_file_arguments", "check_adapter", "check_num_scenes", "embedded_vision", "explainer_for",
           "load_model", "model_title", "open_images", "preprocess_images", "scenes"]


def add_model_file_arguments(p: argparse.ArgumentParser) -> None:
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


def check_adapter(name: str | None) -> None:
    """``--adapter`` names a registered adapter (checked before a model is loaded)."""
    if name is None:
        return
    from attnx.adapters import adapter_names

    if name not in adapter_names():
        raise AttnxValueError(f"--adapter {name!r} is not an adapter; expected one of {', '.join(adapter_names())}")


def load_model(args: argparse.Namespace, kind: str) -> ZooModel:
    """The ``--model`` of ``kind`` (``"image"`` or ``"text"``) with the model-file flags; any
    failure to load is one line naming the model."""
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


def explainer_for(args: argparse.Namespace, loaded: ZooModel) -> Any:
    """The :class:`attnx.Explainer` of the loaded model, with ``--adapter`` when given."""
    import attnx

    return attnx.Explainer(loaded.model, adapter=getattr(args, "adapter", None), tokenizer=loaded.tokenizer)


def embedded_vision(loaded: ZooModel) -> str:
    """What the embedded vision model is, said when it explains a user's own images."""
    size = loaded.info.get("image_size") or ("?",)
    return (f"a {size[0]}-px ViT trained on Fashion-MNIST-style garment scenes ({len(loaded.class_names or [])} "
            "garment classes); give --model for other pictures")


def model_title(spec: str | None, loaded: ZooModel) -> str:
    """The title of a written page: the model's name."""
    name = str(loaded.info.get("name") or spec or f"the embedded {loaded.kind} model")
    return name if name.startswith("attnx") else f"attnx: {name}"


def open_images(paths: Sequence[str]) -> list[Any]:
    """The image files as PIL images, read before any model is loaded: the one place the command
    checks them (every missing file named in one line, then each file read as a picture)."""
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


def preprocess_images(paths: Sequence[str], pictures: Sequence[Any], loaded: ZooModel) -> tuple[torch.Tensor, list[str]]:
    """The pictures read by :func:`open_images`, preprocessed for ``loaded``, and their names."""
    from .. import zoo

    zoo.files.require_preprocessing(loaded)
    return loaded.preprocess(list(pictures)), [Path(p).stem for p in paths]


def scenes(loaded: ZooModel, n: int) -> tuple[torch.Tensor, list[str]]:
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
