"""Fixtures of the attack suite: sandboxes made with the official SDK (always killed), a second
server on gVisor (`runsc`), and a neighbour-latency probe.

The runsc server gets its own home, bridge and subnet, derived from the test ones so that runs on
one machine stay apart: `<test home>-runsc`, `<test bridge>g`, and the test subnet moved up by 32 in
its second octet (10.202/16 → 10.234/16), each overridable with CORRAL_TEST_RUNSC_HOME /
CORRAL_TEST_RUNSC_BRIDGE / CORRAL_TEST_RUNSC_SUBNET. User namespaces are on by default, so
`userns_server` is the test server itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

from tests.conftest import (
    TEST_API_KEY,
    TEST_BRIDGE,
    TEST_HOME,
    TEST_SUBNET,
    ServerProcess,
    extra_server,
    shifted_subnet,
)

RUNSC_HOME = Path(os.environ.get("CORRAL_TEST_RUNSC_HOME", f"{TEST_HOME}-runsc"))
RUNSC_BRIDGE = os.environ.get("CORRAL_TEST_RUNSC_BRIDGE", TEST_BRIDGE[:14] + "g")
RUNSC_SUBNET = os.environ.get("CORRAL_TEST_RUNSC_SUBNET", shifted_subnet(TEST_SUBNET, 32))
DEFAULT_RUNTIME = os.environ.get("CORRAL_RUNTIME", "crun")


@pytest.fixture(scope="session")
def runsc_server(corral_server: ServerProcess) -> Iterator[ServerProcess]:
    """A second real server whose sandboxes run on gVisor. Skipped (visibly) without runsc."""
    if DEFAULT_RUNTIME == "runsc":
        yield corral_server
        return
    if shutil.which("runsc") is None:
        pytest.skip("runsc (gVisor) is not installed: apt-get install runsc")
    with extra_server(RUNSC_HOME, RUNSC_BRIDGE, RUNSC_SUBNET, env={"CORRAL_RUNTIME": "runsc"}) as server:
        yield server


@pytest.fixture(scope="session")
def userns_server(corral_server: ServerProcess) -> ServerProcess:
    """The test server, whose sandboxes run in user namespaces (the default on crun); skipped when
    the suite runs on runsc or with CORRAL_USERNS=0."""
    if DEFAULT_RUNTIME != "crun":
        pytest.skip("host user namespaces are for crun (gVisor has its own)")
    if os.environ.get("CORRAL_USERNS", "").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("CORRAL_USERNS=0: user namespaces are switched off")
    return corral_server


@pytest.fixture(params=["default", "runsc"])
def runtime_server(request: pytest.FixtureRequest, corral_server: ServerProcess) -> ServerProcess:
    """The test server (crun unless CORRAL_RUNTIME says otherwise), then the runsc one."""
    if request.param == "default":
        return corral_server
    if DEFAULT_RUNTIME == "runsc":
        pytest.skip("the default server already runs runsc")
    return request.getfixturevalue("runsc_server")


def sdk_opts(server: ServerProcess) -> dict[str, str]:
    """Connection options of the official SDK for one server (no environment needed)."""
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": TEST_API_KEY}


SandboxFactory = Callable[..., Sandbox]


@pytest.fixture
def make_sandbox(corral_server: ServerProcess) -> Iterator[SandboxFactory]:
    """`make_sandbox(server=None, **create_kwargs)`: a sandbox killed after the test."""
    made: list[Sandbox] = []

    def make(server: ServerProcess | None = None, **kwargs: object) -> Sandbox:
        kwargs.setdefault("timeout", 300)
        sbx = Sandbox.create(**{**sdk_opts(server or corral_server), **kwargs})  # kwargs may name another api_key
        made.append(sbx)
        return sbx

    yield make
    for sbx in made:
        with contextlib.suppress(Exception):
            sbx.kill()


@pytest.fixture(scope="module")
def neighbour(corral_server: ServerProcess) -> Iterator[Sandbox]:
    """A bystander sandbox whose exec latency must not suffer from another sandbox's attack."""
    sbx = Sandbox.create(timeout=900, **sdk_opts(corral_server))
    try:
        yield sbx
    finally:
        with contextlib.suppress(Exception):
            sbx.kill()


def exec_latencies(sbx: Sandbox, samples: int) -> list[float]:
    """Seconds each of `samples` `commands.run("true")` took, end to end through the server."""
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        sbx.commands.run("true", timeout=60)
        out.append(time.perf_counter() - start)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


# Latency bound under attack: 2x the quiet median, but never less than quiet + this floor (seconds),
# so that a 20 ms exec on a busy CI machine is not failed for taking 60 ms.
LATENCY_FLOOR_S = 0.15
LATENCY_SAMPLES = 11


def latency_bound(quiet: float) -> float:
    return max(2 * quiet, quiet + LATENCY_FLOOR_S)
