"""The public surface type-checks: mypy --strict over the SDK, `corral/__init__` and the CLI client."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.sdk._helpers import ROOT

TARGETS = [
    "src/corral/__init__.py",
    "src/corral/sdk",
    "src/corral/cli/main.py",
    "src/corral/cli/sandbox.py",
    "src/corral/cli/_output.py",
    "src/corral/cli/_shell.py",
]


def test_mypy_strict() -> None:
    pytest.importorskip("mypy", reason="mypy is a dev dependency")
    # build/ is ignored by git, so the incremental cache lives there.
    options = [
        "--strict",
        "--python-version",
        "3.11",
        "--follow-imports=silent",
        "--cache-dir",
        "build/mypy-cache",
    ]
    command = [sys.executable, "-m", "mypy", *options, *TARGETS]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
