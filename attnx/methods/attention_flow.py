"""Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

The attention graph has one node per token at every layer boundary: boundary 0 holds the input
tokens (the embeddings, or the input of layer ``start_layer``), boundary ``l`` the output of the
``l``-th explained layer. Layer ``l`` contributes an edge from token ``i`` at boundary ``l`` to
token ``k`` at boundary ``l - 1`` whose capacity is the residual-augmented attention of rollout,
``Â_l[i, k]`` with ``Â = rownorm((fuse_h(A) + I) / 2)``. A readout node on top feeds the top
boundary with the readout row's weights (the class token with capacity 1, or every real content
token with ``1 / #content`` for models that pool their patch tokens: the pooling read as one more
averaging "attention" row). The relevance of input token ``j`` is the value of a maximum flow
from the readout node to token ``j`` at boundary 0 (the same value as from ``j`` to the readout
in the graph with every edge reversed), and by default the row is normalised to sum to one
over the real tokens, as in the authors' code.

The defaults are the authors' setting: heads averaged, the residual added as ``(A + I)``
renormalised (the same ``Â``, as the rows of ``A`` sum to one), every layer from the embeddings
up (``start_layer=0``; their code has no start layer, it picks the output layer instead), the
flow values of a readout divided by their sum. ``max`` / ``min`` fusion, ``discard_ratio`` and
``start_layer`` are rollout's options applied to the same graph.

Unlike rollout, which multiplies attention weights along paths and sums over paths, a flow is
limited by the bottleneck of the paths it uses: every unit of flow through a token at a layer
boundary counts once, however many paths share it.

Maximum flows are solved with :func:`scipy.sparse.csgraph.maximum_flow` (Dinic's algorithm,
compiled), which needs integer capacities: capacities are rounded to multiples of
``1 / RESOLUTION`` (``2**-30``; each edge is off by at most ``2**-31``, far below float32
precision of the attention itself), so the flows are exact for the rounded capacities.
Exact reductions keep the graph small: edges of zero capacity are dropped, as are nodes the
readout node cannot reach (for a class-token model, all of the top boundary but the class
token), and for the flow to token ``j`` the bottom boundary is collapsed into the sink (only the
edges into token ``j`` can carry flow to it). Padding tokens are left out of the graph, so a
padded sample gets exactly the flows of its text alone.

Cost: one maximum flow per real input token, each on about ``(L - 1) N²`` edges, on one core.
With dense (near-uniform) attention that is a few hundredths of a second per image for a
4-layer, 65-token ViT and one to a few seconds for ViT-B/16 at 224 (12 layers, 197 tokens);
``discard_ratio`` removes edges and is the speed knob for larger models (an approximation, as
for rollout). ``benchmarks/bench_attention_flow.py`` measures it next to rollout.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.trace_types import Needs
from ..errors import AttnxValueError
from .options import DISCARD_RATIO, HEAD_FUSION, START_LAYER
from .propagation import check_start_layer, fuse_heads
from .registry import Option, register_method
from .rollout import rollout_matrix

__all__ = ["RESOLUTION", "max_flows", "attention_flow"]

#: capacity units per unit of attention (int32 capacities; a unit of flow fits with room to spare)
RESOLUTION = 2**30


def _units(capacities: np.ndarray) -> np.ndarray:
    """Capacities in [0, 1] -> int32 multiples of ``1 / RESOLUTION`` (rounded to nearest)."""
    c = np.asarray(capacities, dtype=np.float64)
    if not np.isfinite(c).all():
        raise AttnxValueError("attention flow: capacities must be finite")
    if c.size and (c.min() < -1e-6 or c.max() > 1 + 1e-6):
        raise AttnxValueError(f"attention flow: capacities must lie in [0, 1], got [{c.min():.3g}, {c.max():.3g}]")
    return np.rint(np.clip(c, 0.0, 1.0) * RESOLUTION).astype(np.int32)


def max_flows(matrices: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Maximum flow from a readout node to every input token through a layered attention graph.

    Parameters
    ----------
    matrices:
        ``(L, n, n)`` capacities in [0, 1], layers in forward order: ``matrices[l - 1][i, k]`` is
        the capacity of the edge from token ``i`` at boundary ``l`` to token ``k`` at boundary
        ``l - 1`` (boundary 0: the input tokens).
    source:
        ``(n,)`` capacities in [0, 1] of the edges from the readout node to the tokens at the top
        boundary ``L``.

    Returns
    -------
    ``(n,)`` float64: for every input token ``j`` the maximum flow value from the readout node to
    ``j`` at boundary 0 (not normalised), exact for capacities rounded to ``1 / RESOLUTION``.
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    matrices = np.asarray(matrices)
    if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2] or matrices.shape[0] == 0:
        raise AttnxValueError(f"matrices must be (L, n, n) with L >= 1, got {matrices.shape}")
    L, n, _ = matrices.shape
    caps = _units(matrices)
    src = _units(source).reshape(-1)
    if src.shape != (n,):
        raise AttnxValueError(f"source must have {n} entries, got {src.shape}")

    # nodes reachable from the readout through positive capacities, per boundary (top down)
    reach = [None] * (L + 1)
    reach[L] = src > 0
    for l in range(L, 1, -1):
        reach[l - 1] = (caps[l - 1][reach[l]] > 0).any(axis=0)

    # node ids: token i at boundary l (1..L) -> (l - 1) * n + i; then the readout S and the sink T.
    # Boundary 0 is collapsed into T: for sink token j, token i at boundary 1 has one edge to T
    # with capacity caps[0][i, j] (the first n entries of the CSR data, rewritten per sink).
    S, T = L * n, L * n + 1
    counts = [np.ones(n, dtype=np.int64)]
    indices = [np.full(n, T, dtype=np.int32)]
    data = [np.zeros(n, dtype=np.int32)]
    for l in range(2, L + 1):
        keep = reach[l][:, None] & (caps[l - 1] > 0)
        rows, cols = np.nonzero(keep)  # row-major: sorted columns within each row
        counts.append(keep.sum(axis=1))
        indices.append(((l - 2) * n + cols).astype(np.int32))
        data.append(caps[l - 1][rows, cols])
    top = np.nonzero(reach[L])[0]
    counts += [np.array([top.size]), np.array([0])]
    indices.append(((L - 1) * n + top).astype(np.int32))
    data.append(src[top])
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int32)
    graph = csr_array(
        (np.concatenate(data), np.concatenate(indices), indptr), shape=(L * n + 2, L * n + 2)
    )

    flows = np.zeros(n, dtype=np.float64)
    bottom = caps[0] * reach[1][:, None]  # unreachable boundary-1 tokens carry nothing
    for j in range(n):
        column = bottom[:, j]
        if not column.any():
            continue  # no edge into token j can carry flow
        graph.data[:n] = column
        flows[j] = maximum_flow(graph, S, T, method="dinic").flow_value
    return flows / RESOLUTION


@register_method(
    "attention_flow",
    reference="Abnar & Zuidema, ACL 2020",
    needs=Needs(attentions=True),
    options=(
        HEAD_FUSION, DISCARD_RATIO, START_LAYER,
        Option("normalize", True, "divide each sample's flows by their sum over the real tokens", kind=bool),
    ),
)
def attention_flow(
    trace,
    readout,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    normalize: bool = True,
) -> torch.Tensor:
    """Attention flow (Abnar & Zuidema, ACL 2020): maximum flow from the readout to each input token.

    The graph has one level of nodes per layer boundary and, per layer, edges of capacity
    ``Â = rownorm((fuse_h(A) + I) / 2)`` (see the module docstring).

    Options: ``head_fusion`` (mean | max | min), ``discard_ratio`` and ``start_layer`` as in
    rollout (discarding drops edges, which also makes the flows faster), ``normalize`` (divide
    each sample's flows by their sum over the real tokens, as the authors do; ``False`` gives
    the raw flow values in [0, 1]). Padding tokens get 0.
    """
    attentions = trace.attentions
    s = check_start_layer(start_layer, len(attentions))
    mats = torch.stack(
        [rollout_matrix(fuse_heads(a, head_fusion), discard_ratio, readout) for a in attentions[s:]], dim=1
    )  # (B, L, N, N)
    weights = readout.one_hot(mats)  # (B, N): the readout node's edges into the top boundary
    B, _, N, _ = mats.shape
    valid = readout.valid
    out = np.zeros((B, N), dtype=np.float64)
    mats64 = mats.detach().to("cpu", torch.float64).numpy()
    weights64 = weights.detach().to("cpu", torch.float64).numpy()
    valid_np = valid.detach().cpu().numpy()
    for b in range(B):
        idx = np.nonzero(valid_np[b])[0]
        flows = max_flows(mats64[b][:, idx][:, :, idx], weights64[b, idx])
        if normalize:
            total = flows.sum()
            flows = flows / total if total > 0 else flows
        out[b, idx] = flows
    return torch.from_numpy(out).to(device=attentions[0].device, dtype=attentions[0].dtype)
