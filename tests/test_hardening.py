"""Hardening: model files are loaded as data, bad input gets one clear line, and the command line
keeps its files when stdout goes away.

Each test asserts the exact behaviour: the key parts of the message, the exit status, the file
written (or the marker file a malicious pickle would create, not created).
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image

import attnx
from attnx import zoo
from attnx.errors import AttnxError, AttnxTypeError, AttnxValueError
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


# ------------------------------------------------------------------------------------------------
# 1. model files are data
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# 2. clear messages
# ------------------------------------------------------------------------------------------------
def test_not_an_image_file(capsys, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    status, _, err = run(capsys, "explain", str(fake), "--out", str(tmp_path / "x.png"))
    assert status == 2
    assert err.strip().startswith(f"attnx: error: {fake} is not an image file PIL can read (expected PNG, JPEG, ...)")
    assert "Traceback" not in err and "\n" not in err.strip()


@pytest.mark.parametrize("target", ["file", "/dev/null"])
def test_out_naming_an_existing_file(capsys, tmp_path, target):
    out = tmp_path / "notes" if target == "file" else Path("/dev/null")
    if target == "file":
        out.write_text("keep me")
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--out", str(out), "--quiet")
    assert status == 2
    assert err.strip() == (f"attnx: error: --out {out} is an existing file, not a folder; give a folder or a file name "
                           "ending in .png or .html")
    if target == "file":
        assert out.read_text() == "keep me"
    status, _, err = run(capsys, "explain", "--text", "fine", "--out", str(out))
    assert status == 2 and "is an existing file, not a folder" in err


def test_out_under_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--out", str(tmp_path / "f" / "x.png"), "--quiet")
    assert status == 2 and f"{tmp_path / 'f'} is a file, expected a folder there" in err


def test_string_target_on_a_classifier_without_labels():
    model, x = CASES["timm_vit"].model(), CASES["timm_vit"].inputs()
    with pytest.raises(AttnxValueError) as info:
        attnx.explain(model, x, target="cat")
    msg = str(info.value)
    assert "target 'cat' is a string" in msg and "classifier without class names" in msg
    assert "need a language model" in msg and "model with labels" in msg and "\n" not in msg


def test_string_target_through_the_models_labels():
    model, x = CASES["hf_vit_sdpa"].model(), CASES["hf_vit_sdpa"].inputs()
    model.config.id2label = {i: f"garment {i}" for i in range(7)}
    by_name = attnx.explain(model, x, method="generic", target="garment 3")
    by_index = attnx.explain(model, x, method="generic", target=3)
    assert by_name.targets.tolist() == [3, 3] and torch.equal(by_name.scores, by_index.scores)
    assert attnx.explain(model, x, method="rollout", target=["garment 1", "Garment_5"]).targets.tolist() == [1, 5]
    with pytest.raises(AttnxValueError, match=r"'garmnet 3' is not a class name of ViTForImageClassification "
                                              r"\(7 classes: 'garment 0', .*\); did you mean 'garment 3'"):
        attnx.explain(model, x, target="garmnet 3")


def test_string_target_on_the_embedded_vision_model():
    vit = zoo.vision_model()
    x = vit.preprocess(zoo.scenes(2).images)
    assert attnx.explain(vit.model, x, method="rollout", target="coat").targets.tolist() == [4, 4]
    with pytest.raises(AttnxValueError, match=r"did you mean 'Coat'"):
        attnx.explain(vit.model, x, target="Cot")


def test_timm_imagenet_names():
    import timm

    model = timm.create_model("test_vit", pretrained=False, num_classes=1000).eval()
    from attnx.core.labels import class_names

    names = class_names(model)
    assert len(names) == 1000 and names[281] == "tabby, tabby cat"
    assert attnx.core.labels.class_index("Tabby cat", names) == 281


def test_meta_device_inputs():
    model = CASES["timm_vit"].model()
    with pytest.raises(AttnxValueError, match=r"^the inputs are on the meta device \(shapes without values\)"):
        attnx.explain(model, torch.empty(2, 3, 32, 32, device="meta"))
    text = CASES["hf_bert_sdpa"]
    meta_ids = {k: v.to("meta") for k, v in text.inputs().items()}
    with pytest.raises(AttnxValueError, match="meta device"):
        attnx.explain(text.model(), meta_ids)
    with pytest.raises(AttnxValueError, match=r"model's weights are on the meta device \(not loaded\)"):
        attnx.explain(CASES["timm_vit"].model().to("meta"), CASES["timm_vit"].inputs())


@pytest.mark.parametrize("method", ["lrp", "generic", "transformer_attribution", "grad_rollout"])
def test_gradient_methods_under_inference_mode(method):
    """Under ``torch.inference_mode()`` (and on inputs created under it) the explanation is the
    one of a plain call; the user's inference tensor is left as it is."""
    model, x = CASES["timm_vit"].model(), CASES["timm_vit"].inputs()
    plain = attnx.explain(model, x, method=method)
    with torch.inference_mode():
        inside = attnx.explain(model, x, method=method)
        x_inf = x.clone()
    on_inference_tensor = attnx.explain(model, x_inf, method=method)
    assert max_abs_diff(inside.scores, plain.scores) == 0
    assert max_abs_diff(on_inference_tensor.scores, plain.scores) == 0
    assert x_inf.is_inference() and not x_inf.requires_grad
    text = CASES["hf_bert_sdpa"]
    tmodel = text.model()
    with torch.inference_mode():
        ids = {k: v.clone() for k, v in text.inputs().items()}
        e = attnx.explain(tmodel, ids, method=method)
    assert max_abs_diff(e.scores, attnx.explain(tmodel, text.inputs(), method=method).scores) == 0


def test_discard_ratio_as_a_string(capsys):
    model, x = CASES["timm_vit"].model(), CASES["timm_vit"].inputs()
    with pytest.raises(AttnxTypeError) as info:
        attnx.explain(model, x, method="rollout", discard_ratio="0.5")
    assert str(info.value) == "discard_ratio: expected a number in [0, 1), got '0.5' (a str)"
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--option", "discard_ratio=abc")
    assert status == 2 and err.strip() == "attnx: error: discard_ratio: expected a number in [0, 1), got 'abc'"


def decoder(name: str = "gpt2"):
    from decoder_models import DecoderCase

    case = DecoderCase(name, "lm", "eager")
    return case.model(), case.inputs()


@pytest.mark.parametrize("bad", [60, 1000, -1])
@pytest.mark.parametrize("case", ["hf_bert_sdpa", "hf_distilbert_eager", "gpt2"])
def test_token_ids_outside_the_vocabulary(case, bad):
    model, inputs = decoder() if case == "gpt2" else (CASES[case].model(), CASES[case].inputs())
    inputs = dict(inputs)
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][1, 2] = bad
    with pytest.raises(AttnxValueError) as info:
        attnx.explain(model, inputs, method="rollout")
    assert str(info.value).startswith(f"token id {bad} (sample 1, position 2) is outside the model's vocabulary of "
                                      "60 tokens (0..59)")


@pytest.mark.parametrize("case, limit", [("hf_bert_sdpa", 32), ("hf_roberta_eager", 32), ("hf_distilbert_eager", 32),
                                         ("gpt2", 64)])
def test_text_longer_than_the_position_embeddings(case, limit):
    model = decoder()[0] if case == "gpt2" else CASES[case].model()
    n = limit + 3
    ids = torch.randint(3, 60, (1, n))
    with pytest.raises(AttnxValueError) as info:
        attnx.explain(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, method="rollout")
    assert str(info.value) == (f"{n} tokens, the model takes at most {limit}; truncate with "
                               f"tokenizer(..., truncation=True, max_length={limit})")
    ids = ids[:, :limit]  # the longest text it takes is explained
    e = attnx.explain(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, method="rollout")
    assert e.scores.shape == (1, limit)


def test_misspelt_method_names_the_closest(capsys):
    model, x = CASES["timm_vit"].model(), CASES["timm_vit"].inputs()
    with pytest.raises(AttnxValueError, match=r"unknown method 'gradrollout'.*\(did you mean 'grad_rollout'\?\)"):
        attnx.explain(model, x, method="gradrollout")
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "transformer_atribution")
    assert status == 2 and "(did you mean 'transformer_attribution'?)" in err and "\n" not in err.strip()
    with pytest.raises(AttnxTypeError, match=r"unknown option\(s\) \['head_fushion'\].*did you mean 'head_fusion'"):
        attnx.explain(model, x, method="rollout", head_fushion="max")


# ------------------------------------------------------------------------------------------------
# 3. the command line: stdout that goes away, --num-scenes
# ------------------------------------------------------------------------------------------------
class ClosedPipe:
    """A stdout whose reader went away; it records whether the page was complete at the first write."""

    def __init__(self, page: Path) -> None:
        self.page, self.complete_at_first_write, self.writes = page, None, 0

    def write(self, text: str) -> int:
        if self.complete_at_first_write is None:
            self.complete_at_first_write = self.page.is_file() and self.page.read_text().rstrip().endswith("</html>")
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return False


def test_closed_stdout_keeps_the_page(monkeypatch, tmp_path):
    page = tmp_path / "r.html"
    pipe = ClosedPipe(page)
    monkeypatch.setattr(sys, "stdout", pipe)
    status = attnx.cli.main(["explain", "--text", "a fine film", "--text", "dull", "--model", "default-lm",
                             "--method", "rollout,generic", "--out", str(page), "--quiet"])
    monkeypatch.undo()
    assert status == 0
    assert pipe.complete_at_first_write is True and pipe.writes >= 1
    assert page.read_text().count('class="explained"') == 4  # two methods x two prompts


@pytest.mark.subprocess
def test_explain_piped_into_head(tmp_path):
    """``attnx explain ... --out r.html | head -1``: the page is complete, no traceback."""
    exe = Path(sys.executable).with_name("attnx")
    exe = str(exe) if exe.is_file() else shutil.which("attnx")
    if exe is None:
        pytest.skip("the attnx console script is not installed (pip install -e .)")
    page = tmp_path / "r.html"
    texts = " ".join(f"--text 'prompt number {i} is'" for i in range(6))
    proc = subprocess.run(f"'{exe}' explain {texts} --model default-lm --method all --out '{page}' --quiet | head -1",
                          shell=True, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg"))
    assert proc.returncode == 0 and proc.stdout.strip() == "[raw_attention]"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert page.read_text().rstrip().endswith("</html>")
    assert page.read_text().count('class="explained"') == 6 * len(attnx.list_methods())


@pytest.mark.parametrize("n", ["0", "-1", "97", "1000"])
def test_num_scenes_out_of_range(capsys, tmp_path, n):
    out = tmp_path / "x.png"
    status, _, err = run(capsys, "explain", "--num-scenes", n, "--out", str(out), "--quiet")
    assert status == 2
    assert err.strip() == f"attnx: error: --num-scenes must be between 1 and 96 (the shipped held-out scenes), got {n}"
    assert not out.exists()


def test_scenes_count_in_python():
    assert zoo.vision.num_scenes() == 96 and len(zoo.scenes(96)) == 96
    for n in (0, -3, 97):
        with pytest.raises(AttnxValueError, match=rf"between 1 and 96 \(the shipped held-out scenes\), got {n}"):
            zoo.scenes(n)

