"""Explanation methods, looked up by name.

Every method is a pure function of the trace of one pass and the readout row, declared in
:mod:`.registry` with what it reads from the trace and its typed options::

    @register_method("my_method", needs=Needs(attentions=True, gradients=True), options=[...])
    def my_method(trace, readout, *, option=default) -> torch.Tensor:  # (B, N) token relevance

``trace.attentions`` holds the post-softmax attention ``A`` of every layer as ``(B, H, N, N)``;
``trace.gradients`` holds ``dy_t/dA``, ``trace.attention_relevance`` the LRP relevance at ``A``,
``trace.input_relevance`` the relevance at the input and ``trace.hidden_states`` /
``trace.hidden_gradients`` the tokens each block reads and ``dy_t/dh``, each when declared. A method that
reads a small function of each layer (its head-fused map, one readout row) declares it as a
``fold`` and reads it with :func:`attnx.core.layer_fold.kept_layers`: the pass then keeps that
instead of every layer's ``A`` and ``dy_t/dA`` (:mod:`attnx.core.layer_fold`). One module per
method (or family), named after it; the rollout family shares :mod:`.propagation`.
"""
from __future__ import annotations

from .registry import (
    Method,
    Option,
    Relevance,
    get_method,
    list_methods,
    method_names,
    methods_markdown,
    register_method,
    unregister_method,
)

# isort: split
# the built-in methods register themselves on import, in this order
from . import raw, rollout, grad_rollout, generic, gradcam, transformer_attribution, lrp, attention_flow, baselines, legrad, attcat, beyond_intuition, integrated_gradients, occlusion, atman, tokentm  # noqa: E402,F401,I001

__all__ = ["Method", "Option", "Relevance", "get_method", "list_methods", "method_names", "methods_markdown", "register_method", "unregister_method"]
