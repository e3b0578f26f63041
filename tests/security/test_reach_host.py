"""A sandbox cannot reach the host or other sandboxes (gVisor class Lateral, attacker = SandboxRoot).

Canary TCP listeners on the host (on 0.0.0.0, so on every host address) record every connection;
from inside a sandbox, as root, nothing may reach them through any host address (the bridge
gateway, the other bridges, the uplink), nor the Corral API port, nor a server in another sandbox.
Raw and packet sockets (the way to spoof 127.0.0.1 onto the bridge, CVE-2020-8558, or to forge
ARP/IPv6 RAs) are refused: no CAP_NET_RAW. Traffic only goes to the host's own addresses.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_SUBNET, ServerProcess
from tests.security._probes import run, run_python
from tests.security.conftest import SandboxFactory

pytestmark = [pytest.mark.integration, pytest.mark.compat]


class _Canary:
    """A TCP listener on 0.0.0.0 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.hits.append(addr[0])
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def canary() -> Iterator[_Canary]:
    listener = _Canary()
    try:
        yield listener
    finally:
        listener.close()


def _host_addresses() -> list[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    addresses = []
    for line in out.splitlines():
        address = ipaddress.IPv4Interface(line.split()[3]).ip
        if not address.is_loopback:
            addresses.append(str(address))
    return addresses


_CONNECT_PROBE = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
targets = json.loads(sys.argv[1])
def attempt(target):
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect(tuple(target))
        return target
    except OSError:
        return None
    finally:
        s.close()
with ThreadPoolExecutor(64) as pool:
    print(json.dumps([t for t in pool.map(attempt, targets) if t is not None]))
"""


def _reachable(sbx, targets: list[tuple[str, int]]) -> list[list[object]]:
    sbx.files.write("/tmp/connect.py", _CONNECT_PROBE, user="root")
    out = run(sbx, f"python3 /tmp/connect.py '{json.dumps(targets)}'", timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_host_addresses_and_api_port_are_unreachable(
    corral_server: ServerProcess, make_sandbox: SandboxFactory, canary: _Canary
) -> None:
    """Lateral/HostLeak: from sandbox root, no host address (gateway, other bridges, uplink) answers
    on a host canary port or on the Corral API port; the canary sees no connection."""
    sbx = make_sandbox()
    gateway = str(ipaddress.IPv4Network(TEST_SUBNET).network_address + 1)
    addresses = sorted(set(_host_addresses()) | {gateway})
    targets = [(a, p) for a in addresses for p in (canary.port, corral_server.port, 22)]
    targets += [("127.0.0.1", corral_server.port), ("127.0.0.1", canary.port)]
    assert _reachable(sbx, targets) == []
    assert canary.hits == []
    # The control: the sandbox's own envd on its loopback does answer (the probe can connect).
    assert _reachable(sbx, [("127.0.0.1", 49983)]) == [["127.0.0.1", 49983]]


def test_other_sandboxes_are_unreachable(corral_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    """Lateral: a server listening on 0.0.0.0 in sandbox B cannot be reached from sandbox A (while
    B reaches itself on its own address)."""
    a, b = make_sandbox(), make_sandbox()
    b.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True, timeout=0)
    ip_b = run(b, "hostname -I").stdout.split()[0]
    deadline_probe = (
        "for i in $(seq 300); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done"
    )
    run(b, deadline_probe)
    assert _reachable(b, [(ip_b, 8000)]) == [[ip_b, 8000]]
    assert _reachable(a, [(ip_b, 8000), (ip_b, 49983)]) == []


def test_no_raw_or_packet_sockets(corral_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    """Lateral (CVE-2020-8558 route_localnet, ARP and IPv6 RA spoofing): sandbox root cannot open
    raw IP or packet sockets."""
    sbx = make_sandbox()
    results = run_python(
        sbx,
        "import json, socket\n"
        "out = {}\n"
        "for name, args in {'raw_ip': (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),\n"
        "                   'raw_icmp': (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),\n"
        "                   'raw_ipv6': (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW),\n"
        "                   'packet': (socket.AF_PACKET, socket.SOCK_RAW, 0x0300)}.items():\n"
        "    try:\n"
        "        socket.socket(*args).close()\n"
        "        out[name] = 'opened'\n"
        "    except OSError as e:\n"
        "        out[name] = e.errno\n"
        "print(json.dumps(out))\n",
    )
    assert isinstance(results, dict)
    assert "opened" not in results.values(), results
