"""Plans of the sandbox network (names, addresses, nftables text, ip batches, parsers) and the DNS
forwarder on loopback. No root, no kernel state: the executor is tested in
tests/integration/test_network.py."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from corral.core.errors import AlreadyExists, FailedPrecondition, ResourceExhausted
from corral.core.settings import load_settings
from corral.node import network
from corral.node.network import FakeNetwork
from corral.node.network.addressing import ALWAYS_DENIED_V4, allocate_ip, denied_networks, reserved_ips
from corral.node.network.dns import DnsForwarder, parse_resolv_conf, resolv_conf_text
from corral.node.network.links import (
    bridge_batch,
    detach_batch,
    fdb_batch,
    host_attach_batch,
    is_missing_object_error,
    netns_attach_batch,
    parse_host_networks,
    parse_port_alias,
    parse_ports,
    parse_uplink_mtu,
    port_alias,
)
from corral.node.network.naming import (
    bridge_mac,
    netns_name,
    netns_path,
    port_prefix,
    sandbox_id_from_netns,
    sandbox_mac,
    table_name,
    veth_name,
)
from corral.node.network.ruleset import (
    PortBinding,
    nft_error_is_missing,
    render_add_elements,
    render_delete_elements,
    render_delete_tables,
    render_ruleset,
)

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
SUBNET = NET("10.202.0.0/16")


def test_package_exports_what_it_declares() -> None:
    public = {n for n in dir(network) if not n.startswith("_")} - {
        "base", "dns", "fake", "host", "addressing", "links", "naming", "ruleset", "annotations",
        "policy", "sniff", "egress_proxy", "resolutions", "in_netns",
    }  # fmt: skip
    assert set(network.__all__) == public


# -- naming -------------------------------------------------------------------------------------


def test_veth_names_fit_ifnamsiz_and_share_a_per_bridge_prefix() -> None:
    a, b = veth_name("corral0", "abc"), veth_name("corral0", "abd")
    other = veth_name("crltest0", "abc")
    assert len(a) == len(b) == len(other) == 15
    assert re.fullmatch(r"vc[0-9a-f]{13}", a)
    assert a != b and a != other
    assert a.startswith(port_prefix("corral0")) and b.startswith(port_prefix("corral0"))
    assert not other.startswith(port_prefix("corral0"))
    assert veth_name("corral0", "abc") == a  # deterministic: a restarted server finds it again


def test_table_name_is_per_bridge_and_a_valid_nft_identifier() -> None:
    assert table_name("corral0") == "corral_corral0"
    assert table_name("br-x.1") == "corral_br_x_1"
    assert table_name("corral0") != table_name("crltest0")
    with pytest.raises(ValueError):
        table_name("a bridge name that is too long")


def test_netns_names_round_trip_and_reject_foreign_names() -> None:
    name = netns_name("corral0-", "i7x2k")
    assert name == "corral0-i7x2k"
    assert netns_path(name) == "/var/run/netns/corral0-i7x2k"
    assert sandbox_id_from_netns("corral0-", name) == "i7x2k"
    assert sandbox_id_from_netns("corral0-", "crltest0-i7x2k") is None
    # a bridge named "corral0-x" must not make "corral0-" claim its namespaces
    assert sandbox_id_from_netns("corral0-", "corral0-x-i7x2k") is None
    for bad in ("", "a-b", "../x", "A"):
        with pytest.raises(ValueError):
            netns_name("corral0-", bad)


def test_macs_are_fixed_locally_administered_unicast_and_never_collide() -> None:
    assert sandbox_mac(IP("10.202.0.2")) == "02:42:0a:ca:00:02"
    mac = bridge_mac("corral0")
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast
    assert not mac.startswith("02:42:")
    assert bridge_mac("corral0") == mac != bridge_mac("crltest0")


# -- addressing ---------------------------------------------------------------------------------


def test_allocation_skips_network_gateway_and_broadcast() -> None:
    assert reserved_ips(SUBNET) == {IP("10.202.0.0"), IP("10.202.0.1"), IP("10.202.255.255")}
    assert allocate_ip(SUBNET, set()) == IP("10.202.0.2")
    assert allocate_ip(SUBNET, {IP("10.202.0.2"), IP("10.202.0.3")}) == IP("10.202.0.4")
    tiny = NET("10.9.0.0/30")  # .0 network, .1 gateway, .3 broadcast: one sandbox
    assert allocate_ip(tiny, set()) == IP("10.9.0.2")
    with pytest.raises(ResourceExhausted):
        allocate_ip(tiny, {IP("10.9.0.2")})
    with pytest.raises(ValueError):
        allocate_ip(NET("10.9.0.0/31"), set())


def test_allocation_is_round_robin_and_wraps() -> None:
    net = NET("10.9.0.0/29")  # sandboxes .2 .. .6
    assert allocate_ip(net, set(), after=IP("10.9.0.3")) == IP("10.9.0.4")
    assert allocate_ip(net, {IP("10.9.0.4")}, after=IP("10.9.0.3")) == IP("10.9.0.5")
    assert allocate_ip(net, set(), after=IP("10.9.0.6")) == IP("10.9.0.2")  # wraps past broadcast
    assert allocate_ip(net, {IP("10.9.0.2")}, after=IP("10.9.0.6")) == IP("10.9.0.3")
    assert allocate_ip(net, set(), after=IP("192.0.2.9")) == IP("10.9.0.2")  # foreign cursor ignored
    all_used = {IP(f"10.9.0.{i}") for i in range(2, 7)}
    with pytest.raises(ResourceExhausted):
        allocate_ip(net, all_used, after=IP("10.9.0.4"))


def test_denied_networks_cover_private_ranges_host_and_pool_without_overlap() -> None:
    host = [NET("192.0.2.0/24"), NET("192.0.2.2/32"), NET("10.255.255.53/32")]
    denied = denied_networks(NET("100.80.0.0/16"), host)
    for net in ALWAYS_DENIED_V4:
        assert any(net.subnet_of(d) for d in denied), net
    for addr in ("192.0.2.2", "192.0.2.1", "10.255.255.53", "169.254.169.254", "100.80.3.4", "127.0.0.1"):
        assert any(IP(addr) in d for d in denied), addr
    for addr in ("203.0.113.80", "198.51.100.1", "8.8.8.8", "1.1.1.1"):
        assert not any(IP(addr) in d for d in denied), addr
    for i, a in enumerate(denied):  # nft rejects overlapping interval elements
        for b in denied[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    assert NET("192.0.2.0/24") in denied_networks(
        SUBNET, [NET("192.0.2.0/24"), ipaddress.ip_network("fd00::/64")]
    )


# -- ruleset ------------------------------------------------------------------------------------


def _port(ip: str, sid: str = "abc") -> PortBinding:
    return PortBinding(veth_name("crltest0", sid), sandbox_mac(IP(ip)), IP(ip))


def test_ruleset_recreates_both_tables_atomically() -> None:
    text = render_ruleset("crltest0", SUBNET)
    for family in ("inet", "bridge"):
        declare = f"table {family} corral_crltest0 {{}}\ndelete table {family} corral_crltest0\n"
        assert declare in text
        assert text.index(declare) < text.index(f"table {family} corral_crltest0 {{\n")
    assert "elements = {  }" not in text and "elements = { }" not in text  # nft rejects empty lists
    assert text.count("\n}\n") == 2


def test_ruleset_rules() -> None:
    text = render_ruleset(
        "crltest0",
        SUBNET,
        host_networks=[NET("192.0.2.0/24")],
        ports=[_port("10.202.0.2", "aaa"), _port("10.202.0.3", "bbb")],
        no_egress=[IP("10.202.0.3")],
    )
    lines = [line.strip() for line in text.splitlines()]
    assert 'ip saddr 10.202.0.0/16 oifname != "crltest0" masquerade' in lines
    assert "type filter hook forward priority filter; policy accept;" in lines  # host traffic untouched
    assert 'iifname "crltest0" jump from_sandbox' in lines
    assert 'oifname "crltest0" jump to_sandbox' in lines
    assert 'iifname "crltest0" jump input_from_sandbox' in lines
    assert "ip daddr 10.202.0.1 udp dport 53 accept" in lines
    assert "ip daddr 10.202.0.1 tcp dport 53 accept" in lines
    assert "elements = { 10.202.0.3 }" in lines
    denied = next(line for line in lines if line.startswith("elements = { 0.0.0.0/8"))
    for net in (
        "10.0.0.0/8",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.2.0/24",
        "192.168.0.0/16",
    ):
        assert net in denied
    # order inside the chains: what ends a chain is a drop (input, inbound) or the internet accept
    from_sandbox = text[text.index("chain from_sandbox") :]
    order = [
        "nfproto ipv6",
        "established,related accept",
        "ip saddr != 10.202.0.0/16",
        "@denied",
        "@no_egress",
    ]
    positions = [from_sandbox.index(marker) for marker in order]
    assert positions == sorted(positions) and positions[-1] < from_sandbox.index('accept comment "internet"')
    assert f'iifname "{port_prefix("crltest0")}*" jump from_port' in lines
    assert f'"{veth_name("crltest0", "aaa")}" . 02:42:0a:ca:00:02 . 10.202.0.2' in text
    assert "ether type ip iifname . ether saddr . ip saddr @port_addrs accept" in lines
    assert lines[lines.index('counter drop comment "spoofed or not IPv4/ARP"') - 1].startswith(
        "ether type arp"
    )


def test_rulesets_of_two_bridges_do_not_share_anything() -> None:
    a = render_ruleset("corral0", NET("10.201.0.0/16"))
    b = render_ruleset("crltest0", SUBNET)
    assert "corral_corral0" in a and "corral_crltest0" not in a
    assert "crltest0" not in a and "corral0" not in b.replace("corral_crltest0", "")


def test_element_scripts() -> None:
    port = _port("10.202.0.9")
    add = render_add_elements("crltest0", port, allow_internet=False).splitlines()
    assert add == [
        f"add element bridge corral_crltest0 port_addrs {{ {port.element()} }}",
        "add element inet corral_crltest0 no_egress { 10.202.0.9 }",
    ]
    assert render_add_elements("crltest0", port, allow_internet=True).count("\n") == 1
    delete = render_delete_elements("crltest0", port, allow_internet=False)
    assert delete == "\n".join(add).replace("add element", "delete element") + "\n"
    assert render_delete_tables("crltest0") == (
        "table inet corral_crltest0 {}\ndelete table inet corral_crltest0\n"
        "table bridge corral_crltest0 {}\ndelete table bridge corral_crltest0\n"
    )


def test_nft_missing_errors() -> None:
    missing = (
        "/dev/stdin:1:50-99: Error: Could not process rule: No such file or directory\n"
        'delete element bridge corral_x port_addrs { "vc1" . 02:42:0a:cb:00:06 . 10.203.0.6 }\n'
        "                                            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    )
    assert nft_error_is_missing(missing)
    assert not nft_error_is_missing(
        missing + "/dev/stdin:2:1-3: Error: syntax error, unexpected junk\njunk\n^^^\n"
    )
    assert not nft_error_is_missing("")


# -- ip batches and parsers ---------------------------------------------------------------------


def test_bridge_batch_creates_or_converges() -> None:
    gw = ipaddress.IPv4Interface("10.202.0.1/16")
    new = bridge_batch("crltest0", None, gw, 1400).splitlines()
    assert new[0] == "link add name crltest0 type bridge"
    assert f"link set dev crltest0 address {bridge_mac('crltest0')}" in new
    assert "link set dev crltest0 addrgenmode none" in new
    assert new[-3:] == [
        "link set dev crltest0 mtu 1400",
        "addr replace 10.202.0.1/16 dev crltest0",
        "link set dev crltest0 up",
    ]
    again = bridge_batch("crltest0", {"linkinfo": {"info_kind": "bridge"}}, gw, 1400).splitlines()
    assert again == new[-3:]  # every line idempotent
    # a server that ran with another subnet left its gateway: it goes (redirect targets the first address)
    addrs = [
        {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "192.0.2.2", "prefixlen": 24}]},
        {"ifname": "crltest0", "addr_info": [
            {"family": "inet", "local": "10.230.0.1", "prefixlen": 16},
            {"family": "inet", "local": "10.202.0.1", "prefixlen": 16},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
        ]},
    ]  # fmt: skip
    stale = bridge_batch("crltest0", {"linkinfo": {"info_kind": "bridge"}}, gw, 1400, addrs).splitlines()
    assert stale == [*new[-3:-1], "addr del 10.230.0.1/16 dev crltest0", new[-1]]
    with pytest.raises(ValueError, match="not a bridge"):
        bridge_batch("crltest0", {"linkinfo": {"info_kind": "veth"}}, gw, 1400)
    with pytest.raises(ValueError, match="not a bridge"):
        bridge_batch("crltest0", {"ifname": "crltest0"}, gw, 1400)


def test_attach_batches() -> None:
    host = host_attach_batch(
        bridge="crltest0", netns="crltest0-abc", veth="vc0123456789abc", mac="02:42:0a:ca:00:02",
        alias="corral:abc:10.202.0.2:internet", mtu=1400,
    ).splitlines()  # fmt: skip
    assert host[0] == "netns add crltest0-abc"
    assert host[1] == (
        "link add vc0123456789abc mtu 1400 type veth peer name eth0 mtu 1400 "
        "address 02:42:0a:ca:00:02 netns crltest0-abc"
    )
    assert "link set dev vc0123456789abc master crltest0" in host
    assert (
        "link set dev vc0123456789abc type bridge_slave isolated on learning off flood off mcast_flood off"
        in host
    )
    assert host[-1] == "link set dev vc0123456789abc up"  # up only once isolated and enslaved
    inside = netns_attach_batch(ipaddress.IPv4Interface("10.202.0.2/16"), IP("10.202.0.1")).splitlines()
    assert inside.index("link set dev eth0 addrgenmode none") < inside.index("link set dev eth0 up")
    assert "addr add 10.202.0.2/16 dev eth0" in inside
    assert inside[-1] == "route add default via 10.202.0.1 dev eth0"
    assert fdb_batch(veth="vc0123456789abc", mac="02:42:0a:ca:00:02") == (
        "fdb replace 02:42:0a:ca:00:02 dev vc0123456789abc master static\n"
    )


def test_detach_batch_cuts_the_link_before_the_name() -> None:
    batch = detach_batch(netns="crltest0-abc", veth="vc0123456789abc")
    assert batch.splitlines() == ["link del dev vc0123456789abc", "netns del crltest0-abc"]


def test_missing_object_errors() -> None:
    assert is_missing_object_error('Cannot find device "vc1"\nCommand failed -:1\n')
    assert is_missing_object_error(
        'Cannot remove namespace file "/run/netns/x": No such file or directory\nCommand failed -:2\n'
        "RTNETLINK answers: No such file or directory\n"
    )
    assert is_missing_object_error(
        "Dump was interrupted and may be inconsistent.\nRTNETLINK answers: No such file or directory\n"
    )
    assert not is_missing_object_error("RTNETLINK answers: Operation not permitted\n")
    assert not is_missing_object_error("Dump was interrupted and may be inconsistent.\n")
    assert not is_missing_object_error('Cannot find device "x"\nRTNETLINK answers: File exists\n')
    assert not is_missing_object_error("")


def test_port_alias_round_trip_and_parse_ports() -> None:
    alias = port_alias("abc", IP("10.202.0.7"), allow_internet=False)
    assert " " not in alias
    assert parse_port_alias(alias) == ("abc", IP("10.202.0.7"), False)
    assert parse_port_alias(port_alias("abc", IP("10.202.0.7"), True)) == ("abc", IP("10.202.0.7"), True)
    for bad in ("", "corral:abc:10.202.0.7", "other:abc:10.202.0.7:internet", "corral:a-b:10.0.0.1:internet",
                "corral:abc:999.1.1.1:internet", "corral:abc:10.0.0.1:maybe"):  # fmt: skip
        assert parse_port_alias(bad) is None, bad
    prefix = port_prefix("crltest0")
    links = [
        {"ifname": veth_name("crltest0", "abc"), "ifalias": alias},
        {"ifname": veth_name("crltest0", "def"), "ifalias": port_alias("def", IP("10.202.0.8"), True)},
        {"ifname": "vethother", "ifalias": port_alias("zzz", IP("10.202.0.9"), True)},  # not our port
        {"ifname": veth_name("crltest0", "ghi")},  # no alias (half-made): not adopted
    ]
    ports = parse_ports(links, prefix)
    assert set(ports) == {"abc", "def"}
    assert ports["abc"].ip == IP("10.202.0.7") and not ports["abc"].allow_internet
    assert ports["abc"].mac == sandbox_mac(IP("10.202.0.7"))
    assert ports["def"].veth == veth_name("crltest0", "def") and ports["def"].allow_internet


def test_parse_host_networks_and_uplink_mtu() -> None:
    addrs = [
        {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8},
                                       {"family": "inet6", "local": "::1", "prefixlen": 128}]},
        {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "192.0.2.2", "prefixlen": 24}]},
        {"ifname": "ifb0"},
    ]  # fmt: skip
    assert set(parse_host_networks(addrs)) == {
        NET("127.0.0.0/8"), NET("127.0.0.1/32"), NET("192.0.2.0/24"), NET("192.0.2.2/32")
    }  # fmt: skip
    routes = [{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"}]
    links = [{"ifname": "lo", "mtu": 65536}, {"ifname": "eth0", "mtu": 1400}]
    assert parse_uplink_mtu(routes, links) == 1400
    assert parse_uplink_mtu([], links) == 1500


# -- DNS ----------------------------------------------------------------------------------------


def test_parse_resolv_conf() -> None:
    text = """# generated
nameserver 10.255.255.53
nameserver   127.0.0.53 # stub, usable from the host namespace
nameserver fe80::1%eth0
nameserver not-an-address
; nameserver 9.9.9.9
search example.com
"""
    assert parse_resolv_conf(text) == ["10.255.255.53", "127.0.0.53", "fe80::1"]
    assert parse_resolv_conf("") == []


def test_resolv_conf_points_sandboxes_at_the_gateway_only() -> None:
    settings = load_settings({"bridge": "crltest0", "subnet": "10.202.0.0/16"}, env={})
    text = resolv_conf_text(settings)
    assert re.findall(r"^nameserver (\S+)$", text, re.MULTILINE) == ["10.202.0.1"]


class _Upstream(asyncio.DatagramProtocol):
    """A loopback DNS server: every A query gets 203.0.113.80; `silent` drops everything."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.seen: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        request = DNSRecord.parse(data)
        self.seen.append(str(request.q.qname))
        if not self.silent:
            reply = request.reply()
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("203.0.113.80"), ttl=60))
            self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


async def _upstream(silent: bool = False) -> tuple[asyncio.DatagramTransport, _Upstream, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Upstream(silent), local_addr=("127.0.0.1", 0)
    )
    return transport, proto, transport.get_extra_info("sockname")[1]


async def _tcp_upstream() -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        request = DNSRecord.parse(await reader.readexactly(n))
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("203.0.113.81"), ttl=60))
        data = reply.pack()
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u.bind(("127.0.0.1", port))
        return port


async def _udp_query(port: int, name: str, timeout: float = 3.0) -> DNSRecord | None:
    loop = asyncio.get_running_loop()
    query = DNSRecord.question(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        await loop.sock_sendall(sock, query.pack())
        try:
            async with asyncio.timeout(timeout):
                reply = DNSRecord.parse(await loop.sock_recv(sock, 65535))
        except TimeoutError:
            return None
    assert reply.header.id == query.header.id
    return reply


async def test_forwarder_relays_udp_and_tcp_and_applies_its_policy() -> None:
    transport, upstream, up_port = await _upstream()
    tcp_server, tcp_port = await _tcp_upstream()
    port = _free_port()
    denied = {"blocked.example"}
    fwd = DnsForwarder(
        "127.0.0.1",
        [("127.0.0.1", up_port)],
        port=port,
        policy=lambda qname, client: qname not in denied,
    )
    await fwd.start()
    try:
        reply = await _udp_query(port, "deb.debian.org")
        assert reply is not None and reply.header.rcode == RCODE.NOERROR
        assert [str(rr.rdata) for rr in reply.rr] == ["203.0.113.80"]
        assert upstream.seen == ["deb.debian.org."]

        reply = await _udp_query(port, "Blocked.Example")
        assert reply is not None and reply.header.rcode == RCODE.REFUSED and not reply.rr
        assert upstream.seen == ["deb.debian.org."]  # the refused name never left

        fwd.upstreams = (("127.0.0.1", tcp_port),)  # TCP clients are relayed over TCP
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for name in ("pypi.org", "blocked.example"):  # two queries on one connection
            query = DNSRecord.question(name).pack()
            writer.write(struct.pack("!H", len(query)) + query)
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            answer = DNSRecord.parse(await reader.readexactly(n))
            if name == "pypi.org":
                assert [str(rr.rdata) for rr in answer.rr] == ["203.0.113.81"]
            else:
                assert answer.header.rcode == RCODE.REFUSED
        writer.close()

        assert await fwd.resolve(b"\x00garbage", IP("127.0.0.1"), tcp=False) is None
        response = DNSRecord.question("x.org").reply().pack()
        assert await fwd.resolve(response, IP("127.0.0.1"), tcp=False) is None  # answers are not queries
    finally:
        await fwd.aclose()
        transport.close()
        tcp_server.close()


async def test_forwarder_servfails_when_upstreams_time_out_and_ignores_foreign_clients() -> None:
    transport, upstream, up_port = await _upstream(silent=True)
    port = _free_port()
    fwd = DnsForwarder("127.0.0.1", [("127.0.0.1", up_port)], port=port, timeout=0.3)
    await fwd.start()
    try:
        reply = await _udp_query(port, "deb.debian.org")
        assert reply is not None and reply.header.rcode == RCODE.SERVFAIL
        assert upstream.seen == ["deb.debian.org."]
        fwd.allowed_clients = NET("10.202.0.0/16")  # 127.0.0.1 is not a sandbox: no answer at all
        assert await _udp_query(port, "deb.debian.org", timeout=1.0) is None
    finally:
        await fwd.aclose()
        transport.close()
    assert fwd._udp is not None and fwd._udp.is_closing()


async def test_forwarder_bounds_queries_in_flight() -> None:
    transport, upstream, up_port = await _upstream(silent=True)
    port = _free_port()
    fwd = DnsForwarder("127.0.0.1", [("127.0.0.1", up_port)], port=port, timeout=1.0, max_inflight=12)
    await fwd.start()
    try:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            for i in range(5):
                await loop.sock_sendall(sock, DNSRecord.question(f"n{i}.example").pack())
            await asyncio.sleep(0.3)
            assert len(fwd._tasks) == 3  # one client gets a quarter of the forwarder
            assert len(upstream.seen) == 3
            assert not fwd._has_room(IP("127.0.0.1"), 3, 12)
            assert fwd._has_room(IP("10.9.9.9"), 11, 12)  # another client still gets in...
            assert not fwd._has_room(IP("10.9.9.9"), 12, 12)  # ...until the forwarder is full
    finally:
        await fwd.aclose()
        transport.close()
    assert not fwd._tasks  # close() ended every query it owned
    assert not fwd._has_room(IP("10.9.9.50"), 0, 12)  # and takes no more


# -- fake ---------------------------------------------------------------------------------------


async def test_fake_network_allocates_like_the_real_one() -> None:
    settings = load_settings({"bridge": "crltest0", "subnet": "10.202.0.0/16"}, env={})
    net = FakeNetwork(settings)
    with pytest.raises(FailedPrecondition):
        await net.attach("abc", True)
    await net.ensure_host()
    atts = await asyncio.gather(*(net.attach(f"s{i}", i % 2 == 0) for i in range(20)))
    assert len({a.ip for a in atts}) == 20 and all(a.ip in SUBNET for a in atts)
    assert atts[0].netns_path == "/var/run/netns/crltest0-s0" and atts[0].gateway == IP("10.202.0.1")
    with pytest.raises(AlreadyExists):
        await net.attach("s0", True)
    await net.detach("s0")
    await net.detach("s0")
    assert "s0" not in await net.list_attached() and len(await net.used_ips()) == 19
