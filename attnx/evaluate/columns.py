"""The evaluation protocol, declared once: what a league evaluates and what each column measures.

Every column of a league is a :class:`Column`: its CSV key, its markdown label, its direction, a
one-line description (printed under the league table) and the protocol detail (how the number is
measured). The kinds of data a league is computed on are declared here too (:data:`DATA_KINDS`),
with the constants of the protocol (:data:`BASELINES`, :data:`SCENE_SEEDS`,
:data:`RANDOMISATION_SEED`). The CLI help (:func:`columns_help`) and the README's protocol section
(:func:`protocol_markdown`) are rendered from these declarations.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Mapping

__all__ = [
    "BASELINES",
    "Column",
    "DATA_KINDS",
    "DataKind",
    "RANDOMISATION_SEED",
    "SACO_GROUPS",
    "SANITY_METHOD",
    "SANITY_ROW",
    "SCENE_SEEDS",
    "catalogue",
    "columns_help",
    "completeness_column",
    "league_columns",
    "protocol_markdown",
]

#: methods added to every evaluation (a floor for the numbers)
BASELINES = ("random", "gradient_x_input")
#: ``make_scenes`` seeds of the one-garment and two-garment scenes of ``num_scenes=N``
#: (disjoint from the seeds of the training, validation and shipped scenes)
SCENE_SEEDS = (9200001, 9200002)
#: ``seed`` of :func:`attnx.metrics.parameter_randomisation` in the league: every batch and shard
#: randomises the model to the same weights
RANDOMISATION_SEED = 0
#: the sanity row of every league: this method on a copy of the model whose parameters are all
#: re-drawn (``attnx.metrics.randomised_copy``, seed :data:`RANDOMISATION_SEED`), scored on the
#: real model; a faithful method's scores fall to the level of ``random`` there
SANITY_METHOD = "transformer_attribution"
SANITY_ROW = "transformer_attribution@random_weights"
#: salience groups of the SaCo column (the paper's K)
SACO_GROUPS = 10


# =============================================================================================
# what is evaluated
# =============================================================================================
@dataclass(frozen=True)
class DataKind:
    """A kind of data a league is computed on (``League.kind``): its samples and explained classes."""

    key: str
    title: str
    protocol: str


DATA_KINDS = (
    DataKind(
        "scenes", '`task="vision"`, the embedded model on held-out scenes (the default)',
        "The held-out scenes that ship with attnx (`attnx.zoo.scenes()`, 48 one-garment and 48 two-garment "
        "scenes), evaluated alternately one- and two-garment (`limit=N` takes the first `N` of that order), or "
        "`num_scenes=N` new held-out scenes composed by `attnx.data.make_scenes` from the Fashion-MNIST t10k "
        f"split: `ceil(N/2)` one-garment scenes (seed {SCENE_SEEDS[0]}) and `N//2` two-garment scenes "
        f"(seed {SCENE_SEEDS[1]}), alternated. Every ground-truth garment of a scene is explained, so a "
        "two-garment scene gives two (scene, class) maps. The model is multi-label, so the curves follow "
        "the *sigmoid* of the explained class's logit.",
    ),
    DataKind(
        "images", '`task="vision"`, `data=FOLDER`: an image folder',
        "An ImageNet-style folder (one sub-folder per class, `torchvision.datasets.ImageFolder`) and "
        "`model=` anything `attnx.zoo.load` accepts. The explained class is the ground truth: folder names "
        "matching the model's class names (case, `_` and spaces ignored) are mapped to them, integer folder "
        "names are class indices, otherwise the folders' sorted order gives the indices. Images are "
        "evaluated in class round-robin order (`limit` takes a prefix of it). There are no masks, hence no "
        "localisation columns. Models without known preprocessing (a pickled model with no mean/std of its own or given) are fed RGB images "
        "resized to the model's input size and normalised with its `pretrained_cfg` mean/std if it has one "
        "(else left in [0, 1]).",
    ),
    DataKind(
        "text", '`task="text"`',
        "The embedded sentiment model on the Rotten Tomatoes test split (1269 snippets; `limit` takes the "
        "first ones), or `data=` a CSV / TSV file with a `text` column (and an optional `label` column) or a "
        "list of strings, with `model=` any text classifier. The predicted class is explained.",
    ),
)


# =============================================================================================
# the columns
# =============================================================================================
@dataclass(frozen=True)
class Column:
    """One column of a league.

    Attributes
    ----------
    key:
        Name in the CSV file and in :meth:`League.row`.
    label:
        Name in the markdown table.
    higher_is_better:
        The column's direction (the arrow after the label).
    doc:
        One line: what the number is (printed under the markdown table).
    protocol:
        How it is measured, in full (the README and the CLI help). Columns measured together share it.
    digits:
        Decimals in the markdown table.
    timing:
        A wall time: the one kind of column that differs between runs.
    best_at_zero:
        The best value is the one nearest 0 (a correlation: below 0 is no better).
    """

    key: str
    label: str
    higher_is_better: bool
    doc: str
    protocol: str = ""
    digits: int = 3
    timing: bool = False
    best_at_zero: bool = False

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


_PERTURBATION = (
    "Positive / negative perturbation of Chefer et al. (`attnx.metrics.perturbation_curve`): the 10, 20, ..., "
    "90 % most / least relevant pixels set to black (0 in pixel space, before normalisation); area over `x` in "
    "[0, 0.9]. Multi-label models (the embedded ViT): the sigmoid of the explained class's logit; otherwise "
    "top-1 accuracy against the label (the reference protocol)."
)
_PRESENT = (
    "Multi-label models only: the perturbation curves above counting the perturbed images on which the class "
    "is still detected (logit > 0); they come from the same forward passes."
)
_CAUSAL = (
    "RISE deletion (pixels replaced by 0 in the model's input space, i.e. the mean colour) and insertion (from "
    "a blurred copy), most relevant first, in `deletion_steps` equal steps (default 16); area over [0, 1]. "
    "Multi-label models: the sigmoid probability of the explained class; otherwise its softmax probability."
)
_SEGMENTATION = (
    "The segmentation protocol of Chefer et al. against the explained garment's exact mask "
    "(`attnx.metrics.SegmentationMeter`: the map thresholded at its mean, counts summed over the dataset, AP "
    "averaged over the maps)."
)
_LOCATION = (
    "Pointing game (`attnx.metrics.pointing_game`) and relevance mass (`attnx.metrics.relevance_mass`) "
    "against the explained garment's exact mask."
)
_DISCRIMINATION = (
    "Two-garment scenes, each garment explained as its own target (`attnx.metrics.class_discrimination`): "
    "the share of (scene, class) maps that put more positive relevance on the explained garment than on the "
    "other one (a class-blind map scores 0.5), and the relevance on the explained garments divided by the "
    "relevance on the other ones, summed over those maps."
)
_TOKEN_DELETION = (
    'Token deletion (`attnx.metrics.token_deletion_curve`, `replacement="mask"`, 10 steps, area over [0, 1]): '
    "content tokens replaced by `[MASK]` in order of relevance, most relevant first (lower is better) and least "
    "relevant first (higher is better); special tokens and padding are never removed. The measure is the "
    "softmax probability of the predicted class."
)
_RANDOMISATION = (
    "Model-parameter randomisation, the sanity check of Adebayo et al. (`attnx.metrics.parameter_randomisation`, "
    f'`order="cascade"`, `seed={RANDOMISATION_SEED}`), on the samples whose index in the evaluation order is '
    "below `randomisation_samples` (default 16; `0` leaves the check out). On a copy of the model the weights "
    "are re-drawn from the top down (the head, i.e. every parameter after the Transformer blocks, then each "
    "block from the last to the first, then the embeddings); after every step the map is recomputed for the "
    "same class and compared with the original map. `rand. ρ`: mean Spearman rank correlation with the map once "
    "**all** parameters are randomised (the last cascade step); lower is better, down to about 0 (the value "
    "nearest 0 is the best; below 0 is no better): a map that survives the destruction of the weights does not "
    "explain the model. `random` scores exactly 1 by construction: its map is seeded from the input and never "
    "reads the weights. `head ρ`: the same after randomising the head only (the cascade's first step); "
    "class-agnostic maps (raw attention, rollout, attention flow) do not read the head and score 1. A map that "
    "becomes constant has no correlation; it is left out of the mean, and the markdown table says so under the "
    "column notes."
)
_TIME = "Wall time of the explanation alone (not of the metrics), per explained sample: per (image, class) pair, per text."


def perturbation_columns(measure: str | None) -> list[Column]:
    """``pos AUC`` / ``neg AUC`` (and the ``present`` variants for ``measure="sigmoid"``); ``None``:
    the generic wording, every column."""
    what = {
        "sigmoid": "sigmoid probability of the explained class",
        "accuracy": "top-1 accuracy",
        None: "sigmoid probability of the explained class (multi-label models) or the top-1 accuracy",
    }[measure]
    cols = [
        Column("pos_auc", "pos AUC", False, f"positive perturbation (most relevant pixels to black first): area under the {what}",
               _PERTURBATION),
        Column("neg_auc", "neg AUC", True, f"negative perturbation (least relevant pixels to black first): area under the {what}",
               _PERTURBATION),
    ]
    if measure in ("sigmoid", None):
        cols += [
            Column("pos_present", "pos present", False, "positive perturbation: area under the share of images where the class is still detected (logit > 0)",
                   _PRESENT),
            Column("neg_present", "neg present", True, "negative perturbation: area under the share of images where the class is still detected (logit > 0)",
                   _PRESENT),
        ]
    return cols


def causal_columns(measure: str | None) -> list[Column]:
    """``deletion`` / ``insertion``; ``measure=None``: the generic wording."""
    what = {"sigmoid": "sigmoid probability", "probability": "softmax probability",
            None: "sigmoid (multi-label models) or softmax probability"}[measure]
    return [
        Column("deletion_auc", "deletion", False, f"RISE deletion, most relevant pixels removed first: area under the {what} of the class",
               _CAUSAL),
        Column("insertion_auc", "insertion", True, f"RISE insertion into a blurred copy, most relevant pixels first: area under the {what} of the class",
               _CAUSAL),
    ]


_SACO = (
    "The salience-guided faithfulness coefficient of Wu et al. (CVPR 2024; `attnx.metrics.saco`): the map's "
    f"patches sorted by relevance and split into {SACO_GROUPS} equal groups; each group alone set to 0 in the model's "
    "input space; over every pair of groups, +gap in summed relevance when the more relevant group lowers the "
    "class's probability more, −gap otherwise, divided by the sum of the gaps. 1: the effects are ordered as the "
    "relevance; a map unrelated to the model scores about 0 (`random`); a constant map is undefined (left out of "
    "the mean). Multi-label models: the sigmoid probability of the class; otherwise its softmax probability."
)


def saco_column(measure: str | None = None) -> Column:
    """``SaCo``: the salience-guided faithfulness coefficient."""
    return Column("saco", "SaCo", True, "salience-guided faithfulness (Wu et al. 2024): do more relevant patch groups "
                  "change the prediction more? 1 = ordered as the relevance, about 0 = random", _SACO)


LOCALISATION_COLUMNS = [
    Column("pixel_acc", "pixel acc", True, "segmentation (map above its mean vs. the explained garment's mask): pixel accuracy", _SEGMENTATION),
    Column("miou", "mIoU", True, "segmentation: mean IoU of garment and background, counts summed over the dataset", _SEGMENTATION),
    Column("map", "mAP", True, "segmentation: mean average precision of the map against the mask", _SEGMENTATION),
    Column("pointing", "pointing", True, "pointing game: share of maps whose maximum is on the garment", _LOCATION),
    Column("mass", "mass", True, "relevance mass: mean share of the positive relevance inside the garment's mask", _LOCATION),
    Column("discrimination", "discrim.", True, "two-garment scenes: share of (scene, class) maps with more relevance on the explained garment than on the other",
           _DISCRIMINATION),
    Column("mass_ratio", "mass ratio", True, "two-garment scenes: relevance on the explained garments / relevance on the other garments",
           _DISCRIMINATION),
]
TEXT_COLUMNS = [
    Column("del_most_auc", "del. most", False, "token deletion, most relevant first ([MASK]): area under the probability of the predicted class",
           _TOKEN_DELETION),
    Column("del_least_auc", "del. least", True, "token deletion, least relevant first ([MASK]): area under the probability of the predicted class",
           _TOKEN_DELETION),
]


def randomisation_columns(samples: int | None, item_name: str = "samples") -> list[Column]:
    """``rand. ρ`` / ``head ρ`` of a check on the first ``samples`` samples (``None``: N)."""
    on = f"the first {'N' if samples is None else samples} {item_name}"
    return [
        Column("rand_spearman", "rand. ρ", False, "model-parameter randomisation (Adebayo et al.), on " + on + ": mean Spearman "
               "correlation of each original map with the map after all parameters are re-drawn (top-down cascade, last step); "
               "1 = the map does not depend on the weights (random, seeded by the input, scores 1: it is insensitive to the model), "
               "about 0 = a map made by the weights (the value nearest 0 is in bold; below 0 is no better)", _RANDOMISATION,
               best_at_zero=True),
        Column("rand_head_spearman", "head ρ", False, "the same after re-drawing the head only (every parameter after the "
               "Transformer blocks; the cascade's first step); 1 = the map ignores the head (class-agnostic maps)", _RANDOMISATION,
               best_at_zero=True),
    ]


_COMPLETENESS = (
    "Completeness (conservation): a method that claims its relevance sums to a known total declares it "
    "(`conserves=` of `attnx.register_method`; `Explanation.claimed_total`): LRP under a conserving preset "
    "claims the relevance put on the target logit (`y_t` under the logit seed), integrated gradients "
    "`y_t(x) − y_t(x')` (its baseline `x'`). Per sample, the relative error `|Σ R − claimed| / |claimed|` "
    "(`Explanation.completeness_error()`), `Σ R` summed over the input relevance (every pixel and channel, or "
    "every token embedding entry) where the method has one, else over the token relevance; the mean over the "
    "samples ± its bootstrap standard error. Methods that claim no conservation (attention maps, rollout, "
    "gradient × input, occlusion, AtMan, ...) show –. 0 = exactly conserved; biases, normalisation "
    "stabilisers and the quadrature of integrated gradients (it shrinks as `n_steps` grows) leave a "
    "remainder. Not judged by the verdict: it checks a method's claim, not its faithfulness."
)


def completeness_column() -> Column:
    """``complete. err.``: the relative completeness error of the methods that claim conservation."""
    return Column("completeness", "complete. err.", False, "relative completeness error |Σ R − claimed| / |claimed| of the "
                  "methods that claim conservation (LRP: the target logit; integrated gradients: y(x) − y(baseline)); "
                  "– for the others", _COMPLETENESS)


def time_column(unit: str) -> Column:
    """``ms/<unit>``: the explanation's wall time per image or text."""
    return Column(f"ms_per_{unit}", f"ms/{unit}", False, f"wall time of the explanation alone per {unit} (not of the metrics)",
                  _TIME, digits=1, timing=True)


def league_columns(kind: str, measures: Mapping[str, str] | None = None, randomisation_samples: int | None = 0,
                   item_name: str = "samples", saco: bool = True, completeness: bool = True) -> list[Column]:
    """The columns of a league, in table order.

    Parameters
    ----------
    kind:
        ``"scenes"``, ``"images"`` or ``"text"`` (:data:`DATA_KINDS`).
    measures:
        Images: the measure of the perturbation curves (``"sigmoid"`` or ``"accuracy"``) and of the
        deletion / insertion curves (``"sigmoid"`` or ``"probability"``); ``None``: generic wording.
    randomisation_samples:
        Samples of the parameter randomisation check (``0``: not run, no columns; ``None``: N).
    item_name:
        What a sample is, in the randomisation column's description.
    saco:
        Images: the SaCo column (results saved before it existed have none).
    completeness:
        The completeness column (results saved before it existed have none).
    """
    if kind == "text":
        cols = list(TEXT_COLUMNS)
    else:
        m = measures or {}
        cols = perturbation_columns(m.get("perturbation")) + causal_columns(m.get("causal"))
        if saco:
            cols.append(saco_column(m.get("causal")))
        if kind == "scenes":
            cols += LOCALISATION_COLUMNS
    if randomisation_samples != 0:
        cols += randomisation_columns(randomisation_samples, item_name)
    if completeness:
        cols.append(completeness_column())
    return cols + [time_column("text" if kind == "text" else "image")]


def catalogue() -> list[tuple[Column, list[str]]]:
    """Every column a league can have, once, in generic wording, with the data kinds that have it."""
    kinds: dict[str, list[str]] = {}
    columns: dict[str, Column] = {}
    for kind in DATA_KINDS:
        for c in league_columns(kind.key, randomisation_samples=None):
            columns.setdefault(c.key, c)
            kinds.setdefault(c.key, []).append(kind.key)
    # the sanity check and the timings apply to every kind: listed last
    last = [k for k in columns if k.startswith("rand_") or k == "completeness" or columns[k].timing]
    order = [k for k in columns if k not in last] + last
    return [(columns[k], kinds[k]) for k in order]


# =============================================================================================
# rendering: the README's protocol section and the CLI help
# =============================================================================================
_KIND_NAMES = {"scenes": "scenes", "images": "image folders", "text": "text"}


def _protocol_groups() -> list[tuple[list[tuple[Column, list[str]]], str]]:
    """Consecutive columns that share their protocol, with it."""
    groups: list[tuple[list[tuple[Column, list[str]]], str]] = []
    for column, kinds in catalogue():
        if groups and groups[-1][1] == column.protocol:
            groups[-1][0].append((column, kinds))
        else:
            groups.append(([(column, kinds)], column.protocol))
    return groups


def _wrap(text: str, width: int, first: str = "", rest: str = "  ") -> str:
    return textwrap.fill(text, width=width, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False)


def protocol_markdown(width: int = 100) -> str:
    """The protocol as markdown, for the README: the data kinds and the baselines, a table of the
    columns (direction, one-line description, the leagues that have it), then how they are measured."""
    lines = ["**What is evaluated.**", ""]
    for kind in DATA_KINDS:
        lines.append(_wrap(f"*{kind.title}*: {kind.protocol}", width, "- "))
    lines += [
        "",
        _wrap(f"The baselines {' and '.join(f'`{b}`' for b in BASELINES)} are added to every league "
              "(`baselines=False`, `--no-baselines`: left out unless named).", width, "", ""),
        "",
        "**The columns** (↑: higher is better, ↓: lower is better).",
        "",
        "| column | what it measures | leagues |",
        "|---|---|---|",
    ]
    for column, kinds in catalogue():
        lines.append(f"| {column.label} {column.arrow} | {column.doc} | {', '.join(_KIND_NAMES[k] for k in kinds)} |")
    lines += ["", "**How they are measured.**", ""]
    for columns, protocol in _protocol_groups():
        labels = ", ".join(f"**{c.label}**" for c, _ in columns)
        lines.append(_wrap(f"{labels}: {protocol}", width, "- "))
    return "\n".join(lines) + "\n"


def columns_help(width: int = 100) -> str:
    """The columns for ``attnx evaluate --help``: label, direction and one-line description."""
    lines = ["columns (↑ higher is better, ↓ lower is better):"]
    for column, kinds in catalogue():
        head = f"  {column.label} {column.arrow}".ljust(17)
        text = f"{column.doc} ({', '.join(_KIND_NAMES[k] for k in kinds)})"
        lines.append(_wrap(text, width, head, " " * 17))
    return "\n".join(lines) + "\n"
