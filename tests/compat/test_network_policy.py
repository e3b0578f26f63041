"""Egress policy through the official SDK: `allow_internet_access`, `network.allow_out`/`deny_out`
(addresses, domains by SNI / Host) and `Sandbox.update_network` (PUT /sandboxes/{id}/network).

"The internet" is a namespace this module makes (`tests.network_fixtures.FakeNet`, 198.18.<N>.10
and .11 where N is the test subnet's second octet); sandboxes reach it through the real server's
NAT. DNS is only ever asked for names a policy refuses (answered REFUSED by the node's forwarder,
never forwarded), so nothing leaves the machine.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_BRIDGE, TEST_SUBNET
from tests.network_fixtures import FakeNet, fake_net

pytestmark = [pytest.mark.timeout(240)]


# A DNS query by hand (the template has no DNS tools): prints the rcode the sandbox's resolver gave.
DNS_QUERY = r"""
import random, socket, struct, sys
server = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
q = struct.pack("!HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[1].split(".")) + b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(q, (server, 53))
try:
    r = s.recv(4096)
    print({0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(r[3] & 15, r[3] & 15))
except socket.timeout:
    print("timeout")
"""


@pytest.fixture(scope="module")
def inet() -> Iterator[FakeNet]:
    with fake_net("fn", TEST_BRIDGE, TEST_SUBNET) as net:
        yield net


def sh(sbx, command: str) -> str:
    """stdout of a command in the sandbox, or `blocked` when it failed."""
    result = sbx.commands.run(f"{command} || echo blocked", timeout=30)
    return result.stdout.strip()


def curl(sbx, url: str, resolve: str | None = None) -> str:
    extra = f"--resolve {shlex.quote(resolve)} " if resolve else ""
    return sh(sbx, f"curl -sS -k --connect-timeout 2 --max-time 5 {extra}{shlex.quote(url)} 2>/dev/null")


def rcode(sbx, name: str) -> str:
    return sh(sbx, f"python3 -c {shlex.quote(DNS_QUERY)} {shlex.quote(name)}")


def test_open_by_default(e2b_env, inet: FakeNet) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=60)
    try:
        assert curl(sbx, f"http://{inet.host_a}/").startswith(f"host={inet.host_a} peer=")
        assert "tls=yes" in curl(sbx, "https://denied.test/", f"denied.test:443:{inet.host_a}")
        assert sbx.get_info().network is None and sbx.traffic_access_token is None
    finally:
        sbx.kill()


def test_no_internet_access_blocks_everything_including_dns(e2b_env, inet: FakeNet) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=60, allow_internet_access=False)
    try:
        assert curl(sbx, f"http://{inet.host_a}/") == "blocked"
        assert curl(sbx, "https://allowed.test/", f"allowed.test:443:{inet.host_a}") == "blocked"
        assert rcode(sbx, "exfiltrate.attacker.test") == "REFUSED"
        assert sbx.get_info().allow_internet_access is False
        # a runtime update can open it (E2B: omitted allow_internet_access means true)...
        sbx.update_network({"allow_out": [inet.host_b], "deny_out": ["0.0.0.0/0"]})
        assert curl(sbx, f"http://{inet.host_b}/").startswith("host=")
        assert curl(sbx, f"http://{inet.host_a}/") == "blocked"
        assert sbx.get_info().allow_internet_access is True
        # ...and close it again
        sbx.update_network({"allow_internet_access": False})
        assert curl(sbx, f"http://{inet.host_b}/") == "blocked"
        assert sbx.get_info().allow_internet_access is False
    finally:
        sbx.kill()


def test_deny_and_allow_addresses_then_update(e2b_env, inet: FakeNet) -> None:
    from e2b import ALL_TRAFFIC, Sandbox

    sbx = Sandbox.create(timeout=60, network={"deny_out": [inet.host_a]})
    try:
        assert curl(sbx, f"http://{inet.host_a}/") == "blocked"
        assert curl(sbx, f"http://{inet.host_b}/").startswith("host=")
        assert sbx.get_info().network == {"allow_public_traffic": True, "deny_out": [inet.host_a]}
        # allowlist mode, allow wins over deny
        sbx.update_network(
            {"allow_out": [inet.host_a], "deny_out": lambda ctx: [ctx.all_traffic, inet.host_a]}
        )
        assert curl(sbx, f"http://{inet.host_a}/").startswith("host=")
        assert curl(sbx, f"http://{inet.host_b}/") == "blocked"
        assert rcode(sbx, "not-on-the-list.test") == "REFUSED"
        assert sbx.get_info().network["deny_out"] == [ALL_TRAFFIC, inet.host_a]  # type: ignore[index]
        # {} clears everything
        sbx.update_network({})
        assert curl(sbx, f"http://{inet.host_b}/").startswith("host=")
        assert curl(sbx, f"http://{inet.host_a}/").startswith("host=")
    finally:
        sbx.kill()


def test_domain_allowlist_by_sni_and_host(e2b_env, inet: FakeNet) -> None:
    from e2b import ALL_TRAFFIC, Sandbox

    sbx = Sandbox.create(
        timeout=60, network={"allow_out": ["allowed.test", "*.allowed.test"], "deny_out": [ALL_TRAFFIC]}
    )
    try:
        a = inet.host_a
        assert "tls=yes" in curl(sbx, "https://allowed.test/", f"allowed.test:443:{a}")
        assert "tls=yes" in curl(sbx, "https://api.allowed.test/", f"api.allowed.test:443:{a}")
        assert curl(sbx, "http://allowed.test/", f"allowed.test:80:{a}").startswith("host=allowed.test ")
        assert curl(sbx, "https://denied.test/", f"denied.test:443:{a}") == "blocked"
        assert curl(sbx, "http://denied.test/", f"denied.test:80:{a}") == "blocked"
        assert curl(sbx, f"https://{a}/") == "blocked"  # no name to allow it by
        assert rcode(sbx, "denied.test") == "REFUSED"
        # replaced at runtime: now only denied.test
        sbx.update_network({"allow_out": ["denied.test"], "deny_out": [ALL_TRAFFIC]})
        assert curl(sbx, "https://allowed.test/", f"allowed.test:443:{a}") == "blocked"
        assert "tls=yes" in curl(sbx, "https://denied.test/", f"denied.test:443:{a}")
    finally:
        sbx.kill()


def test_forks_keep_their_parents_policy_and_closed_ports(e2b_env, inet: FakeNet) -> None:
    import httpx
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=60, network={"deny_out": [inet.host_a], "allow_public_traffic": False})
    forks: list = []
    try:
        assert curl(sbx, f"http://{inet.host_a}/") == "blocked"
        forks = sbx.fork(count=1, timeout=60)
        fork = forks[0]
        assert isinstance(fork, Sandbox), fork
        assert curl(fork, f"http://{inet.host_a}/") == "blocked"
        assert curl(fork, f"http://{inet.host_b}/").startswith("host=")  # control: only that address
        assert fork.get_info().network == {"allow_public_traffic": False, "deny_out": [inet.host_a]}
        # closed to the public like its parent, with a key of its own
        token = fork.traffic_access_token
        assert token and token != sbx.traffic_access_token
        port = {"E2b-Sandbox-Id": fork.sandbox_id, "E2b-Sandbox-Port": "8000"}
        assert httpx.get(e2b_env.url, headers=port).status_code == 403
        parents = {**port, "e2b-traffic-access-token": sbx.traffic_access_token or ""}
        assert httpx.get(e2b_env.url, headers=parents).status_code == 403
        own = httpx.get(e2b_env.url, headers={**port, "e2b-traffic-access-token": token})
        assert own.status_code == 502  # let through; nothing listens on 8000
        # from then on the two are separate: opening the parent leaves the fork as it was
        sbx.update_network({})
        assert curl(sbx, f"http://{inet.host_a}/").startswith("host=")
        assert curl(fork, f"http://{inet.host_a}/") == "blocked"
    finally:
        for box in [sbx, *forks]:
            if isinstance(box, Sandbox):
                box.kill()


def test_invalid_policies_and_unknown_sandboxes(e2b_env) -> None:
    from e2b import Sandbox
    from e2b.exceptions import SandboxException, SandboxNotFoundException

    with pytest.raises(SandboxException, match="400: allow out contains domains but deny out is missing"):
        Sandbox.create(timeout=30, network={"allow_out": ["example.com"]})
    with pytest.raises(SandboxException, match="400: invalid network rule"):
        Sandbox.create(timeout=30, network={"deny_out": ["not a cidr"]})
    with pytest.raises(SandboxNotFoundException):
        Sandbox.update_network("nosuchsandbox0", {"deny_out": ["0.0.0.0/0"]})
    sbx = Sandbox.create(timeout=30)
    try:
        with pytest.raises(SandboxException, match="invalid network rule"):
            sbx.update_network({"deny_out": ["300.1.1.1"]})
    finally:
        sbx.kill()
    with pytest.raises(SandboxNotFoundException):
        sbx.update_network({})  # killed
