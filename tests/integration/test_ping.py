"""`ping` in a sandbox: ICMP echo through datagram sockets (SOCK_DGRAM/IPPROTO_ICMP, what iputils
`ping` tries first), which the node allows every gid in the sandbox's netns
(`net.ipv4.ping_group_range`, set when the network is wired), while raw sockets stay refused
(CAP_NET_RAW is never granted). Root and the default user, with the user namespace on or off
(`CORRAL_USERNS`: the kernel checks the host gid, which differs). Not on runsc: with
`--network=host` gVisor makes host TCP and UDP sockets only (`tests.gvisor.NO_PING`).

The base template ships no `ping` binary, so a small Python probe does what it does. The echo goes
to the sandbox's own loopback (always answered: proves the socket is allowed) and to a host of the
test's fake internet (`tests.network_fixtures.FakeNet`, reached through the node's NAT).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from e2b import CommandExitException, Sandbox

from tests import gvisor
from tests.conftest import TEST_BRIDGE, TEST_SUBNET, ServerProcess
from tests.network_fixtures import FakeNet, fake_net

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


# Prints {"echo": {target: "reply" | what went wrong}, "raw": "allowed" | errno name, "gid": n}.
PROBE = r"""
import errno, json, os, socket, struct, sys

def echo(target):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    except OSError as exc:
        return f"socket: {exc.strerror}"
    s.settimeout(3)
    s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"corral", (target, 0))  # id, checksum: the kernel's
    try:
        reply = s.recv(1024)
    except socket.timeout:
        return "timeout"
    return "reply" if reply[0] == 0 and reply[8:] == b"corral" else f"other: {reply.hex()}"

def raw():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "allowed"

print(json.dumps({"echo": {t: echo(t) for t in sys.argv[1:]}, "raw": raw(), "gid": os.getgid()}))
"""


@pytest.fixture(scope="module")
def inet() -> Iterator[FakeNet]:
    with fake_net("fp", TEST_BRIDGE, TEST_SUBNET) as net:
        yield net


@pytest.fixture(scope="module")
def sandbox(e2b_env: ServerProcess) -> Iterator[Sandbox]:
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/tmp/ping_probe.py", PROBE, user="root")
        yield sbx
    finally:
        sbx.kill()


def _probe(sbx: Sandbox, user: str, *targets: str) -> dict:
    try:
        result = sbx.commands.run(f"python3 /tmp/ping_probe.py {' '.join(targets)}", user=user, timeout=30)
    except CommandExitException as exc:
        pytest.fail(f"probe failed: {exc.stderr}")
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("user", ["root", "user"])
@gvisor.NO_PING
def test_icmp_echo_works_without_raw_sockets(sandbox: Sandbox, inet: FakeNet, user: str) -> None:
    seen = _probe(sandbox, user, "127.0.0.1", inet.host_a)
    assert seen["gid"] == (0 if user == "root" else 1000)
    assert seen["echo"] == {"127.0.0.1": "reply", inet.host_a: "reply"}
    assert seen["raw"] == "EPERM"  # NET_RAW stays dropped: datagram sockets are all there is


@gvisor.NO_PING
def test_icmp_echo_follows_the_egress_policy(e2b_env: ServerProcess, inet: FakeNet) -> None:
    """A sandbox without internet access can ping itself, and nothing outside."""
    sbx = Sandbox.create(timeout=120, allow_internet_access=False)
    try:
        sbx.files.write("/tmp/ping_probe.py", PROBE, user="root")
        seen = _probe(sbx, "user", "127.0.0.1", inet.host_a)
    finally:
        sbx.kill()
    assert seen["echo"] == {"127.0.0.1": "reply", inet.host_a: "timeout"}
