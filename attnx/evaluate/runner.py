"""The evaluation: every method on every batch of a task, per-sample results into a league."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import attnx

from .. import metrics
from ..core.runtime import evaluation_mode
from ..errors import AttnxError, AttnxValueError
from ..metrics import parameter_randomisation, randomisation_steps
from . import sharding
from .columns import BASELINES, RANDOMISATION_SEED, SANITY_METHOD, SANITY_ROW
from .datasets import IndexDataset
from .league import League
from .rows import parse_row, split_rows
from .tasks import TextTask, to_numpy, vision_task

__all__ = ["METHOD_FAILURES", "evaluate", "failure_reason", "method_list"]


def method_list(methods: Any, baselines: bool, allow_empty: bool = False) -> list[str]:
    """The evaluated rows (each checked): ``methods`` (``None`` / ``"all"``: every registered
    method, a list or a comma-separated string), then the baselines (``baselines``). A row is a
    method's name or ``method(option=value, ...)`` (:func:`attnx.methods.registry.parse_row`:
    ``gradient_x_input(libragrad=true)``), its own row of the table."""
    if methods is None or methods == "all":
        names = attnx.list_methods()
    else:
        names = split_rows(methods) if isinstance(methods, str) else [m.strip() for m in methods]
        names = [m for m in names if m]
        if not names and not allow_empty:  # allow_empty: a run of the sanity row alone
            raise AttnxValueError("no method given")
    for m in names:
        parse_row(m)  # raises, naming the methods (or the method's options) there are
    out = list(dict.fromkeys(names))
    if baselines:
        out += [b for b in BASELINES if b in attnx.list_methods() and b not in out]
    return out


def evaluate(
    task: str = "vision",
    methods: str | Sequence[str] | None = None,
    *,
    model: Any = None,
    data: Any = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_scenes: int | None = None,
    progress: bool = True,
    baselines: bool = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    shard: str | tuple[int, int] | None = None,
    distributed: bool | None = None,
    deletion_steps: int = 16,
    forward_batch_size: int = 256,
    randomisation_samples: int = 16,
    sanity: bool = True,
) -> League:
    """Evaluate explanation methods; the protocol is declared in :mod:`attnx.evaluate.columns`.

    Parameters
    ----------
    task:
        ``"vision"`` or ``"text"``.
    methods:
        Method names (a list or a comma-separated string); ``None`` or ``"all"``: every registered
        method. The baselines ``random`` and ``gradient_x_input`` are appended (``baselines``).
    model:
        ``None`` (the embedded model of the task), a specification for
        :func:`attnx.zoo.load`, a :class:`attnx.zoo.ZooModel` bundle, or (images) an
        ``nn.Module``.
    data:
        Vision: ``None`` (the shipped scenes; then ``model`` must be the embedded one), an
        :class:`attnx.data.Scenes`, or an image folder (class sub-folders). Text: ``None`` (Rotten
        Tomatoes test split), a CSV / TSV file (``text``, optional ``label``) or a list of strings.
    limit:
        Evaluate only the first ``limit`` samples (scenes, images, texts) of the evaluation order.
    batch_size:
        Samples per batch (a two-garment scene gives two maps in its batch). Batches, hence
        shards, are formed in the evaluation order.
    num_scenes:
        Compose this many new held-out scenes (needs Fashion-MNIST; see
        :data:`~attnx.evaluate.columns.SCENE_SEEDS`).
    progress:
        Show a progress bar (on rank 0 only when distributed).
    options:
        Method options: ``{"rollout": {"head_fusion": "max"}, ...}``.
    shard:
        ``"I/N"`` or ``(I, N)``: evaluate only batches ``I, I+N, ...``; returns a partial league
        for :meth:`League.merge` (:mod:`attnx.evaluate.sharding`).
    distributed:
        ``None``: shard over torch.distributed when launched by torchrun (``WORLD_SIZE > 1``),
        with ``max(1, cores // world_size)`` threads for the evaluation (restored afterwards);
        ``False``: never.
    deletion_steps:
        Steps of the deletion / insertion curves.
    forward_batch_size:
        At most this many perturbed inputs per model call in the metrics.
    randomisation_samples:
        The model-parameter randomisation check (``rand. ρ``, ``head ρ``) runs on the samples
        whose index in the evaluation order is below this ((scene, class) maps for scenes), each
        computed with its batch, so shards merge exactly; ``0`` leaves it out.
    sanity:
        Add the sanity row :data:`~attnx.evaluate.columns.SANITY_ROW`: transformer attribution
        computed on a copy of the model with every parameter re-drawn, scored on the real model.

    Returns
    -------
    League
    """
    if task not in ("vision", "text"):
        raise AttnxValueError(f"task must be 'vision' or 'text', got {task!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AttnxValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise AttnxValueError(f"limit must be a positive int, got {limit!r}")
    if not isinstance(randomisation_samples, int) or isinstance(randomisation_samples, bool) or randomisation_samples < 0:
        raise AttnxValueError(f"randomisation_samples must be an int >= 0, got {randomisation_samples!r}")
    names = method_list(methods, baselines, allow_empty=sanity)
    options = {k: dict(v) for k, v in (options or {}).items()}
    for m, opts in options.items():
        if m not in names:
            raise AttnxValueError(f"options given for {m!r}, which is not evaluated ({', '.join(names)})")
        attnx.get_method(m).check_options(opts)
    if shard is not None:
        shard = sharding.parse_shard(shard)
    use_dist = sharding.launched_distributed() if distributed is None else bool(distributed)
    if use_dist and shard is not None:
        raise AttnxValueError("shard= and a torch.distributed launch do not combine: under torchrun every rank is a shard")
    if task == "text" and num_scenes is not None:
        raise AttnxValueError("num_scenes applies to the vision task")

    dist = sharding.join_process_group() if use_dist else None
    with sharding.torch_threads(sharding.threads_per_rank() if dist is not None else None):
        if task == "vision":
            job = vision_task(model, data, num_scenes, deletion_steps, forward_batch_size)
        else:
            job = TextTask(model, data, forward_batch_size)
        n = job.num_samples if limit is None else min(limit, job.num_samples)
        randomisation = _randomisation_settings(job.model, randomisation_samples) if randomisation_samples else None
        if dist is not None:
            shard = (dist.get_rank(), dist.get_world_size())
        meta = dict(job.meta, task=task, num_samples=n, total=job.count_items(n), batch_size=batch_size,
                    methods_options={m: {**options.get(m, {}), **parse_row(m)[1]} for m in names}, randomisation=randomisation,
                    sanity={"row": SANITY_ROW, "method": SANITY_METHOD, "seed": RANDOMISATION_SEED} if sanity else None,
                    shard=list(shard) if shard else None)
        with evaluation_mode(job.model):  # the metrics call the model too; every module's own flag restored
            part = _run(job, names, options, n, batch_size, shard, progress and (dist is None or dist.get_rank() == 0), meta)
    if dist is not None:
        return League.merge([League.from_dict(d) for d in sharding.all_gather(part.as_dict())])
    if shard is not None:
        return part
    return League.merge([part])


def _randomisation_settings(model: torch.nn.Module, samples: int) -> dict:
    """The randomisation check's settings (checks first that the cascade's steps can be found)."""
    try:
        steps = randomisation_steps(model)
    except ValueError as exc:
        raise AttnxValueError(f"parameter randomisation: {exc}; or leave the check out with randomisation_samples=0 "
                         "(attnx evaluate --randomisation-samples 0)") from None
    return {"samples": samples, "order": "cascade", "seed": RANDOMISATION_SEED,
            "steps": [name for name, _ in steps], "first": steps[0][0]}


def _randomisation(job, method: str, opts: Mapping[str, Any], p: dict, fields: dict, limit: int) -> dict[str, np.ndarray]:
    """Spearman correlations of the cascading randomisation (after the first step and after the
    last one) for the rows of this batch whose global index is below ``limit``; NaN elsewhere."""
    index = p["items"]["index"]
    head = np.full(len(index), np.nan)
    full = np.full(len(index), np.nan)
    sel = np.flatnonzero(index < limit)
    if sel.size:
        inputs, targets = job.subset(p, torch.from_numpy(sel), fields)
        cache: dict[str, Any] = {}

        def explain(work, x, t):  # the method's own options, not parameter_randomisation's (``seed`` of random)
            if cache.get("model") is not work:
                cache.update(model=work, explainer=attnx.Explainer(work))
            return cache["explainer"](x, method=method, target=t, **opts)

        r = parameter_randomisation(job.model, inputs, explain, targets, order="cascade", seed=RANDOMISATION_SEED)
        head[sel] = to_numpy(r.spearman[1]).astype(np.float64)
        full[sel] = to_numpy(r.spearman[-1]).astype(np.float64)
    return {"rand_head": head, "rand_all": full}


#: what a method may raise on a model it does not apply to: its row then says why (not a crash)
METHOD_FAILURES = (AttnxError, ValueError, TypeError, RuntimeError, NotImplementedError)


def failure_reason(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _run(job, names, options, n, batch_size, shard, progress, meta) -> League:
    """Every method on the batches of ``shard``: the (partial) league of their per-sample results.
    A method that raises is dropped from the rest of the run, with the reason in ``meta["failed"]``;
    the sanity row (``meta["sanity"]``) is its method explained on a randomised copy of the model."""
    explainer = attnx.Explainer(job.model)
    explainers = {m: explainer for m in names}
    rows = {m: parse_row(m) for m in names}  # row -> (method, its options)
    methods = {m: rows[m][0] for m in names}
    sanity = meta.get("sanity")
    failed: dict[str, str] = {}
    if sanity:
        row = sanity["row"]
        methods[row] = sanity["method"]
        names = [*names, row]
        try:
            explainers[row] = attnx.Explainer(metrics.randomised_copy(job.model, sanity["seed"]))
        except METHOD_FAILURES as exc:  # no Transformer blocks found to re-draw
            failed[row] = failure_reason(exc)
    batches = sharding.batch_indices(n, batch_size, shard)
    loader = torch.utils.data.DataLoader(IndexDataset(job.get, n), batch_sampler=batches,
                                         collate_fn=job.collate, num_workers=0)
    items: dict[str, list] = {}
    samples: dict[str, dict[str, list]] = {m: {} for m in names}
    total = sum(len(b) for b in batches)
    rand_limit = int((meta.get("randomisation") or {}).get("samples", 0))
    with tqdm(total=total, desc=f"evaluate {meta['task']}", unit=job.unit, disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            prepared = job.prepare(batch)
            for k, v in prepared["items"].items():
                items.setdefault(k, []).append(v)
            for m in [m for m in names if m not in failed]:
                bar.set_postfix_str(m, refresh=False)
                opts = {**options.get(m, {}), **rows[m][1]} if m in rows else {}
                try:
                    fields = job.run(explainers[m], methods[m], opts, prepared)
                    if rand_limit and m in rows:
                        fields.update(_randomisation(job, methods[m], opts, prepared, fields, rand_limit))
                    elif rand_limit:  # the sanity row: no randomisation of a randomised model
                        nan = np.full(len(prepared["items"]["index"]), np.nan)
                        fields.update(rand_head=nan, rand_all=nan)
                except METHOD_FAILURES as exc:
                    failed[m] = failure_reason(exc)
                    samples.pop(m, None)
                    continue
                for k, v in fields.items():
                    samples[m].setdefault(k, []).append(v)
            bar.update(len(prepared["samples"]))
    names = [m for m in names if m not in failed]
    if items:
        items_np = {k: np.concatenate(v) for k, v in items.items()}
        samples_np = {m: {k: np.concatenate(v) for k, v in samples[m].items()} for m in names}
    else:
        items_np, samples_np = job.empty(names)
        if rand_limit:
            for f in samples_np.values():
                f.update(rand_head=np.zeros(0), rand_all=np.zeros(0))
    meta = dict(meta, fractions=job.fractions, measures=job.measures, failed=failed)
    return League(meta["task"], job.kind, list(names), items_np, samples_np, meta)
