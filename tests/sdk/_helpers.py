"""Test helpers shared by the SDK tests: the unasync rule table, loaded from scripts/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_unasync() -> ModuleType:
    """`scripts/unasync.py` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("corral_unasync_script", ROOT / "scripts" / "unasync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
