"""Egress policy, SNI/Host sniffing, the nft rules a policy becomes, and the control plane's
validation of E2B's `network` config. Pure: no root, no kernel."""

from __future__ import annotations

import dataclasses
import ipaddress
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from corral.core.errors import InvalidArgument, NotFound
from corral.core.sandbox import SandboxState
from corral.core.settings import load_settings
from corral.node.network import FakeNetwork
from corral.node.network.policy import (
    ALL_TRAFFIC,
    EgressPolicy,
    IngressPolicy,
    NetworkPolicy,
    PolicyError,
    match_domain,
    merge_port_ranges,
    parse_rule,
)
from corral.node.network.ruleset import (
    egress_chain_rules,
    inspect_chain_rules,
    nft_error_is_missing,
    render_policy_delete,
    render_policy_update,
    render_ruleset,
)
from corral.node.network.sniff import host_header_name, sniff_hostname
from corral.server.network_policy import NetworkPolicies, NetworkUpdateRequest, plan_network
from corral.server.public_ports import check_traffic_token, forwarded_headers
from corral.server.store import SandboxRow, Store

IP = ipaddress.ip_address
NET = ipaddress.IPv4Network


# -- rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "network", "domain", "ports"),
    [
        ("8.8.8.8", "8.8.8.8/32", None, None),
        ("8.8.8.0/24", "8.8.8.0/24", None, None),
        ("8.8.8.7/24", "8.8.8.0/24", None, None),  # host bits allowed, as Go's ParseCIDR
        ("8.8.8.8:53", "8.8.8.8/32", None, (53, 53)),
        ("8.8.8.0/24:1-1024", "8.8.8.0/24", None, (1, 1024)),
        ("8.8.8.8:", "8.8.8.8/32", None, None),
        ("0.0.0.0/0", "0.0.0.0/0", None, None),
        ("2001:db8::/32", "2001:db8::/32", None, None),
        ("[2001:db8::1]:443", "2001:db8::1/128", None, (443, 443)),
        ("Example.COM.", None, "example.com", None),
        ("*.example.com:443", None, "*.example.com", (443, 443)),
        ("*", None, "*", None),
        ("bücher.example", None, "xn--bcher-kva.example", None),
    ],
)
def test_parse_rule(
    entry: str, network: str | None, domain: str | None, ports: tuple[int, int] | None
) -> None:
    rule = parse_rule(entry)
    assert (str(rule.network) if rule.network else None, rule.domain, rule.ports) == (network, domain, ports)


@pytest.mark.parametrize(
    "entry", ["", "  ", "8.8.8.8:0", "8.8.8.8:70000", "8.8.8.8:90-80", "exa mple.com", "a*.example.com",
              "example.*", "-bad.example", "[::1", "x" * 300, "300.1.1.1", "1.2.3"]
)  # fmt: skip
def test_parse_rule_refuses(entry: str) -> None:
    with pytest.raises(PolicyError):
        parse_rule(entry)


def test_match_domain_is_e2bs() -> None:
    assert match_domain("example.com", "example.com") and match_domain("EXAMPLE.com", "example.com")
    assert not match_domain("api.example.com", "example.com")
    assert match_domain("api.example.com", "*.example.com") and match_domain(
        "a.b.example.com", "*.example.com"
    )
    assert not match_domain("example.com", "*.example.com")  # the wildcard needs a label
    assert not match_domain("badexample.com", "*.example.com")
    assert match_domain("anything.test", "*") and not match_domain("", "*")


def test_merge_port_ranges() -> None:
    assert merge_port_ranges([(443, 443), (80, 80), (81, 90), (85, 100), (200, 300)]) == [
        (80, 100), (200, 300), (443, 443)
    ]  # fmt: skip


# -- decisions ------------------------------------------------------------------------------------


def test_default_policy_allows_everything_and_every_name() -> None:
    policy = EgressPolicy()
    assert policy.is_open and not policy.denies_all and not policy.blocks_everything
    assert policy.allows(IP("1.1.1.1"), 443) and policy.allows_name("anything.example")
    assert policy.inspected_ports() == []


def test_allow_wins_over_deny() -> None:
    policy = EgressPolicy.from_lists(["198.18.0.10", "allowed.test"], ["198.18.0.0/24", ALL_TRAFFIC])
    assert policy.allows(IP("198.18.0.10"), 22)  # allowed address, any port
    assert not policy.allows(IP("198.18.0.11"), 22)
    assert policy.allows(IP("198.18.0.11"), 443, "allowed.test")  # allowed by name, denied address
    assert not policy.allows(IP("198.18.0.11"), 443, "denied.test")
    assert not policy.allows(IP("198.18.0.11"), 443, None)  # no name at all: https://<ip>


def test_ports_narrow_rules() -> None:
    policy = EgressPolicy.from_lists(["198.18.0.10:80", "allowed.test:443"], [ALL_TRAFFIC])
    assert policy.allows(IP("198.18.0.10"), 80) and not policy.allows(IP("198.18.0.10"), 81)
    assert policy.allows(IP("1.2.3.4"), 443, "allowed.test")
    assert not policy.allows(IP("1.2.3.4"), 80, "allowed.test")
    assert policy.inspected_ports() == [(443, 443)]
    deny_port = EgressPolicy.from_lists(None, ["198.18.0.10:25"])
    assert not deny_port.allows(IP("198.18.0.10"), 25) and deny_port.allows(IP("198.18.0.10"), 80)


def test_denylist_mode_and_domain_denies() -> None:
    policy = EgressPolicy.from_lists(["ok.evil.test"], ["*.evil.test", "203.0.113.7"])
    assert policy.allows(IP("1.1.1.1"), 443, "good.test") and not policy.allows(IP("203.0.113.7"), 80)
    assert not policy.allows(IP("1.1.1.1"), 443, "x.evil.test") and policy.allows(
        IP("1.1.1.1"), 443, "ok.evil.test"
    )
    assert policy.inspected_ports() == [(80, 80), (443, 443)]
    assert policy.allows_name("good.test") and policy.allows_name("ok.evil.test")
    assert not policy.allows_name("x.evil.test")


def test_no_internet_keeps_allow_out_like_e2b() -> None:
    closed = EgressPolicy.from_lists(None, ["1.1.1.1"], allow_internet_access=False)
    assert closed.blocks_everything and [r.entry for r in closed.deny] == [ALL_TRAFFIC]
    assert not closed.allows_name("example.com")
    pinhole = EgressPolicy.from_lists(["198.18.0.10"], None, allow_internet_access=False)
    assert pinhole.denies_all and not pinhole.blocks_everything
    assert pinhole.allows(IP("198.18.0.10"), 80) and not pinhole.allows(IP("198.18.0.11"), 80)


def test_dns_follows_the_allowlist() -> None:
    policy = EgressPolicy.from_lists(["allowed.test", "*.pypi.test", "198.18.0.10"], [ALL_TRAFFIC])
    assert policy.allows_name("allowed.test") and policy.allows_name("files.pypi.test")
    assert not policy.allows_name("denied.test") and not policy.allows_name("pypi.test")
    assert not policy.allows_name("exfil-data.attacker.test")
    addresses_only = EgressPolicy.from_lists(["198.18.0.10"], [ALL_TRAFFIC])
    assert not addresses_only.allows_name("anything.test")


def test_domains_need_a_deny() -> None:
    with pytest.raises(PolicyError, match=r"missing 0\.0\.0\.0/0"):
        EgressPolicy.from_lists(["example.com"], None)
    EgressPolicy.from_lists(["example.com"], ["*.example.com"])  # any deny makes it meaningful
    EgressPolicy.from_lists(["example.com"], ["203.0.113.0/24"])


def test_policy_json_round_trip() -> None:
    policy = NetworkPolicy(
        EgressPolicy.from_lists(["a.test", "1.2.3.0/24:80-90"], [ALL_TRAFFIC]),
        IngressPolicy("tok", "h:${PORT}"),
    )
    assert NetworkPolicy.from_json(policy.to_json()) == policy
    assert (
        NetworkPolicy.default(False).egress.blocks_everything and NetworkPolicy.default(True).egress.is_open
    )
    assert policy.ingress.host_for(8080) == "h:8080" and IngressPolicy().host_for(1) is None


# -- sniffing -------------------------------------------------------------------------------------


def _client_hello(server_hostname: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def test_sni_from_a_real_client_hello() -> None:
    hello = _client_hello("Allowed.Test")
    assert sniff_hostname(hello) == (True, "allowed.test")
    for cut in (1, 5, 40, len(hello) - 1):  # any prefix: "read more"
        assert sniff_hostname(hello[:cut]) == (False, None)
    assert sniff_hostname(_client_hello(None)) == (True, None)  # https://<ip>: no SNI


def test_sni_across_records() -> None:
    hello = _client_hello("split.test")
    body = hello[5:]
    first, second = body[:30], body[30:]
    records = (
        b"\x16\x03\x01"
        + len(first).to_bytes(2, "big")
        + first
        + b"\x16\x03\x01"
        + len(second).to_bytes(2, "big")
        + second
    )
    assert sniff_hostname(records) == (True, "split.test")


def test_garbage_is_decided_without_a_name() -> None:
    assert sniff_hostname(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == (True, None)  # not a ClientHello
    assert sniff_hostname(b"SSH-2.0-OpenSSH_9.2\r\n") == (True, None)
    assert sniff_hostname(b"\x00\x01binary") == (True, None)
    assert sniff_hostname(b"") == (False, None)


def test_http_host() -> None:
    request = b"GET / HTTP/1.1\r\nUser-Agent: curl\r\nHost: Allowed.Test:8080\r\nAccept: */*\r\n\r\n"
    assert sniff_hostname(request) == (True, "allowed.test")
    assert sniff_hostname(request[:20]) == (False, None)
    assert sniff_hostname(b"GE") == (False, None)
    assert sniff_hostname(b"GET / HTTP/1.0\r\n\r\n") == (True, None)
    assert sniff_hostname(b"POST /x HTTP/1.1\r\nhost: a.test\r\n") == (True, "a.test")
    assert sniff_hostname(b"GARBAGE\r\nHost: a.test\r\n\r\n") == (True, None)
    assert host_header_name(b"[::1]:80") is None and host_header_name(b"ex ample") is None


# -- rules rendered for nftables ------------------------------------------------------------------


def test_egress_chain_rules() -> None:
    policy = EgressPolicy.from_lists(
        ["198.18.0.11", "198.18.0.0/24", "1.2.3.0/24:80-90", "a.test", "2001:db8::1"],
        [ALL_TRAFFIC, "9.9.9.9:53"],
    )
    assert egress_chain_rules(policy) == [
        'ip daddr 198.18.0.0/24 counter accept comment "egress allowed"',  # collapsed: no overlap
        'ip daddr 1.2.3.0/24 meta l4proto { tcp, udp } th dport 80-90 counter accept comment "egress allowed"',
        'counter drop comment "egress denied"',
        'ip daddr 9.9.9.9/32 meta l4proto { tcp, udp } th dport 53 counter drop comment "egress denied"',
    ]
    assert egress_chain_rules(EgressPolicy()) == []


def test_inspect_chain_rules() -> None:
    policy = EgressPolicy.from_lists(["a.test", "b.test:8000-8100"], [ALL_TRAFFIC])
    assert inspect_chain_rules(policy, 4567) == [
        'ip daddr != @denied tcp dport { 80, 443, 8000-8100 } counter redirect to :4567 comment "egress inspection"'
    ]
    assert inspect_chain_rules(policy, None) == [
        'tcp dport { 80, 443, 8000-8100 } counter drop comment "egress inspection unavailable"'
    ]
    assert inspect_chain_rules(EgressPolicy.from_lists(["1.1.1.1"], [ALL_TRAFFIC]), 4567) == []


def test_ruleset_with_policies() -> None:
    ip = ipaddress.IPv4Address("10.202.0.2")
    policy = EgressPolicy.from_lists(["a.test"], [ALL_TRAFFIC])
    text = render_ruleset("crltest0", NET("10.202.0.0/16"), policies={ip: policy}, proxy_port=4567)
    lines = [line.strip() for line in text.splitlines()]
    assert "elements = { 10.202.0.2 : jump egress_10_202_0_2 }" in lines
    assert "elements = { 10.202.0.2 : jump inspect_10_202_0_2 }" in lines
    assert 'iifname "crltest0" ip saddr vmap @inspect_policy' in lines
    assert "ip daddr 10.202.0.1 tcp dport 4567 ct status dnat accept" in lines
    from_sandbox = text[text.index("chain from_sandbox") :]
    assert (
        from_sandbox.index("@no_egress")
        < from_sandbox.index("vmap @egress_policy")
        < from_sandbox.index('accept comment "internet"')
    )
    assert text.index("chain egress_10_202_0_2") < text.index("map egress_policy")  # chains before the map
    assert "tcp dport 4567" not in render_ruleset("crltest0", NET("10.202.0.0/16"))  # no proxy, no hole


def test_policy_update_and_delete_scripts() -> None:
    ip = ipaddress.IPv4Address("10.202.0.9")
    script = render_policy_update("crltest0", ip, EgressPolicy.from_lists(["a.test"], [ALL_TRAFFIC]), 4567)
    lines = script.splitlines()
    assert lines[:2] == [
        "add chain inet corral_crltest0 egress_10_202_0_9",
        "flush chain inet corral_crltest0 egress_10_202_0_9",
    ]
    assert (
        lines[-1]
        == "add element inet corral_crltest0 inspect_policy { 10.202.0.9 : jump inspect_10_202_0_9 }"
    )
    delete = render_policy_delete("crltest0", ip).splitlines()
    assert (
        delete[0].startswith("delete element")
        and delete[-1] == "delete chain inet corral_crltest0 inspect_10_202_0_9"
    )
    assert nft_error_is_missing(
        "Error: No such file or directory; did you mean chain 'egress_1' in table inet 'x'?\ndelete chain ...\n   ^^^"
    )


# -- the control plane's validation ---------------------------------------------------------------


def test_plan_network() -> None:
    assert plan_network(None, allow_internet_access=True, secure=True) is None
    closed = plan_network(None, allow_internet_access=False, secure=True)
    assert (
        closed is not None
        and closed.policy.egress.blocks_everything
        and closed.config == {"allowPublicTraffic": True}
    )
    plan = plan_network(
        {
            "allowOut": ["a.test"],
            "denyOut": [ALL_TRAFFIC],
            "allowPublicTraffic": False,
            "maskRequestHost": "x:${PORT}",
        },
        allow_internet_access=True,
        secure=True,
    )
    assert (
        plan is not None
        and plan.policy.ingress.traffic_access_token
        and plan.policy.ingress.host_for(3) == "x:3"
    )
    assert plan.config == {
        "allowPublicTraffic": False,
        "allowOut": ["a.test"],
        "denyOut": [ALL_TRAFFIC],
        "maskRequestHost": "x:${PORT}",
    }


@pytest.mark.parametrize(
    ("network", "secure", "message"),
    [
        ({"allowPublicTraffic": False}, False, "requires secure"),
        ({"allowOut": ["a.test"]}, True, "ALL_TRAFFIC"),
        ({"denyOut": ["not a rule"]}, True, "invalid network rule"),
        ({"egressProxy": {"address": "p:1080"}}, True, "egressProxy"),
        ({"rules": {"a.test": [{"transform": {}}]}}, True, "rules"),
        ({"maskRequestHost": "bad host\r\n"}, True, "maskRequestHost"),
        ({"allowOut": "1.1.1.1"}, True, "invalid network config"),
    ],
)
def test_plan_network_refuses(network: dict, secure: bool, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        plan_network(network, allow_internet_access=True, secure=secure)


# -- public ports ----------------------------------------------------------------------------------


def test_traffic_token_check() -> None:
    assert check_traffic_token(None, {}) is None and check_traffic_token(IngressPolicy(), {}) is None
    ingress = IngressPolicy(traffic_access_token="s3cret")
    assert check_traffic_token(ingress, {})["message"] == "missing traffic access token"  # type: ignore[index]
    assert check_traffic_token(ingress, {"e2b-traffic-access-token": "nope"})["code"] == 403  # type: ignore[index]
    assert check_traffic_token(ingress, {"e2b-traffic-access-token": "s3cret"}) is None


def test_forwarded_headers() -> None:
    raw = [
        (b"Host", b"8000-abc.corral.test"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"E2B-Traffic-Access-Token", b"tok"),
        (b"X-Forwarded-For", b"203.0.113.1"),
        (b"Accept", b"*/*"),
        (b"Transfer-Encoding", b"chunked"),
    ]
    out = dict(forwarded_headers(raw, host="localhost:8000", client="127.0.0.1", scheme="https"))
    assert out == {
        b"accept": b"*/*",
        b"x-forwarded-for": b"203.0.113.1, 127.0.0.1",
        b"x-forwarded-proto": b"https",
        b"x-forwarded-host": b"8000-abc.corral.test",
        b"host": b"localhost:8000",
    }


# -- the control plane's record and the node ------------------------------------------------------


@dataclasses.dataclass
class ControlPlane:
    """A store with the default team, a fake node network and the control plane's policy record."""

    store: Store
    team: str
    net: FakeNetwork
    policies: NetworkPolicies

    def row(self, sandbox_id: str, internet: bool = True) -> None:
        """Record a running sandbox of the team (as create does before the attach)."""
        now = datetime.now(UTC)
        self.store.insert_sandbox(
            SandboxRow(sandbox_id=sandbox_id, team_id=self.team, template_id="base", state=SandboxState.RUNNING,
                       started_at=now, end_at=now + timedelta(seconds=60), allow_internet_access=internet)
        )  # fmt: skip


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    settings = load_settings({"home": tmp_path / "home"}, env={})
    store = Store.open(settings)
    try:
        team = store.team_for_api_key(store.ensure_default_team(None))
        assert team is not None
        net = FakeNetwork(settings)
        await net.ensure_host()
        yield ControlPlane(store, team, net, NetworkPolicies(store, net))
    finally:
        store.close()


async def test_policies_are_recorded_at_attach_and_replaced_by_update(plane: ControlPlane) -> None:
    store, team, net, policies = plane.store, plane.team, plane.net, plane.policies
    assert net.policy_source == policies.policy_for

    # what create hands over: the E2B request's network fields
    req = SimpleNamespace(
        network={"allowOut": ["a.test"], "denyOut": [ALL_TRAFFIC], "allowPublicTraffic": False},
        allow_internet_access=True,
        secure=True,
    )
    plan = policies.plan(req)
    plane.row("sbx1")
    policies.stage("sbx1", plan)
    assert policies.config("sbx1") is None  # nothing recorded before the attach asks
    att = await net.attach("sbx1", allow_internet=True)
    token = policies.traffic_access_token("sbx1")
    assert token and att.allow_internet and net.policy("sbx1") == plan.policy  # type: ignore[union-attr]
    assert policies.config("sbx1") == {
        "allowPublicTraffic": False,
        "allowOut": ["a.test"],
        "denyOut": [ALL_TRAFFIC],
    }
    assert policies.policy_for("sbx1") == plan.policy  # type: ignore[union-attr]  # rebuilt from the record

    await policies.update(team, "sbx1", NetworkUpdateRequest.model_validate({"allow_internet_access": False}))
    live = net.policy("sbx1")
    assert live is not None and live.egress.blocks_everything and live.ingress.traffic_access_token == token
    assert not (await net.list_attached())["sbx1"].allow_internet
    assert store.get_sandbox("sbx1").allow_internet_access is False  # type: ignore[union-attr]
    assert policies.config("sbx1") == {"allowPublicTraffic": False}
    with pytest.raises(NotFound):
        await policies.update("other-team", "sbx1", NetworkUpdateRequest())
    with pytest.raises(InvalidArgument):
        await policies.update(team, "sbx1", NetworkUpdateRequest.model_validate({"denyOut": ["a b"]}))
    assert policies.policy_for("nosuch") is None


async def test_forks_inherit_their_parents_current_policy(plane: ControlPlane) -> None:
    team, net, policies = plane.team, plane.net, plane.policies
    req = SimpleNamespace(
        network={"allowOut": ["a.test"], "denyOut": [ALL_TRAFFIC], "allowPublicTraffic": False,
                 "maskRequestHost": "localhost:${PORT}"},
        allow_internet_access=True, secure=True,
    )  # fmt: skip
    plane.row("parent")
    policies.stage("parent", policies.plan(req))
    await net.attach("parent", allow_internet=True)
    # changed at runtime: the fork gets the policy as it is now, not as it was created
    await policies.update(
        team,
        "parent",
        NetworkUpdateRequest.model_validate({"allowOut": ["b.test"], "denyOut": [ALL_TRAFFIC]}),
    )
    plane.row("fork1")
    policies.inherit("parent", "fork1")
    await net.attach("fork1", allow_internet=True)
    parent, fork = net.policy("parent"), net.policy("fork1")
    assert parent is not None and fork is not None
    assert fork.egress == parent.egress == EgressPolicy.from_lists(["b.test"], [ALL_TRAFFIC])
    assert fork.ingress.mask_request_host == "localhost:${PORT}"
    token = policies.traffic_access_token("fork1")
    assert token and token != policies.traffic_access_token("parent")  # closed to the public, own key
    assert fork.ingress.traffic_access_token == token
    assert policies.config("fork1") == policies.config("parent")

    # no internet at all is inherited through the row and the record
    plane.row("closed", internet=False)
    policies.stage(
        "closed", policies.plan(SimpleNamespace(network=None, allow_internet_access=False, secure=False))
    )
    await net.attach("closed", allow_internet=False)
    plane.row("fork2", internet=False)
    policies.inherit("closed", "fork2")
    await net.attach("fork2", allow_internet=False)
    assert net.policy("fork2").egress.blocks_everything  # type: ignore[union-attr]
    assert policies.traffic_access_token("fork2") is None

    # a parent with the defaults: the fork has the defaults, and no record
    plane.row("plain")
    policies.stage("plain", None)
    await net.attach("plain", allow_internet=True)
    plane.row("fork3")
    policies.inherit("plain", "fork3")
    await net.attach("fork3", allow_internet=True)
    assert policies.config("fork3") is None and net.policy("fork3") == NetworkPolicy()
