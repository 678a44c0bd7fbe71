"""The ``llm`` league: factual recall on a real language model, one row per method.

Protocol (:func:`evaluate_facts`; ``attnx evaluate --task llm``):

1. The prompts of :func:`attnx.data.facts.fact_prompts` (countries, cities and landmarks; 7 relations, 1–3
   templates each)
   are given to the model; those it answers correctly (greedy, :func:`attnx.evaluate.facts.answered`)
   are kept, in a fixed shuffled order (seed 0; ``limit`` takes the first ones).
2. Each method explains the answer's first token (its logit at the prompt's last position), the
   prompts batched with left padding.
3. Subject rank (:func:`~attnx.evaluate.facts.subject_rank`): the rank of the subject's best token
   among the prompt's tokens, **the first token excluded** (language models park attention on it:
   an attention sink), and again with it included. ``top-1``: share of prompts where the subject
   ranks first; ``MRR``: mean reciprocal rank. Ties count against the subject.
4. Faithfulness (:func:`~attnx.evaluate.facts.removal_curves`): the answer token's log-probability
   as 0, 10, ..., 100 % of the prompt's tokens (all but the first) are **deleted** from the prompt,
   most relevant first (``AUC most``, lower is better) and least relevant first (``AUC least``,
   higher is better); ``ABC`` = AUC least − AUC most, the area between the curves (AttnLRP's
   measure; higher is better).

Every number is a mean over prompts with its standard error (sample standard deviation / √n).
"""
from __future__ import annotations

import json
import math
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import attnx

from .. import zoo
from ..core.runtime import evaluation_mode
from ..data.facts import FactPrompt, fact_prompts
from ..errors import AttnxValueError
from .columns import RANDOMISATION_SEED, SANITY_METHOD, SANITY_ROW
from .facts import (
    FRACTIONS,
    answered,
    chance_rank,
    curves_from,
    encode,
    measure_rows,
    pad_id,
    removal_rows,
    subject_rank,
)
from .rows import parse_row, split_rows
from .storage import ROW_SETTINGS, check_same_samples, updated_order

__all__ = ["COLUMNS", "FactLeague", "LRP_PRESETS", "default_rows", "evaluate_facts", "row_method", "select_prompts"]

#: the LRP rows of the table: one per preset for language models (``lrp-<preset>``: lrp with that preset)
LRP_PRESETS = ("attnlrp", "cplrp")
#: registered methods that do not explain a decoder's next token, with why (left out of the default rows)
NOT_FOR_DECODERS: dict[str, str] = {}


def default_rows() -> list[str]:
    """The table's rows by default: every registered method (:func:`attnx.list_methods`) that
    explains a decoder's next token, ``lrp`` once per preset of :data:`LRP_PRESETS`; a method
    that raises on the model gets a row saying why."""
    rows: list[str] = []
    for m in attnx.list_methods():
        if m in NOT_FOR_DECODERS:
            continue
        rows += [f"lrp-{p}" for p in LRP_PRESETS] if m == "lrp" else [m]
    return rows


def row_method(row: str) -> tuple[str, dict]:
    """A table row -> ``(method, options)``: ``lrp-<preset>`` (lrp with that preset), a method's name,
    or ``method(option=value, ...)`` (:func:`attnx.methods.registry.parse_row`)."""
    if row.startswith("lrp-") and "(" not in row:
        return "lrp", {"preset": row[len("lrp-"):]}
    return parse_row(row)


#: ``(key, label, higher is better, description)`` of the table's columns
COLUMNS = (
    ("top1", "top-1", True, "share of prompts whose subject is the most relevant token (first token excluded)"),
    ("mrr", "MRR", True, "mean reciprocal rank of the subject's best token (first token excluded)"),
    ("top1_first", "top-1 (first incl.)", True, "top-1 with the first token among the ranked tokens"),
    ("mrr_first", "MRR (first incl.)", True, "MRR with the first token among the ranked tokens"),
    ("auc_most", "AUC most", False, "area under the answer's log-probability, most relevant tokens deleted first"),
    ("auc_least", "AUC least", True, "area under the answer's log-probability, least relevant tokens deleted first"),
    ("abc", "ABC", True, "area between the curves: AUC least − AUC most"),
    ("completeness", "complete. err.", False, "relative completeness error |Σ R − claimed| / |claimed| of the methods that "
     "claim conservation (LRP under a conserving preset: the answer's logit; integrated gradients: y(x) − y(baseline)); "
     "– for the others"),
    ("ms", "ms/prompt", False, "wall time of the explanation alone per prompt"),
)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]  # undefined values (a method that claims no conservation) are left out
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def _auc(curves: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(curves, dtype=np.float64)
    return ((y[:, 1:] + y[:, :-1]) / 2 * np.diff(x)).sum(-1)


@dataclass
class FactLeague:
    """Per-prompt results of every method and the table computed from them.

    ``items``: per prompt ``text``, ``relation``, ``candidates`` (tokens ranked, first excluded) and
    ``subject_tokens``; ``samples[row]``: ``rank``, ``rank_first`` (first token included),
    ``most`` / ``least`` ``(n, K)`` log-probability curves, ``seconds``; ``meta``: the protocol's
    settings and the filter's counts.
    """

    methods: list[str]
    items: dict[str, list]
    samples: dict[str, dict[str, np.ndarray]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items.get("text", []))

    def row(self, name: str) -> dict[str, tuple[float, float]]:
        """``{column key: (mean, standard error)}`` of one method (NaN for a method that failed, and for
        a column the saved results lack)."""
        if name not in self.samples:
            return {key: (math.nan, math.nan) for key, _, _, _ in COLUMNS}
        s = self.samples[name]
        f = self.meta["fractions"]
        most, least = _auc(s["most"], f), _auc(s["least"], f)
        return {"top1": _mean_se(s["rank"] == 1), "mrr": _mean_se(1.0 / s["rank"]),
                "top1_first": _mean_se(s["rank_first"] == 1), "mrr_first": _mean_se(1.0 / s["rank_first"]),
                "auc_most": _mean_se(most), "auc_least": _mean_se(least), "abc": _mean_se(least - most),
                "completeness": _mean_se(s["completeness"]) if "completeness" in s else (math.nan, math.nan),
                "ms": _mean_se(1000 * s["seconds"])}

    def chance(self) -> dict[str, tuple[float, float]]:
        """What a uniformly random ranking scores, in expectation per prompt (``top1``, ``mrr`` and the
        first-token-included pair)."""
        n = torch.tensor(self.items["candidates"])
        k = torch.tensor(self.items["subject_tokens"])
        t, r = chance_rank(n, k)
        t1, r1 = chance_rank(n + 1, k)
        return {"top1": _mean_se(t.numpy()), "mrr": _mean_se(r.numpy()),
                "top1_first": _mean_se(t1.numpy()), "mrr_first": _mean_se(r1.numpy())}

    def describe(self) -> str:
        m = self.meta
        n, answered = len(self), m.get("answered", "?")
        which = (f"the first {n} (shuffled order) of its {answered} correctly answered factual prompts"
                 if isinstance(answered, int) and n < answered else f"{n} factual prompts answered correctly")
        evaluated: dict[str, int] = {}
        for r in self.items.get("relation", []):
            evaluated[r] = evaluated.get(r, 0) + 1
        return (f"llm: {m.get('model', '?')} on {which} ({answered} of {m.get('tried', '?')} answered; relations "
                "evaluated / answered: "
                + ", ".join(f"{r} {evaluated.get(r, 0)}/{c}" for r, c in m.get("per_relation", {}).items()) + ")")

    def to_markdown(self) -> str:
        """The table (mean ± standard error; the best mean of each column in bold), the chance level
        of the rank columns and the columns' definitions."""
        failed = self.meta.get("failed") or {}
        shown = [*self.methods, *failed]
        rows = {m: self.row(m) for m in shown}
        head = "| method | " + " | ".join(f"{label} {'↑' if hi else '↓'}" for _, label, hi, _ in COLUMNS) + " |"
        lines = [f"**{self.describe()}**", "", head, "|---|" + "---:|" * len(COLUMNS)]
        best = {}
        for key, _, hi, _ in COLUMNS:
            vals = [rows[m][key][0] for m in self.methods if math.isfinite(rows[m][key][0])]
            if vals and key != "ms":
                best[key] = max(vals) if hi else min(vals)
        for m in shown:
            cells = []
            for key, _, _, _ in COLUMNS:
                mean, se = rows[m][key]
                digits = 0 if key == "ms" else 3
                text = "–" if not math.isfinite(mean) else f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")
                if key in best and f"{mean:.3f}" == f"{best[key]:.3f}":
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        c = self.chance()
        lines.append("| *chance (random ranking, exact)* | " + " | ".join(
            f"{c[key][0]:.3f}" if key in c else "" for key, _, _, _ in COLUMNS) + " |")
        lines += ["", *(f"- {label}: {doc}" for _, label, _, doc in COLUMNS),
                  f"- Tokens are deleted ({self.meta.get('replacement')}) from the prompt at fractions "
                  "0, 0.1, ..., 1 of its tokens after the first; the measure is the log-probability (nats) of the "
                  "answer's first token; areas over [0, 1].",
                  "- Every cell: mean over prompts ± its standard error."]
        sanity = self.meta.get("sanity")
        if sanity:
            lines.append(f"- {sanity['row']}: {sanity['method']} computed on a copy of the model with every parameter "
                         f"re-drawn (seed {sanity['seed']}), scored on the real model (a sanity row: a faithful method "
                         "falls to the level of random there).")
        if failed:
            lines += ["", *(f"Failed on this model: {m}: {why}" for m, why in failed.items())]
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None) -> str:
        """``method`` then, per column, the mean and its standard error (``<key>_se``)."""
        header = ["method"] + [x for key, _, _, _ in COLUMNS for x in (key, f"{key}_se")]
        lines = [",".join(header)]
        for m in [*self.methods, *(self.meta.get("failed") or {})]:
            r = self.row(m)
            lines.append(",".join([m] + [repr(float(x)) for key, _, _, _ in COLUMNS for x in r[key]]))
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def plot_curves(self, path: str | Path | None = None):
        """Mean removal curves (most / least relevant first) per method, saved to ``path`` if given."""
        from matplotlib.figure import Figure

        from .table import legend_below, line_styles

        styles = line_styles(self.methods)
        fig = Figure(figsize=(12.4, 4.4))
        axes = fig.subplots(1, 2)
        x = np.asarray(self.meta["fractions"])
        for ax, (name, title) in zip(axes, (("most", "most relevant deleted first (lower is better)"),
                                            ("least", "least relevant deleted first (higher is better)"))):
            for m in self.methods:
                ax.plot(x, self.samples[m][name].mean(0), label=m, linewidth=1.6, **styles[m])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("fraction of the prompt's tokens deleted (first token kept)")
            ax.set_ylabel("log-probability of the answer")
            ax.grid(alpha=0.3)
        fig.suptitle(textwrap.fill(self.describe(), 190), fontsize=8)  # the description is long: wrapped
        legend_below(fig, axes[0], len(self.methods))
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig

    def updated(self, new: "FactLeague") -> "FactLeague":
        """This league with the rows of ``new`` (the same model, prompts and protocol, checked) put
        in: a row already here is replaced, a new one added before the baselines and the sanity row."""
        check_same_samples("llm", self.meta, new.meta, {"text": self.items.get("text", [])},
                           {"text": new.items.get("text", [])}, skip=ROW_SETTINGS)
        failed_new = dict(new.meta.get("failed") or {})
        added = [*new.methods, *failed_new]
        order = [m for m in updated_order(self.methods, new.methods, ("random", "gradient_x_input")) if m not in failed_new]
        samples = {m: (new.samples[m] if m in new.samples else self.samples[m]) for m in order}
        failed = {m: why for m, why in (self.meta.get("failed") or {}).items() if m not in added}
        failed.update(failed_new)
        options = {m: o for m, o in (self.meta.get("methods_options") or {}).items() if m in order}
        options.update(new.meta.get("methods_options") or {})
        meta = dict(self.meta, failed=failed, methods_options=options)
        if new.meta.get("sanity"):  # the sanity row was (re)computed
            meta["sanity"] = new.meta["sanity"]
        return FactLeague(order, self.items, samples, meta)

    @classmethod
    def load(cls, path: str | Path) -> "FactLeague":
        """The league :meth:`save` wrote."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        samples = {m: {k: np.asarray(v) for k, v in s.items()} for m, s in data["samples"].items()}
        return cls(data["methods"], data["items"], samples, data["meta"])

    def save(self, path: str | Path) -> Path:
        """The per-prompt results as JSON (lists), from which every number of the table follows."""
        data = {"methods": self.methods, "items": self.items, "meta": self.meta,
                "samples": {m: {k: np.asarray(v).tolist() for k, v in s.items()} for m, s in self.samples.items()}}
        Path(path).write_text(json.dumps(data), encoding="utf-8")
        return Path(path)


def _method_rows(methods: str | Sequence[str] | None, allow_empty: bool = False) -> list[str]:
    """The rows to evaluate, each checked (:func:`row_method`); ``None`` / ``"all"``: :func:`default_rows`."""
    if methods is None or methods == "all":
        return default_rows()
    names = split_rows(methods) if isinstance(methods, str) else [m.strip() for m in methods]
    names = [m for m in names if m]
    if not names and not allow_empty:
        raise AttnxValueError("no method given")
    for m in names:
        method, options = row_method(m)
        attnx.get_method(method).resolve(options)  # an unknown method, option or preset raises here
    return list(dict.fromkeys(names))


def select_prompts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[FactPrompt], batch_size: int = 64,
                   needed: int | None = None) -> tuple[list[FactPrompt], list[int], dict[str, Any]]:
    """The prompts the model answers correctly (in the given order), their answers' first tokens, and
    the counts (``tried``, ``answered``, ``per_relation``: answered per relation). With ``needed``,
    prompts are tried in batches until that many are answered."""
    kept, targets = [], []
    tried = 0
    if needed is not None:  # small runs: try prompts in small batches
        batch_size = min(batch_size, max(8, 2 * needed))
    if needed is None:  # all prompts: batches of (nearly) equal length, so that padding costs little
        length = [len(tokenizer(p.text)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: length[i])
        found: dict[int, int] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            sub = [prompts[i] for i in chunk]
            correct, target = answered(model, tokenizer, sub, encode(tokenizer, sub))
            found.update((i, int(t)) for i, c, t in zip(chunk, correct.tolist(), target.tolist()) if c)
        tried = len(prompts)
        kept = [prompts[i] for i in sorted(found)]  # back in the given order
        targets = [found[i] for i in sorted(found)]
    for start in range(0, len(prompts) if needed is not None else 0, batch_size):
        if len(kept) >= needed:
            break
        chunk = list(prompts[start:start + batch_size])
        correct, target = answered(model, tokenizer, chunk, encode(tokenizer, chunk))
        tried += len(chunk)
        for p, c, t in zip(chunk, correct.tolist(), target.tolist()):
            if c:
                kept.append(p)
                targets.append(int(t))
    per_relation: dict[str, int] = {}
    for p in kept:
        per_relation[p.relation] = per_relation.get(p.relation, 0) + 1
    return kept, targets, {"tried": tried, "answered": len(kept), "per_relation": per_relation}


def evaluate_facts(model: Any = "smollm2", methods: str | Sequence[str] | None = None, *,
                   prompts: Sequence[FactPrompt] | None = None, limit: int | None = None, batch_size: int = 16,
                   replacement: str | int = "delete", forward_batch_size: int = 64, progress: bool = True,
                   seed: int = 0, on_chunk: Callable[[FactLeague], None] | None = None, sanity: bool = True) -> FactLeague:
    """Run the ``llm`` league (the protocol is in the module docstring).

    Parameters
    ----------
    model:
        A name for :func:`attnx.zoo.load` (default ``"smollm2"``) or a :class:`attnx.zoo.ZooModel`
        with a causal language model and its tokenizer.
    methods:
        Rows (a list or a comma-separated string): a method's name, ``lrp-<preset>`` or
        ``method(option=value, ...)``; ``None`` / ``"all"``: :func:`default_rows`, every registered
        method that explains a decoder.
    prompts:
        The candidate prompts (default :func:`attnx.data.facts.fact_prompts`).
    limit:
        Evaluate the first ``limit`` correctly answered prompts of the shuffled order (prompts are
        tried until that many are answered; the table says how many were tried).
    replacement:
        ``"delete"`` (default) or a token id that replaces the removed tokens.
    on_chunk:
        Called with the league of the prompts evaluated so far after every batch (a long run can
        save its results as it goes: a prefix of the prompts is a complete league of its own).
    sanity:
        Add the sanity row :data:`~attnx.evaluate.columns.SANITY_ROW`: transformer attribution
        on a copy of the model with every parameter re-drawn, scored on the real model.
    """
    if replacement != "delete" and not isinstance(replacement, int):
        raise AttnxValueError(f"replacement must be 'delete' or a token id, got {replacement!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise AttnxValueError(f"limit must be a positive int, got {limit!r}")
    rows = _method_rows(methods, allow_empty=sanity)
    loaded = model if isinstance(model, zoo.ZooModel) else zoo.load(model, "text")
    if loaded.tokenizer is None:
        raise AttnxValueError("the llm league needs a language model with its tokenizer (a ZooModel with tokenizer=)")
    lm, tok = loaded.model, loaded.tokenizer
    prompts = list(fact_prompts() if prompts is None else prompts)
    order = np.random.default_rng(seed).permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    pad = pad_id(tok)
    explainer = attnx.Explainer(lm, tokenizer=tok)
    run_as = {m: row_method(m) for m in rows}
    explainers = {m: explainer for m in rows}
    failed: dict[str, str] = {}
    if sanity:
        from .. import metrics
        from .runner import METHOD_FAILURES, failure_reason

        run_as[SANITY_ROW] = (SANITY_METHOD, {})
        rows = [*rows, SANITY_ROW]
        try:
            explainers[SANITY_ROW] = attnx.Explainer(metrics.randomised_copy(lm, RANDOMISATION_SEED), tokenizer=tok)
        except METHOD_FAILURES as exc:
            failed[SANITY_ROW] = failure_reason(exc)
    else:
        from .runner import METHOD_FAILURES, failure_reason
    items: dict[str, list] = {k: [] for k in ("text", "subject", "relation", "template", "candidates", "subject_tokens")}
    samples: dict[str, dict[str, list]] = {m: {"rank": [], "rank_first": [], "most": [], "least": [], "seconds": [],
                                               "completeness": []} for m in rows}
    t_start = time.perf_counter()
    with evaluation_mode(lm):
        kept, targets, counts = select_prompts(lm, tok, prompts, forward_batch_size, needed=limit)
        if not kept:
            raise AttnxValueError("the model answers none of the prompts correctly: nothing to evaluate")
        n = len(kept) if limit is None else min(limit, len(kept))
        seconds_filter = time.perf_counter() - t_start
        from tqdm.auto import tqdm

        def league() -> FactLeague:  # the prompts evaluated so far
            name = loaded.info.get("name") or (model if isinstance(model, str) else type(lm).__name__)
            meta = dict(counts, model=str(name), fractions=list(FRACTIONS), batch_size=batch_size,
                        replacement="deleted, the rest closing up" if replacement == "delete"
                        else f"replaced by token id {replacement}",
                        seed=seed, limit=limit, methods_options={m: run_as[m][1] for m in rows if m not in failed},
                        seconds_filter=seconds_filter, seconds_total=time.perf_counter() - t_start, failed=dict(failed),
                        sanity={"row": SANITY_ROW, "method": SANITY_METHOD, "seed": RANDOMISATION_SEED} if sanity else None)
            kept_rows = [m for m in rows if m not in failed]
            merged = {m: {k: np.concatenate(v) if v else np.zeros(0) for k, v in samples[m].items()} for m in kept_rows}
            return FactLeague(kept_rows, {k: list(v) for k, v in items.items()}, merged, meta)

        with tqdm(total=n, desc="evaluate llm", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, n, batch_size):
                chunk = kept[start:min(start + batch_size, n)]
                batch = encode(tok, chunk)
                target = torch.tensor(targets[start:start + len(chunk)], dtype=torch.long)
                real = batch["attention_mask"].bool()
                not_first = real.clone()
                not_first[torch.arange(len(chunk)), batch["first"]] = False
                subject = batch["subject"] & not_first
                for p, nf, s in zip(chunk, not_first.sum(-1).tolist(), subject.sum(-1).tolist()):
                    for k, v in (("text", p.text), ("subject", p.subject), ("relation", p.relation),
                                 ("template", p.template), ("candidates", nf), ("subject_tokens", s)):
                        items[k].append(v)
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                wheres = {}
                for m in [m for m in rows if m not in failed]:
                    bar.set_postfix_str(m, refresh=False)
                    method, opts = run_as[m]
                    try:
                        t0 = time.perf_counter()
                        e = explainers[m](inputs, method=method, target=target, **opts)
                        dt = time.perf_counter() - t0
                        scores = e.scores.detach()
                        err = e.completeness_error()
                        wheres[m] = removal_rows(batch, scores, target, FRACTIONS, replacement)
                    except METHOD_FAILURES as exc:  # a method that does not apply to this model: its row says why
                        failed[m] = failure_reason(exc)
                        continue
                    out = samples[m]
                    out["rank"].append(subject_rank(scores, subject, not_first).numpy())
                    out["rank_first"].append(subject_rank(scores, batch["subject"], real).numpy())
                    out["seconds"].append(np.full(len(chunk), dt / len(chunk)))
                    out["completeness"].append(np.full(len(chunk), np.nan) if err is None else err.numpy())
                # every method's shortened prompts in one pass: rows shared by methods run once
                bar.set_postfix_str("removal curves", refresh=False)
                keys = [key for where in wheres.values() for w in where.values() for _, _, key in w]
                cache = measure_rows(lm, keys, pad, forward_batch_size)
                for m, where in wheres.items():
                    curves = curves_from(where, cache, len(chunk), len(FRACTIONS))
                    samples[m]["most"].append(curves["most"])
                    samples[m]["least"].append(curves["least"])
                bar.update(len(chunk))
                if on_chunk is not None:
                    on_chunk(league())
    return league()


def run_cli(args: Any, say: Any) -> int:
    """``attnx evaluate --task llm``: the league on ``--model`` (default smollm2); writes
    ``league_llm.md`` / ``.csv``, ``curves_llm.png`` and ``samples_llm.json`` to ``--out`` (the table,
    csv and samples after every batch, so that a stopped run leaves the league of its prompts so far)."""
    given = [flag for flag, attr in (("--data", "data"), ("--shard", "shard"), ("--num-scenes", "num_scenes"),
                                     ("--no-baselines", "no_baselines")) if getattr(args, attr, None)]
    if given:  # the llm task has its own prompts and always ranks random and gradient_x_input
        raise AttnxValueError(f"{', '.join(given)} do(es) not apply to --task llm (its prompts are attnx.data.facts)")
    out = Path(args.out or "attnx_evaluate")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def write(league: FactLeague, final: bool) -> str:
        table = league.to_markdown()
        wall = f"\nWall time: {time.perf_counter() - t0:.1f} s" + ("." if final else " so far (the run goes on).")
        (out / "league_llm.md").write_text(table + wall + "\n", encoding="utf-8")
        league.to_csv(out / "league_llm.csv")
        league.save(out / "samples_llm.json")
        if final:
            league.plot_curves(out / "curves_llm.png")
        return table

    model = args.model if args.model not in (None, "default") else "smollm2"
    if getattr(args, "update", False):  # the named rows into the league already in --out
        league = _update(out, model, args)
    else:
        rows = None if args.methods in (None, "all") else [r for r in split_rows(args.methods) if r != SANITY_ROW]
        league = evaluate_facts(model, rows, limit=args.limit, batch_size=args.batch_size or 16,
                                progress=not args.quiet, on_chunk=lambda partial: write(partial, final=False))
    say(write(league, final=True))
    for name in ("league_llm.md", "league_llm.csv", "curves_llm.png", "samples_llm.json"):
        say(f"wrote {out / name}")
    return 0


def _update(out: Path, model: str, args: Any) -> FactLeague:
    """``--update``: the rows of ``--methods`` computed on the prompts of the league in ``out``
    (its limit, batch size, deletion and seed) and put into it."""
    path = out / "samples_llm.json"
    if not path.is_file():
        raise AttnxValueError(f"--update: no llm league in {out} (samples_llm.json); run attnx evaluate --task llm --out {out} first")
    old = FactLeague.load(path)
    meta = old.meta
    for flag, given, stored in (("--limit", args.limit, meta.get("limit")), ("--batch-size", args.batch_size, meta.get("batch_size"))):
        if given is not None and given != stored:
            raise AttnxValueError(f"--update: the llm league in {out} was run with {flag} {stored}, not {given}; "
                                  "leave it out (the league's own is used) or regenerate the league")
    text = str(meta.get("replacement", ""))
    replacement: str | int = int(text.rsplit(" ", 1)[1]) if text.startswith("replaced by token id") else "delete"
    rows = split_rows(args.methods)
    new = evaluate_facts(model, [r for r in rows if r != SANITY_ROW], limit=meta.get("limit"), batch_size=int(meta["batch_size"]),
                         replacement=replacement, seed=int(meta.get("seed", 0)), progress=not args.quiet,
                         sanity=SANITY_ROW in rows)
    return old.updated(new)
