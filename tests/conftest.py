"""Shared fixtures: a real `corral server` (subprocess, real crun) on its own home, bridge and port.

Tests never touch the default home (/var/lib/corral) or bridge (corral0) that `make run` uses.
The base template is built once per machine into the test home (or hard-link copied from the
default home when that already has it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

TEST_HOME = Path(os.environ.get("CORRAL_TEST_HOME", "/var/lib/corral-test"))
# Separate runs on one machine (a developer's and CI's) must differ in all three.
TEST_BRIDGE = os.environ.get("CORRAL_TEST_BRIDGE", "crltest0")
TEST_SUBNET = os.environ.get("CORRAL_TEST_SUBNET", "10.202.0.0/16")
TEST_API_KEY = "e2b_" + "7e57" * 10
DEFAULT_HOME = Path("/var/lib/corral")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_test_template() -> None:
    """Give the test home the current `base`: hard-link it from the default home when that has it
    (`make test` builds it there first), else build it."""
    from corral.builder.base import ensure_base_template, host_base_digest
    from corral.core.settings import load_settings

    digest = host_base_digest()
    source = DEFAULT_HOME / "layers" / digest
    dest = TEST_HOME / "layers" / digest
    if not dest.exists() and source.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(source), str(dest)], check=True)
        (TEST_HOME / "templates").mkdir(parents=True, exist_ok=True)
        shutil.copy(DEFAULT_HOME / "templates" / "base.json", TEST_HOME / "templates" / "base.json")
    ensure_base_template(load_settings({"home": TEST_HOME}), log=lambda line: None)


class ServerProcess:
    """A `corral server` subprocess; `restart()` keeps its home, so sandboxes must be re-adopted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = TEST_HOME / "server.log"

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "corral.cli.main", "server",
            "--home", str(TEST_HOME), "--port", str(self.port), "--bridge", TEST_BRIDGE,
            "--subnet", TEST_SUBNET, "--api-key", TEST_API_KEY, "--log-level", "info",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corral server exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"corral server did not become ready; see {self.log}")

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, sig: int = signal.SIGINT) -> None:
        self.stop(sig)
        self.start()

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": TEST_API_KEY}, timeout=30)

    def kill_all_sandboxes(self) -> None:
        with self.api() as client:
            for sandbox in client.get("/v2/sandboxes", params={"limit": 100}).json():
                client.delete(f"/sandboxes/{sandbox['sandboxID']}")


@pytest.fixture(scope="session")
def corral_server() -> Iterator[ServerProcess]:
    if os.geteuid() != 0:
        pytest.skip("needs root and the real OCI runtime")
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    ensure_test_template()
    server = ServerProcess(_free_port())
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            if server.proc is not None:
                server.kill_all_sandboxes()
        server.stop()


@pytest.fixture(scope="session")
def e2b_env(corral_server: ServerProcess) -> Iterator[ServerProcess]:
    """Point the official e2b SDK at the test server."""
    saved = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN")}
    os.environ.update(E2B_API_URL=corral_server.url, E2B_SANDBOX_URL=corral_server.url, E2B_API_KEY=TEST_API_KEY)
    os.environ.pop("E2B_DOMAIN", None)
    try:
        yield corral_server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
