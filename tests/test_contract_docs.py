"""The README's generated sections are the ones the code writes today; what the README and docs/ say
a command writes is what the command writes; the marked examples of docs/ run as written and make what
they say. (tests/test_contract_docs_blocks.py runs every block of every page.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attnx

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def generated(name: str) -> str:
    m = re.search(rf"<!-- {name}:start[^>]*-->\n(.*?)\n<!-- {name}:end -->", README, re.S)
    assert m, f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> section"
    return m.group(1)


def test_methods_table_is_written_from_the_declarations():
    assert generated("methods") == attnx.methods.methods_markdown(), "run `attnx methods --markdown` and paste it"


def test_every_method_is_in_the_table():
    table = generated("methods")
    assert all(f"| `{m}` |" in table for m in attnx.list_methods())


def test_supported_models_table_is_written_from_the_adapters():
    from attnx.adapters.catalogue import adapters_markdown

    assert generated("models") == adapters_markdown(), "run `attnx models --markdown` and paste it"


def test_every_adapter_has_its_row_in_the_table():
    """Each adapter that ships is described (a new adapter without a row fails here), in lookup order."""
    from attnx.adapters import adapter_names
    from attnx.adapters.catalogue import SUPPORT

    assert set(adapter_names()) == set(SUPPORT), set(adapter_names()) ^ set(SUPPORT)
    table = generated("models")
    positions = [table.index(f"| `{name}` |") for name in adapter_names()]
    assert positions == sorted(positions) and len(table.splitlines()) == len(adapter_names()) + 2


def test_the_readme_keeps_the_verdict_block():
    """The block the league's verdict generator fills, under its heading."""
    section = README.split("\n## Which method to trust\n", 1)[1].split("\n## ", 1)[0]
    assert section.count("<!-- verdict:start -->") == 1 and section.count("<!-- verdict:end -->") == 1


ARCHITECTURE = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()


def test_the_architecture_method_example_runs():
    """The "Add a method" example of docs/ARCHITECTURE.md registers a working method."""
    section = ARCHITECTURE.split("## Add a method", 1)[1].split("## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "ARCHITECTURE.md", "exec"), namespace)
    try:
        from conftest import CASES

        case = CASES["timm_vit"]
        model, x = case.model(), case.inputs(2)
        e = attnx.explain(model, x, method="last_layer_head", head=1)
        trace = attnx.Explainer(model).capture(x)
        assert (e.scores - trace.attentions[-1][:, 1, 0, 1:]).abs().max() < 1e-6
        assert attnx.get_method("last_layer_head").options == {"head": 0}
    finally:
        attnx.methods.unregister_method("last_layer_head")


CI = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def readme_commands(section: str) -> list[str]:
    """The lines of the ``bash`` blocks of a README section."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```bash\n(.*?)```", body, re.S) for line in block.strip().splitlines()]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    ci_lines = CI.splitlines()
    for section in ("Install and try", "Test"):
        commands = readme_commands(section)
        assert commands and all(c in ci_lines for c in commands), (section, commands)


# ------------------------------------------------------------------------------------------------
# what the README says a command does, and its examples, against the code
# ------------------------------------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_readme_names_the_file_and_method_that_attnx_explain_writes(capsys, tmp_path, monkeypatch):
    """``attnx explain`` without arguments: the method and the file the README and docs/cli.md name."""
    from cli_runner import run

    line = re.search(r"^attnx explain +# .*written to (\S+\.png)", README, re.M)
    assert line, "README.md has no line `attnx explain   # ... written to FILE.png`"
    documented_file = line.group(1)
    documented_method = re.search(r"The command's default method is `(\w+)`", README).group(1)
    cli_doc_method = re.search(r"`attnx explain` uses `(\w+)` unless", (DOCS / "cli.md").read_text()).group(1)
    assert documented_method == cli_doc_method == attnx.cli.DEFAULT_METHOD
    assert attnx.cli.build_parser().parse_args(["explain"]).method == attnx.cli.DEFAULT_METHOD

    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "explain")
    assert status == 0, err
    written = re.findall(r"^wrote (\S+)$", out, re.M)
    assert written == [documented_file], (written, documented_file)
    assert (tmp_path / documented_file).stat().st_size > 0


def test_the_bundle_kinds_in_the_docs_are_the_bundles_own():
    """Every ``name = zoo.loader()   # ... .kind == "K"`` of the README and docs/ is what the loader returns."""
    from attnx import zoo

    pattern = re.compile(r"^\w+ = zoo\.(\w+)\(\) .*# .*\.kind == \"([^\"]+)\"", re.M)
    texts = [README] + [p.read_text() for p in sorted(DOCS.glob("*.md"))]
    claims = {(loader, kind) for text in texts for loader, kind in pattern.findall(text)}
    assert {loader for loader, _ in claims} >= {"vision_model", "text_model", "clip_model"}, claims
    for loader, kind in sorted(claims):
        assert getattr(zoo, loader)().kind == kind, f"zoo.{loader}().kind is not {kind!r}"


#: the page of each marked example
EXAMPLES = {"own-model": "own_models.md", "metrics": "evaluation.md"}


def doc_example(name: str) -> str:
    """The ``python`` block that follows ``<!-- example:NAME ... -->`` on its page of docs/."""
    text = (DOCS / EXAMPLES[name]).read_text()
    m = re.search(rf"<!-- example:{name}\b[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, f"docs/{EXAMPLES[name]} has no <!-- example:{name} --> before a python block"
    return m.group(1)


def run_example(name: str, folder: Path, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    namespace: dict = {"__name__": f"docs_{name}"}
    exec(compile(doc_example(name), f"docs/{EXAMPLES[name]} ({name})", "exec"), namespace)
    return namespace


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_own_model_example_runs_as_written(tmp_path, monkeypatch):
    ns = run_example("own-model", tmp_path, monkeypatch)
    assert {"my_model.pt", "whole_model.pt", "weights.safetensors", "cat.png"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "my_hf_vit" / "config.json").is_file()
    assert ns["e"].heatmap().shape == (1, 224, 224)
    x = ns["hf"].preprocess("cat.png")[None]
    # the folder, the weights file with arch= and the model saved are one model
    with torch.no_grad():
        saved = ns["hf_net"].eval()(x).logits
        assert torch.allclose(ns["hf"].model(x).logits, saved, atol=1e-5)
        assert torch.allclose(ns["hf_weights"].model(x).logits, saved, atol=1e-5)


def test_the_metrics_example_runs_as_written(tmp_path, monkeypatch):
    ns = run_example("metrics", tmp_path, monkeypatch)
    images, masks, labels = ns["images"], ns["masks"], ns["labels"]
    assert masks.shape == (images.shape[0], *images.shape[2:]) and masks.dtype == torch.bool
    assert all(ns["scenes"].labels[i, c] > 0 for i, c in enumerate(labels.tolist()))  # a garment of the scene
    assert masks.flatten(1).any(dim=1).all()
    vit = ns["vit"]
    assert ns["px0"]["mean"] == vit.mean and ns["px0"]["std"] == vit.std
    assert torch.isfinite(ns["pos"].auc()).all() and torch.isfinite(ns["neg"].auc()).all()


def test_every_docs_page_is_in_the_site_navigation():
    """``mkdocs build --strict`` (the last CI step) refuses a page outside ``nav``; this says so in
    the fast tier, naming the page (a league table written by ``attnx evaluate`` is a page too)."""
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*\"?([\w./-]+\.md)\"?\s*$", nav, flags=re.M)) | set(re.findall(r"-\s+([\w./-]+\.md)\s*$", nav, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), f"docs pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
