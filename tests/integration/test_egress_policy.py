"""Egress policies on the real kernel: per-sandbox nft chains, the inspecting proxy (SNI / Host),
DNS by policy, always-denied ranges, runtime replacement and re-adoption after a restart.

Sandboxes here are bare network namespaces attached by `SandboxNetwork` on a bridge of this module's
own (`crleg0`, 10.204.0.0/16; override with CORRAL_TEST_EGRESS_BRIDGE / _SUBNET); probes are `curl`
run inside them with `ip netns exec`. "The internet" is `tests.network_fixtures.FakeNet`: a namespace
with 198.18.204.10/.11 (reachable), 172.29.204.1 (private) and 169.254.204.1 (link-local). DNS is
answered by a fake upstream on loopback (`allowed.test` and `www.allowed.test` are host A,
`b.allowed.test` host B, anything else 198.18.0.99): a connection that only its name allows must
go to an address of that name. No packet leaves the machine.

Every "blocked" assertion has a control showing the same probe succeeding where it should.
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
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from dnslib import CNAME, QTYPE, RR, A, DNSRecord

from corral.core.settings import Settings, load_settings
from corral.node.network import Attachment, EgressPolicy, IngressPolicy, NetworkPolicy, SandboxNetwork
from corral.node.network.naming import table_name
from corral.node.network.policy import ALL_TRAFFIC
from tests.network_fixtures import FakeNet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not (shutil.which("ip") and shutil.which("nft") and shutil.which("curl") and shutil.which("openssl")),
        reason="needs iproute2, nftables, curl and openssl",
    ),
    pytest.mark.timeout(180),
]

BRIDGE = os.environ.get("CORRAL_TEST_EGRESS_BRIDGE", "crleg0")
SUBNET = ipaddress.IPv4Network(os.environ.get("CORRAL_TEST_EGRESS_SUBNET", "10.204.0.0/16"))
GATEWAY = str(SUBNET.network_address + 1)
OCTET = SUBNET.network_address.packed[1]
TABLE = table_name(BRIDGE)
STATE_DIR = Path(f"/run/corral/test-egress-{BRIDGE}")
FAKE_ANSWER = "198.18.0.99"


# -- probes -------------------------------------------------------------------------------------


async def sh(*argv: str, check: bool = True, timeout: float = 20) -> tuple[int, str, str]:
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
    assert proc.returncode is not None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}: {err.decode()}")
    return proc.returncode, out.decode(), err.decode()


async def curl(ns: str | None, url: str, *, resolve: str | None = None, max_time: float = 3) -> str:
    """The body, or `blocked` when the connection failed (dropped, reset, closed by the proxy)."""
    argv = [*(["ip", "netns", "exec", ns] if ns else []), "curl", "-sS", "-k", "--noproxy", "*"]
    argv += ["--connect-timeout", "1", "--max-time", str(max_time)]
    argv += ["--resolve", resolve] if resolve else []
    code, out, _ = await sh(*argv, url, check=False)
    return out.strip() if code == 0 else "blocked"


async def tcp(ns: str, host: str, port: int) -> str:
    """`telnet`-like: the line a plain TCP server sends, or `blocked`."""
    code, out, _ = await sh(
        "ip", "netns", "exec", ns, sys.executable, "-c",
        "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1);"
        "print(s.recv(100).decode().strip())", host, str(port), check=False,
    )  # fmt: skip
    return out.strip() if code == 0 else "blocked"


DNS_PROBE = r"""
import socket, sys
from dnslib import DNSRecord, RCODE
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(DNSRecord.question(sys.argv[2]).pack(), (sys.argv[1], 53))
try:
    r = DNSRecord.parse(s.recv(65535))
    print(RCODE.get(r.header.rcode), ",".join(str(rr.rdata) for rr in r.rr) or "-")
except socket.timeout:
    print("timeout")
"""


async def dns(ns: str, name: str) -> str:
    return (await sh("ip", "netns", "exec", ns, sys.executable, "-c", DNS_PROBE, GATEWAY, name))[1].strip()


async def counter(comment: str) -> int:
    """Packets counted by every rule with this comment (all chains of our table)."""
    data = json.loads((await sh("nft", "-j", "list", "table", "inet", TABLE))[1])
    total = 0
    for item in data["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


# -- fixtures -----------------------------------------------------------------------------------


class FakeUpstream(asyncio.DatagramProtocol):
    """The host's resolver, on loopback: `records` maps a name to an address or to `cname:<name>`;
    any other name gets A 198.18.0.99."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.records: dict[str, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        request = DNSRecord.parse(data)
        name = str(request.q.qname).rstrip(".")
        self.seen.append(name)
        reply = request.reply()
        for _ in range(8):
            target = self.records.get(name, FAKE_ANSWER)
            if not target.startswith("cname:"):
                break
            reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(target[6:]), ttl=60))
            name = target[6:]
        reply.add_answer(RR(name, QTYPE.A, rdata=A(target), ttl=60))
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


@dataclasses.dataclass
class Env:
    settings: Settings
    net: SandboxNetwork
    upstream: FakeUpstream
    upstream_addr: tuple[str, int]
    inet: FakeNet
    sbx: dict[str, Attachment] = dataclasses.field(default_factory=dict)

    def new_net(self) -> SandboxNetwork:
        return SandboxNetwork(self.settings, dns_upstreams=[self.upstream_addr], state_dir=STATE_DIR)

    async def sandbox(self, name: str, policy: NetworkPolicy | None = None) -> Attachment:
        if name in self.sbx:
            await self.net.detach(name)
        if policy is not None:
            await self.net.set_policy(name, policy)
        self.sbx[name] = await self.net.attach(name, allow_internet=True)
        return self.sbx[name]


def egress(
    allow: list[str] | None = None, deny: list[str] | None = None, *, internet: bool = True
) -> NetworkPolicy:
    return NetworkPolicy(EgressPolicy.from_lists(allow, deny, allow_internet_access=internet))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env() -> AsyncIterator[Env]:
    with open(f"/run/lock/corral-test-{BRIDGE}.lock", "w") as lock:  # noqa: ASYNC230 (instant)
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        settings = load_settings({"bridge": BRIDGE, "subnet": str(SUBNET), "home": "/nonexistent"}, env={})
        loop = asyncio.get_running_loop()
        transport, upstream = await loop.create_datagram_endpoint(FakeUpstream, local_addr=("127.0.0.1", 0))
        inet = FakeNet(name=f"crlegnet{OCTET}", veth=f"crlegfn{OCTET}", octet=OCTET)
        await SandboxNetwork(settings, dns=False, egress_proxy=False, state_dir=STATE_DIR).teardown_host()
        box = Env(settings, None, upstream, transport.get_extra_info("sockname")[:2], inet)  # type: ignore[arg-type]
        upstream.records.update(
            {"allowed.test": inet.host_a, "www.allowed.test": inet.host_a, "b.allowed.test": inet.host_b}
        )
        box.net = box.new_net()
        try:
            await asyncio.to_thread(inet.up)
            await box.net.ensure_host()
            yield box
        finally:
            with contextlib.suppress(Exception):
                await box.net.close()
            await SandboxNetwork(settings, dns=False, egress_proxy=False, state_dir=STATE_DIR).teardown_host()
            await asyncio.to_thread(inet.down)
            transport.close()
        assert not list(STATE_DIR.glob("*.json"))


# -- tests --------------------------------------------------------------------------------------


async def test_open_sandbox_reaches_the_fake_internet(env: Env) -> None:
    att = await env.sandbox("open")
    ns, a = att.netns_name, env.inet.host_a
    assert (await curl(ns, f"http://{a}/")).startswith(f"host={a} peer=")
    assert "tls=yes" in await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{a}")
    assert (await tcp(ns, a, 8080)).startswith("peer=")
    assert (await dns(ns, "anything.test")) == f"NOERROR {FAKE_ANSWER}"
    assert env.net.egress_proxy_port is not None
    assert (
        "redirect"
        not in (await sh("nft", "list", "chain", "inet", TABLE, f"inspect_{str(att.ip).replace('.', '_')}"))[
            1
        ]
    )


async def test_deny_addresses(env: Env) -> None:
    att = await env.sandbox("denyip", egress(deny=[env.inet.host_a, f"{env.inet.host_b}:8080"]))
    ns = att.netns_name
    before = await counter("egress denied")
    assert await tcp(ns, env.inet.host_a, 8080) == "blocked"
    assert await curl(ns, f"http://{env.inet.host_a}/") == "blocked"
    assert await tcp(ns, env.inet.host_b, 8080) == "blocked"  # that port only
    assert (await curl(ns, f"http://{env.inet.host_b}/")).startswith(
        "host="
    )  # control: other port, same host
    assert await counter("egress denied") >= before + 3


async def test_allowlist_of_addresses(env: Env) -> None:
    att = await env.sandbox("allowip", egress(allow=[env.inet.host_b], deny=[ALL_TRAFFIC]))
    ns = att.netns_name
    assert (await tcp(ns, env.inet.host_b, 8080)).startswith("peer=")
    assert await tcp(ns, env.inet.host_a, 8080) == "blocked"
    assert await curl(ns, f"http://{env.inet.host_a}/") == "blocked"
    seen = len(env.upstream.seen)
    assert await dns(ns, "anything.test") == "REFUSED -"  # no name is on the list
    assert len(env.upstream.seen) == seen


async def test_domain_allowlist_by_sni_and_host(env: Env) -> None:
    att = await env.sandbox("domains", egress(allow=["allowed.test"], deny=[ALL_TRAFFIC]))
    ns, a = att.netns_name, env.inet.host_a
    before = env.net._proxy.decisions.copy()  # type: ignore[union-attr]
    answer = await curl(ns, "http://allowed.test/", resolve=f"allowed.test:80:{a}")
    assert answer.startswith("host=allowed.test peer=") and answer.endswith("tls=no")
    assert "tls=yes" in await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{a}")
    assert await curl(ns, "http://denied.test/", resolve=f"denied.test:80:{a}") == "blocked"
    assert await curl(ns, "https://denied.test/", resolve=f"denied.test:443:{a}") == "blocked"
    assert await curl(ns, f"https://{a}/") == "blocked"  # no SNI: decided by address alone
    assert await tcp(ns, a, 8080) == "blocked"  # not an inspected port: addresses only
    after = env.net._proxy.decisions  # type: ignore[union-attr]
    assert after["allowed"] - before["allowed"] == 2 and after["denied"] - before["denied"] == 3
    # DNS answers the allowlist only
    assert await dns(ns, "allowed.test") == f"NOERROR {a}"
    seen = len(env.upstream.seen)
    assert await dns(ns, "denied.test") == "REFUSED -"
    assert await dns(ns, "exfil.attacker.test") == "REFUSED -"
    assert len(env.upstream.seen) == seen
    # the proxy is reachable only through the redirect, never dialled directly
    assert await tcp(ns, GATEWAY, env.net.egress_proxy_port) == "blocked"  # type: ignore[arg-type]


async def test_wildcards_and_ports(env: Env) -> None:
    att = await env.sandbox("wild", egress(allow=["*.allowed.test:443"], deny=[ALL_TRAFFIC]))
    ns, a = att.netns_name, env.inet.host_a
    assert "tls=yes" in await curl(ns, "https://www.allowed.test/", resolve=f"www.allowed.test:443:{a}")
    assert await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{a}") == "blocked"
    assert (
        await curl(ns, "http://www.allowed.test/", resolve=f"www.allowed.test:80:{a}") == "blocked"
    )  # port 443 only


async def test_allow_wins_over_deny(env: Env) -> None:
    a, b = env.inet.host_a, env.inet.host_b
    att = await env.sandbox("allowwins", egress(allow=[a, "b.allowed.test"], deny=[a, f"{b}/32"]))
    ns = att.netns_name
    assert (await tcp(ns, a, 8080)).startswith("peer=")
    assert "tls=yes" in await curl(ns, "https://b.allowed.test/", resolve=f"b.allowed.test:443:{b}")
    assert await curl(ns, "https://other.test/", resolve=f"other.test:443:{b}") == "blocked"


async def test_a_name_takes_a_connection_only_to_its_own_addresses(env: Env) -> None:
    """SNI / Host spoofing: an allowed name sent to an address it does not resolve to is refused."""
    a, b = env.inet.host_a, env.inet.host_b
    att = await env.sandbox("pinned", egress(allow=["allowed.test", "*.allowed.test"], deny=[ALL_TRAFFIC]))
    ns = att.netns_name
    proxy = env.net._proxy
    assert proxy is not None
    before = proxy.decisions.copy()
    # resolved through the sandbox's own forwarder, then connected to: works
    assert await dns(ns, "b.allowed.test") == f"NOERROR {b}"
    assert "tls=yes" in await curl(ns, "https://b.allowed.test/", resolve=f"b.allowed.test:443:{b}")
    # an allowed name to an address that is not one of its own: refused, by SNI and by Host
    assert await curl(ns, "https://b.allowed.test/", resolve=f"b.allowed.test:443:{a}") == "blocked"
    assert await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{b}") == "blocked"
    assert await curl(ns, "http://allowed.test/", resolve=f"allowed.test:80:{b}") == "blocked"
    # control: a name the sandbox never asked for, to its address (the proxy resolves it itself)
    assert "tls=yes" in await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{a}")
    after = proxy.decisions
    assert after["name mismatch"] - before["name mismatch"] == 3
    assert after["allowed"] - before["allowed"] == 2


async def test_the_answers_a_sandbox_got_hold_through_cnames_and_changes(env: Env) -> None:
    a, b = env.inet.host_a, env.inet.host_b
    env.upstream.records.update({"cdn.allowed.test": "cname:edge.cdn.test", "edge.cdn.test": b})
    try:
        policy = egress(allow=["*.allowed.test"], deny=[ALL_TRAFFIC])
        att = await env.sandbox("cname", policy)
        ns = att.netns_name
        assert await dns(ns, "cdn.allowed.test") == f"NOERROR edge.cdn.test.,{b}"
        env.upstream.records["cdn.allowed.test"] = a  # the name moves after the sandbox asked
        # what the sandbox was told still counts (under the name it asked), and so does the new answer
        assert "tls=yes" in await curl(ns, "https://cdn.allowed.test/", resolve=f"cdn.allowed.test:443:{b}")
        assert "tls=yes" in await curl(ns, "https://cdn.allowed.test/", resolve=f"cdn.allowed.test:443:{a}")
        # the chain's target is no allowed name of its own
        assert await curl(ns, "https://edge.cdn.test/", resolve=f"edge.cdn.test:443:{b}") == "blocked"
        # another sandbox was told nothing: only the current answer counts for it
        other = await env.sandbox("cname2", policy)
        assert (
            await curl(other.netns_name, "https://cdn.allowed.test/", resolve=f"cdn.allowed.test:443:{b}")
            == "blocked"
        )
        # a detached sandbox's answers go with it (its address will be someone else's)
        assert env.net.resolved_names.count(att.ip) > 0
        await env.net.detach("cname")
        env.sbx.pop("cname")
        assert env.net.resolved_names.count(att.ip) == 0
    finally:
        for name in ("cdn.allowed.test", "edge.cdn.test"):
            env.upstream.records.pop(name, None)


async def test_an_allowed_address_takes_any_name(env: Env) -> None:
    a, b = env.inet.host_a, env.inet.host_b
    att = await env.sandbox("cidrsni", egress(allow=[f"{b}/32", "allowed.test"], deny=[ALL_TRAFFIC]))
    ns = att.netns_name
    for name in ("allowed.test", "other.test", "b.allowed.test"):
        assert "tls=yes" in await curl(ns, f"https://{name}/", resolve=f"{name}:443:{b}")
    assert (await curl(ns, "http://other.test/", resolve=f"other.test:80:{b}")).startswith("host=other.test ")
    assert "tls=yes" in await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{a}")  # by name
    assert await curl(ns, "https://other.test/", resolve=f"other.test:443:{a}") == "blocked"  # control


async def test_always_denied_ranges_cannot_be_reopened(env: Env) -> None:
    inet = env.inet
    for target in (inet.private, inet.link_local):  # controls: the hosts are there
        assert (await curl(None, f"http://{target}/")).startswith("host=")
    neighbour = await env.sandbox("neighbour")
    async with _listener(neighbour.netns_name, 8080):
        assert (await tcp(neighbour.netns_name, "127.0.0.1", 8080)).startswith("peer=")  # control
        everything = [inet.private, inet.link_local, "172.16.0.0/12", "169.254.0.0/16", "10.0.0.0/8",
                      str(neighbour.ip), GATEWAY, "127.0.0.1", "0.0.0.0/0", "*"]  # fmt: skip
        att = await env.sandbox("greedy", egress(allow=everything, deny=[ALL_TRAFFIC]))
        ns = att.netns_name
        before = await counter("denied ranges")
        assert await curl(ns, f"http://{inet.private}/") == "blocked"
        assert await curl(ns, f"http://{inet.link_local}/") == "blocked"
        assert await tcp(ns, str(neighbour.ip), 8080) == "blocked"
        assert await tcp(ns, GATEWAY, 8080) == "blocked"
        # by name too: the redirect skips denied ranges, and the proxy would refuse them anyway
        assert (
            await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{inet.private}") == "blocked"
        )
        # private, link-local and private-by-name; the neighbour is cut off at layer 2 (isolated ports)
        assert await counter("denied ranges") >= before + 3
        assert (await curl(ns, f"http://{inet.host_a}/")).startswith("host=")  # control: allowed ("*")


async def test_no_internet_then_opened_and_closed_at_runtime(env: Env) -> None:
    att = await env.sandbox("closed", egress(internet=False))
    ns = att.netns_name
    assert not att.allow_internet
    assert await tcp(ns, env.inet.host_a, 8080) == "blocked"
    seen = len(env.upstream.seen)
    assert await dns(ns, "exfil.attacker.test") == "REFUSED -"
    assert len(env.upstream.seen) == seen
    # open it up: the no_egress element and the alias follow
    await env.net.set_policy("closed", egress())
    assert (await tcp(ns, env.inet.host_a, 8080)).startswith("peer=")
    assert (await dns(ns, "x.test")).startswith("NOERROR")
    alias = json.loads((await sh("ip", "-j", "link", "show", "dev", att.veth_host))[1])[0]["ifalias"]
    assert alias.endswith(":internet")
    # a domain allowlist at runtime, then closed again
    await env.net.set_policy("closed", egress(allow=["allowed.test"], deny=[ALL_TRAFFIC]))
    assert "tls=yes" in await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{env.inet.host_a}")
    assert await curl(ns, "https://denied.test/", resolve=f"denied.test:443:{env.inet.host_a}") == "blocked"
    await env.net.set_policy("closed", egress(internet=False))
    assert await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{env.inet.host_a}") == "blocked"
    assert await dns(ns, "allowed.test") == "REFUSED -"
    elements = json.loads((await sh("nft", "-j", "list", "set", "inet", TABLE, "no_egress"))[1])
    assert str(att.ip) in json.dumps(elements)


async def test_large_transfers_stream_through_the_proxy(env: Env) -> None:
    att = await env.sandbox("stream", egress(allow=["allowed.test"], deny=[ALL_TRAFFIC]))
    code, out, _ = await sh(
        "ip", "netns", "exec", att.netns_name, "curl", "-sS", "-k", "--noproxy", "*", "--max-time", "20",
        "--resolve", f"allowed.test:443:{env.inet.host_a}", "-o", "/dev/null", "-w", "%{size_download}",
        "https://allowed.test/big/20000000",
    )  # fmt: skip
    assert code == 0 and int(out) == 20_000_000


async def test_policies_survive_a_restart(env: Env) -> None:
    att = await env.sandbox("survivor", egress(allow=["allowed.test"], deny=[ALL_TRAFFIC]))
    policy = NetworkPolicy(
        EgressPolicy.from_lists(["allowed.test"], [ALL_TRAFFIC]), IngressPolicy("tok", None)
    )
    await env.net.set_policy("survivor", policy)
    ns, a = att.netns_name, env.inet.host_a
    old_port = env.net.egress_proxy_port
    await env.net.close()
    # worst case: the rules are gone too; only the kernel's links and the policy files remain
    await sh("nft", "delete", "table", "inet", TABLE)
    env.net = env.new_net()
    await env.net.ensure_host()
    assert env.net.policy("survivor") == policy
    assert env.net.egress_proxy_port is not None and old_port is not None
    assert "tls=yes" in await curl(ns, "https://allowed.test/", resolve=f"allowed.test:443:{a}")
    assert await curl(ns, "https://denied.test/", resolve=f"denied.test:443:{a}") == "blocked"
    assert await dns(ns, "denied.test") == "REFUSED -"
    closed = env.sbx["closed"]
    assert not (await env.net.list_attached())["closed"].allow_internet
    assert await tcp(closed.netns_name, a, 8080) == "blocked"


async def test_detach_removes_chains_and_policy_file(env: Env) -> None:
    att = env.sbx["survivor"]
    key = str(att.ip).replace(".", "_")
    assert (STATE_DIR / "survivor.json").exists()
    assert (STATE_DIR / "survivor.json").stat().st_mode & 0o077 == 0  # holds the traffic token
    await env.net.detach("survivor")
    chains = (await sh("nft", "list", "table", "inet", TABLE))[1]
    assert f"egress_{key}" not in chains and f"inspect_{key}" not in chains
    assert not (STATE_DIR / "survivor.json").exists()
    assert env.net.policy("survivor") is None
    await env.net.detach("survivor")  # idempotent


@contextlib.asynccontextmanager
async def _listener(ns: str, port: int) -> AsyncIterator[None]:
    script = (
        "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('0.0.0.0',{port}));s.listen(8);print('ready',flush=True)\n"
        "while True:\n c,p=s.accept();c.sendall(f'peer={p[0]}\\n'.encode());c.close()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
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
