"""The attention of any PyTorch model, seen through a ``TorchFunctionMode``.

A mode active during the forward sees every torch function a model calls, whatever its module
names. Attention reaches it in one of three forms:

* a call of ``F.scaled_dot_product_attention`` (timm, Hugging Face ``sdpa``), which
  ``AttentionInterceptor`` replaces by its explicit definition ``softmax(Q K^T * scale + mask) V``
  so that the probabilities exist as a tensor in the graph;
* a call of ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, torchvision), which is
  asked for per-head weights;
* attention written out (DINO, DeiT, MAE, timm with ``fused_attn=False``, Hugging Face ``eager``,
  ``nn.Softmax`` modules), recognised by its data flow (:class:`SoftmaxFlow`): a softmax over the
  last (key) axis of a ``(..., Nq, Nk)`` tensor whose output -- directly, or through eval-mode
  dropout, a cast, ``contiguous`` or a reshape that keeps the ``(Nq, Nk)`` axes -- is the left
  operand of ``@`` / ``torch.matmul`` / ``torch.bmm`` with values ``(..., Nk, D)``, or an
  operand of ``torch.einsum`` that contracts its key axis. A classifier's softmax or a router's
  (followed by ``topk``) is never multiplied that way and is not attention.

``TokenWatcher`` only notes how many tokens each attention attends over, changing nothing.
The calls a mode makes inside its own ``__torch_function__`` (the explicit SDPA, the MHA kernel)
do not re-enter it, so no attention is seen twice.
"""
from __future__ import annotations

import collections
import inspect
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.recorder import AttentionRecorder
from ..errors import AttnxValueError
from ..lrp.relay import is_exact_alias
from .fused_kernel import probed_attention, repeated_heads, sdpa_probabilities
from .switches import record_mha_weights

__all__ = ["AttentionInterceptor", "KernelInterceptor", "SoftmaxFlow", "TokenWatcher", "explicit_attention", "record_probabilities"]

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
T = torch.Tensor

#: softmax however it is spelled (``nn.Softmax`` calls ``F.softmax``)
SOFTMAX = frozenset({F.softmax, torch.softmax, T.softmax})
#: products ``A @ V`` whose left operand may be attention probabilities
MATMUL = frozenset({torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm})
#: ops after which the probabilities are still the probabilities when their output is an exact
#: alias of the input (dropout in eval mode, a no-op cast) or the same values in another dtype,
#: device or memory layout
PASS_THROUGH = frozenset({
    F.dropout, torch.dropout, T.to, T.type, T.type_as, T.float, T.double, T.half, T.bfloat16, T.contiguous,
})
#: reshapes that keep the probabilities when they keep the last two (query, key) axes
RESHAPES = frozenset({
    T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unflatten, torch.unflatten, T.squeeze,
    torch.squeeze, T.unsqueeze, torch.unsqueeze,
})
#: of ``PASS_THROUGH``, the ones that may only return an exact alias (dropout that drops is not)
ALIAS_ONLY = frozenset({F.dropout, torch.dropout})


def einsum_contracts_last_axis(equation: str, num_operands: int, index: int) -> bool:
    """Whether ``torch.einsum(equation, ...)`` sums operand ``index`` over its last axis against
    another operand (``"bhqk,bhkd->bhqd"`` does for operand 0)."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    subscripts = lhs.split(",")
    if len(subscripts) != num_operands or not subscripts[index] or subscripts[index].endswith("."):
        return False
    key = subscripts[index][-1]
    if not arrow:  # implicit output: the labels that occur once
        counts = collections.Counter(c for s in subscripts for c in s if c != ".")
        rhs = "".join(c for c, n in counts.items() if n == 1)
    return key not in rhs and any(key in s for j, s in enumerate(subscripts) if j != index)


class SoftmaxFlow:
    """Follows the outputs of softmaxes over the last axis to the product that consumes them.

    Feed it every call a mode sees through :meth:`call`; ``on_attention(probs)`` is called with
    the very tensor a product multiplies with the values (so that ``autograd.grad`` with respect
    to it is ``dy/dA``), once per softmax output.
    """

    def __init__(self) -> None:
        self._live: dict[int, weakref.ref] = {}

    def _tracked(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._live.get(id(t))
        return ref is not None and ref() is t

    def _track(self, t: torch.Tensor) -> None:
        key = id(t)
        self._live[key] = weakref.ref(t, lambda _, key=key: self._live.pop(key, None))

    def consumed(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The attention probabilities that this call multiplies with the values, if any."""
        if func in MATMUL:
            probs = args[0] if args else kwargs.get("input")
            values = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
            if self._tracked(probs) and isinstance(values, torch.Tensor) and values.dim() >= 2 \
                    and values.shape[-2] == probs.shape[-1]:
                return self._consume(probs)
        elif func is torch.einsum and args and isinstance(args[0], str):
            operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            for i, probs in enumerate(operands):
                if self._tracked(probs) and einsum_contracts_last_axis(args[0], len(operands), i):
                    return self._consume(probs)
        return None

    def _consume(self, probs: torch.Tensor) -> torch.Tensor:
        self._live.pop(id(probs), None)  # one record per softmax output, however often it is used
        return probs

    def follow(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Note the output of ``func`` if it is (still) attention-shaped softmax probabilities."""
        if not isinstance(out, torch.Tensor):
            return
        if func in SOFTMAX:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if out.dim() >= 3 and isinstance(dim, int) and dim in (-1, out.dim() - 1):
                self._track(out)
            return
        source = args[0] if args else kwargs.get("input")
        if not self._tracked(source) or out.requires_grad != source.requires_grad:
            return
        if func in PASS_THROUGH:
            same_values = func not in ALIAS_ONLY and out.shape == source.shape
            if is_exact_alias(out, source) or same_values:
                self._track(out)
        elif func in RESHAPES and out.dim() >= 3 and out.shape[-2:] == source.shape[-2:]:
            self._track(out)

    def call(self, func: Any, args: tuple, kwargs: dict, on_attention: Callable[[torch.Tensor], Any]) -> Any:
        """Run ``func(*args, **kwargs)``, calling ``on_attention`` first if it consumes attention;
        a tensor ``on_attention`` returns is multiplied with the values in place of the probabilities."""
        probs = self.consumed(func, args, kwargs)
        if probs is not None:
            replacement = on_attention(probs)
            if isinstance(replacement, torch.Tensor) and replacement is not probs:
                args = substituted(args, probs, replacement)
        out = func(*args, **kwargs)
        self.follow(func, args, kwargs, out)
        return out


def substituted(args: tuple, old: torch.Tensor, new: torch.Tensor) -> tuple:
    """``args`` with the tensor ``old`` replaced by ``new`` (also inside an einsum's operand list)."""
    def swap(a: Any) -> Any:
        if a is old:
            return new
        if isinstance(a, (list, tuple)) and any(x is old for x in a):
            return type(a)(new if x is old else x for x in a)
        return a

    return tuple(swap(a) for a in args)


def record_probabilities(recorder: AttentionRecorder, probs: torch.Tensor) -> None:
    """Record probabilities ``(..., Nq, Nk)`` as ``(B, H, Nq, Nk)``, gradients taken w.r.t. ``probs``.

    A 3-D ``(B*H, Nq, Nk)`` tensor (heads folded into the batch axis, as ``torch.bmm`` needs
    them) is unfolded with the recorder's batch size; more than two leading axes are taken as
    ``(B, heads...)``. A leading size that is not the batch size is recorded as it is, and the
    trace refuses it (windowed attention is not one global stack).
    """
    if probs.dim() == 4:
        recorder.record(probs)
    elif probs.dim() == 3:
        B, L = recorder.batch_size, probs.shape[0]
        folded = B is not None and B > 0 and L % B == 0
        recorder.record(probs.unflatten(0, (B, L // B)) if folded else probs.unsqueeze(1), grad_wrt=probs)
    elif probs.dim() > 4:
        recorder.record(probs.flatten(1, -3), grad_wrt=probs)
    else:
        raise AttnxValueError(f"cannot record attention probabilities of shape {tuple(probs.shape)}")


def explicit_attention(
    recorder: AttentionRecorder,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` written out, recording the probabilities (``edit``: a
    function of the probabilities whose result the product with the values uses instead)."""
    probs = sdpa_probabilities(query, key, attn_mask, is_causal, scale, enable_gqa)
    if enable_gqa and query.dim() >= 3:
        value = repeated_heads(value, query.shape[-3])
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if edit is not None:
        probs = edit(probs)
    record_probabilities(recorder, probs)
    return torch.matmul(probs, value)


class AttentionInterceptor(TorchFunctionMode):
    """Records the attention probabilities of every attention called while active: SDPA (made
    explicit), ``F.multi_head_attention_forward`` (per-head weights) and attention written out."""

    def __init__(self, recorder: AttentionRecorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.flow = SoftmaxFlow()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return explicit_attention(self.recorder, *args, **kwargs)
        if func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            need = bound.arguments.get("need_weights", True)
            average = bound.arguments.get("average_attn_weights", True)
            bound.arguments["need_weights"] = True
            bound.arguments["average_attn_weights"] = False
            out, weights = func(*bound.args, **bound.kwargs)
            record_mha_weights(self.recorder, weights)
            return out, (None if not need else weights.mean(dim=1) if average else weights)
        return self.flow.call(func, args, kwargs, self.on_attention)

    def on_attention(self, probs: torch.Tensor) -> None:
        record_probabilities(self.recorder, probs)


class KernelInterceptor(AttentionInterceptor):
    """:class:`AttentionInterceptor` for a pass that folds the layers: SDPA calls are left to the
    kernel (:func:`attnx.adapters.fused_kernel.probed_attention`); attention written out or asked
    of ``nn.MultiheadAttention`` is recorded as before, and the recorder refuses the two kinds in
    one forward (the pass then runs again with :class:`AttentionInterceptor`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            out = probed_attention(self.recorder, args, kwargs or {})
            if out is not None:
                return out
        return super().__torch_function__(func, types, args, kwargs)


class TokenWatcher(TorchFunctionMode):
    """Notes the number of key tokens of every attention (kernel call or written out), and the
    output grid of a patch embedding (a convolution whose stride equals its kernel) applied to
    images of ``image_size``, changing nothing."""

    def __init__(self, recorder: AttentionRecorder, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.recorder = recorder
        self.image_size = image_size
        self.flow = SoftmaxFlow()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and self.image_size is not None:
            out = func(*args, **kwargs)
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
            if tuple(x.shape[-2:]) == self.image_size and tuple(weight.shape[-2:]) == stride:
                self.recorder.saw_patch_grid(tuple(out.shape[-2:]))
            return out
        if func is F.scaled_dot_product_attention:
            key = args[1] if len(args) > 1 else kwargs["key"]
            self.recorder.saw_tokens(key.shape[-2])
        elif func is F.multi_head_attention_forward:
            key = _MHA_SIGNATURE.bind(*args, **kwargs).arguments["key"]
            self.recorder.saw_tokens(key.shape[0])  # (S, B, E) or unbatched (S, E): S leads
        else:
            return self.flow.call(func, args, kwargs, self.on_attention)
        return func(*args, **kwargs)

    def on_attention(self, probs: torch.Tensor) -> None:
        self.recorder.saw_tokens(probs.shape[-1])
