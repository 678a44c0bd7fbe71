"""Baselines for evaluation tables: seeded random relevance, and gradient × input.

* ``random`` is the floor of any evaluation: uniform random relevance per content token, the same
  for any model. Targets, logits and the token layout are resolved as for every other method.
* ``gradient_x_input`` is the plain gradient of the target logit times the input: per pixel
  (summed over channels) for images, per token embedding (summed over the hidden dimension) for
  text. It is LRP to the input with every rule the plain gradient, so it runs through the same
  relevance pass as the ``lrp`` method, with a registry that maps every module and function to
  :class:`attnx.lrp.rules.Passthrough`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..core.trace_types import Needs
from ..errors import AttnxTypeError
from ..lrp.registry import Registry
from ..lrp.rules import Passthrough
from .lrp import input_relevance_scores
from .options import LIBRAGRAD, PATCH_SIZE
from .registry import Option, Relevance, register_method

__all__ = ["GradientRegistry", "random_relevance", "random_baseline", "gradient_x_input"]


# --------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------
def _sample_digest(x: torch.Tensor | None, b: int, valid: torch.Tensor | None) -> list[int]:
    """32-bit words of a digest of sample ``b`` of ``x`` (only its real tokens for text; images
    are read in float32, so a float64 copy of a float32 image gives the same digest)."""
    if x is None:
        return []
    v = x[b].detach()
    if not v.is_floating_point():
        if valid is not None and v.dim() >= 1 and v.shape[0] == valid.shape[1]:
            v = v[valid[b].to(v.device)]
        v = v.to(torch.int64)
    else:
        v = v.to(torch.float32)
    digest = hashlib.blake2b(v.contiguous().cpu().numpy().tobytes(), digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def random_relevance(num_tokens: int, seed: int, digest: list[int] = ()) -> np.ndarray:
    """``num_tokens`` uniform numbers in [0, 1) from a generator seeded with ``seed`` and
    ``digest``; the first ``k`` values do not depend on ``num_tokens``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *digest])).random(num_tokens)


def non_negative_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise AttnxTypeError(f"seed must be a non-negative int, got {seed!r}")
    return seed


@register_method(
    "random",
    reference="— (evaluation floor)",
    needs=Needs(attentions=True),
    options=(Option("seed", 0, "seed of the random generator (mixed with a digest of each sample)", check=non_negative_seed),),
)
def random_baseline(trace, readout, *, seed: int = 0) -> Relevance:
    """Seeded uniform random relevance per content token, independent of the model (the floor).

    Values are uniform in [0, 1) for the content tokens; prefix tokens and padding get 0. Each
    sample draws from a generator seeded with ``seed`` and a digest of the sample's own
    input (its real token ids, or its pixels), so different inputs get different maps while a
    sample gets the same map alone, in any batch and with any padding. One forward pass
    resolves the targets, logits and token layout.
    """
    layout = trace.layout
    B, N = trace.logits.shape[0], layout.num_tokens
    valid = layout.valid_mask(B, torch.device("cpu"))
    content = layout.content_mask(B, torch.device("cpu"))
    x = trace.batch.explained_input
    rel = np.zeros((B, N), dtype=np.float64)
    for b in range(B):
        idx = np.nonzero((valid[b] & content[b]).numpy())[0]
        rel[b, idx] = random_relevance(idx.size, seed, _sample_digest(x, b, layout.valid))
    tokens = torch.from_numpy(rel).to(device=trace.logits.device, dtype=trace.logits.dtype)
    return Relevance(tokens=tokens, options={"seed": seed})


# --------------------------------------------------------------------------------------------
# gradient x input
# --------------------------------------------------------------------------------------------
class GradientRegistry(Registry):
    """A rule registry giving plain autograd everywhere: every module and every torch function
    is handled by :class:`~attnx.lrp.rules.Passthrough`, so an LRP pass returns gradient × input
    (and the coverage table has no unhandled ops). A target's ``relevance_seed`` (a stated
    linearisation, e.g. a cosine with its norm held constant) is not used: the seed is the
    target's exact gradient at the logits."""

    plain_gradient = True

    def __init__(self) -> None:
        super().__init__("gradient", seed="logit")
        self._rule = Passthrough()

    def rule_for_module(self, module, stack, name=""):  # noqa: D401 - Registry interface
        return self._rule

    def rule_for_function(self, func, stack):
        return self._rule

    def copy(self, name: str | None = None) -> "GradientRegistry":
        return GradientRegistry()


@register_method("gradient_x_input", reference="Shrikumar et al. 2016", needs=Needs(input_relevance=True, rules=GradientRegistry), options=(PATCH_SIZE, LIBRAGRAD))
def gradient_x_input(trace, readout) -> Relevance:
    """Gradient × input, ``x ⊙ ∂y_t/∂x``, at the pixels or the token embeddings.

    ``Explanation.input_relevance`` holds the raw products, ``(B, C, H, W)`` or ``(B, T, D)``
    (the output of the input embeddings). ``Explanation.scores`` sums them over the channels and
    each patch of the model's grid (images) or over the hidden dimension (text, one value per
    token). The same as the ``lrp`` method with every rule the plain gradient; any target
    (a callable or a continuation too) is differentiated as given.

    With ``libragrad=True`` the gradient is LibraGrad's (:func:`attnx.lrp.registry.libragrad`):
    the relevance then sums to the target score up to the biases (complete).
    """
    return input_relevance_scores(trace, readout)
