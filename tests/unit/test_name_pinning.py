"""Connections allowed by their name must go to an address of that name: the policy's verdict, the
record of DNS answers per sandbox (CNAME chains, TTLs, bounds), and the forwarder's hooks that feed
it (`on_answer`, `lookup`). Pure or loopback only."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord

from corral.core.settings import load_settings
from corral.node.network.dns import DnsForwarder, parse_upstreams
from corral.node.network.policy import ALL_TRAFFIC, EgressPolicy, Verdict
from corral.node.network.resolutions import ResolvedAddresses, answer_addresses

IP = ipaddress.ip_address
CLIENT = IP("10.202.0.5")
OTHER = IP("10.202.0.6")


# -- verdicts -------------------------------------------------------------------------------------


def test_a_name_alone_allows_only_by_name() -> None:
    policy = EgressPolicy.from_lists(["example.com", "*.example.com", "198.18.0.10"], [ALL_TRAFFIC])
    assert policy.verdict(IP("203.0.113.7"), 443, "example.com") is Verdict.ALLOW_BY_NAME
    assert policy.verdict(IP("203.0.113.7"), 443, "www.example.com") is Verdict.ALLOW_BY_NAME
    assert policy.verdict(IP("203.0.113.7"), 443, "evil.test") is Verdict.DENY
    assert policy.verdict(IP("203.0.113.7"), 443, None) is Verdict.DENY
    # an address entry allows whatever the name says
    assert policy.verdict(IP("198.18.0.10"), 443, "evil.test") is Verdict.ALLOW
    assert policy.verdict(IP("198.18.0.10"), 443, "example.com") is Verdict.ALLOW
    assert policy.allows(IP("203.0.113.7"), 443, "example.com")  # the yes/no trusts the name


def test_a_name_never_narrows_what_is_allowed_anyway() -> None:
    denylist = EgressPolicy.from_lists(["example.com"], ["198.51.100.0/24"])
    assert denylist.verdict(IP("203.0.113.7"), 443, "example.com") is Verdict.ALLOW  # not denied at all
    assert denylist.verdict(IP("198.51.100.9"), 443, "example.com") is Verdict.ALLOW_BY_NAME
    assert denylist.verdict(IP("198.51.100.9"), 443, "other.test") is Verdict.DENY
    # allow wins over a denied domain, still only by name
    both = EgressPolicy.from_lists(["*.example.com"], ["bad.example.com", ALL_TRAFFIC])
    assert both.verdict(IP("203.0.113.7"), 443, "bad.example.com") is Verdict.ALLOW_BY_NAME
    ported = EgressPolicy.from_lists(["example.com:443", "198.18.0.10:22"], [ALL_TRAFFIC])
    assert ported.verdict(IP("203.0.113.7"), 80, "example.com") is Verdict.DENY
    assert ported.verdict(IP("198.18.0.10"), 443, "example.com") is Verdict.ALLOW_BY_NAME  # wrong port


# -- answers --------------------------------------------------------------------------------------


def _reply(qname: str, *records: RR, rcode: int = RCODE.NOERROR, qtype: str = "A") -> bytes:
    reply = DNSRecord.question(qname, qtype).reply()
    reply.header.rcode = rcode
    for rr in records:
        reply.add_answer(rr)
    return reply.pack()


def test_answer_addresses_follow_cname_chains_in_any_order() -> None:
    reply = _reply(
        "WWW.Example.com.",
        RR("edge.cdn.test", QTYPE.A, rdata=A("198.18.0.7"), ttl=300),
        RR("cdn.example.net", QTYPE.CNAME, rdata=CNAME("edge.cdn.test"), ttl=20),
        RR("www.example.com", QTYPE.CNAME, rdata=CNAME("cdn.example.net"), ttl=600),
        RR("unrelated.test", QTYPE.A, rdata=A("203.0.113.66"), ttl=600),  # not on the chain
        RR("edge.cdn.test", QTYPE.AAAA, rdata=AAAA("2001:db8::7"), ttl=10),
    )
    name, found = answer_addresses(reply)  # type: ignore[misc]
    assert name == "www.example.com"
    assert found == [(IP("198.18.0.7"), 20), (IP("2001:db8::7"), 10)]  # smallest TTL on the way


def test_answer_addresses_ignore_failures_queries_and_garbage() -> None:
    assert answer_addresses(_reply("x.test", rcode=RCODE.NXDOMAIN)) is None
    assert answer_addresses(DNSRecord.question("x.test").pack()) is None  # a query, not an answer
    assert answer_addresses(b"\x00\x01garbage") is None
    cname_loop = _reply(
        "a.test",
        RR("a.test", QTYPE.CNAME, rdata=CNAME("b.test"), ttl=60),
        RR("b.test", QTYPE.CNAME, rdata=CNAME("a.test"), ttl=60),
    )
    assert answer_addresses(cname_loop) == ("a.test", [])


# -- the record -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_record_is_per_client_and_per_name_and_expires() -> None:
    clock = Clock()
    record = ResolvedAddresses(min_keep=30, max_keep=600, clock=clock)
    record.record_answer(
        CLIENT, _reply("example.com", RR("example.com", QTYPE.A, rdata=A("198.18.0.7"), ttl=5))
    )
    record.record(CLIENT, "slow.test", [(IP("198.18.0.8"), 86400)])
    assert record.resolves_to(CLIENT, "example.com", IP("198.18.0.7"))
    assert not record.resolves_to(OTHER, "example.com", IP("198.18.0.7"))  # told CLIENT, not OTHER
    assert not record.resolves_to(CLIENT, "other.test", IP("198.18.0.7"))  # another name
    assert not record.resolves_to(CLIENT, "example.com", IP("198.18.0.8"))  # another address
    clock.now += 29
    assert record.resolves_to(CLIENT, "example.com", IP("198.18.0.7"))  # a TTL of 5 s lasts min_keep
    clock.now += 2
    assert not record.resolves_to(CLIENT, "example.com", IP("198.18.0.7"))
    assert record.resolves_to(CLIENT, "slow.test", IP("198.18.0.8"))
    clock.now += 600
    assert not record.resolves_to(CLIENT, "slow.test", IP("198.18.0.8"))  # capped at max_keep
    record.record(CLIENT, "x.test", [(IP("198.18.0.9"), 60)])
    record.forget(CLIENT)
    assert record.count(CLIENT) == 0 and not record.resolves_to(CLIENT, "x.test", IP("198.18.0.9"))


def test_record_memory_is_bounded_per_client() -> None:
    clock = Clock()
    record = ResolvedAddresses(max_per_client=8, clock=clock)
    for i in range(100):
        record.record(CLIENT, f"n{i}.test", [(IP(f"198.18.1.{i}"), 60)])
    assert record.count(CLIENT) == 8
    assert record.resolves_to(CLIENT, "n99.test", IP("198.18.1.99"))  # the newest stay
    assert not record.resolves_to(CLIENT, "n0.test", IP("198.18.1.0"))
    record.record(OTHER, "n0.test", [(IP("198.18.1.0"), 60)])
    assert record.count(OTHER) == 1  # another client's budget is its own


# -- the forwarder's hooks ------------------------------------------------------------------------


class _Upstream(asyncio.DatagramProtocol):
    """www.example.test CNAME edge.cdn.test A 198.18.0.7; everything else NXDOMAIN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        request = DNSRecord.parse(data)
        reply = request.reply()
        if str(request.q.qname).rstrip(".").lower() == "www.example.test" and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.CNAME, rdata=CNAME("edge.cdn.test"), ttl=60))
            reply.add_answer(RR("edge.cdn.test", QTYPE.A, rdata=A("198.18.0.7"), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


async def test_forwarder_hands_answers_over_and_looks_names_up() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    record = ResolvedAddresses()
    fwd = DnsForwarder("127.0.0.1", [("127.0.0.1", port)], port=0, on_answer=record.record_answer)
    try:
        query = DNSRecord.question("www.example.test").pack()
        answer = await fwd.resolve(query, CLIENT, tcp=False)
        assert answer is not None and DNSRecord.parse(answer).header.rcode == RCODE.NOERROR
        assert record.resolves_to(CLIENT, "www.example.test", IP("198.18.0.7"))
        assert not record.resolves_to(CLIENT, "edge.cdn.test", IP("198.18.0.7"))  # the name asked only
        await fwd.resolve(DNSRecord.question("nx.test").pack(), CLIENT, tcp=False)
        assert record.count(CLIENT) == 1

        assert await fwd.lookup("WWW.example.test.") == [(IP("198.18.0.7"), 60)]
        assert await fwd.lookup("nx.test") == []
        assert await fwd.lookup("www.example.test", ipv6=True) == []
    finally:
        transport.close()
    assert await fwd.lookup("www.example.test") == []  # no upstream answers: nothing


def test_dns_upstreams_setting() -> None:
    assert parse_upstreams("10.0.0.2, 127.0.0.1:5353,[::1]:53,[fd00::1]") == [
        "10.0.0.2",
        ("127.0.0.1", 5353),
        "::1",
        "fd00::1",
    ]
    for bad in ("resolver.example", "127.0.0.1:0", "127.0.0.1:x"):
        with pytest.raises(ValueError):
            parse_upstreams(bad)
    settings = load_settings({}, env={"CORRAL_DNS_UPSTREAMS": "127.0.0.1:5353"})
    assert settings.dns_upstreams == "127.0.0.1:5353"
    assert load_settings({}, env={}).dns_upstreams is None
