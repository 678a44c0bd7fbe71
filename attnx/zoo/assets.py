"""The files the embedded models ship with (``attnx/zoo/assets``)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "asset"]

ASSETS = Path(__file__).resolve().parent / "assets"


def asset(name: str) -> Path:
    """The path of a shipped file; a clear error if the installation lacks it."""
    path = ASSETS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"attnx asset {name} is missing from {ASSETS}: the installation is incomplete (reinstall attnx; "
            "a source checkout has it under attnx/zoo/assets, and the scripts in training/ rebuild it)"
        )
    return path
