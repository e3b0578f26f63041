"""Small helpers of the attack suite: run hostile commands in a sandbox and read host oracles."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from e2b import CommandExitException, CommandResult, Sandbox

__all__ = ["host_text", "run", "run_python", "runtime_binary", "sha256_file"]


def run(sbx: Sandbox, cmd: str, *, user: str = "root", timeout: float = 120) -> CommandResult:
    """Run `cmd` in the sandbox (as root there by default); a non-zero exit is a result, not an error."""
    try:
        return sbx.commands.run(cmd, user=user, timeout=timeout)
    except CommandExitException as exc:
        return exc


def run_python(sbx: Sandbox, source: str, *, user: str = "root", timeout: float = 120) -> object:
    """Run a Python program in the sandbox whose last stdout line is JSON; returns that value."""
    sbx.files.write("/tmp/probe.py", source, user="root")
    result = run(sbx, "python3 /tmp/probe.py", user=user, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    assert lines, f"probe printed nothing (exit {result.exit_code}): {result.stderr}"
    return json.loads(lines[-1])


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def runtime_binary(name: str) -> Path:
    found = shutil.which(name)
    assert found is not None, f"{name} not on PATH"
    return Path(found).resolve()


def host_text(path: str) -> str:
    """A host file's contents ("" when it does not exist)."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""
