"""Explainer: model + adapter -> Explanation. The public entry point, and the only place that runs
passes (:mod:`attnx.core.trace`) and builds :class:`~attnx.core.explanation.Explanation` objects."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, DualEncoderAdapter, InterceptAdapter, get_adapter
from ..errors import AttnxTypeError, AttnxValueError, ForwardMismatchError, NonFiniteOutputError
from ..lrp.registry import Registry, get_preset
from ..methods.registry import Method, Relevance, get_method
from . import memory_check
from .allocator import keep_heap_blocks
from .batch import check_input_dtype, check_on_real_device, check_token_ids, outside_inference_mode
from .degenerate import check_map
from .explanation import Explanation
from .forward_check import check_mode, input_signature, tolerance
from .image_text import ImageText, ImageTextExplanation, explain_pairs, tower_target
from .labels import class_names, multi_label
from .layer_fold import LayerFold
from .layout import Readout, to_scores
from .precision import check_precision
from .readout import ReadoutUsed, settle_readout
from .runtime import no_autocast, unwrap_model
from .structure import ModelStructure
from .sub_batches import check_sub_batch, fresh_pages_on_cpu, split, sub_batch_size
from .targets import Target, prepare_target
from .trace import run_trace
from .trace_types import FirstLayer, Needs, Trace

#: what a plain call records: the attention probabilities (a frozen value, shared safely)
ATTENTIONS = Needs(attentions=True)
#: the last layer only (the readout is measured there)
LAST_LAYER = FirstLayer(lambda options, layout, num_layers: num_layers - 1)

__all__ = ["Explainer", "explain"]


class Explainer:
    """Explains one model, holding its adapter for repeated calls.

    Parameters
    ----------
    model:
        A stock model: timm / torchvision / Hugging Face ViT or DeiT, a Hugging Face BERT-family
        sequence classifier, or any model whose attention runs through
        ``F.scaled_dot_product_attention`` or ``nn.MultiheadAttention`` or is written out
        (a softmax over the keys multiplied with the values, as DINO, DeiT and MAE write it);
        a dual encoder (CLIP, SigLIP, OpenCLIP: see :mod:`attnx.core.image_text`).
        ``torch.compile``, ``nn.DataParallel`` and ``DistributedDataParallel`` wrappers are
        explained on the module inside them (:func:`attnx.core.runtime.unwrap_model`).
    adapter:
        ``None`` to choose automatically, an adapter name (``"timm_vit"``, ``"timm_swin"``,
        ``"torchvision_vit"``, ``"hf"``, ``"hf_swin"``, ``"hf_decoder"``, ``"intercept"``) or an
        :class:`attnx.adapters.Adapter` instance.
    tokenizer:
        The tokenizer of a language model, for text targets (``target=" Paris"``: its first
        token) and text continuations (:class:`attnx.core.targets.Continuation`).
    check_forward:
        Whether to check that the explained forward is the model's own (:mod:`attnx.core.forward_check`):
        ``"once"`` (default) per adapter and input signature, costing one forward without
        gradients; ``"always"``; ``"never"``. When an automatically chosen family adapter fails
        the check, the ``intercept`` adapter (which keeps the model's own kernels) is tried; a
        model that fails both is refused with :class:`attnx.errors.ForwardMismatchError`.
    precision:
        What a float16 / bfloat16 model computes in (:mod:`attnx.core.precision`): ``"auto"``
        (default: its own dtype where the maps stay within the measured tolerance of float32,
        else float32), ``"model"`` (its own dtype, no second copy of the weights) or ``"float32"``.
        The maps are float32 either way and the model is left as found.

    Notes
    -----
    The explainer follows the model: when its modules or head settings change after the
    explainer was made (a block replaced, ``reset_classifier``), the adapter is made again.

    Examples
    --------
    >>> explainer = attnx.Explainer(model)
    >>> e = explainer(images, method="grad_rollout", target=[243, 282])
    >>> e.heatmap().shape  # (B, H, W)
    >>> lm = attnx.Explainer(gpt2, tokenizer=tok)
    >>> e = lm(tok(["The capital of France is"], return_tensors="pt"), method="generic")  # the next token
    """

    def __init__(
        self, model: nn.Module, adapter: str | Adapter | None = None, tokenizer: Any = None,
        check_forward: str | bool = "once", precision: str = "auto",
    ) -> None:
        self.model = unwrap_model(model)
        self.precision = check_precision(precision)  # torch.compile / DataParallel wrappers: the user's module
        self.adapter_choice = adapter
        self.tokenizer = tokenizer
        self.check_forward = check_mode(check_forward)
        self.structure: ModelStructure | None = None
        self.follow_model()

    def follow_model(self) -> None:
        """Make the adapter (again) when the model's modules or head settings changed since it was
        made; an adapter instance the user gave cannot be remade, so the call is refused then."""
        if self.structure is not None and self.structure.same_as(self.model):
            return
        if self.structure is not None and isinstance(self.adapter_choice, Adapter):
            raise AttnxValueError(
                f"the modules of {type(self.model).__name__} changed since this Explainer was made with the adapter "
                f"instance {type(self.adapter_choice).__name__}; make a new Explainer (or pass the adapter by name)"
            )
        self.adapter = get_adapter(self.model, self.adapter_choice)
        #: the labels of a classifier's outputs (string targets are class names); None for language models
        self.class_names = None if self.adapter.is_lm else class_names(self.model)
        self.multi_label = not self.adapter.is_lm and multi_label(self.model)
        self._readouts: dict = {}  # token layouts whose readout was measured (attnx.core.readout)
        #: input signatures whose explained forward was checked, and whether the output is an embedding
        self.checked: dict[tuple, bool] = {}
        self.structure = ModelStructure(self.model)

    def trace(
        self,
        inputs: Any,
        target: Target = None,
        needs: Needs = ATTENTIONS,
        preset: str | Registry | None = None,
        strict: bool = True,
        patch_size: int | None = None,
        first_layer: FirstLayer | None = None,
        fold: LayerFold | None = None,
        method: str | None = None,
    ) -> Trace:
        """One pass recording what ``needs`` asks for (attentions, ``dy_t/dA``, relevance), for
        users' own methods and checks; ``preset`` is the LRP rule registry of a relevance pass (a
        preset name or an :class:`attnx.lrp.Registry`, resolved here once), ``strict`` raises
        :class:`attnx.lrp.UncoveredOpError` when an op matches none of its rules, ``first_layer``
        the lowest layer the backward passes must reach (default: every layer), ``fold`` what a method keeps
        of each layer (:mod:`attnx.core.layer_fold`; default: the full attentions and gradients), ``method``
        the method the pass serves (its precision under ``precision="auto"``, :mod:`attnx.core.precision`)."""
        check_on_real_device(inputs, self.model)
        self.follow_model()
        # autograd is off under torch.inference_mode(): the pass runs outside it, on clones of
        # the inputs created under it (the user's tensors stay as they are)
        with torch.inference_mode(False):
            inputs = outside_inference_mode(inputs)
            registry = None if preset is None else get_preset(preset)
            target = prepare_target(target, self.tokenizer, self.class_names, not self.adapter.is_lm, self.model)
            if target is None and self.adapter.outputs_embedding:
                target = tower_target(self.adapter, needs)
            run = (inputs, target, needs, registry, strict, patch_size, first_layer, fold, method)
            try:
                trace, key = self.run(self.adapter, *run)
            except NonFiniteOutputError as error:
                trace, key = self.finite_elsewhere(run, error)
            if trace.model_forward is not None and not trace.model_forward.agrees(trace.logits):
                trace, key = self.keep_model_forward(trace, run)
            if trace.model_forward is not None:
                self.checked[key] = trace.model_forward.is_embedding
            return self.embedding_target(trace, key, target, needs)

    def run(self, adapter: Adapter, inputs: Any, target: Target, needs: Needs, registry: Registry | None,
            strict: bool, patch_size: int | None, first_layer: FirstLayer | None,
            fold: LayerFold | None = None, method: str | None = None) -> tuple[Trace, tuple]:
        """One pass with ``adapter``, checked against the model's forward when due; the trace and
        the input signature it was checked under."""
        batch = adapter.prepare(inputs)
        check_token_ids(batch, adapter.input_embeddings(), self.model)
        check_input_dtype(batch, self.model)
        key = (adapter.name, input_signature(batch))
        due = self.check_forward == "always" or (self.check_forward == "once" and key not in self.checked)
        trace = run_trace(adapter, batch, target, needs, registry, strict, patch_size, due, first_layer, fold,
                          self.precision, method)
        return trace, key

    def finite_elsewhere(self, run: tuple, error: NonFiniteOutputError) -> tuple[Trace, tuple]:
        """The explained output is not finite under the family adapter: when it was chosen
        automatically, explain through ``intercept`` (the model's own kernels; the family adapter
        may have switched to a kernel that gives NaN, e.g. Hugging Face's eager softmax in float32
        on a padded float64 batch); ``error`` stands otherwise, and that path's own when it is not
        finite either."""
        fallback = self.intercept_fallback()
        if fallback is None:
            raise error
        second = self.run(fallback, *run)
        self.adapter, self.checked = fallback, {}
        return second

    def intercept_fallback(self) -> InterceptAdapter | None:
        """``intercept`` with the family adapter's layout, when the family adapter was chosen
        automatically (a dual encoder's towers are its adapter's: image-text pairs need it)."""
        if self.adapter_choice is not None or isinstance(self.adapter, (InterceptAdapter, DualEncoderAdapter)):
            return None
        return InterceptAdapter(self.model, layout_from=self.adapter)

    def keep_model_forward(self, trace: Trace, run: tuple) -> tuple[Trace, tuple]:
        """The explained forward differs from the model's: explain through ``intercept`` (the
        model's own kernels, intercepted) when the family adapter was chosen automatically and
        that path agrees; else refuse."""
        tried = [self.adapter.name]
        differences = [trace.model_forward.difference(trace.logits)]
        fallback = self.intercept_fallback()
        if fallback is not None:
            second, key = self.run(fallback, *run)
            if second.model_forward.agrees(second.logits):
                self.adapter, self.checked = fallback, {}
                return second, key
            tried.append(fallback.name)
            differences.append(second.model_forward.difference(second.logits))
        raise ForwardMismatchError(
            f"the forward attnx explains differs from {type(self.model).__name__}'s own (largest logit difference "
            f"{', '.join(f'{d:.2g} with adapter {a!r}' for d, a in zip(differences, tried))}; tolerance "
            f"{tolerance(trace.model_forward.logits):.2g}): exposing its attention changes what it computes"
        )

    def embedding_target(self, trace: Trace, key: tuple, target: Target, needs: Needs) -> Trace:
        """A model whose output is an embedding has no predicted class: without a target, methods
        that read one are refused (naming the similarity targets), the others report no target."""
        if target is not None or not self.checked.get(key, False):
            return trace
        if needs.backward or needs.forward:
            raise AttnxValueError(
                f"{type(self.model).__name__} outputs an embedding, not class logits, so there is no predicted class "
                "to explain; pass a target on the embedding: attnx.similarity.cosine_to(reference_embedding) or "
                "attnx.similarity.embedding_norm"
            )
        trace.targets = None
        return trace

    def capture(self, inputs: Any, target: Target = None, gradients: bool = False) -> Trace:
        """Attentions (and their gradients) of one forward, for users' own methods."""
        return self.trace(inputs, target, Needs(attentions=True, gradients=gradients))

    def explain(
        self, inputs: Any, method: str = "rollout", target: Target = None, check_memory: bool = True,
        sub_batch: int | str | None = "auto", **options: Any
    ) -> Explanation | ImageTextExplanation:
        """Explain a batch.

        Parameters
        ----------
        inputs:
            An image batch ``(B, C, H, W)``, or the dict a Hugging Face tokenizer returns.
        method:
            A name from :func:`attnx.list_methods`.
        target:
            ``None`` (predicted class; for a language model the predicted next token), an int,
            ``B`` ints, a string (a language model's token, with the explainer's tokenizer), an
            :class:`attnx.core.targets.Continuation`, or a callable on the model output returning
            ``B`` scalars (see :mod:`attnx.core.targets`).
        **options:
            Options of the method (e.g. ``head_fusion``, ``discard_ratio``, ``start_layer``);
            ``attnx methods`` lists them. For a dual encoder (CLIP, SigLIP, OpenCLIP) also
            ``text=`` prompts (with the ``tokenizer`` of the explainer or ``attnx.explain``) and
            ``towers=("image", "text")``: the image-text pairs are explained and an
            :class:`attnx.core.image_text.ImageTextExplanation` returned (see :mod:`attnx.core.image_text`).
        check_memory:
            Refuse the call with :class:`attnx.errors.InsufficientMemoryError` before the pass when
            its estimated peak (:func:`attnx.estimate`) exceeds the free memory of the device;
            ``False`` skips the check.
        sub_batch:
            The most samples one pass takes: ``"auto"`` (default) splits a CPU batch whose block
            temporaries glibc would hand back to the kernel at every free into even shares whose
            temporaries it keeps, saving the time of faulting their pages in again at every layer
            (:mod:`attnx.core.sub_batches`);
            an ``int`` sets the share; ``None`` explains the batch whole. The maps are the same
            either way: a sample's explanation does not depend on the rest of its batch.
        """
        self.follow_model()
        if "text" in options:
            inputs = ImageText(inputs, options.pop("text"))
        if isinstance(inputs, ImageText):
            return explain_pairs(self, inputs, method, target, **options)
        if fresh_pages_on_cpu(self.model):
            keep_heap_blocks()
        size = sub_batch_size(self.model, inputs, check_sub_batch(sub_batch))
        shares = None if size is None else split(inputs, target, size)
        if shares is None:
            return self.explain_batch(inputs, method, target, check_memory, options)
        return Explanation.concatenate([
            self.explain_batch(part, method, part_target, check_memory and start == 0, dict(options), start)
            for start, part, part_target in shares
        ])

    def explain_batch(
        self, inputs: Any, method: str, target: Target, check_memory: bool, options: dict, first_sample: int = 0
    ) -> Explanation:
        """:meth:`explain` on one batch in one pass; ``first_sample``: its first sample's index in
        the user's batch (a sub-batch), for the messages."""
        spec = get_method(method)
        method_options, trace_options = spec.resolve(options)
        registry = self.registry_for(spec, trace_options)
        if check_memory:
            memory_check.check_memory(self.model, inputs, method, options, self.precision, registry)
        trace = self.trace(
            inputs, target, spec.needs, registry, trace_options.get("strict", True), trace_options.get("patch_size"),
            spec.first_layer_for(method_options), spec.fold_for(method_options),
            f"{method}:{registry.name}" if "preset" in trace_options else method,  # its precision: the measured table
        )
        readout, used = self.readout_for(trace, spec.needs, inputs, target)
        with no_autocast((trace.logits.device.type,)):  # the method's math in the trace's dtype
            result = spec.fn(trace, readout, **method_options)
        recorded = {k: v for k, v in options.items() if k != "preset"}
        if "preset" in trace_options:
            recorded["preset"] = registry.name
        explanation = self.package(result, trace, method, recorded, used, first_sample)
        explanation.class_names, explanation.multi_label = self.class_names, self.multi_label
        if spec.conserves is not None:  # what the method claims its relevance sums to
            relevance = result if isinstance(result, Relevance) else Relevance(tokens=result)
            explanation.claimed_total = spec.claimed_total(trace, relevance, {**method_options, **trace_options})
        return explanation

    __call__ = explain

    def readout_for(self, trace: Trace, needs: Needs, inputs: Any, target: Target) -> tuple[Readout, ReadoutUsed | None]:
        """The readout a method reads on ``trace``: the head's, declared by the adapter and checked
        against the target's gradient, or measured (:mod:`attnx.core.readout`); ``None`` as the used
        readout for methods that read no attention row (they start at the logits)."""
        if not (needs.attentions or needs.gradients or needs.attention_relevance):
            return Readout(trace.layout, trace.logits.shape[0], trace.logits.device), None
        last = Needs(attentions=True, gradients=True)
        if target is None and trace.targets is None:
            # an embedding model explained without a target: the rows its norm depends on are the
            # rows its output reads
            from .similarity import embedding_norm

            target = embedding_norm
        return settle_readout(trace, self.adapter, lambda: self.trace(inputs, target, last, first_layer=LAST_LAYER), self._readouts)

    @staticmethod
    def registry_for(spec: Method, trace_options: dict) -> Registry | None:
        """The LRP registry of a method's relevance pass: its ``preset`` option or its fixed rules;
        with ``libragrad=True``, LibraGrad's rules, which every pass (relevance or gradients) then
        takes its gradients through."""
        if trace_options.get("libragrad"):
            return get_preset("libragrad")
        if not spec.needs.relevance:
            return None
        if "preset" in trace_options:
            return get_preset(trace_options["preset"])
        if spec.needs.rules is not None:
            return spec.needs.rules()
        raise AttnxTypeError(f"method {spec.name!r} needs relevance but declares neither a preset option nor rules")

    @staticmethod
    def package(
        result: torch.Tensor | Relevance, trace: Trace, method: str, options: dict, readout: ReadoutUsed | None = None,
        first_sample: int = 0,
    ) -> Explanation:
        """The :class:`Explanation` of a method's result on ``trace``.

        Raises :class:`attnx.errors.NonFiniteMapError` when a sample's map has NaN or infinite
        values and warns with :class:`attnx.errors.DegenerateMapWarning` when it is constant or
        all zero over the real content tokens (:mod:`attnx.core.degenerate`).
        """
        if isinstance(result, torch.Tensor):
            result = Relevance(tokens=result)
        layout = trace.layout
        scores = result.scores if result.scores is not None else to_scores(result.tokens, layout)
        check_map(scores, result.pixels, trace, method, first_sample)
        ids = None
        if layout.grid is None and trace.batch is not None:  # the user's ids (not those with a continuation)
            ids = trace.batch.extra.get("input_ids", trace.batch.kwargs.get("input_ids"))
        return Explanation(
            scores=scores,
            grid=layout.grid,
            targets=trace.targets,
            logits=trace.logits,
            method=method,
            options={**options, **result.options},
            token_relevance=result.tokens,
            layout=layout,
            input_ids=ids,
            input_relevance=trace.input_relevance,
            pixel_relevance=result.pixels,
            coverage=trace.coverage,
            target_scores=trace.target_scores,
            explained_tokens=trace.explained_tokens,
            readout=readout,
        )


def explain(
    model: nn.Module, inputs: Any, method: str = "rollout", target: Target = None, tokenizer: Any = None,
    check_forward: str | bool = "once", check_memory: bool = True, precision: str = "auto",
    sub_batch: int | str | None = "auto", **options: Any
) -> Explanation | ImageTextExplanation:
    """Explain ``model`` on ``inputs`` with ``method``; see :meth:`Explainer.explain` (and
    :class:`Explainer` for ``check_forward`` and ``precision``)."""
    return Explainer(model, tokenizer=tokenizer, check_forward=check_forward, precision=precision).explain(
        inputs, method=method, target=target, check_memory=check_memory, sub_batch=sub_batch, **options
    )
