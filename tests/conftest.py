"""Shared fixtures: a real `corral server` (subprocess, real crun) on its own home, bridge and port.

Tests never touch the default home (/var/lib/corral) or bridge (corral0) that `make run` uses.
The base template is built once per machine into the test home (or hard-link copied from the
default home when that already has it).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from corral.testing import DEFAULT_HOME, TEST_API_KEY, free_port, seed_home, shifted_subnet
from corral.testing import ServerProcess as _ServerProcess

TEST_HOME = Path(os.environ.get("CORRAL_TEST_HOME", "/var/lib/corral-test"))
# Separate runs on one machine (a developer's and CI's) must differ in all three.
TEST_BRIDGE = os.environ.get("CORRAL_TEST_BRIDGE", "crltest0")
TEST_SUBNET = os.environ.get("CORRAL_TEST_SUBNET", "10.202.0.0/16")
# The test server's sandboxes have the exec agent as their init (crun, unless turned off).
NEEDS_EXEC_AGENT = pytest.mark.skipif(
    os.environ.get("CORRAL_RUNTIME", "crun") != "crun" or os.environ.get("CORRAL_EXEC_AGENT", "1") in ("0", "off"),
    reason="the exec agent runs with crun only (and not with CORRAL_EXEC_AGENT=0)",
)
__all__ = [
    "DEFAULT_HOME",
    "NEEDS_EXEC_AGENT",
    "TEST_API_KEY",
    "TEST_BRIDGE",
    "TEST_HOME",
    "TEST_SUBNET",
    "ServerProcess",
    "ensure_test_template",
    "extra_server",
    "shifted_subnet",
]
_free_port = free_port


@functools.cache
def fake_resolver_address() -> str:
    """The test servers' DNS upstream (one per test session): `*.test` -> the fake internet's
    hosts (`tests.network_fixtures.FakeResolver`), so that no sandbox DNS leaves the machine."""
    from tests.network_fixtures import FakeResolver

    return FakeResolver(ipaddress.IPv4Network(TEST_SUBNET).network_address.packed[1]).address


@contextlib.contextmanager
def extra_server(home: Path, bridge: str, subnet: str, **options: Any) -> Iterator[ServerProcess]:
    """Another real server of this run, on a home, bridge and subnet of its own (`options` as for
    `ServerProcess`); whatever sandboxes it still has are killed when it stops."""
    home.mkdir(parents=True, exist_ok=True)
    ensure_test_template(home)
    server = ServerProcess(_free_port(), home=home, bridge=bridge, subnet=subnet, **options)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.kill_all_sandboxes()
        server.stop()


def ensure_test_template(home: Path = TEST_HOME) -> None:
    """Give the test home the current `base`: hard-link it from the default home when that has it
    (`make test` builds it there first), else build it."""
    seed_home(home, DEFAULT_HOME)


class ServerProcess(_ServerProcess):
    """`corral.testing.ServerProcess` on the test home, bridge and subnet unless told otherwise."""

    def __init__(
        self,
        port: int,
        *,
        home: Path = TEST_HOME,
        bridge: str = TEST_BRIDGE,
        subnet: str = TEST_SUBNET,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        tls_ca: Path | None = None,
    ) -> None:
        env = {"CORRAL_DNS_UPSTREAMS": fake_resolver_address(), **(env or {})}
        super().__init__(port, home=home, bridge=bridge, subnet=subnet, env=env, extra_args=extra_args, tls_ca=tls_ca)


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
