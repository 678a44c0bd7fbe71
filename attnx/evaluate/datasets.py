"""The data of an evaluation, in evaluation order: embedded scenes, image folders, texts.

What each kind of data is, and which class is explained, is declared in
:data:`attnx.evaluate.columns.DATA_KINDS`.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import zoo
from ..data import FashionMNISTNotFound, Scenes, make_scenes
from ..data import rotten_tomatoes as rt
from ..errors import AttnxValueError
from ..zoo.hub import pil_transform
from .columns import SCENE_SEEDS

__all__ = ["IndexDataset", "check_data", "evaluation_scenes", "folder_class_indices", "image_transform", "read_texts"]


class IndexDataset(torch.utils.data.Dataset):
    """``dataset[i]`` as ``(i, sample)``, so that every batch knows its samples' positions."""

    def __init__(self, get: Callable[[int], Any], n: int) -> None:
        self.get, self.n = get, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i, self.get(i)


def _alternate(a: int, b: int) -> list[int]:
    """Positions ``0..a-1`` and ``a..a+b-1`` alternated (``a`` first), the rest appended."""
    out = []
    for k in range(max(a, b)):
        if k < a:
            out.append(k)
        if k < b:
            out.append(a + k)
    return out


def evaluation_scenes(data: Scenes | None, num_scenes: int | None) -> tuple[Scenes, str]:
    """The scenes to evaluate, in evaluation order, and their description.

    Parameters
    ----------
    data:
        Given scenes (evaluated in their order), or ``None``: the shipped held-out scenes, one- and
        two-garment scenes alternated.
    num_scenes:
        Instead: compose this many new held-out scenes (needs Fashion-MNIST), alternated.
    """
    if isinstance(data, Scenes):
        if num_scenes is not None:
            raise AttnxValueError("give scenes (data=) or num_scenes=, not both")
        return data, f"{len(data)} given scenes"
    if num_scenes is not None:
        if not isinstance(num_scenes, int) or num_scenes < 1:
            raise AttnxValueError(f"num_scenes must be a positive int, got {num_scenes!r}")
        info = zoo.vision.read_info()
        size = int(info.get("scene_kwargs", {}).get("size", info["image_size"][0]))
        a, b = (num_scenes + 1) // 2, num_scenes // 2
        try:
            parts = [make_scenes(a, "test", seed=SCENE_SEEDS[0], size=size, objects=1)]
            if b:
                parts.append(make_scenes(b, "test", seed=SCENE_SEEDS[1], size=size, objects=2))
        except FashionMNISTNotFound as exc:
            raise FashionMNISTNotFound(
                f"num_scenes composes new held-out scenes from the Fashion-MNIST t10k split, which is not installed.\n{exc}"
            ) from None
        scenes = Scenes(*(torch.cat([getattr(p, k) for p in parts]) for k in ("images", "labels", "masks", "classes", "boxes")))
        desc = (f"{num_scenes} new held-out scenes (make_scenes t10k, {a} one-garment seed {SCENE_SEEDS[0]}, "
                f"{b} two-garment seed {SCENE_SEEDS[1]}, alternated)")
        return scenes[torch.tensor(_alternate(a, b))], desc
    scenes = zoo.scenes()
    one = int((scenes.num_objects == 1).sum())
    if bool((scenes.num_objects[:one] == 1).all()):  # the shipped order: one-garment half first
        order = _alternate(one, len(scenes) - one)
        scenes = scenes[torch.tensor(order)]
    return scenes, f"the {len(scenes)} shipped held-out scenes (alternately one and two garments)"


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def folder_class_indices(folders: Sequence[str], class_names: Sequence[str] | None) -> tuple[list[int], str]:
    """Model class index of each folder of an image folder, and how they were matched."""
    if class_names:
        lookup = {_norm(c): i for i, c in enumerate(class_names)}
        if all(_norm(f) in lookup for f in folders):
            return [lookup[_norm(f)] for f in folders], "folder names matched to the model's class names"
    if all(f.isdigit() for f in folders):
        return [int(f) for f in folders], "folder names are class indices"
    return list(range(len(folders))), "folders in sorted order are classes 0, 1, ..."


def _model_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    for obj, attr in ((getattr(model, "patch_embed", None), "img_size"), (model, "image_size"),
                      (getattr(model, "config", None), "image_size")):
        v = getattr(obj, attr, None) if obj is not None else None
        if v is None:
            continue
        if isinstance(v, int):
            return (v, v)
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return (int(v[0]), int(v[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return tuple(cfg["input_size"][-2:])
    return None


def image_transform(loaded: zoo.ZooModel) -> tuple[Callable, Any, Any, str]:
    """(PIL image -> input tensor, mean, std, note) for a loaded image model."""
    if loaded.preprocess is not None:
        return loaded.preprocess, loaded.mean, loaded.std, "the model's preprocessing"
    size = _model_input_size(loaded.model)
    if size is None:
        raise AttnxValueError("cannot tell this model's input size (no preprocessing known); evaluate it from Python "
                         "with a model bundle (attnx.zoo.ZooModel) that has preprocess=")
    cfg = getattr(loaded.model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is not None and std is not None:
        return pil_transform(size, mean, std), tuple(mean), tuple(std), f"RGB resized to {size[0]}x{size[1]}, pretrained_cfg mean/std"
    return pil_transform(size, (0.0,) * 3, (1.0,) * 3), None, None, f"RGB resized to {size[0]}x{size[1]}, [0, 1], not normalised"


def check_data(kind: str, data: str | Path) -> None:
    """Raise one line unless ``data`` is what an evaluation of ``kind`` reads: a folder with one
    sub-folder of images per class (``"vision"``) or a CSV / TSV file (``"text"``). The one check
    of a ``data`` path: the tasks call it, and ``attnx evaluate`` before it loads a model."""
    path = Path(data)
    table = path.suffix.lower() in (".csv", ".tsv", ".tab")
    if not path.exists():
        raise AttnxValueError(f"no such {'file' if table or kind == 'text' else 'folder'}: {data}")
    if kind == "vision" and not path.is_dir():
        raise AttnxValueError(f"the data for images (--data) is a folder with one sub-folder of images per class, not {data}")
    if kind == "text" and not path.is_file():
        raise AttnxValueError(f"the data for text (--data) is a CSV or TSV file with a text column, not {data}")


def read_texts(data: Any, class_names: Sequence[str] | None) -> tuple[list[str], list[int], str]:
    """(texts, labels (-1 unknown), description) of ``None`` (the Rotten Tomatoes test split), a
    list of strings or ``(text, label)`` pairs, or a CSV / TSV file with ``text`` (and ``label``)."""
    if data is None:
        test = rt.load_split("test")
        return [r.text for r in test], [r.label for r in test], "Rotten Tomatoes test split"
    if isinstance(data, (list, tuple)):
        texts, labels = [], []
        for d in data:
            if isinstance(d, str):
                texts.append(d)
                labels.append(-1)
            else:
                texts.append(str(d[0]))
                labels.append(int(d[1]))
        return texts, labels, f"{len(texts)} given texts"
    check_data("text", data)
    path = Path(data)
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = {(k or "").strip().lower(): k for k in reader.fieldnames or []}
        if "text" not in fields:
            raise AttnxValueError(f"{path} has no 'text' column (columns: {list(reader.fieldnames or [])}); "
                             "give a header line with text and (optionally) label")
        rows = list(reader)
    lookup = {_norm(c): i for i, c in enumerate(class_names or [])}
    texts, labels = [], []
    for r in rows:
        texts.append(r[fields["text"]])
        raw = (r.get(fields["label"]) or "").strip() if "label" in fields else ""
        if raw.lstrip("-").isdigit():
            labels.append(int(raw))
        elif raw and _norm(raw) in lookup:
            labels.append(lookup[_norm(raw)])
        elif raw:
            raise AttnxValueError(f"{path}: label {raw!r} is neither a class index nor one of the model's classes {list(class_names or [])}")
        else:
            labels.append(-1)
    return texts, labels, f"{path.name} ({len(texts)} texts)"
