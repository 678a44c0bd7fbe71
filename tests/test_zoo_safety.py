"""Model files and folders are data (attnx.zoo.safety): a folder's custom code never runs and is
never asked about unless trusted, a zip bomb is refused before it is unpacked, a damaged
safetensors file is one typed line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from attnx import zoo
from attnx.errors import AttnxValueError
from attnx.zoo import safety
from conftest import CASES

ENV = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")

CUSTOM_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import PretrainedConfig


class CustomConfig(PretrainedConfig):
    model_type = "attnx-custom"
'''


def custom_code_folder(folder: Path) -> tuple[Path, Path]:
    """A Hugging Face folder whose config.json maps its classes to the folder's own Python file,
    which writes a marker file when it is imported."""
    folder.mkdir()
    marker = folder.parent / f"{folder.name}_ran"
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "attnx-custom", "architectures": ["CustomForImageClassification"],
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForImageClassification": "custom.CustomModel"},
    }))
    return folder, marker


def png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.subprocess
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="a pseudo-terminal (POSIX)")
@pytest.mark.parametrize("how", ["model", "arch"])
def test_custom_code_is_refused_without_a_prompt(tmp_path, how):
    """``--model DIR`` / ``--arch DIR`` with auto_map, run in a terminal (a pseudo-terminal whose
    user has typed "y"): no "[y/N]" question, the code does not run, one line names
    --trust-remote-code. (transformers asks when trust_remote_code is left out, and runs the code
    on "y".)"""
    folder, marker = custom_code_folder(tmp_path / "custom")
    image = png(tmp_path / "photo.png")
    spec = ["--model", str(folder)]
    if how == "arch":
        torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
        spec = ["--model", str(tmp_path / "weights.pt"), "--arch", str(folder)]
    terminal, user = os.openpty()
    os.write(terminal, b"y\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "attnx.cli", "explain", str(image), *spec, "--out", str(tmp_path / "m.png")],
                              stdin=user, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        os.close(user)
        os.close(terminal)
    assert not marker.exists(), "the folder's code ran"
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert line.startswith(f"attnx: error: {folder} contains custom code") and "--trust-remote-code" in line


def test_custom_code_in_python(tmp_path):
    folder, marker = custom_code_folder(tmp_path / "custom")
    with pytest.raises(AttnxValueError, match=r"contains custom code .*trust_remote_code=True"):
        zoo.load(folder)
    assert not marker.exists()
    # trusted, the folder's code does run (and this toy folder has no model class: transformers says so)
    with pytest.raises(Exception):  # noqa: B017 - transformers own error (its type varies by version)
        zoo.load(folder, trust_remote_code=True)
    assert marker.exists()


def deflate_bomb(path: Path, megabytes: int = 80) -> Path:
    """A torch.save file whose entries are re-packed with deflate: a tensor of zeros shrinks ~1000x."""
    plain = path.with_suffix(".plain")
    torch.save({"w": torch.zeros(megabytes * 2**18)}, plain)  # float32: 4 bytes each
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            with src.open(info) as f, dst.open(info.filename, "w", force_zip64=True) as g:
                while chunk := f.read(2**22):
                    g.write(chunk)
    plain.unlink()
    return path


def test_deflate_bomb_is_refused_before_unpacking(tmp_path, monkeypatch):
    path = deflate_bomb(tmp_path / "bomb.pt")
    assert path.stat().st_size < 2**20  # 80 MB of zeros in well under 1 MB

    def no_unpacking(*args, **kwargs):
        raise AssertionError("torch.load unpacked the archive")

    monkeypatch.setattr(torch, "load", no_unpacking)
    with pytest.raises(AttnxValueError, match=r"unpacks to 80 MB .*refused before unpacking.*max_expansion=N") as info:
        zoo.load(path, arch="test_vit")
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    # the limit raised, the file is read (and is not a state dict of test_vit)
    with pytest.raises(AttnxValueError, match="does not fit --arch 'test_vit'"):
        zoo.load(path, arch="test_vit", max_expansion=100_000)


def test_deflate_bomb_on_the_command_line(capsys, tmp_path):
    from cli_runner import run

    path = deflate_bomb(tmp_path / "bomb.pt")
    status, _, err = run(capsys, "explain", str(png(tmp_path / "p.png")), "--model", str(path), "--arch", "test_vit")
    assert status == 2 and "refused before unpacking" in err and "--max-expansion N" in err


def test_torch_save_files_are_within_the_limit(tmp_path):
    """torch.save stores its entries: unpacked size equals the file's, far below the limit."""
    path = tmp_path / "sd.pt"
    torch.save(CASES["timm_vit"].model().state_dict(), path)
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(i.file_size for i in archive.infolist())
    assert unpacked <= path.stat().st_size
    safety.check_zip_expansion(str(path), max_expansion=1)  # passes even at 1x


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_safetensors_is_one_typed_line(tmp_path, damage):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    if damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        save_file({"w": torch.ones(64, 64)}, str(path))
        path.write_bytes(path.read_bytes()[: 100 if damage == "truncated" else 0])
    with pytest.raises(AttnxValueError, match=r"is not a safetensors file the safetensors library can read") as info:
        zoo.load(path, arch="test_vit")
    assert "\n" not in str(info.value)
