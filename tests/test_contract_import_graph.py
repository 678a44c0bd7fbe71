"""The layout of the package: no import cycles, no private names across modules, small files.

The graph is read from the source with ``ast`` (imports inside functions included, those under
``if TYPE_CHECKING:`` left out), so a cycle hidden by a function-level import is found too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> package name
PACKAGES = {ROOT / "attnx": "attnx"}
MAX_LINES = 650


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every import of module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # imports for type checkers only are not run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = name if is_package(name) else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def edges(name: str) -> set[str]:
    """The attnx modules that importing ``name`` runs (a package's own submodules it imports by name
    count as edges to those submodules, not to the package)."""
    out = set()
    for target, names, _ in imports(name):
        if not target.startswith("attnx"):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        out.update(subs)
        if target in MODULES and len(subs) < len(names or [None]):
            out.add(target)
    out.discard(name)
    return out


def test_no_import_cycles():
    graph = {m: edges(m) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = []
    for name in MODULES:
        for target, names, line in imports(name):
            if target.startswith("attnx"):
                bad += [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}.{n}"
                        for n in names if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(MODULES[name].read_text())
        aliases = set()  # local names bound to attnx modules
        run = {line: target for target, _, line in imports(name)}  # imports for type checkers only are not run
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("attnx")}
            elif isinstance(node, ast.ImportFrom) and node.lineno in run:
                target = run[node.lineno] if node.level else node.module
                aliases |= {a.asname or a.name for a in node.names if f"{target}.{a.name}" in MODULES}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


#: the layers, bottom up: the library (what ``attnx.explain`` needs, and its views) never imports the
#: application (the command, the demo, the embedded models and data, the leagues)
LIBRARY = ("errors", "lrp", "core", "adapters", "methods", "metrics", "viz", "report")
APPLICATION = ("data", "zoo", "evaluate", "demo", "cli")
#: package -> the packages its modules may import (``attnx`` is the package's lazy front door)
ALLOWED = {
    "attnx": {"errors"},
    "errors": set(),
    "lrp": {"errors"},
    "core": {"errors", "lrp", "adapters", "methods", "viz", "report"},
    "adapters": {"errors", "lrp", "core"},
    "methods": {"errors", "lrp", "core"},
    "metrics": {"errors", "core"},
    "viz": {"errors"},
    "report": {"errors", "core", "viz"},
    "data": {"errors"},
    "zoo": {"errors", "core", "data"},
    "evaluate": {"attnx", "errors", "core", "metrics", "report", "data", "zoo"},
    "demo": {"attnx", "errors", "core", "viz", "report", "data", "zoo", "cli"},
    "cli": {"attnx", "errors", "core", "adapters", "viz", "report", "zoo", "evaluate", "demo"},
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "attnx"


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in MODULES}
    assert packages == set(ALLOWED) and set(LIBRARY) | set(APPLICATION) == packages - {"attnx"}


def test_imports_follow_the_layers():
    """Each package imports only what the matrix allows; the library imports no application package."""
    assert not any(ALLOWED[lib] & set(APPLICATION) for lib in LIBRARY)
    bad = sorted(f"{m} -> {e}" for m in MODULES for e in edges(m)
                 if package_of(e) != package_of(m) and package_of(e) not in ALLOWED[package_of(m)])
    assert not bad, "imports across layers the matrix does not allow:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines; split it along its seams"


def test_the_graph_is_read():
    """The checks above see the real imports (guards against a reader that finds nothing)."""
    assert "attnx.core.trace" in edges("attnx.core.explainer") and "attnx.core.layout" in edges("attnx.adapters.base")
    assert len(MODULES) > 30


HEAVY = ("torch", "transformers", "timm", "torchvision", "open_clip", "matplotlib", "tqdm", "scipy")


def loaded_after(code: str) -> list[str]:
    """The heavy libraries in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_import_attnx_loads_no_heavy_library():
    assert loaded_after("import attnx") == []


def test_adapters_import_no_model_library():
    """A model of a library exists only once that library was imported: the adapters ask ``sys.modules``."""
    assert [m for m in loaded_after("import attnx.adapters") if m not in ("torch", "tqdm")] == []


@pytest.mark.subprocess
def test_explaining_a_timm_model_imports_no_other_model_library():
    code = (
        "import torch, timm, attnx\n"
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=2,"
        " num_classes=3).eval()\n"
        "assert attnx.explain(m, torch.randn(2, 3, 32, 32), method='generic').scores.shape == (2, 16)\n"
        "assert type(attnx.adapters.get_adapter(m)).__name__ == 'TimmViTAdapter'\n"
    )
    loaded = loaded_after(code)
    assert "timm" in loaded and "transformers" not in loaded and "open_clip" not in loaded, loaded


def test_public_api_resolves_lazily():
    """Every public name, read on the package, is the object its module defines; ``dir`` and
    ``from attnx import X`` see the names before they are loaded."""
    code = (
        "import attnx, importlib, sys\n"
        "assert 'torch' not in sys.modules and set(attnx.__all__) <= set(dir(attnx)), dir(attnx)\n"
        "from attnx import explain, Explainer, list_methods, register_method, zoo\n"
        "assert 'torch' in sys.modules and explain is importlib.import_module('attnx.core.explainer').explain\n"
        "for name in attnx.__all__:\n"
        "    obj = getattr(attnx, name)\n"
        "    home = getattr(obj, '__module__', None) or obj.__name__\n"
        "    assert home.startswith('attnx'), (name, home)\n"
        "assert 'rollout' in attnx.list_methods() and attnx.zoo.__name__ == 'attnx.zoo'\n"
        "assert attnx.evaluate.__name__ == 'attnx.evaluate' and attnx.lrp.__name__ == 'attnx.lrp'\n"
        "assert not hasattr(attnx, 'no_such_name')\n"
    )
    assert loaded_after(code) != []


def test_lazy_names_match_the_type_checking_imports():
    """The table of lazy names and the imports shown to type checkers name the same modules."""
    tree = ast.parse(MODULES["attnx"].read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    shown = {a.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) and node.module
             for a in node.names}
    import attnx

    parents = {name: module.rsplit(".", 1)[0] for name, module in attnx._SUBMODULES.items()}
    assert shown == {**attnx._LAZY_NAMES, **parents}
