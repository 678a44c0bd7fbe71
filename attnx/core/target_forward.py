"""The explained target's score on perturbed inputs, computed with the model's own forward.

Perturbation methods run the model many times on changed copies of the explained batch:
integrated gradients on points between a baseline and the input, occlusion with one window
replaced, AtMan with the attention to one token suppressed. A method that declares
``Needs(forward=True)`` finds a :class:`TargetForward` on ``Trace.forward``::

    x = trace.forward.inputs()          # (B, C, H, W) pixels or (B, T, D) token embeddings
    scores = trace.forward(perturbed)   # (M,) for (M, ...) inputs; row r is a copy of sample r % B

* **What is perturbed**: the pixels of an image model; the output of the token embeddings of a
  text model (BERT-family, decoders, a CLIP text tower), which replaces that output in the forward.
* **The forward**: the model's own (its own attention kernels, none of attnx's switches), as the
  explained pass runs it: eval mode, one call at a time, compiled modules eager, half precision in
  float32, gradient checkpointing off. The other inputs of the batch (attention mask, position
  ids, token types, an appended continuation, the readout) are repeated with every copy. The grad
  mode is the caller's (captum differentiates through it).
* **The score**: the explained ``y_t`` of each sample (its class or token logit, a continuation's
  log-probability, a callable's value), or with ``score="log_probability"`` the log-softmax of the
  explained class or token. A callable target sees the output of one copy of the batch per call.
* **Memory**: rows run in chunks of whole copies of the batch, at most ``chunk_size`` samples
  (at least one copy).
* **Attention**: with ``key_factors`` ``(M, N)`` every self-attention's probabilities of row ``r``
  pass through ``edit(probs, factors)`` (:mod:`attnx.adapters.attention_edit`).

:meth:`TargetForward.inputs` takes the explained inputs from one forward whose scores must equal
the explained pass's: perturbing another function than the explained one would be a silent wrong
answer (:class:`attnx.errors.ForwardMismatchError`).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapters.attention_edit import AttentionEditor
from ..adapters.base import Adapter
from ..adapters.switches import no_new_forward_hooks, plain_execution
from ..errors import AttnxValueError, ForwardMismatchError, UnsupportedModelError
from ..lrp.engine import LRPEngine
from ..lrp.registry import Registry
from .batch import Batch
from .forward_check import tolerance
from .layout import Layout
from .pass_reading import resolve
from .runtime import eager_compiled, evaluation_mode, exclusive, float32_execution
from .targets import BoundContinuation, ResolvedTarget, is_callable_target

__all__ = ["DEFAULT_CHUNK", "TargetForward"]

#: samples per model call of the perturbed forwards (whole copies of the batch, at least one)
DEFAULT_CHUNK = 64

Edit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TargetForward:
    """The explained target's score for perturbed inputs (see the module docstring).

    Parameters
    ----------
    adapter, batch, target, layout:
        The explained pass's adapter, batch (a continuation appended), bound target and layout.
    scores:
        ``(B,)`` the explained pass's ``y_t``: the unperturbed forward must reproduce them.
    classes:
        ``(B,)`` the explained class or token per sample, or ``None`` (callable, continuation).
    chunk_size:
        The most samples one model call takes.
    rules, strict:
        A :class:`~attnx.lrp.registry.Registry` of a modified gradient (LibraGrad's): the forwards
        of perturbed inputs run under the LRP engine with those inputs tracked, so that a gradient
        of their scores (integrated gradients) is taken through the rules; the scores are the
        model's own.
    """

    def __init__(self, adapter: Adapter, batch: Batch, target: Any, layout: Layout, scores: torch.Tensor,
                 classes: torch.Tensor | None, chunk_size: int = DEFAULT_CHUNK, rules: Registry | None = None,
                 strict: bool = True) -> None:
        self.adapter = adapter
        self.batch = replace(batch, layout=layout)
        self.target = target
        self.layout = layout
        self.scores = scores.detach()
        self.classes = classes
        self.chunk_size = chunk_size
        #: the rules of a modified gradient (LibraGrad) that a perturbed forward's backward takes
        self.rules, self.strict = rules, strict
        self.embeddings: nn.Module | None = adapter.input_embeddings()
        self._inputs: torch.Tensor | None = None
        self._tiled: dict[int, Batch] = {}
        self._held = False

    # what is perturbed -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch.batch_size

    @property
    def kind(self) -> str:
        """``"pixels"`` (an image model's input) or ``"embeddings"`` (the output of the token embeddings)."""
        return "pixels" if self.embeddings is None else "embeddings"

    @property
    def callable_target(self) -> bool:
        return is_callable_target(self.target)

    def inputs(self) -> torch.Tensor:
        """The explained inputs, detached: ``(B, C, H, W)`` pixels or ``(B, T, D)`` token embeddings,
        read from one forward whose scores are checked against the explained pass's."""
        if self._inputs is None:
            seen: list[torch.Tensor] = []
            with self.held(), torch.no_grad():
                scores = self.chunk(1, None, None, None, "target", seen)
            limit = tolerance(self.scores)
            difference = float((scores.to(self.scores) - self.scores).abs().amax())
            if not difference <= limit:
                raise ForwardMismatchError(
                    f"the forward of {type(self.adapter.model).__name__} on the explained batch gives target scores "
                    f"{difference:.2g} away from the explained pass's (tolerance {limit:.2g}); perturbation methods "
                    "need the model's own forward to compute the explained function"
                )
            x = seen[0] if self.kind == "embeddings" else self.batch.explained_input
            if x is None or not x.is_floating_point():
                raise UnsupportedModelError(
                    f"no floating point input to perturb in {type(self.adapter.model).__name__}: expected images or a "
                    "model whose adapter names its token embeddings"
                )
            self._inputs = x.detach()
        return self._inputs

    def pad_token_id(self) -> int:
        """The padding token of a text model (``config.pad_token_id``)."""
        config = getattr(self.adapter.model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        pad = getattr(text, "pad_token_id", None)
        if self.kind != "embeddings" or not isinstance(pad, int):
            raise AttnxValueError(
                f"{type(self.adapter.model).__name__} has no padding token (config.pad_token_id) whose embedding "
                "could replace its inputs; use baseline='zeros'"
            )
        return pad

    def token_embeddings(self, token_id: int) -> torch.Tensor:
        """``(B, T, D)`` the embedding of ``token_id`` at every position, from the model's token embeddings."""
        x = self.inputs()
        ids = torch.full(tuple(x.shape[:2]), token_id, dtype=torch.long, device=x.device)
        with self.held(), torch.no_grad():
            return self.embeddings(ids).detach()

    def copies_per_chunk(self) -> int:
        """Copies of the batch one model call takes (one for a callable target)."""
        return 1 if self.callable_target else max(1, self.chunk_size // self.batch_size)

    # the forward -------------------------------------------------------------------------
    def __call__(self, inputs: torch.Tensor | None = None, *, copies: int | None = None,
                 key_factors: torch.Tensor | None = None, edit: Edit | None = None, score: str = "target") -> torch.Tensor:
        """``(M,)`` scores of ``M = copies · B`` rows, row ``r`` a copy of sample ``r % B``.

        Parameters
        ----------
        inputs:
            ``(M, ...)`` perturbed inputs shaped like :meth:`inputs`; ``None``: the explained ones.
        copies:
            The number of copies when ``inputs`` and ``key_factors`` are ``None``.
        key_factors, edit:
            ``(M, N)`` per-row factors handed with each self-attention's probabilities of those
            rows ``(m, H, N, N)`` to ``edit(probs, factors) -> probs``.
        score:
            ``"target"`` (``y_t``) or ``"log_probability"`` (log-softmax of the explained class or token).
        """
        B = self.batch_size
        rows = next((t.shape[0] for t in (inputs, key_factors) if t is not None), (copies or 1) * B)
        if rows % B:
            raise AttnxValueError(f"perturbed rows must be whole copies of the batch of {B} samples, got {rows}")
        if inputs is not None and tuple(inputs.shape[1:]) != tuple(self.inputs().shape[1:]):
            raise AttnxValueError(f"perturbed inputs must be shaped like {tuple(self.inputs().shape)} per sample, got {tuple(inputs.shape)}")
        if key_factors is not None and (edit is None or key_factors.shape != (rows, self.layout.num_tokens)):
            raise AttnxValueError(f"key_factors must be ({rows}, {self.layout.num_tokens}) and come with an edit function")
        step = self.copies_per_chunk() * B
        out = []
        with self.held():
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                part = None if inputs is None else inputs[start:stop]
                factors = None if key_factors is None else key_factors[start:stop]
                out.append(self.chunk((stop - start) // B, part, factors, edit, score))
        return torch.cat(out)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The model held as the explained pass holds it, for one or many forwards."""
        if self._held:
            yield
            return
        model = self.adapter.model
        with exclusive(model), eager_compiled(model), no_new_forward_hooks(model), \
                float32_execution(model, self.batch), evaluation_mode(model), plain_execution(model):
            self._held = True
            try:
                yield
            finally:
                self._held = False

    def chunk(self, copies: int, inputs: torch.Tensor | None, factors: torch.Tensor | None, edit: Edit | None,
              score: str, seen: list | None = None) -> torch.Tensor:
        """The scores of ``copies`` copies of the batch in one model call."""
        batch = self.tiled(copies)
        if inputs is not None and self.kind == "pixels":
            batch = batch.with_input(inputs.to(batch.explained_input.dtype))
        editor = None if factors is None else AttentionEditor(lambda p: edit(p, factors), self.layout.num_tokens, batch.batch_size)
        with contextlib.ExitStack() as stack:
            if self.rules is not None and inputs is not None and inputs.requires_grad:
                engine = stack.enter_context(LRPEngine(self.adapter.model, self.rules, strict=self.strict))
                engine.mark(inputs if self.kind == "embeddings" else batch.explained_input)
            if self.embeddings is not None and (inputs is not None or seen is not None):
                stack.enter_context(embeddings_output(self.embeddings, inputs, seen))
            if editor is not None:
                stack.enter_context(editor)
            output, logits = self.adapter.call(batch)
            if self.rules is not None and inputs is not None and inputs.requires_grad:
                engine.check_coverage()
        if editor is not None:
            editor.check()
        resolved = resolve(self.tiled_target(copies), output, logits, batch.layout, batch.batch_size)
        return self.score_of(resolved, score, copies)

    def tiled(self, copies: int) -> Batch:
        """The batch repeated ``copies`` times (sample-minor: row ``r`` is sample ``r % B``)."""
        if copies not in self._tiled:
            index = torch.arange(self.batch_size).repeat(copies)
            self._tiled[copies] = self.batch if copies == 1 else self.batch.select(index)
        return self._tiled[copies]

    def tiled_target(self, copies: int) -> Any:
        if self.classes is not None:
            return self.classes.repeat(copies)
        if isinstance(self.target, BoundContinuation):
            t = self.target
            return BoundContinuation(t.positions.repeat(copies, 1), t.ids.repeat(copies, 1), t.mask.repeat(copies, 1))
        return self.target  # a callable, on one copy

    def score_of(self, resolved: ResolvedTarget, score: str, copies: int) -> torch.Tensor:
        if score == "target":
            return resolved.scores
        if score != "log_probability":
            raise AttnxValueError(f"score must be 'target' or 'log_probability', got {score!r}")
        if isinstance(self.target, BoundContinuation):
            return resolved.scores  # a continuation's score is its log-probability
        if self.classes is None:
            raise AttnxValueError("a callable target has no log-probability; use score='target'")
        classes = self.classes.repeat(copies).to(resolved.logits.device)
        return resolved.logits.log_softmax(dim=-1).gather(1, classes[:, None]).squeeze(1)


@contextlib.contextmanager
def embeddings_output(module: nn.Module, replacement: torch.Tensor | None, seen: list | None) -> Iterator[None]:
    """The output of ``module`` replaced by ``replacement`` (same shape), and/or noted in ``seen``."""

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if seen is not None:
            seen.append(output)
        if replacement is None:
            return None
        if not isinstance(output, torch.Tensor) or output.shape != replacement.shape:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise AttnxValueError(f"perturbed token embeddings {tuple(replacement.shape)} do not match the model's {got}")
        return replacement.to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
