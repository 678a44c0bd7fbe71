"""Sanity check: does the explanation depend on the model's weights?

:func:`parameter_randomisation`
    The model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps",
    NeurIPS 2018): the map is recomputed as the weights are re-drawn, step by step from the top
    (:func:`randomisation_steps`), and compared to the original map (:class:`Randomisation`).
:func:`spearman` and :func:`pearson`
    The per-sample correlations it compares maps with, computed in torch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.explainer import Explainer
from ..core.explanation import Explanation
from ..errors import AttnxTypeError, AttnxValueError
from .common import RelevanceLike, bool_mask

__all__ = ["parameter_randomisation", "Randomisation", "randomisation_steps", "randomised_copy", "spearman", "pearson"]


def _rows(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, Explanation):
        a = a.scores
    if not isinstance(a, torch.Tensor):
        raise AttnxTypeError(f"{name} must be a tensor or an Explanation, got {type(a).__name__}")
    a = a.detach()
    if a.dim() < 2:
        raise AttnxValueError(f"{name} must have a batch dimension: (B, ...), got shape {tuple(a.shape)}")
    return a.reshape(a.shape[0], -1).to(torch.float64)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` ranks 1..n of each row, tied values sharing their average rank."""
    B, n = x.shape
    s, order = x.sort(dim=1, stable=True)
    start = torch.ones(B, n, dtype=torch.bool, device=x.device)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    group = start.long().cumsum(dim=1) - 1
    pos = torch.arange(n, dtype=torch.float64, device=x.device).expand(B, n)
    first = torch.full((B, n), math.inf, dtype=torch.float64, device=x.device).scatter_reduce(1, group, pos, "amin")
    last = torch.full((B, n), -math.inf, dtype=torch.float64, device=x.device).scatter_reduce(1, group, pos, "amax")
    avg = ((first + last) / 2 + 1).gather(1, group)
    return torch.empty_like(avg).scatter_(1, order, avg)


def _pair(a: RelevanceLike, b: RelevanceLike, mask: torch.Tensor | None):
    x, y = _rows(a, "a"), _rows(b, "b")
    if x.shape != y.shape:
        raise AttnxValueError(f"cannot correlate maps of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.to(x.device)
    if mask is not None:
        mask = bool_mask(mask.reshape(x.shape[0], -1) if isinstance(mask, torch.Tensor) else mask, tuple(x.shape), "mask")
        mask = mask.to(x.device)
    return x, y, mask


def _pearson_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1))


def _per_sample(fn: Callable, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return fn(x, y)
    return torch.cat([fn(x[i : i + 1, mask[i]], y[i : i + 1, mask[i]]) for i in range(x.shape[0])])


def pearson(a: RelevanceLike, b: RelevanceLike, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` Pearson correlation of each sample's flattened maps (NaN when one is constant).

    ``mask`` (same shape, bool) restricts each sample to its ``True`` entries, e.g. the real
    tokens of a padded text batch.
    """
    x, y, mask = _pair(a, b, mask)
    return _per_sample(_pearson_rows, x, y, mask)


def spearman(a: RelevanceLike, b: RelevanceLike, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` Spearman rank correlation: Pearson correlation of the average ranks (ties share
    their mean rank, as in ``scipy.stats.spearmanr``); NaN when a map is constant. ``mask`` as
    in :func:`pearson`."""
    x, y, mask = _pair(a, b, mask)
    return _per_sample(lambda u, v: _pearson_rows(_average_ranks(u), _average_ranks(v)), x, y, mask)


@dataclass
class Randomisation:
    """Result of :func:`parameter_randomisation`.

    Attributes
    ----------
    layers:
        ``S`` names: ``"none"`` (the unchanged copy) and then what was randomised at each step.
    spearman, spearman_abs, pearson:
        ``(S, B)`` similarity of each step's map to the original map: Spearman rank correlation
        of the signed maps, of their absolute values, and Pearson correlation.
    maps:
        ``(S, B, P)`` the maps compared (an Explanation's ``scores``).
    valid:
        ``(B, P)`` bool: the entries compared (padding of a text batch excluded), or ``None``.
    order:
        ``"cascade"`` or ``"independent"``.
    """

    layers: list
    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    pearson: torch.Tensor
    maps: torch.Tensor
    order: str
    valid: torch.Tensor | None = None

    def summary(self) -> list[dict]:
        """One row per step with the batch-mean correlations."""
        return [
            {"layer": name, "spearman": float(self.spearman[i].mean()), "spearman_abs": float(self.spearman_abs[i].mean()),
             "pearson": float(self.pearson[i].mean())}
            for i, name in enumerate(self.layers)
        ]


def randomisation_steps(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Default steps, top down: the classifier head (parameters after the blocks), each block from
    the last to the first, then the embeddings (parameters before the blocks).

    The blocks are the children of the ``nn.ModuleList`` / ``nn.Sequential`` of at least two
    modules of one type that holds the most parameters.

    Parameters
    ----------
    model:
        The model whose parameters are grouped into steps.

    Returns
    -------
    list of (str, list of str)
        Each step's name (``"head"``, a block's module name, ``"embeddings"``) and the names of
        the parameters it re-draws.

    Raises
    ------
    ValueError
        When the model has no such stack of blocks.
    """
    names = [n for n, _ in model.named_parameters()]
    best, best_count = None, 0
    for cname, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(container.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        count = sum(p.numel() for p in container.parameters())
        if count > best_count:
            best, best_count = (cname, [k for k, _ in kids]), count
    if best is None:
        raise AttnxValueError("cannot find the stack of Transformer blocks of this model; pass layers=[module names, top first]")
    cname, kids = best
    prefix = f"{cname}." if cname else ""
    blocks = [(f"{prefix}{k}", [n for n in names if n.startswith(f"{prefix}{k}.")]) for k in kids]
    in_blocks = {n for _, ps in blocks for n in ps}
    positions = [i for i, n in enumerate(names) if n in in_blocks]
    first, last = min(positions), max(positions)
    head = [n for i, n in enumerate(names) if i > last and n not in in_blocks]
    embeddings = [n for i, n in enumerate(names) if i < first and n not in in_blocks]
    steps = [("head", head)] if head else []
    steps += [b for b in reversed(blocks) if b[1]]
    if embeddings:
        steps.append(("embeddings", embeddings))
    return steps


def _named_steps(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, list[str]]]:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    steps = []
    for name in layers:
        if name in modules:
            prefix = f"{name}." if name else ""
            steps.append((name, [n for n in params if n.startswith(prefix)]))
        elif name in params:
            steps.append((name, [name]))
        else:
            raise AttnxValueError(f"{name!r} is neither a module nor a parameter of the model")
    return steps


def _redraw_(p: torch.Tensor, generator: torch.Generator) -> None:
    """Redraw ``p`` from a normal distribution with its own mean and standard deviation."""
    data = p.detach().double()
    mu = float(data.mean())
    sd = float(data.std()) if data.numel() > 1 else 0.0
    if not math.isfinite(sd) or sd == 0.0:
        sd = 0.02
    noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    p.copy_((noise * sd + mu).to(device=p.device, dtype=p.dtype))


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter of :func:`randomisation_steps` re-drawn, as the
    last step of :func:`parameter_randomisation`'s cascade with the same ``seed`` (the model
    itself is untouched). A map computed on it and scored on the real model is a sanity row: a
    faithful method's scores should fall to the level of a random map."""
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    with torch.no_grad():
        for s, (_, pnames) in enumerate(randomisation_steps(work)):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + s)
            for n in pnames:
                _redraw_(params[n], gen)
    return work


def parameter_randomisation(
    model: nn.Module,
    inputs: Any,
    method: str | Callable,
    target: Any = None,
    *,
    order: str = "cascade",
    layers: Sequence[str] | None = None,
    seed: int = 0,
    adapter: Any = None,
    **method_kwargs: Any,
) -> Randomisation:
    """Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps",
    NeurIPS 2018): an explanation that depends on the model should change when its weights are
    randomised.

    Works on ``copy.deepcopy(model)``; the model passed in is never modified (its parameters,
    buffers, ``training`` flags, hooks and ``.grad`` stay as they are). The original map is the
    explanation on the copy; then, step by step, groups of parameters are re-drawn and the map
    is recomputed for the same target classes, and compared to the original map (an
    Explanation's ``scores``; for a padded text batch over the real tokens only).

    Steps (``layers=None``): the classifier head (every parameter registered after the stack
    of Transformer blocks, e.g. the final norm and the head), each block from the last to the
    first, then the embeddings (every parameter registered before the blocks). Or pass
    ``layers``: module (or parameter) names, top first. Step 0, ``"none"``, recomputes the map
    on the unchanged copy (correlation 1 for a deterministic method).

    ``order="cascade"`` randomises cumulatively from the top; ``"independent"`` randomises one
    step at a time, restoring the others. Each parameter tensor is re-drawn from a normal
    distribution with the tensor's own mean and standard deviation (0.02 when it has none), a
    scale-preserving re-initialisation drawn from a generator seeded with ``seed`` and the
    step's index (the global RNG is not used); both orders draw the same values for a step.

    Parameters
    ----------
    model:
        The model (any model attnx explains).
    inputs:
        Images ``(B, C, H, W)`` or a tokenizer's dict.
    method:
        An attnx method name (run with ``attnx.Explainer(copy, adapter)``, options from
        ``**method_kwargs``) or a callable ``(model, inputs, target) -> Explanation | tensor``.
    target:
        As in :meth:`attnx.Explainer.explain`; ``None`` explains the original model's
        prediction, and the randomised models are explained for those same classes.

    Returns
    -------
    Randomisation
        ``spearman``, ``spearman_abs`` and ``pearson`` ``(S, B)`` against the original map.
    """
    if order not in ("cascade", "independent"):
        raise AttnxValueError(f"order must be 'cascade' or 'independent', got {order!r}")
    if not isinstance(model, nn.Module):
        raise AttnxTypeError(f"parameter_randomisation needs an nn.Module to copy, got {type(model).__name__}")
    if not (isinstance(method, str) or callable(method)):
        raise AttnxTypeError(f"method must be an attnx method name or a callable, got {method!r}")
    work = copy.deepcopy(model)
    steps = randomisation_steps(work) if layers is None else _named_steps(work, layers)
    params = dict(work.named_parameters())

    explainer = None
    if isinstance(method, str):
        explainer = Explainer(work, adapter=adapter)

    valid = None

    def run(t: Any) -> tuple[torch.Tensor, Any]:
        nonlocal valid
        out = explainer(inputs, method=method, target=t, **method_kwargs) if explainer else method(work, inputs, t)
        if isinstance(out, Explanation):
            layout = out.layout
            if out.grid is None and layout is not None and (layout.valid is not None or layout.columns is not None):
                valid = layout.score_mask(len(out), out.scores.device)  # padded text
            return _rows(out.scores, "map"), out.targets
        if isinstance(out, torch.Tensor):
            return _rows(out, "map"), None
        raise AttnxTypeError(f"the method must return an Explanation or a tensor, got {type(out).__name__}")

    reference, targets = run(target)
    fixed = targets if targets is not None else target
    maps = [run(fixed)[0]]
    names = ["none"]
    originals: dict[str, torch.Tensor] = {}
    for s, (name, pnames) in enumerate(steps):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + s)
        with torch.no_grad():
            if order == "independent":
                for n, v in originals.items():
                    params[n].copy_(v)
                originals = {n: params[n].detach().clone() for n in pnames}
            for n in pnames:
                _redraw_(params[n], gen)
        maps.append(run(fixed)[0])
        names.append(name)
    stacked = torch.stack(maps)  # (S, B, P)
    ref = reference.expand_as(stacked[0])
    sp = torch.stack([spearman(m, ref, valid) for m in stacked])
    sp_abs = torch.stack([spearman(m.abs(), ref.abs(), valid) for m in stacked])
    pe = torch.stack([pearson(m, ref, valid) for m in stacked])
    return Randomisation(names, sp, sp_abs, pe, stacked, order, valid)
