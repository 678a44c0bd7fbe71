"""Models from files, loaded as data (attnx.zoo.files): a state dict with its architecture and its
preprocessing, a Hugging Face folder as the architecture, whole pickled models only when trusted,
a malicious pickle never executed, missing or mismatching files one clear line.

Each test asserts the exact behaviour: the key parts of the message, the exit status, the file
written (or the marker file a malicious pickle would create, not created).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from attnx import zoo
from attnx.errors import AttnxError, AttnxValueError
from cli_runner import run
from conftest import CASES, max_abs_diff

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


def png(path: Path, size=(80, 60), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def picture(path: Path) -> np.ndarray:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG"
        a = np.asarray(img.convert("RGB")).astype(np.float64)
    assert a.shape[0] > 100 and a.shape[1] > 100 and a.std() > 10
    return a


@pytest.fixture(scope="module")
def tiny_timm():
    """``timm``'s own small test architecture ``test_vit`` (160 px, 0.3 M parameters), 3 classes."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=3).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_with_arch_and_preprocessing_options(capsys, tmp_path, tiny_timm, suffix):
    """The README's ``--model my_model.pt --arch ...`` example: a state dict, its timm
    architecture and the preprocessing options give the saved model and a picture."""
    path = tmp_path / f"my_model{suffix}"
    if suffix == ".pt":
        torch.save(tiny_timm.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(tiny_timm.state_dict(), str(path))
    image, out = png(tmp_path / "photo.png"), tmp_path / "map.png"
    status, stdout, err = run(capsys, "explain", str(image), "--model", str(path), "--arch", "test_vit",
                              "--mean", *map(str, MEAN), "--std", *map(str, STD), "--size", "96", "128",
                              "--method", "rollout", "--out", str(out), "--quiet")
    assert status == 0, err
    assert f"wrote {out}" in stdout
    picture(out)
    # the model built is the saved one, fed as the options say
    loaded = zoo.load(path, arch="test_vit", mean=MEAN, std=STD, size=(96, 128))
    assert loaded.model.num_classes == 3 and not loaded.model.training
    for k, v in tiny_timm.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    with Image.open(image) as img:
        x = loaded.preprocess(img)
        ref = np.asarray(img.convert("RGB").resize((128, 96)), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert x.shape == (3, 96, 128) and max_abs_diff(x, ref) < 1e-6


def test_state_dict_uses_the_architectures_own_preprocessing(tmp_path, tiny_timm):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": tiny_timm.state_dict(), "epoch": 3}, path)  # a training script's checkpoint
    loaded = zoo.load(path, arch="test_vit")
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)  # timm's pretrained_cfg of test_vit
    assert loaded.preprocess(Image.new("RGB", (50, 70))).shape == (3, 160, 160)


def test_hugging_face_folder_as_arch(tmp_path):
    model = CASES["hf_vit_sdpa"].model()
    folder = tmp_path / "vit"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), tmp_path / "vit.bin")
    with pytest.raises(AttnxValueError, match=r"\(mean, std missing\): give --mean --std \(Python: mean=, std=\)"):
        zoo.files.require_preprocessing(zoo.load(tmp_path / "vit.bin", arch=str(folder)))
    loaded = zoo.load(tmp_path / "vit.bin", arch=str(folder), mean=MEAN, std=STD)
    assert loaded.class_names == [model.config.id2label[i] for i in range(7)]
    x = CASES["hf_vit_sdpa"].inputs()
    assert loaded.preprocess(Image.new("RGB", (40, 40))).shape == (3, 32, 32)  # config.image_size
    assert torch.equal(loaded.model(pixel_values=x).logits, model(pixel_values=x).logits)
    # the folder's own image processor config, when there is one
    from transformers import ViTImageProcessor

    ViTImageProcessor(image_mean=list(STD), image_std=list(MEAN), size={"height": 24, "width": 40}).save_pretrained(folder)
    own = zoo.load(tmp_path / "vit.bin", arch=str(folder))
    assert own.mean == STD and own.std == MEAN and own.preprocess(Image.new("RGB", (9, 9))).shape == (3, 24, 40)
    given = zoo.load(tmp_path / "vit.bin", arch=str(folder), mean=MEAN, std=STD, size=32)  # options win
    assert given.mean == MEAN and given.preprocess(Image.new("RGB", (9, 9))).shape == (3, 32, 32)


def test_save_pretrained_folder_and_its_weights_file(tmp_path):
    """A folder written by ``save_pretrained`` (keys in the file's layout, renamed by transformers
    when loaded) read as a folder and as ``model.safetensors`` with ``arch=`` the folder: the same
    weights, the given preprocessing used although the folder has no image processor."""
    model = CASES["hf_vit_sdpa"].model()
    folder = tmp_path / "my_hf_vit"
    model.save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    x = CASES["hf_vit_sdpa"].inputs()
    for loaded in (zoo.load(folder / "model.safetensors", arch=f"{folder}/", mean=MEAN, std=STD),
                   zoo.load(str(folder), mean=MEAN, std=STD)):
        assert torch.equal(loaded.model(pixel_values=x).logits, model(pixel_values=x).logits)
        assert loaded.mean == MEAN and loaded.std == STD
        assert loaded.preprocess(Image.new("RGB", (40, 40))).shape == (3, 32, 32)  # config.image_size
    # without mean / std: no traceback from the missing image processor, one line naming the options
    bare = zoo.load(str(folder))
    with pytest.raises(AttnxValueError, match=r"\(mean, std missing\): give --mean --std"):
        zoo.files.require_preprocessing(bare)


def test_weights_file_that_does_not_fit_a_hugging_face_folder(tmp_path):
    from safetensors.torch import load_file, save_file

    model = CASES["hf_vit_sdpa"].model()
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("classifier")}, tmp_path / "partial.safetensors")
    with pytest.raises(AttnxValueError, match=r"does not fit --arch .*: keys 2 missing \(classifier.bias, classifier.weight\)$"):
        zoo.load(tmp_path / "partial.safetensors", arch=str(folder))
    state["classifier.bias"] = torch.zeros(state["classifier.bias"].numel() + 2)
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(AttnxValueError, match=r"does not fit --arch .*: keys 1 of another shape \(classifier.bias\)$"):
        zoo.load(tmp_path / "shape.safetensors", arch=str(folder))


def test_whole_pickled_model_needs_trust_pickle(capsys, tmp_path):
    model = CASES["timm_vit"].model()  # built directly: no pretrained_cfg, so no preprocessing of its own
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    image, out = png(tmp_path / "photo.png"), tmp_path / "whole.png"
    status, _, err = run(capsys, "explain", str(image), "--model", str(path), "--out", str(out))
    assert status == 2 and not out.exists()
    line = err.strip()
    assert "\n" not in line and "needs unpickling of Python objects (" in line and "timm." in line
    assert "save a state dict" in line and "--trust-pickle" in line
    # trusted: a warning naming the risk, then the preprocessing the options give
    with pytest.warns(UserWarning, match="can execute arbitrary code"):
        status, _, err = run(capsys, "explain", str(image), "--model", str(path), "--trust-pickle", "--out", str(out))
    # the size is the one the model is built for (patch_embed.img_size); mean and std are unknown
    assert status == 2 and err.strip() == ("attnx: error: no preprocessing is known for whole.pt (mean, std missing): "
                                           "give --mean --std (Python: mean=, std=)")
    with pytest.warns(UserWarning, match="trust_pickle=True"):
        status, stdout, err = run(capsys, "explain", str(image), "--model", str(path), "--trust-pickle", "--mean",
                                  *map(str, MEAN), "--std", *map(str, STD), "--size", "32", "--method", "rollout",
                                  "--out", str(out), "--quiet")
    assert status == 0, err
    picture(out)
    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = zoo.load(path, trust_pickle=True, mean=MEAN, std=STD, size=32)
    x = CASES["timm_vit"].inputs()
    assert torch.equal(loaded.model(x), model(x))
    with pytest.warns(UserWarning), pytest.raises(AttnxValueError, match="holds a whole VisionTransformer, not a state dict"):
        zoo.load(path, trust_pickle=True, arch="test_vit")


class Payload:
    """A pickle that creates a file when it is unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_not_executed(capsys, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    if writer == "torch.save":
        torch.save({"weight": torch.zeros(2), "x": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)
    image = png(tmp_path / "photo.png")
    status, _, err = run(capsys, "explain", str(image), "--model", str(path), "--arch", "test_vit")
    assert status == 2 and "needs unpickling" in err and "--trust-pickle" in err
    with pytest.raises(AttnxValueError, match="trust_pickle=True"):
        zoo.load(path)
    assert not marker.exists()
    # the payload is live: the opt-in does run it (and then finds no model in the file)
    with pytest.warns(UserWarning, match="arbitrary code"), pytest.raises(AttnxError, match="expected a state dict|not a file"):
        zoo.load(path, trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("spec", ["missing.pt", "sub/missing.pt", "./missing.safetensors"])
def test_missing_model_file(capsys, tmp_path, spec):
    image = png(tmp_path / "photo.png")
    status, _, err = run(capsys, "explain", str(image), "--model", spec)
    assert status == 2 and err.strip() == f"attnx: error: no such model file: {spec}"
    assert "Repo id" not in err
    with pytest.raises(AttnxValueError, match="no such model file"):
        zoo.load(spec)


def test_state_dict_without_arch_or_with_the_wrong_one(tmp_path, tiny_timm):
    path = tmp_path / "sd.pt"
    torch.save(tiny_timm.state_dict(), path)
    with pytest.raises(AttnxValueError, match=r"is a state dict \(weights only\): give its architecture with --arch"):
        zoo.load(path)
    with pytest.raises(AttnxValueError, match=r"does not fit --arch 'vit_tiny_patch16_224': keys \d+ missing .*of another shape"):
        zoo.load(path, arch="vit_tiny_patch16_224")
    with pytest.raises(AttnxValueError, match=r"'test_vt' is not a timm architecture.*did you mean test_vit"):
        zoo.load(path, arch="test_vt")


def test_arch_only_for_model_files(capsys):
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--arch", "test_vit", "--quiet")
    assert status == 2 and "--arch and --trust-pickle apply to model files" in err
