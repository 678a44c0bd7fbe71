"""The tests mirror the code: a maintainer finds the tests of a module by its name.

Every ``tests/test_*.py`` has one of three forms (CONTRIBUTING.md, "Tests"):

* ``test_<package>_<module>.py``: the tests of ``attnx/<package>/<module>.py``; ``test_<package>.py``
  the tests of a package as a whole (``attnx/<package>/``, or the module ``attnx/<package>.py``);
* ``test_contract_<name>.py``: a contract that runs over many modules or models (:data:`CONTRACTS`);
* ``test_family_<name>.py``: a model family across methods (:data:`FAMILIES`, each with its adapters).

A file of none of these forms is listed in :data:`EXCEPTIONS` with the reason.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "attnx"

#: the cross-module contracts, each in ``tests/test_contract_<name>.py``
CONTRACTS = {
    "batch_independence": "a batch explained at once equals each of its samples explained alone",
    "capture": "the recorded attention and its gradient equal the model's own (softmax recomputed, finite differences)",
    "docs": "the README's generated sections and the documented examples are what the code does",
    "docs_blocks": "every code block of README.md and docs/*.md runs as written",
    "import_graph": "the package layers, no import cycles, no private names across modules, a fast import",
    "libragrad": "LibraGrad's gradients equal the authors' timm fork, and gradient x input under them is complete",
    "lowest_layer": "a backward stops at the lowest layer a method reads, with the maps of a full trace",
    "lxt": "AttnLRP equals the authors' implementation (lxt) on real weights",
    "model_io": "what goes into and comes out of a model: typed errors, dict and embedding outputs, wrappers",
    "notebooks": "the example notebooks run and match their generator",
    "readme_verdict": "the README's verdict block and docs/league/verdict.md are generated from the league tables",
    "padding": "padding changes nothing and gets zero relevance",
    "realistic_sizes": "the contracts at the sizes people use (224 px, 12 layers)",
    "reference": "every method against an independent reference written from its equations",
    "scope": "what attnx explains, and what it refuses by type in one line",
    "state": "the model and the inputs are left exactly as found, on every kind of model",
    "test_names": "the test files are named after what they test",
    "wrappers": "a user's module around one known backbone gets the family adapter's block methods and per-layer readouts",
}

#: the model families, each in ``tests/test_family_<name>.py``, with the adapters (attnx/adapters/) it exercises
FAMILIES = {
    "vit": ("timm_vit", "torchvision_vit", "hf"),
    "decoder": ("hf_decoder",),
    "swin": ("swin",),
    "clip": ("dual_encoder",),
}

#: files of none of the forms, with the reason
EXCEPTIONS = {
    "test_cli_clip.py": "the command on dual encoders; follows the split of attnx/cli/commands.py by subcommand",
    "test_cli_decoders.py": "the command on language models; follows the split of attnx/cli/commands.py by subcommand",
    "test_cli_errors.py": "the command's one error path; follows the split of attnx/cli/commands.py by subcommand",
}


def names_of_test_files() -> list[str]:
    return sorted(p.name for p in TESTS.glob("test_*.py"))


def what_it_tests(name: str) -> str | None:
    """What a test file's name says it tests (a path or a declared name), or ``None``."""
    stem = name[len("test_"):-len(".py")]
    if stem.startswith("contract_"):
        contract = stem[len("contract_"):]
        return f"contract {contract}" if contract in CONTRACTS else None
    if stem.startswith("family_"):
        family = stem[len("family_"):]
        return f"family {family}" if family in FAMILIES else None
    package, _, module = stem.partition("_")  # package names have no underscore
    if module:
        path = PACKAGE / package / f"{module}.py"
        return str(path) if path.is_file() else None
    for path in (PACKAGE / package / "__init__.py", PACKAGE / f"{package}.py"):
        if path.is_file():
            return str(path)
    return None


@pytest.mark.parametrize("name", names_of_test_files())
def test_every_test_file_names_what_it_tests(name):
    if name in EXCEPTIONS:
        assert what_it_tests(name) is None, f"{name} has a valid name now: drop it from EXCEPTIONS"
        return
    assert what_it_tests(name), (
        f"tests/{name} names no module, package, contract or family: name it test_<package>_<module>.py "
        "(attnx/<package>/<module>.py), test_contract_<name>.py or test_family_<name>.py (CONTRACTS, FAMILIES "
        "in tests/test_contract_test_names.py), see CONTRIBUTING.md"
    )


def test_every_declared_contract_and_family_has_its_file():
    files = set(names_of_test_files())
    assert not [c for c in CONTRACTS if f"test_contract_{c}.py" not in files]
    assert not [f for f in FAMILIES if f"test_family_{f}.py" not in files]
    assert not [e for e in EXCEPTIONS if e not in files]


def test_every_family_names_existing_adapters():
    for family, adapters in FAMILIES.items():
        missing = [a for a in adapters if not (PACKAGE / "adapters" / f"{a}.py").is_file()]
        assert not missing, f"family {family}: no attnx/adapters/{missing}.py"


def test_the_names_are_checked():
    """The check itself tells a good name from a bad one (guards against a check that passes everything)."""
    assert what_it_tests("test_core_trace.py") and what_it_tests("test_lrp_rules.py")
    assert what_it_tests("test_errors.py") and what_it_tests("test_metrics.py")
    assert what_it_tests("test_contract_state.py") and what_it_tests("test_family_swin.py")
    for bad in ("test_hardening.py", "test_core_nothing.py", "test_contract_misc.py", "test_family_resnet.py",
                "test_lrp_decoders.py", "test_decoders_lrp.py"):
        assert what_it_tests(bad) is None, bad
