"""The official E2B JS SDK (e2b@2.45.0) runs tests/compat/js/smoke.mjs against a real server.

Needs `node` (>= 18) and `npm`; the SDK is installed into tests/compat/js/node_modules (git-ignored)
from the pinned package.json and package-lock.json (`npm ci`) on first use, which needs the npm
registry once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.compat

JS_DIR = Path(__file__).parent / "js"


def _node_modules() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the JS SDK smoke test needs node and npm on PATH (apt-get install nodejs npm)")
    installed = JS_DIR / "node_modules" / "e2b" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != "2.45.0":
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"npm install failed in {JS_DIR}:\n{done.stderr[-2000:]}")
    return JS_DIR / "node_modules"


def _python_watch_works(sandbox: Any) -> bool:
    """Whether the server watches directories yet (the JS check of it is required only then)."""
    try:
        sandbox.files.make_dir("/tmp/probe")
        watcher = sandbox.files.watch_dir("/tmp/probe")
        sandbox.files.write("/tmp/probe/x", "x")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(event.name == "x" for event in watcher.get_new_events()):
                watcher.stop()
                return True
            time.sleep(0.05)
        watcher.stop()
    except Exception:  # noqa: BLE001 - any failure means: not available yet
        return False
    return False


def test_js_sdk_smoke(sandbox: Any) -> None:
    _node_modules()
    done = subprocess.run(
        ["node", "smoke.mjs"],
        cwd=JS_DIR,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == ["create", "run", "background", "pty", "files", "watch", "kill"]
    if _python_watch_works(sandbox):
        assert summary["watch"] == "ok"
