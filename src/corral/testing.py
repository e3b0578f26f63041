"""Helpers that run a real `corral server` for tests and benchmarks (not used by the server itself).

    seed_home(home)                       # give `home` the host's `base` template (hard links when
                                          # the default home has it, else a build)
    server = ServerProcess(free_port(), home=home, bridge="crlx0", subnet="10.250.0.0/16")
    server.start(); ...; server.stop()    # a `corral server` subprocess, logging to home/server.log

Each user (a test session, `make bench`, another engineer's run) must give its server its own home,
bridge and subnet: two servers on one bridge would remove each other's sandboxes as strays.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

__all__ = ["DEFAULT_HOME", "TEST_API_KEY", "ServerProcess", "free_port", "seed_home", "shifted_subnet"]

DEFAULT_HOME = Path("/var/lib/corral")
TEST_API_KEY = "e2b_" + "7e57" * 10


def shifted_subnet(subnet: str, by: int) -> str:
    """`subnet` with its second octet moved up by `by`: a /16 for another server of the same run
    (10.202/16 + 32 -> 10.234/16). 10.255/16 is skipped: this machine's resolver lives there."""
    net = ipaddress.IPv4Network(subnet)
    first, second = net.network_address.packed[:2]
    moved = (second + by) % 256
    if moved == 255:
        moved = 254
    return f"{first}.{moved}.0.0/{max(net.prefixlen, 16)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_home(home: Path, source_home: Path = DEFAULT_HOME) -> None:
    """Give `home` the current `base` template: hard-link it from `source_home` when that has it
    (`make test`/`make run` build it there first), else build it."""
    from corral.builder.base import ensure_base_template, host_base_digest
    from corral.core.settings import load_settings

    home.mkdir(parents=True, exist_ok=True)
    digest = host_base_digest()
    source = source_home / "layers" / digest
    dest = home / "layers" / digest
    if not dest.exists() and source.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(source), str(dest)], check=True)
        (home / "templates").mkdir(parents=True, exist_ok=True)
        shutil.copy(source_home / "templates" / "base.json", home / "templates" / "base.json")
    ensure_base_template(load_settings({"home": home}), log=lambda line: None)


class ServerProcess:
    """A `corral server` subprocess; `restart()` keeps its home, so sandboxes must be re-adopted."""

    def __init__(
        self,
        port: int,
        *,
        home: Path,
        bridge: str,
        subnet: str,
        api_key: str = TEST_API_KEY,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        tls_ca: Path | None = None,
        log_level: str = "info",
    ) -> None:
        self.port = port
        # extra_args e.g. ("--tls-cert", c, "--tls-key", k, "--domain", d); with TLS, `tls_ca` verifies it.
        self.extra_args = tuple(extra_args)
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True
        self.url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.home, self.bridge, self.subnet = home, bridge, subnet
        self.api_key = api_key
        self.log_level = log_level
        self.env = dict(env or {})  # e.g. {"CORRAL_RUNTIME": "runsc"}: a second server on another runtime
        self.log = home / "server.log"

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "corral.cli.main", "server",
            "--home", str(self.home), "--port", str(self.port), "--bridge", self.bridge,
            "--subnet", self.subnet, "--api-key", self.api_key, "--log-level", self.log_level,
            *self.extra_args,
        ]  # fmt: skip
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corral server exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1, verify=self.verify).status_code == 200:
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
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=30, verify=self.verify)

    def kill_all_sandboxes(self) -> None:
        with self.api() as client:
            for sandbox in client.get("/v2/sandboxes", params={"limit": 100}).json():
                client.delete(f"/sandboxes/{sandbox['sandboxID']}")
