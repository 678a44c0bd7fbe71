"""How each kind of data is batched, explained and measured: scenes, image folders, texts.

A task gives the evaluation loop (:mod:`attnx.evaluate.runner`) its model, its samples
(``get`` / ``collate``), the prepared batches (``prepare``: inputs, explained classes, per-sample
items) and the per-sample results of one method on a batch (``run``); see
:data:`attnx.evaluate.columns.DATA_KINDS` for what is evaluated.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics, zoo
from ..core.model_output import logits_of
from ..data import Scenes
from ..data import rotten_tomatoes as rt
from ..errors import AttnxTypeError, AttnxValueError
from .columns import SACO_GROUPS
from .datasets import check_data, evaluation_scenes, folder_class_indices, image_transform, read_texts

__all__ = ["FolderTask", "ImageTask", "SceneTask", "TextTask", "completeness", "to_numpy", "vision_task"]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def completeness(e) -> np.ndarray:
    """``(B,)`` the relative completeness error of each sample (:meth:`attnx.Explanation.completeness_error`);
    NaN for a method that claims no conservation."""
    err = e.completeness_error()
    return np.full(len(e), np.nan) if err is None else to_numpy(err).astype(np.float64)


def _bundle(model: Any, kind: str) -> zoo.ZooModel:
    """``model`` (a name, a bundle or an ``nn.Module``) as a :class:`attnx.zoo.ZooModel`."""
    if isinstance(model, zoo.ZooModel):
        return model
    if isinstance(model, torch.nn.Module):
        if kind == "text":
            raise AttnxTypeError("a text model needs its tokenizer: pass attnx.zoo.ZooModel(model, 'text', tokenizer=...)")
        return zoo.ZooModel(model, "image")  # evaluated in eval mode, its flags restored (runner.evaluate)
    if model is None or isinstance(model, str):
        return zoo.load(model, "text" if kind == "text" else "image")
    raise AttnxTypeError(f"model must be a name (see attnx.zoo.load), a ZooModel bundle or an nn.Module, got {type(model).__name__}")


def vision_task(model: Any, data: Any, num_scenes: int | None, deletion_steps: int, forward_batch_size: int) -> ImageTask:
    """The scenes task (``data`` ``None`` or scenes: the embedded model) or an image folder's."""
    if data is None or isinstance(data, Scenes):
        if model not in (None, "default"):
            raise AttnxValueError("the scenes are for the embedded vision model; to evaluate another model give "
                             "data=an image folder (one sub-folder per class)")
        return SceneTask(data, num_scenes, deletion_steps, forward_batch_size)
    if num_scenes is not None:
        raise AttnxValueError("num_scenes applies to the shipped scenes, not to data=")
    return FolderTask(model, data, deletion_steps, forward_batch_size)


# ---------------------------------------------------------------------------------------------
# vision
# ---------------------------------------------------------------------------------------------
class ImageTask:
    """What scenes and image folders share: perturbation, deletion and insertion curves."""

    kind = "images"
    unit = "image"
    item_fields: tuple[str, ...] = ()

    def _setup(self, loaded: zoo.ZooModel, deletion_steps: int, forward_batch_size: int) -> None:
        if not isinstance(deletion_steps, int) or deletion_steps < 1:
            raise AttnxValueError(f"deletion_steps must be a positive int, got {deletion_steps!r}")
        self.loaded = loaded
        self.model = loaded.model
        self.multi_label = loaded.multi_label
        self.steps = deletion_steps
        self.fbs = forward_batch_size
        # multi-label: the logit is stored, the table shows its sigmoid (and logit > 0: "present")
        self.measures = {"perturbation": "sigmoid" if self.multi_label else "accuracy",
                         "causal": "sigmoid" if self.multi_label else "probability"}
        pert = [0.0] + [i / 10 for i in range(1, 10)]
        causal = [i / deletion_steps for i in range(deletion_steps + 1)]
        self.fractions = {"pos": pert, "neg": pert, "deletion": causal, "insertion": causal}

    def curves(self, e, x: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
        pm = "logit" if self.multi_label else "accuracy"
        cm = "logit" if self.multi_label else "probability"
        px = dict(baseline=0.0, mean=self.mean, std=self.std) if self.mean is not None else dict(baseline=0.0)
        out = {}
        for mode, name in (("positive", "pos"), ("negative", "neg")):
            c = metrics.perturbation_curve(self.model, x, e, targets, mode=mode, measure=pm,
                                           labels=None if self.multi_label else targets, batch_size=self.fbs, **px)
            out[name] = to_numpy(c.values)
        out["deletion"] = to_numpy(metrics.deletion_curve(self.model, x, e, targets, steps=self.steps, measure=cm,
                                                          batch_size=self.fbs).values)
        out["insertion"] = to_numpy(metrics.insertion_curve(self.model, x, e, targets, steps=self.steps, measure=cm,
                                                            batch_size=self.fbs).values)
        out["saco"] = to_numpy(metrics.saco(self.model, x, e, targets, groups=SACO_GROUPS, measure=self.measures["causal"],
                                            batch_size=self.fbs, **px))
        return out

    def empty(self, names: list[str]) -> tuple[dict, dict]:
        """Items and per-method results of no samples (a shard without batches)."""
        K = {k: len(v) for k, v in self.fractions.items()}
        items = {k: np.zeros(0, dtype=np.int64) for k in self.item_fields}
        if "two" in items:
            items["two"] = np.zeros(0, dtype=bool)
        fields = {"seconds": np.zeros(0), "saco": np.zeros(0), "completeness": np.zeros(0), **{k: np.zeros((0, K[k]), dtype=np.float32) for k in K}}
        if self.kind == "scenes":
            fields.update(seg_correct=np.zeros(0, np.int64), seg_labeled=np.zeros(0, np.int64),
                          seg_intersection=np.zeros((0, 2), np.int64), seg_union=np.zeros((0, 2), np.int64),
                          seg_ap=np.zeros(0), pointing=np.zeros(0, bool), mass=np.zeros(0), mass_other=np.zeros(0))
        return items, {m: dict(fields) for m in names}

    def subset(self, p: dict, sel: torch.Tensor, fields: dict):
        """Inputs and targets of the rows ``sel`` of a prepared batch (randomisation check)."""
        return p["x"][sel], p["targets"][sel]

    def explain(self, explainer, method: str, opts: dict, x: torch.Tensor, targets: torch.Tensor):
        t0 = time.perf_counter()
        e = explainer(x, method=method, target=targets, **opts)
        seconds = time.perf_counter() - t0
        return e, np.full(len(targets), seconds / max(1, len(targets)))


class SceneTask(ImageTask):
    """The embedded vision model on held-out scenes: every garment of a scene explained, with its mask."""

    kind = "scenes"
    item_fields = ("index", "sample", "target", "two")

    def __init__(self, data: Scenes | None, num_scenes: int | None, deletion_steps: int, forward_batch_size: int) -> None:
        self.scenes, dataset = evaluation_scenes(data, num_scenes)
        loaded = zoo.vision_model()
        self._setup(loaded, deletion_steps, forward_batch_size)
        self.mean, self.std = loaded.mean, loaded.std
        self.preprocess = loaded.preprocess
        self.num_samples = len(self.scenes)
        counts = self.scenes.num_objects.long()
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.meta = {"kind": "scenes", "model": "the embedded vision model (attnx.zoo)", "dataset": dataset,
                     "item_name": "(scene, class) maps", "deletion_steps": deletion_steps,
                     "forward_batch_size": forward_batch_size}

    def count_items(self, n: int) -> int:
        return int(self.offsets[n])

    def get(self, i: int):
        return i

    def collate(self, batch):
        return torch.tensor([i for i, _ in batch], dtype=torch.long)

    def prepare(self, idx: torch.Tensor) -> dict:
        s = self.scenes[idx]
        x = self.preprocess(s.images)
        scene, slot, target, other = [], [], [], []
        for b in range(len(idx)):
            cls = [int(c) for c in s.classes[b] if c >= 0]
            for j, c in enumerate(cls):
                scene.append(b)
                slot.append(j)
                target.append(c)
                other.append(cls[1 - j] if len(cls) == 2 else -1)
        scene_t, target_t, other_t = torch.tensor(scene), torch.tensor(target), torch.tensor(other)
        H, W = s.masks.shape[-2:]
        mask = s.masks[scene_t, target_t]
        mask_other = torch.where((other_t >= 0)[:, None, None], s.masks[scene_t, other_t.clamp(min=0)],
                                 torch.zeros(len(scene), H, W, dtype=torch.bool))
        index = self.offsets[idx[scene_t]] + torch.tensor(slot)
        items = {"index": to_numpy(index), "sample": to_numpy(idx[scene_t]), "target": to_numpy(target_t),
                 "two": to_numpy(other_t >= 0)}
        return {"samples": idx, "items": items, "x": x[scene_t], "targets": target_t, "mask": mask, "mask_other": mask_other}

    def run(self, explainer, method: str, opts: dict, p: dict) -> dict[str, np.ndarray]:
        e, seconds = self.explain(explainer, method, opts, p["x"], p["targets"])
        out = {"seconds": seconds, "completeness": completeness(e), **self.curves(e, p["x"], p["targets"])}
        seg = metrics.segmentation_scores(e, p["mask"])
        out.update(seg_correct=to_numpy(seg.pixel_correct), seg_labeled=to_numpy(seg.pixel_labeled),
                   seg_intersection=to_numpy(seg.intersection), seg_union=to_numpy(seg.union), seg_ap=to_numpy(seg.ap))
        out["pointing"] = to_numpy(metrics.pointing_game(e, p["mask"]))
        cd = metrics.class_discrimination(e, p["mask"], p["mask_other"])
        out["mass"] = to_numpy(cd.mass_target)
        out["mass_other"] = to_numpy(cd.mass_other)
        return out


class FolderTask(ImageTask):
    """Any image classifier on an image folder (one sub-folder per class): the label explained."""

    item_fields = ("index", "sample", "target")

    def __init__(self, model: Any, data: str | Path, deletion_steps: int, forward_batch_size: int) -> None:
        from torchvision.datasets import ImageFolder

        check_data("vision", data)
        root = Path(data)
        loaded = _bundle(model, "image")
        if loaded.kind != "image":
            raise AttnxValueError(f"{model!r} is not an image classifier")
        transform, mean, std, how = image_transform(loaded)
        self.dataset = ImageFolder(str(root), transform=transform)
        if len(self.dataset) == 0:
            raise FileNotFoundError(f"{root} holds no images")
        self._setup(loaded, deletion_steps, forward_batch_size)
        self.mean, self.std = mean, std
        classes, mapping = folder_class_indices(self.dataset.classes, loaded.class_names)
        self.class_of_folder = classes
        # class round-robin order, so that a prefix (limit) holds every class
        by_class: dict[int, list[int]] = {}
        for i, (_, t) in enumerate(self.dataset.samples):
            by_class.setdefault(t, []).append(i)
        lists = [by_class[k] for k in sorted(by_class)]
        self.order = [lst[k] for k in range(max(map(len, lists))) for lst in lists if k < len(lst)]
        self.num_samples = len(self.order)
        spec = model if isinstance(model, str) else (loaded.info.get("name") or type(loaded.model).__name__)
        self.meta = {"kind": "images", "model": str(spec), "dataset": f"image folder {root.name}/ ({len(self.dataset.classes)} classes)",
                     "item_name": "images", "classes": mapping, "input": how, "deletion_steps": deletion_steps,
                     "forward_batch_size": forward_batch_size}

    def count_items(self, n: int) -> int:
        return n

    def get(self, i: int):
        x, t = self.dataset[self.order[i]]
        return x, self.class_of_folder[t]

    def collate(self, batch):
        idx = torch.tensor([i for i, _ in batch], dtype=torch.long)
        x = torch.stack([s[0] for _, s in batch])
        t = torch.tensor([s[1] for _, s in batch], dtype=torch.long)
        return idx, x, t

    def prepare(self, batch) -> dict:
        idx, x, t = batch
        source = torch.tensor([self.order[int(i)] for i in idx])
        return {"samples": idx, "items": {"index": to_numpy(idx), "sample": to_numpy(source), "target": to_numpy(t)},
                "x": x, "targets": t}

    def run(self, explainer, method: str, opts: dict, p: dict) -> dict[str, np.ndarray]:
        e, seconds = self.explain(explainer, method, opts, p["x"], p["targets"])
        return {"seconds": seconds, "completeness": completeness(e), **self.curves(e, p["x"], p["targets"])}


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
class TextTask:
    """A text classifier on texts: the predicted class explained, tokens deleted by relevance."""

    kind = "text"
    unit = "text"
    steps = 10

    def __init__(self, model: Any, data: Any, forward_batch_size: int) -> None:
        if data is None:  # cheap check first: the corpus package (says how to install it)
            rt.corpus_path()
        loaded = _bundle(model, "text")
        if loaded.kind != "text" or loaded.tokenizer is None:
            raise AttnxValueError(f"{model!r} is not a text classifier with a tokenizer")
        self.texts, self.labels, dataset = read_texts(data, loaded.class_names)
        if not self.texts:
            raise AttnxValueError("no texts to evaluate")
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.fbs = forward_batch_size
        self.num_samples = len(self.texts)
        fr = [i / self.steps for i in range(self.steps + 1)]
        self.fractions = {"most": fr, "least": fr}
        self.measures = {"deletion": "probability"}
        name = "the embedded sentiment model (attnx.zoo)" if model in (None, "default") else (
            model if isinstance(model, str) else (loaded.info.get("name") or type(loaded.model).__name__))
        self.meta = {"kind": "text", "model": str(name), "dataset": dataset, "item_name": "texts",
                     "replacement": "mask", "steps": self.steps, "forward_batch_size": forward_batch_size}

    def count_items(self, n: int) -> int:
        return n

    def get(self, i: int):
        return self.texts[i], self.labels[i]

    def collate(self, batch):
        return [i for i, _ in batch], [s[0] for _, s in batch], [s[1] for _, s in batch]

    def prepare(self, batch) -> dict:
        idx, texts, labels = batch
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        idx_t = torch.tensor(idx, dtype=torch.long)
        with torch.no_grad():  # the predicted classes, explained by every method (and by the sanity row's model)
            predicted = logits_of(self.model(**enc), embeddings=False).argmax(dim=-1)
        return {"samples": idx_t, "items": {"index": to_numpy(idx_t), "sample": to_numpy(idx_t),
                                            "label": np.asarray(labels, dtype=np.int64)},
                "batch": enc, "targets": predicted}

    def run(self, explainer, method: str, opts: dict, p: dict) -> dict[str, np.ndarray]:
        batch = p["batch"]
        t0 = time.perf_counter()
        e = explainer(batch, method=method, target=p["targets"], **opts)
        seconds = time.perf_counter() - t0
        B = batch["input_ids"].shape[0]
        out = {"seconds": np.full(B, seconds / B), "target": to_numpy(e.targets), "completeness": completeness(e)}
        for first, name in ((True, "most"), (False, "least")):
            c = metrics.token_deletion_curve(self.model, batch, e, e.targets, most_relevant_first=first, steps=self.steps,
                                             replacement="mask", tokenizer=self.tokenizer, batch_size=self.fbs)
            out[name] = to_numpy(c.values)
        return out

    def subset(self, p: dict, sel: torch.Tensor, fields: dict):
        """The rows ``sel`` of the batch (its padding kept) and their explained (predicted) classes."""
        batch = {k: v[sel] for k, v in p["batch"].items()}
        return batch, torch.from_numpy(fields["target"])[sel]

    def empty(self, names: list[str]) -> tuple[dict, dict]:
        """Items and per-method results of no samples (a shard without batches)."""
        items = {"index": np.zeros(0, np.int64), "sample": np.zeros(0, np.int64), "label": np.zeros(0, np.int64)}
        fields = {"seconds": np.zeros(0), "target": np.zeros(0, np.int64), "completeness": np.zeros(0),
                  "most": np.zeros((0, self.steps + 1), np.float32), "least": np.zeros((0, self.steps + 1), np.float32)}
        return items, {m: dict(fields) for m in names}
