"""Adapters: token layouts (prefix tokens, grids in the model's own token order, any input size),
automatic ``interpolate_pos_encoding`` for Hugging Face ViTs, adapter registry."""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.adapters import TimmViTAdapter
from attnx.core.layout import Layout
from attnx.core.explanation import Explanation
from conftest import CASES, ids, max_abs_diff, run_model, timm_vit
from contracts import attention_layers, grab_layer_inputs

GRID_CASES = [CASES[n] for n in ("timm_vit", "timm_reg4", "timm_deit_distilled", "timm_avgpool",
                                 "timm_dynamic_40x56", "torchvision_vit", "hf_vit_sdpa_40x56",
                                 "hf_deit_teacher_eager")]


@pytest.mark.parametrize("case", GRID_CASES, ids=ids(GRID_CASES))
def test_grid_follows_the_models_token_order(case):
    """Changing the pixels of patch (r, c) changes exactly token prefix + r*w + c at the input of
    the first attention layer: the layout's row-major grid is the model's token order."""
    model = case.model(torch.float64)
    x = case.inputs(1, dtype=torch.float64)
    layers = attention_layers(case, model)[:1]
    layout = attnx.Explainer(model).capture(x).layout
    h, w = layout.grid
    H, W = case.image_size
    ph, pw = H // h, W // w
    assert (ph * h, pw * w) == (H, W)
    with torch.no_grad(), grab_layer_inputs(layers) as seen:
        run_model(case, model, x)
        for r, c in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 3)):
            y = x.clone()
            y[..., r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] += 1.0
            run_model(case, model, y)
    base = seen[0][0]
    for k, (r, c) in enumerate(((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 3))):
        changed = (seen[k + 1][0] - base).abs().amax(-1) > 1e-9
        assert changed.nonzero().flatten().tolist() == [layout.prefix_tokens + r * w + c]


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (56, 24), (16, 64), (8, 8)])
def test_timm_dynamic_img_size_any_size(size):
    case = CASES["timm_dynamic_40x56"]
    explainer = attnx.Explainer(case.model())
    x = torch.randn(2, 3, *size)
    for method in ("rollout", "grad_rollout"):
        e = explainer.explain(x, method=method)
        assert e.grid == (size[0] // 8, size[1] // 8)
        assert e.scores.shape == (2, (size[0] // 8) * (size[1] // 8))
        assert e.heatmap().shape == (2, *size)
        assert torch.isfinite(e.scores).all()


def test_timm_fixed_non_square_model():
    model = timm_vit(img_size=(24, 40))().eval()
    e = attnx.explain(model, torch.randn(2, 3, 24, 40), method="generic")
    assert e.grid == (3, 5) and e.heatmap().shape == (2, 24, 40)
    with pytest.raises(ValueError, match="expects 24x40 images, got 40x24"):
        attnx.explain(model, torch.randn(2, 3, 40, 24))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("size", [(40, 56), (48, 48), (16, 24)])
def test_hf_vit_at_a_non_default_size(impl, size):
    """interpolate_pos_encoding is passed automatically; the result is the model's own output
    with interpolated position embeddings."""
    case = CASES[f"hf_vit_{impl}"]
    model = case.model()
    x = torch.randn(2, 3, *size)
    with pytest.raises(ValueError, match="doesn't match model"):  # the model alone refuses it
        model(pixel_values=x)
    explainer = attnx.Explainer(model)
    assert explainer.adapter.prepare(x).kwargs.get("interpolate_pos_encoding") is True
    assert "interpolate_pos_encoding" not in explainer.adapter.prepare(torch.randn(1, 3, 32, 32)).kwargs
    captured = explainer.capture(x, gradients=True)
    with torch.no_grad():
        eager = model.__class__._from_config(model.config, attn_implementation="eager")
        eager.load_state_dict(model.state_dict())
        eager.eval()
        out = eager(pixel_values=x, interpolate_pos_encoding=True, output_attentions=True)
    assert max_abs_diff(captured.logits, out.logits) < 1e-5
    for a, b in zip(captured.attentions, out.attentions):
        assert max_abs_diff(a, b) < 1e-6
    e = explainer.explain(x, method="grad_rollout")
    assert e.grid == (size[0] // 8, size[1] // 8) and e.heatmap().shape == (2, *size)


def test_hf_pixel_values_dict():
    case = CASES["hf_vit_sdpa"]
    model = case.model()
    x = case.inputs(2)
    a = attnx.explain(model, {"pixel_values": x}, method="rollout")
    b = attnx.explain(model, x, method="rollout")
    assert torch.equal(a.scores, b.scores)
    with pytest.raises(ValueError, match="expected 'pixel_values'"):
        attnx.explain(model, {"images": x})


def test_timm_without_a_pooling_head_is_refused():
    """global_pool='' returns token features, not class logits: nothing to read."""
    model = timm_vit(global_pool="")().eval()
    with pytest.raises(attnx.errors.UnsupportedModelError, match=r"global_pool=''"):
        attnx.Explainer(model)


def test_heatmap_puts_a_hot_patch_where_it_is_in_the_image():
    """Geometry of the heat map on a non-square grid: patch (r, c) lands on rows r*ph.., cols c*pw.."""
    h, w, ph, pw = 5, 7, 8, 8
    for r, c in ((0, 0), (4, 6), (2, 3), (0, 6)):
        scores = torch.zeros(1, h * w)
        scores[0, r * w + c] = 1.0
        e = Explanation(scores=scores, grid=(h, w), targets=None, logits=torch.zeros(1, 2), method="x",
                        layout=Layout(1 + h * w, 1, 0, (h, w), (h * ph, w * pw)))
        heat = e.heatmap()
        assert heat.shape == (1, h * ph, w * pw)
        peak = heat[0] == 1
        rows, cols = peak.nonzero(as_tuple=True)
        assert rows.min() >= r * ph and rows.max() < (r + 1) * ph
        assert cols.min() >= c * pw and cols.max() < (c + 1) * pw
        assert e.patch_map()[0, r, c] == 1 and e.patch_map().sum() == 1
        # a constant map normalises to zeros, not NaN
        flat = Explanation(scores=torch.ones(1, h * w), grid=(h, w), targets=None, logits=torch.zeros(1, 2), method="x")
        assert torch.equal(flat.heatmap(size=(10, 14)), torch.zeros(1, 10, 14))


def test_register_adapter_first_takes_priority():
    from attnx import adapters
    from attnx.adapters import register_adapter

    calls = []

    class MyTimm(TimmViTAdapter):
        name = "my_timm"

        def prepare(self, inputs):
            calls.append(inputs.shape)
            return super().prepare(inputs)

    saved = adapters._REGISTRY  # register_adapter rebinds the module's registry
    try:
        register_adapter(MyTimm, first=True)
        assert attnx.adapters.adapter_names()[0] == "my_timm"
        case = CASES["timm_vit"]
        model, x = case.model(), case.inputs(2)
        explainer = attnx.Explainer(model)
        assert explainer.adapter.name == "my_timm"
        e = explainer.explain(x, method="rollout")
        # the explanation, and once per Explainer the readout check's pass (attnx.core.readout)
        assert calls == [x.shape, x.shape]
        assert torch.equal(e.scores, attnx.Explainer(model, adapter="timm_vit").explain(x).scores)
        with pytest.raises(TypeError, match="expected an Adapter subclass"):
            register_adapter(object)
    finally:
        adapters._REGISTRY = saved
    assert "my_timm" not in attnx.adapters.adapter_names()


def test_adapter_instance_can_be_passed():
    case = CASES["timm_vit"]
    model = case.model()
    adapter = TimmViTAdapter(model)
    assert attnx.Explainer(model, adapter=adapter).adapter is adapter
