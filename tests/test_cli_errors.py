"""The ``attnx`` command's one error path and its cheap start.

Every user mistake is one line ``attnx: error: ...`` with exit status 2, found before a model is
loaded when it can be (``--out`` included); ``attnx --help`` imports no torch; ``--adapter``
chooses the adapter; a whole pickled Hugging Face model explains in a new process; a user's photo
explained with the embedded garment model is said so.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from attnx import zoo
from cli_runner import run
from conftest import CASES

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")


def png(path: Path, size=(40, 40)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def one_error_line(status: int, err: str) -> str:
    line = err.strip()
    assert status == 2, err
    assert "\n" not in line and "Traceback" not in err and line.startswith("attnx: error: "), err
    return line


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command loads a model: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(zoo, "load", refuse)


def test_the_cli_raises_no_system_exit():
    """One error path: no module of the command raises SystemExit (it would exit 1, untyped)."""
    for path in sorted((ROOT / "attnx" / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        raised = [ast.unparse(n.exc) for n in ast.walk(tree) if isinstance(n, ast.Raise) and n.exc is not None]
        assert not [r for r in raised if "SystemExit" in r], (path.name, raised)


@pytest.mark.parametrize("argv, message", [
    (["explain", "--option", "novalue", "--num-scenes", "1"], "--option expects key=value, got 'novalue'"),
    (["evaluate", "--merge", "/no/such/folder"], "no such folder: /no/such/folder"),
    (["evaluate", "--task", "all", "--data", "x.csv"], "--task all evaluates the embedded models"),
    (["evaluate", "--shard", "0/2", "--merge", "x"], "give --shard (evaluate one shard) or --merge"),
    (["evaluate", "--model", "vit_tiny_patch16_224"], "the shipped scenes are for the embedded model"),
    (["explain", "--model", "default-clip", "--text", "a bag", "--target", "1"], "a dual encoder explains every image"),
])
def test_user_mistakes_are_one_line_exit_2(capsys, no_model_load, argv, message):
    status, _, err = run(capsys, *argv)
    assert message in one_error_line(status, err)


@pytest.mark.parametrize("argv, suffix", [
    (["explain", "--num-scenes", "1"], ".txt"),
    (["explain", "--text", "a fine film"], ".png"),
    (["explain", "--model", "default-clip", "--text", "a bag", "--num-scenes", "1"], ".html"),
])
def test_out_with_a_suffix_the_command_does_not_write(capsys, tmp_path, no_model_load, argv, suffix):
    out = tmp_path / f"x{suffix}"
    status, _, err = run(capsys, *argv, "--out", str(out), "--quiet")
    line = one_error_line(status, err)
    assert f"--out {out}" in line and f"not as {suffix}" in line and not out.exists()


@pytest.mark.parametrize("out", ["/proc/attnx_map.png", "/proc/attnx_missing/sub/map.png", "/proc/attnx_folder"])
def test_out_where_nothing_can_be_written(capsys, no_model_load, out):
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--out", out, "--quiet")
    assert f"--out {out}: cannot write in /proc" in one_error_line(status, err)


def test_out_in_a_new_folder_is_created(capsys, tmp_path):
    out = tmp_path / "new" / "deeper" / "map.png"
    status, stdout, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--out", str(out), "--quiet")
    assert status == 0, err
    assert out.is_file() and f"wrote {out}" in stdout


def test_unknown_adapter_before_loading(capsys, no_model_load):
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--adapter", "nosuch")
    line = one_error_line(status, err)
    assert "--adapter 'nosuch' is not an adapter" in line and "intercept" in line and "timm_vit" in line


def test_help_imports_no_torch():
    code = ("import sys\nfrom attnx import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "try:\n    cli.main(['explain', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'timm') if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    assert "examples:" in proc.stdout and "--adapter" in proc.stdout and "--trust-remote-code" in proc.stdout


def test_explain_help_names_the_default_method(capsys):
    from attnx import cli

    status, out, _ = run(capsys, "explain", "--help")
    assert status == 0 and f"(default {cli.DEFAULT_METHOD})" in " ".join(out.split())
    readme = (ROOT / "README.md").read_text()
    assert cli.DEFAULT_METHOD in readme and "library's default" in readme  # the README says why they differ


def test_a_photo_with_the_embedded_model_is_said(capsys, tmp_path):
    image = png(tmp_path / "my_photo.png")
    status, stdout, err = run(capsys, "explain", str(image), "--method", "rollout", "--out", str(tmp_path / "m.png"), "--quiet")
    assert status == 0, err
    line = next(line for line in stdout.splitlines() if "embedded vision model" in line)
    assert "64-px" in line and "Fashion-MNIST" in line and "--model" in line
    # the embedded scenes are what the model is for: nothing to say
    status, stdout, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--out", str(tmp_path / "s.png"))
    assert status == 0 and "embedded vision model" not in stdout


@pytest.fixture(scope="module")
def pickled_hf_vit(tmp_path_factory):
    """A whole Hugging Face ViT saved with torch.save(model), and an image for it."""
    folder = tmp_path_factory.mktemp("pickled")
    torch.save(CASES["hf_vit_sdpa"].model(), folder / "hf_vit.pt")
    return folder / "hf_vit.pt", png(folder / "photo.png")


@pytest.mark.parametrize("adapter", [[], ["--adapter", "intercept"]])
def test_pickled_hugging_face_model_in_a_new_process(tmp_path, pickled_hf_vit, adapter):
    """Unpickled in a process that never built the class, the model still returns its attentions."""
    path, image = pickled_hf_vit
    out = tmp_path / "map.png"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "attnx.cli", "explain", str(image), "--model", str(path), "--trust-pickle",
         "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--method", "rollout", *adapter,
         "--out", str(out), "--quiet"], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"wrote {out}" in proc.stdout


def test_pickled_hugging_face_model_matches_the_original(pickled_hf_vit):
    """The restored recording is the model's own attention: rollout equals the original model's."""
    import attnx

    path, _ = pickled_hf_vit
    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = zoo.load(path, trust_pickle=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = CASES["hf_vit_sdpa"].inputs()
    a = attnx.explain(loaded.model, x, method="rollout").scores
    b = attnx.explain(CASES["hf_vit_sdpa"].model(), x, method="rollout").scores
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
