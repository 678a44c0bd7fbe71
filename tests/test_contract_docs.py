"""The README's generated sections are the ones the code writes today."""
from __future__ import annotations

import re
from pathlib import Path

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
    """The lines of the first ``bash`` block of a README section."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", body, re.S).group(1).strip().splitlines()


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    ci_lines = CI.splitlines()
    for section in ("Install", "Test"):
        commands = readme_commands(section)
        assert commands and all(c in ci_lines for c in commands), (section, commands)
