"""Fixtures of the integration suite: a sandbox of the test server, and a server that keeps no
spare build cache (for layer GC).

`sbx` is a fresh sandbox of the test server (official SDK), killed afterwards, also when its test
failed while the server was down (it is started again first).

`gc_server` has its own home, bridge and subnet, derived from the test ones like the attack
suite's second servers: `<test home>-gc`, `<test bridge>c`, and the test subnet moved up by 96 in
its second octet (CORRAL_TEST_GC_HOME / _BRIDGE / _SUBNET override them). It runs with
CORRAL_BUILD_CACHE_MAX_AGE_HOURS=0, so its layers directory holds exactly what something refers to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

from tests.conftest import TEST_BRIDGE, TEST_HOME, TEST_SUBNET, ServerProcess, extra_server, shifted_subnet

GC_HOME = Path(os.environ.get("CORRAL_TEST_GC_HOME", f"{TEST_HOME}-gc"))
GC_BRIDGE = os.environ.get("CORRAL_TEST_GC_BRIDGE", TEST_BRIDGE[:14] + "c")
GC_SUBNET = os.environ.get("CORRAL_TEST_GC_SUBNET", shifted_subnet(TEST_SUBNET, 96))


@pytest.fixture
def sbx(e2b_env: ServerProcess) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        if e2b_env.proc is None:  # a test that failed while the server was down
            e2b_env.start()
        sandbox.kill()  # through the API: False when the test killed it already


@pytest.fixture(scope="session")
def gc_server() -> Iterator[ServerProcess]:
    if os.geteuid() != 0:
        pytest.skip("needs root and the real OCI runtime")
    with extra_server(GC_HOME, GC_BRIDGE, GC_SUBNET, env={"CORRAL_BUILD_CACHE_MAX_AGE_HOURS": "0"}) as server:
        yield server
