"""`corral server` refuses a runtime with known escapes unless told to (gVisor class Escape,
attacker = SandboxImage/SandboxRoot on a runtime with a published escape)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]


def _fake(tmp_path: Path, name: str, version_line: str) -> Path:
    binary = tmp_path / name
    binary.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    binary.chmod(0o755)
    return binary


def _server(tmp_path: Path, runtime: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "corral.cli.main", "server", "--home", str(tmp_path / "home"),
            "--port", "1", "--bridge", "crlnone0", "--runtime", str(runtime), *extra]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_server_refuses_runc_with_2025_escapes(tmp_path: Path) -> None:
    """Debian 12's runc 1.1.5 lacks the 2025 fixes: refused before anything is set up, naming the
    CVEs and the way out."""
    done = _server(tmp_path, _fake(tmp_path, "runc", "runc version 1.1.5"))
    assert done.returncode == 2
    for text in (
        "refusing to run sandboxes with runc 1.1.5",
        "CVE-2025-31133",
        "CVE-2025-52881",
        "--allow-vulnerable-runtime",
    ):
        assert text in done.stderr, done.stderr
    assert not (tmp_path / "home").exists()  # refused before touching the host


def test_unknown_runtime_version_is_refused(tmp_path: Path) -> None:
    done = _server(tmp_path, _fake(tmp_path, "mystery", "no version here"))
    assert done.returncode == 2 and "cannot tell the version" in done.stderr


def test_allow_vulnerable_runtime_lets_it_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With the flag the check passes and says so loudly (checked without starting a server)."""
    from corral.cli.server import _check_runtime
    from corral.core.settings import load_settings

    runc = _fake(tmp_path, "runc", "runc version 1.1.5")
    _check_runtime(load_settings({"runtime": str(runc), "allow_vulnerable_runtime": True}, env={}))
    out = capsys.readouterr()
    assert "ALLOWED BY --allow-vulnerable-runtime" in out.err and "CVE-2025-31133" in out.err
    assert "sandboxes run on runc 1.1.5" in out.out
