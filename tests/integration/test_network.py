"""The sandbox network on the real kernel: bridge, namespaces, nftables, DNS forwarder.

Everything happens on a bridge of its own (`crlnt0`, 10.203.0.0/16) and in namespaces this module
makes. No packet leaves the machine: DNS is answered by a fake upstream on loopback, and "the
internet" is a namespace `crlntinet` reached through an unnumbered veth (198.51.100.1, TEST-NET-2,
plus 172.29.253.1 as a private address that must stay unreachable).

Sandbox A and B may use the internet, C may not. Probes run inside the namespaces with
`ip netns exec <ns> python -c ...`; every blocked probe has a control that shows the same probe
succeeding where it should, so a broken setup cannot pass as "blocked".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import shutil
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from dnslib import QTYPE, RR, A, DNSRecord

from corral.core.settings import Settings, load_settings
from corral.node.network import Attachment, SandboxNetwork
from corral.node.network.naming import bridge_mac, port_prefix, table_name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not (shutil.which("ip") and shutil.which("nft")), reason="needs iproute2 and nftables"
    ),
    pytest.mark.timeout(120),
]

BRIDGE = "crlnt0"
SUBNET = ipaddress.IPv4Network("10.203.0.0/16")
GATEWAY = "10.203.0.1"
TABLE = table_name(BRIDGE)
INET_NS = "crlntinet"  # no "crlnt0-" prefix: not a sandbox namespace
INET_VETH = "crlntfi0"
INET_IP = "198.51.100.1"
PRIVATE_IP = "172.29.253.1"
FAKE_ANSWER = "203.0.113.80"
BLOCKED = "timeout"  # a dropped SYN or query: nothing comes back

PROBE = r"""
import socket, struct, sys
mode, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
src = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
try:
    if mode == "tcp":
        s = socket.socket(); s.settimeout(timeout)
        if src: s.bind((src, 0))
        s.connect((host, port)); print("open", s.recv(100).decode().strip())
    else:
        from dnslib import DNSRecord, RCODE
        name = sys.argv[6]
        q = DNSRecord.question(name).pack()
        if mode == "dns-udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            if src: s.bind((src, 0))
            s.sendto(q, (host, port)); data = s.recv(65535)
        else:
            s = socket.socket(); s.settimeout(timeout)
            if src: s.bind((src, 0))
            s.connect((host, port)); s.sendall(struct.pack("!H", len(q)) + q)
            n = struct.unpack("!H", s.recv(2))[0]; data = b""
            while len(data) < n: data += s.recv(n - len(data))
        r = DNSRecord.parse(data)
        print("dns", RCODE.get(r.header.rcode), ",".join(str(rr.rdata) for rr in r.rr) or "-")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e.errno)
"""

LISTEN = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16); print("ready", flush=True)
while True:
    c, peer = s.accept(); c.sendall(peer[0].encode() + b"\n"); c.close()
"""


# -- helpers ------------------------------------------------------------------------------------


async def sh(*argv: str, check: bool = True, timeout: float = 20) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}: {err.decode()}")
    return out.decode()


def _ns(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


async def tcp(ns: str | None, host: str, port: int, *, timeout: float = 1.0, src: str = "-") -> str:
    return (
        await sh(*_ns(ns), sys.executable, "-c", PROBE, "tcp", host, str(port), str(timeout), src)
    ).strip()


async def dns(ns: str | None, name: str, *, server: str = GATEWAY, tcp: bool = False, timeout: float = 2.0,
              src: str = "-") -> str:  # fmt: skip
    mode = "dns-tcp" if tcp else "dns-udp"
    out = await sh(*_ns(ns), sys.executable, "-c", PROBE, mode, server, "53", str(timeout), src, name)
    return out.strip()


@contextlib.asynccontextmanager
async def listener(ns: str | None, port: int) -> AsyncIterator[None]:
    """A TCP server (in `ns`, or on the host) that tells each client the address it came from."""
    proc = await asyncio.create_subprocess_exec(
        *_ns(ns), sys.executable, "-c", LISTEN, str(port), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            assert (await proc.stdout.readline()).strip() == b"ready"
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def counters() -> dict[str, int]:
    """Packets counted by each commented rule of both tables, by comment."""
    found: dict[str, int] = {}
    for family in ("inet", "bridge"):
        data = json.loads(await sh("nft", "-j", "list", "table", family, TABLE))
        for item in data["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    found[rule["comment"]] = expr["counter"]["packets"]
    return found


async def set_elements(family: str, name: str) -> list:
    data = json.loads(await sh("nft", "-j", "list", "set", family, TABLE, name))
    return next(i["set"] for i in data["nftables"] if "set" in i).get("elem", [])


async def link(name: str, ns: str | None = None) -> dict | None:
    out = await sh("ip", *(["-n", ns] if ns else []), "-json", "-d", "addr", "show", "dev", name, check=False)
    return json.loads(out)[0] if out.strip() else None


def netns_names() -> set[str]:
    try:
        return set(os.listdir("/var/run/netns"))
    except FileNotFoundError:
        return set()


# -- fixtures -----------------------------------------------------------------------------------


class FakeUpstream(asyncio.DatagramProtocol):
    """The host's resolver, on loopback: every query gets A 203.0.113.80."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.transport.sendto(self.answer(data), addr)  # type: ignore[attr-defined]

    def answer(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        self.seen.append(str(request.q.qname).rstrip("."))
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(FAKE_ANSWER), ttl=60))
        return reply.pack()


@dataclasses.dataclass
class Env:
    settings: Settings
    net: SandboxNetwork
    upstream: FakeUpstream
    upstream_addr: tuple[str, int]
    a: Attachment
    b: Attachment
    c: Attachment

    def new_net(self) -> SandboxNetwork:
        return SandboxNetwork(self.settings, dns_upstreams=[self.upstream_addr])


async def _remove_fake_internet() -> None:
    await sh("ip", "link", "del", INET_VETH, check=False)
    await sh("ip", "netns", "del", INET_NS, check=False)


async def _make_fake_internet() -> None:
    """`crlntinet`: 198.51.100.1 and 172.29.253.1 behind an unnumbered host veth, so the host has
    no address there (its own networks are denied to sandboxes, this one must look like the
    internet). Replies go back on-link to whatever masqueraded address the host used."""
    await sh("ip", "netns", "add", INET_NS)
    await sh("ip", "link", "add", INET_VETH, "type", "veth", "peer", "name", "eth0", "netns", INET_NS)
    await sh("ip", "link", "set", "dev", INET_VETH, "addrgenmode", "none")
    await sh("ip", "link", "set", "dev", INET_VETH, "up")
    batch = (
        f"link set dev lo up\nlink set dev eth0 addrgenmode none\naddr add {INET_IP}/24 dev eth0\n"
        f"addr add {PRIVATE_IP}/24 dev eth0\nlink set dev eth0 up\nroute add default dev eth0\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "ip", "-n", INET_NS, "-batch", "-", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate(batch.encode())
    assert proc.returncode == 0, err
    await sh("ip", "route", "add", "198.51.100.0/24", "dev", INET_VETH)
    await sh("ip", "route", "add", "172.29.253.0/24", "dev", INET_VETH)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env() -> AsyncIterator[Env]:
    # Two runs of this module at once (two people's `make test`) would tear down each other's bridge.
    with open(f"/run/lock/corral-test-{BRIDGE}.lock", "w") as lock:  # noqa: ASYNC230 (instant)
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        async for box in _env():
            yield box


async def _env() -> AsyncIterator[Env]:
    settings = load_settings({"bridge": BRIDGE, "subnet": str(SUBNET), "home": "/nonexistent"}, env={})
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(FakeUpstream, local_addr=("127.0.0.1", 0))
    upstream_addr = transport.get_extra_info("sockname")[:2]

    async def tcp_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        answer = upstream.answer(await reader.readexactly(n))
        writer.write(struct.pack("!H", len(answer)) + answer)
        await writer.drain()
        writer.close()

    tcp_upstream = await asyncio.start_server(tcp_answer, "127.0.0.1", upstream_addr[1])
    # leftovers of an interrupted run
    await SandboxNetwork(settings, dns=False).teardown_host()
    await _remove_fake_internet()
    net = SandboxNetwork(settings, dns_upstreams=[upstream_addr])
    box = Env(settings, net, upstream, upstream_addr, None, None, None)  # type: ignore[arg-type]
    try:
        await _make_fake_internet()
        await net.ensure_host()
        box.a = await net.attach("sbxa", allow_internet=True)
        box.b = await net.attach("sbxb", allow_internet=True)
        box.c = await net.attach("sbxc", allow_internet=False)
        yield box
    finally:
        with contextlib.suppress(Exception):
            await box.net.close()
        await SandboxNetwork(settings, dns=False).teardown_host()
        await _remove_fake_internet()
        tcp_upstream.close()
        transport.close()
    assert BRIDGE not in await sh("ip", "-br", "link")
    assert not {n for n in netns_names() if n.startswith(f"{BRIDGE}-") or n == INET_NS}


# -- tests --------------------------------------------------------------------------------------


async def test_host_setup(env: Env) -> None:
    await env.net.ensure_host()  # idempotent
    bridge = await link(BRIDGE)
    assert bridge is not None and "UP" in bridge["flags"]
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert bridge["address"] == bridge_mac(BRIDGE)
    assert [(a["family"], a["local"], a["prefixlen"]) for a in bridge["addr_info"]] == [("inet", GATEWAY, 16)]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    tables = await sh("nft", "list", "tables")
    assert f"table inet {TABLE}" in tables and f"table bridge {TABLE}" in tables
    ruleset = await sh("nft", "list", "table", "inet", TABLE)
    assert f'ip saddr {SUBNET} oifname != "{BRIDGE}" masquerade' in ruleset


async def test_attachment_shape(env: Env) -> None:
    a = env.a
    assert a.netns_path == f"/var/run/netns/{BRIDGE}-sbxa" and Path(a.netns_path).exists()
    assert a.ip in SUBNET and str(a.gateway) == GATEWAY and a.prefixlen == 16
    assert len({env.a.ip, env.b.ip, env.c.ip}) == 3
    eth0 = await link("eth0", a.netns_name)
    assert eth0 is not None and eth0["address"] == a.mac and "UP" in eth0["flags"]
    assert [(x["family"], x["local"]) for x in eth0["addr_info"]] == [("inet", str(a.ip))]  # no IPv6
    routes = json.loads(await sh("ip", "-n", a.netns_name, "-json", "route", "show", "default"))
    assert routes == [{"dst": "default", "gateway": GATEWAY, "dev": "eth0", "flags": []}]
    port = await link(a.veth_host)
    assert port is not None and port["master"] == BRIDGE and port["ifname"].startswith(port_prefix(BRIDGE))
    slave = port["linkinfo"]["info_slave_data"]
    assert slave["isolated"] and not slave["learning"] and not slave["flood"] and not slave["mcast_flood"]
    fdb = await sh("bridge", "fdb", "show", "dev", a.veth_host)
    assert f"{a.mac} master {BRIDGE} static" in fdb


async def test_dns_through_the_gateway(env: Env) -> None:
    assert await dns(env.a.netns_name, "deb.debian.org") == f"dns NOERROR {FAKE_ANSWER}"
    assert await dns(env.a.netns_name, "pypi.org", tcp=True) == f"dns NOERROR {FAKE_ANSWER}"
    assert env.upstream.seen[-2:] == ["deb.debian.org", "pypi.org"]
    # no internet, no names: DNS would be C's one way out
    seen = len(env.upstream.seen)
    assert await dns(env.c.netns_name, "exfil.example") == "dns REFUSED -"
    assert len(env.upstream.seen) == seen


async def test_host_ports_are_closed_to_sandboxes(env: Env) -> None:
    async with listener(None, 18931):
        assert (await tcp(None, GATEWAY, 18931)).startswith("open")  # control: the listener works
        before = (await counters())["host ports"]
        assert await tcp(env.a.netns_name, GATEWAY, 18931) == BLOCKED
        assert await tcp(env.c.netns_name, GATEWAY, 18931) == BLOCKED
        assert await tcp(env.a.netns_name, "192.0.2.2", 18931) == BLOCKED  # any host address
        assert (await counters())["host ports"] > before


async def test_sandboxes_cannot_reach_each_other(env: Env) -> None:
    a, b = env.a, env.b
    async with listener(b.netns_name, 8080):
        assert await tcp(None, str(b.ip), 8080) == f"open {GATEWAY}"  # control: host -> sandbox works
        assert await tcp(a.netns_name, str(b.ip), 8080) == BLOCKED  # same segment: isolated ports
        # and routed through the gateway, past the bridge's isolation, the forward chain stops it
        await sh("ip", "-n", a.netns_name, "route", "add", f"{b.ip}/32", "via", GATEWAY)
        try:
            before = (await counters())["denied ranges"]
            assert await tcp(a.netns_name, str(b.ip), 8080) == BLOCKED
            assert (await counters())["denied ranges"] > before
        finally:
            await sh("ip", "-n", a.netns_name, "route", "del", f"{b.ip}/32")


async def test_internet_egress_is_masqueraded_and_policed(env: Env) -> None:
    async with listener(INET_NS, 8080):
        seen_as = await tcp(env.a.netns_name, INET_IP, 8080)
        assert seen_as.startswith("open ")
        assert ipaddress.IPv4Address(seen_as.split()[1]) not in SUBNET  # masqueraded
        before = await counters()
        assert await tcp(env.c.netns_name, INET_IP, 8080) == BLOCKED  # allow_internet=False
        assert (await tcp(None, PRIVATE_IP, 8080)).startswith("open")  # control for the next one
        assert await tcp(env.a.netns_name, PRIVATE_IP, 8080) == BLOCKED  # private range
        after = await counters()
        assert after["internet access disabled"] > before["internet access disabled"]
        assert after["denied ranges"] > before["denied ranges"]


async def test_no_connections_from_outside_into_sandboxes(env: Env) -> None:
    fi_mac = (await link(INET_VETH))["address"]  # type: ignore[index]
    await sh("ip", "-n", INET_NS, "neigh", "replace", "169.254.77.1", "lladdr", fi_mac, "dev", "eth0")
    await sh("ip", "-n", INET_NS, "route", "add", str(SUBNET), "via", "169.254.77.1", "dev", "eth0", "onlink")
    try:
        async with listener(env.a.netns_name, 8081):
            assert (await tcp(None, str(env.a.ip), 8081)).startswith("open")  # control
            before = (await counters())["no inbound connections"]
            assert await tcp(INET_NS, str(env.a.ip), 8081) == BLOCKED
            assert (await counters())["no inbound connections"] > before
    finally:
        await sh("ip", "-n", INET_NS, "route", "del", str(SUBNET), check=False)


async def test_forged_addresses_are_dropped_at_the_bridge(env: Env) -> None:
    a = env.a
    assert (await dns(a.netns_name, "deb.debian.org")).startswith("dns NOERROR")  # control
    before = (await counters())["spoofed or not IPv4/ARP"]
    # another sandbox's address (C's, to escape C's policy the other way round)...
    await sh("ip", "-n", a.netns_name, "addr", "add", "10.203.0.200/16", "dev", "eth0")
    try:
        assert await dns(a.netns_name, "deb.debian.org", src="10.203.0.200", timeout=1) == BLOCKED
    finally:
        await sh("ip", "-n", a.netns_name, "addr", "del", "10.203.0.200/16", "dev", "eth0")
    # ...or another MAC
    await sh("ip", "-n", a.netns_name, "link", "set", "dev", "eth0", "address", "02:42:0a:cb:00:fe")
    try:
        assert await dns(a.netns_name, "deb.debian.org", timeout=1) == BLOCKED
    finally:
        await sh("ip", "-n", a.netns_name, "link", "set", "dev", "eth0", "address", a.mac)
    assert (await counters())["spoofed or not IPv4/ARP"] > before
    assert (await dns(a.netns_name, "deb.debian.org")).startswith("dns NOERROR")  # back to normal


async def test_a_restarted_server_readopts_everything(env: Env) -> None:
    await env.net.close()  # the old server's DNS forwarder goes with it
    # worst case: the rules are gone too (flushed firewall); only the kernel's links remain
    await sh("nft", "delete", "table", "inet", TABLE)
    await sh("nft", "delete", "table", "bridge", TABLE)
    env.net = env.new_net()
    await env.net.ensure_host()
    attached = await env.net.list_attached()
    assert attached == {"sbxa": env.a, "sbxb": env.b, "sbxc": env.c}
    assert await env.net.used_ips() == {env.a.ip, env.b.ip, env.c.ip}
    assert [e for e in await set_elements("inet", "no_egress")] == [str(env.c.ip)]
    assert len(await set_elements("bridge", "port_addrs")) == 3
    assert (await dns(env.a.netns_name, "deb.debian.org")).startswith("dns NOERROR")
    assert await dns(env.c.netns_name, "deb.debian.org") == "dns REFUSED -"
    async with listener(INET_NS, 8080):
        assert (await tcp(env.a.netns_name, INET_IP, 8080)).startswith("open")
        assert await tcp(env.c.netns_name, INET_IP, 8080) == BLOCKED
    d = await env.net.attach("sbxd", allow_internet=True)  # allocation continues past the adopted
    assert d.ip not in {env.a.ip, env.b.ip, env.c.ip}
    await env.net.detach("sbxd")


async def test_detach_is_complete_and_idempotent(env: Env) -> None:
    b = env.b
    await env.net.detach(b.sandbox_id)
    assert b.netns_name not in netns_names()
    assert await link(b.veth_host) is None
    assert not any(b.veth_host in json.dumps(e) for e in await set_elements("bridge", "port_addrs"))
    assert b.veth_host not in await sh("bridge", "fdb", "show", "br", BRIDGE)
    assert "sbxb" not in await env.net.list_attached()
    await env.net.detach(b.sandbox_id)  # again: nothing left to do, no error
    await env.net.detach("neverattached")
    # C's no_egress element goes with it, so its address can serve a sandbox with internet later
    c = env.c
    await env.net.detach(c.sandbox_id)
    assert await set_elements("inet", "no_egress") == []
    # a new server (no memory of C) detaches from what the kernel says
    env.c = await env.net.attach("sbxc", allow_internet=False)
    fresh = env.new_net()
    await fresh.detach("sbxc")
    assert await set_elements("inet", "no_egress") == [] and env.c.netns_name not in netns_names()


async def test_attach_over_the_leftovers_of_a_crash(env: Env) -> None:
    await sh("ip", "netns", "add", f"{BRIDGE}-crashed")  # a namespace without a port
    att = await env.net.attach("crashed", allow_internet=True)
    try:
        assert (await dns(att.netns_name, "deb.debian.org")).startswith("dns NOERROR")
    finally:
        await env.net.detach("crashed")


async def test_reconcile_removes_what_nobody_keeps(env: Env) -> None:
    await sh("ip", "netns", "add", f"{BRIDGE}-orphan1")  # a namespace without a port (crash)
    removed = await env.net.reconcile(keep={"sbxa"})
    assert "orphan1" in removed and "sbxa" not in removed
    assert f"{BRIDGE}-orphan1" not in netns_names() and env.a.netns_name in netns_names()


async def test_concurrent_attach_detach(env: Env) -> None:
    ids = [f"par{i}" for i in range(24)]
    atts = await asyncio.gather(*(env.net.attach(i, allow_internet=i.endswith("1")) for i in ids))
    assert len({a.ip for a in atts}) == len(ids)
    assert set(ids) <= set(await env.net.list_attached())
    await asyncio.gather(*(env.net.detach(i) for i in ids))
    assert not any(f"{BRIDGE}-{i}" in netns_names() for i in ids)
    ports = [
        line.split()[0] for line in (await sh("ip", "-br", "link", "show", "master", BRIDGE)).splitlines()
    ]
    assert [p.split("@")[0] for p in ports] == [env.a.veth_host]  # only A is left



async def test_teardown_removes_everything(env: Env) -> None:
    net = env.net
    await net.teardown_host()
    assert await link(BRIDGE) is None
    tables = await sh("nft", "list", "tables")
    assert TABLE not in tables
    assert not {n for n in netns_names() if n.startswith(f"{BRIDGE}-")}
    await net.teardown_host()  # idempotent


@pytest.mark.skipif(
    os.environ.get("CORRAL_TEST_HOST_DNS") != "1",
    reason="asks the machine's own resolver; opt in with CORRAL_TEST_HOST_DNS=1",
)
async def test_forwarding_to_the_host_resolver() -> None:
    """One real query through the forwarder to the resolvers of /etc/resolv.conf (no sandbox)."""
    from corral.node.network.dns import host_upstreams, start_dns_forwarder

    fwd = await start_dns_forwarder("127.0.0.1", host_upstreams(), port=15353)
    try:
        out = await sh(
            sys.executable, "-c", PROBE, "dns-udp", "127.0.0.1", "15353", "5", "-", "deb.debian.org"
        )
        assert out.startswith("dns NOERROR") and out.split()[2] != "-", out
    finally:
        await fwd.aclose()
