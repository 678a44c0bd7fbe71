"""The precision a half-precision model is explained in (:mod:`attnx.core.precision`).

1. ``precision="model"`` computes in the model's dtype with its own weights (no float32 copy is
   ever seen by its layers), gives float32 maps within the stated tolerance of the exact float32
   computation of the same weights, and leaves the model bit-exactly as found;
2. ``precision="float32"`` is exactly the float32 computation of the rounded weights, with the
   model's own weights: each op casts what it reads, the layers never hold a float32 copy, and
   nothing of the call outlives it;
3. ``"auto"`` runs the methods measured within tolerance in the model's dtype and the others in
   float32 (float16 relevance overflows: Transformer Attribution is non-finite in float16);
4. a bad value is refused with one clear line.
"""
from __future__ import annotations

import copy
import warnings
import weakref

import pytest
import torch

import attnx
from attnx.core.precision import OWN_PRECISION, TOLERANCE
from attnx.errors import AttnxValueError
from conftest import CASES
from contracts import assert_unchanged, snapshot
from decoder_models import DecoderCase


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation (Pearson of the ranks), written out."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a - b).norm(dim=1) / b.norm(dim=1)


@pytest.fixture(scope="module")
def vision_bf16():
    from attnx import zoo

    bundle = zoo.vision_model(dtype=torch.bfloat16)
    x = bundle.preprocess(zoo.scenes(4).images).to(torch.bfloat16)
    return bundle.model, x


class LinearDtypes:
    """The dtypes of the weights the model's linear layers hold and of the outputs they compute
    during a call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights: set[torch.dtype] = set()
        self.outputs: set[torch.dtype] = set()
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def hook(self, module, args, output) -> None:
        self.weights.add(module.weight.dtype)
        self.outputs.add(output.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def linear_dtypes_during(model, call) -> LinearDtypes:
    watch = LinearDtypes(model)
    try:
        call()
    finally:
        watch.remove()
    return watch


@pytest.mark.parametrize("method", ["rollout", "generic", "grad_rollout", "lrp"])
def test_model_precision_computes_in_bfloat16_within_tolerance_of_float32(vision_bf16, method):
    model, x = vision_bf16
    storage = {n: (t.data_ptr(), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}
    before = snapshot(model)
    box = {}
    seen = linear_dtypes_during(model, lambda: box.update(e=attnx.explain(model, x, method=method, precision="model")))
    assert seen.weights == seen.outputs == {torch.bfloat16}, "a layer computed in float32"
    low = box["e"].scores
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # the exact float32 computation of the same (rounded) weights, on an independent float32 copy
    exact = attnx.explain(copy.deepcopy(model).float(), x.float(), method=method).scores
    assert spearman(low, exact).min() >= TOLERANCE["spearman"]
    assert relative_l2(low, exact).max() <= TOLERANCE["relative_l2"]
    assert not torch.equal(low, exact)  # computed in bfloat16 indeed
    assert_unchanged(before, model)
    for n, t in model.state_dict(keep_vars=True).items():
        assert t.dtype == torch.bfloat16 and t.data_ptr() == storage[n][0] and torch.equal(t.detach(), storage[n][1]), n


@pytest.mark.parametrize("method", ["generic", "transformer_attribution", "partial_lrp", "legrad"])
def test_float32_precision_is_the_float32_computation_of_the_rounded_weights(vision_bf16, method):
    """Computed in float32 on the model's own bfloat16 weights (the layers hold them as stored):
    equal to explaining an independent float32 copy, the model as found, and the call's autograd
    graph and casts gone once it returns (a saved tensor kept with its own node would hold them)."""
    from attnx.core import runtime

    model, x = vision_bf16
    before = snapshot(model)
    storage = {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()}
    computes = []
    original = runtime.Float32Compute.__init__

    def watch(self, *args):
        original(self, *args)
        computes.append(weakref.ref(self))

    box = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime.Float32Compute, "__init__", watch)
        seen = linear_dtypes_during(model, lambda: box.update(e=attnx.explain(model, x, method=method, precision="float32")))
    assert seen.weights == {torch.bfloat16} and seen.outputs == {torch.float32}
    exact = attnx.explain(copy.deepcopy(model).float(), x.float(), method=method).scores
    assert (box["e"].scores - exact).abs().max() <= 1e-6 * exact.abs().max()
    assert_unchanged(before, model)
    assert all(t.dtype == torch.bfloat16 and t.data_ptr() == storage[n] for n, t in model.state_dict(keep_vars=True).items())
    assert computes and all(ref() is None for ref in computes), "the call's casts outlived it"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("method, preset", [("generic", None), ("transformer_attribution", None), ("lrp", "attnlrp"),
                                            ("lrp", "chefer2021"), ("gradient_x_input", None), ("legrad", None)])
def test_auto_precision_follows_the_measured_table(dtype, method, preset):
    case = CASES["hf_bert_sdpa"]
    model = case.model().to(dtype)
    x = case.inputs(2, lengths=[9, 5])
    options = {"preset": preset} if preset else {}
    key = method if preset is None else f"{method}:{preset}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate maps of a random tiny model are not the point
        seen = linear_dtypes_during(model, lambda: attnx.explain(model, x, method=method, **options))
    assert seen.weights == {dtype} and seen.outputs == {dtype if key in OWN_PRECISION[dtype] else torch.float32}


def test_float16_relevance_overflows_where_auto_keeps_float32(vision_bf16):
    """The reason float16 keeps float32 for Transformer Attribution: in float16 it is not finite."""
    model, x = vision_bf16
    half = copy.deepcopy(model).half()
    assert "transformer_attribution" not in OWN_PRECISION[torch.float16]
    with pytest.raises(attnx.errors.NonFiniteMapError):
        attnx.explain(half, x.half(), method="transformer_attribution", precision="model")
    e = attnx.explain(half, x.half(), method="transformer_attribution")  # auto: float32
    assert torch.isfinite(e.scores).all()


def test_llama_in_its_own_precision_leaves_it_as_found():
    case = DecoderCase("llama", "lm", "sdpa")
    model = case.model().to(torch.bfloat16)
    x = case.inputs(batch=2)
    before = snapshot(model)
    exact_e = attnx.explain(copy.deepcopy(model).float(), x, method="generic")
    exact = exact_e.scores
    # the same targets: a random tiny model's top logits can swap order in bfloat16
    e = attnx.explain(model, x, method="generic", precision="model", target=exact_e.targets.tolist())
    assert e.scores.dtype == torch.float32 and torch.isfinite(e.scores).all()
    assert relative_l2(e.scores, exact).max() <= TOLERANCE["relative_l2"]
    assert_unchanged(before, model)


def test_a_bad_precision_is_refused():
    model = CASES["timm_vit"].model()
    with pytest.raises(AttnxValueError, match="precision must be one of 'auto', 'float32', 'model'"):
        attnx.Explainer(model, precision="half")


@pytest.mark.parametrize("method, preset", [("transformer_attribution", None), ("partial_lrp", None),
                                            ("lrp", "chefer2021"), ("legrad", None), ("gradient_x_input", None)])
def test_float32_precision_on_a_decoder_is_the_float32_computation(method, preset):
    """A bfloat16 Llama with padding, its head's rule on the target rows: the float32 computation
    of the rounded weights, without a float32 copy of them."""
    case = DecoderCase("llama", "lm", "sdpa")
    model = case.model().to(torch.bfloat16)
    x = case.inputs(batch=2)
    options = {"preset": preset} if preset else {}
    before = snapshot(model)
    exact = attnx.explain(copy.deepcopy(model).float(), x, method=method, **options)
    box = {}
    seen = linear_dtypes_during(model, lambda: box.update(e=attnx.explain(
        model, x, method=method, precision="float32", target=exact.targets.tolist(), **options)))
    assert seen.weights == {torch.bfloat16} and seen.outputs == {torch.float32}
    assert (box["e"].scores - exact.scores).abs().max() <= 1e-6 * exact.scores.abs().max()
    assert_unchanged(before, model)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_an_offloaded_half_precision_model_is_computed_in_float32(offload, tmp_path):
    """accelerate brings each layer's bfloat16 weights in at every call; the methods computed in
    float32 cast them as their ops read them, as for a model in memory."""
    accelerate = pytest.importorskip("accelerate")
    case = DecoderCase("llama", "lm", "sdpa")
    model = case.model().to(torch.bfloat16)
    x = case.inputs(batch=2)
    exact = attnx.explain(copy.deepcopy(model).float(), x, method="transformer_attribution")
    if offload == "cpu":
        accelerate.cpu_offload(model, execution_device="cpu")
    else:
        accelerate.disk_offload(model, str(tmp_path), execution_device="cpu")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    got = attnx.explain(model, x, method="transformer_attribution", target=exact.targets.tolist())
    assert (got.scores - exact.scores).abs().max() <= 1e-6 * exact.scores.abs().max()
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "meta")}  # as found
