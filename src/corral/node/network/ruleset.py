"""The host's nftables rules for one sandbox bridge, rendered as text for `nft -f -`.

Two tables, both named `corral_<bridge>` and owned entirely by this bridge:

`table inet` (routed traffic)
  postrouting  masquerade what leaves the pool through anything but the bridge (internet egress)
  forward      policy accept, so the host's other traffic is untouched. From the bridge:
               IPv6 dropped; replies (established/related) accepted; spoofed sources, the denied
               ranges (private, CGNAT, loopback, link-local, multicast, the host's networks and the
               pool itself) and members of `no_egress` dropped; then the sandbox's own egress chain
               (`egress_<ip>`, through the verdict map `egress_policy`: its allowOut/denyOut
               addresses); the rest (the internet) accepted.
               Towards the bridge: only replies; nobody outside opens connections to sandboxes.
  prerouting   (nat) a sandbox whose policy names domains has its TCP to the domain rules' ports
               (80, 443) redirected to the node's inspecting proxy (`inspect_<ip>` through
               `inspect_policy`), which decides by TLS SNI / HTTP Host; never for denied ranges.
  input        from the bridge: replies, DNS (udp/tcp 53) to the gateway address, which is the
               node's DNS forwarder, and connections redirected to the inspecting proxy (never
               direct ones: `ct status dnat`); nothing else (no API, no host port).

`table bridge` (layer 2, before the bridge learns or forwards anything)
  Frames entering from a sandbox port must carry that port's own MAC and IPv4 address
  (`port_addrs`: ifname . mac . ip), and be IPv4 or ARP. This is what makes the address-based rules
  above hold against a sandbox that forges its source address (raw sockets, or NET_ADMIN in its
  namespace): without it a sandbox could borrow a neighbour's address to escape `no_egress`, or
  poison the bridge's MAC table and the gateway's ARP cache to intercept a neighbour's traffic.

Ports are also `isolated on` at the bridge (see `links.py`), so sandboxes never reach each other at
layer 2 whether or not br_netfilter is loaded.

Re-applying is idempotent and atomic: the text declares each table, deletes it and declares it
again, all in one nft transaction, with the current set elements rendered in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping

from corral.node.network.addressing import denied_networks
from corral.node.network.naming import port_prefix, table_name
from corral.node.network.policy import EgressPolicy, EgressRule

__all__ = [
    "DNS_PORT",
    "PortBinding",
    "egress_chain",
    "egress_chain_rules",
    "inspect_chain",
    "inspect_chain_rules",
    "nft_error_is_missing",
    "render_add_elements",
    "render_delete_elements",
    "render_delete_tables",
    "render_policy_delete",
    "render_policy_update",
    "render_ruleset",
]

DNS_PORT = 53


@dataclasses.dataclass(frozen=True, slots=True)
class PortBinding:
    """What one bridge port (a sandbox's veth) may send as: its interface, MAC and IPv4 address."""

    veth: str
    mac: str
    ip: ipaddress.IPv4Address

    def element(self) -> str:
        return f'"{self.veth}" . {self.mac} . {self.ip}'


def _elements(items: Iterable[str]) -> str:
    items = list(items)
    return f"elements = {{ {', '.join(items)} }}" if items else ""


def _ip_key(ip: ipaddress.IPv4Address) -> str:
    return str(ip).replace(".", "_")


def egress_chain(ip: ipaddress.IPv4Address) -> str:
    """The sandbox's filter chain for its allowOut/denyOut addresses, named after its address."""
    return f"egress_{_ip_key(ip)}"


def inspect_chain(ip: ipaddress.IPv4Address) -> str:
    """The sandbox's nat chain that redirects its inspected TCP ports to the egress proxy."""
    return f"inspect_{_ip_key(ip)}"


def _nft_set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _address_rules(rules: Iterable[EgressRule], verdict: str, comment: str) -> list[str]:
    """nft rules for the IPv4 address entries of one list (domains are the proxy's; IPv6 never
    leaves a sandbox at all)."""
    v4 = [r for r in rules if isinstance(r.network, ipaddress.IPv4Network)]
    out: list[str] = []
    every_port = list(ipaddress.collapse_addresses(r.network for r in v4 if r.ports is None))  # type: ignore[misc]
    if every_port == [ipaddress.IPv4Network("0.0.0.0/0")]:
        out.append(f'counter {verdict} comment "{comment}"')
    elif every_port:
        out.append(f'ip daddr {_nft_set([str(n) for n in every_port])} counter {verdict} comment "{comment}"')
    for rule in v4:
        if rule.ports is not None:
            first, last = rule.ports
            ports = str(first) if first == last else f"{first}-{last}"
            out.append(
                f"ip daddr {rule.network} meta l4proto {{ tcp, udp }} th dport {ports} "
                f'counter {verdict} comment "{comment}"'
            )
    return out


def egress_chain_rules(policy: EgressPolicy) -> list[str]:
    """The rules of `egress_<ip>`: allow entries accept, then deny entries drop; falling off the
    end returns to `from_sandbox`, which accepts (E2B's order: allow wins, default allow)."""
    return _address_rules(policy.allow, "accept", "egress allowed") + _address_rules(
        policy.deny, "drop", "egress denied"
    )


def inspect_chain_rules(policy: EgressPolicy, proxy_port: int | None) -> list[str]:
    """The rules of `inspect_<ip>`: redirect the TCP ports of the policy's domain rules to the
    proxy, except towards denied ranges (dropped in `forward` as usual). Without a proxy, those
    connections are dropped: a domain rule that cannot be checked must not turn into "allowed"."""
    ranges = policy.inspected_ports()
    if not ranges:
        return []
    ports = _nft_set([str(a) if a == b else f"{a}-{b}" for a, b in ranges])
    if proxy_port is None:
        return [f'tcp dport {ports} counter drop comment "egress inspection unavailable"']
    return [
        f'ip daddr != @denied tcp dport {ports} counter redirect to :{proxy_port} comment "egress inspection"'
    ]


def _chain_block(name: str, rules: list[str]) -> str:
    body = "".join(f"        {rule}\n" for rule in rules)
    return f"    chain {name} {{\n{body}    }}\n"


def render_ruleset(
    bridge: str,
    subnet: ipaddress.IPv4Network,
    *,
    host_networks: Iterable[ipaddress.IPv4Network] = (),
    ports: Iterable[PortBinding] = (),
    no_egress: Iterable[ipaddress.IPv4Address] = (),
    policies: Mapping[ipaddress.IPv4Address, EgressPolicy] | None = None,
    proxy_port: int | None = None,
) -> str:
    """The whole nft script for `bridge`: (re)creates both tables with the given set elements.

    `policies`: the egress policy of each live sandbox, by address (each gets its two chains);
    `proxy_port`: where the inspecting egress proxy listens on the gateway, if it runs.
    """
    table = table_name(bridge)
    gateway = subnet.network_address + 1
    denied = _elements(str(n) for n in denied_networks(subnet, host_networks))
    blocked = _elements(str(ip) for ip in sorted(set(no_egress)))
    bound = _elements(p.element() for p in sorted(set(ports), key=lambda p: p.veth))
    policies = dict(sorted((policies or {}).items()))
    chains = "".join(
        _chain_block(egress_chain(ip), egress_chain_rules(p))
        + _chain_block(inspect_chain(ip), inspect_chain_rules(p, proxy_port))
        for ip, p in policies.items()
    )
    egress_map = _elements(f"{ip} : jump {egress_chain(ip)}" for ip in policies)
    inspect_map = _elements(f"{ip} : jump {inspect_chain(ip)}" for ip in policies)
    proxy_input = (
        f"ip daddr {gateway} tcp dport {proxy_port} ct status dnat accept\n        " if proxy_port else ""
    )
    return f"""\
table inet {table} {{}}
delete table inet {table}
table inet {table} {{
    set denied {{
        type ipv4_addr; flags interval
        {denied}
    }}
    set no_egress {{
        type ipv4_addr
        {blocked}
    }}
{chains}    map egress_policy {{
        type ipv4_addr : verdict
        {egress_map}
    }}
    map inspect_policy {{
        type ipv4_addr : verdict
        {inspect_map}
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{bridge}" ip saddr vmap @inspect_policy
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{bridge}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" jump from_sandbox
        oifname "{bridge}" jump to_sandbox
    }}
    chain from_sandbox {{
        meta nfproto ipv6 counter drop comment "no IPv6 egress"
        ct state established,related accept
        ip saddr != {subnet} counter drop comment "spoofed source"
        ip daddr @denied counter drop comment "denied ranges"
        ip saddr @no_egress counter drop comment "internet access disabled"
        ip saddr vmap @egress_policy
        counter accept comment "internet"
    }}
    chain to_sandbox {{
        ct state established,related accept
        counter drop comment "no inbound connections"
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{bridge}" jump input_from_sandbox
    }}
    chain input_from_sandbox {{
        ct state established,related accept
        ip daddr {gateway} udp dport {DNS_PORT} accept
        ip daddr {gateway} tcp dport {DNS_PORT} accept
        {proxy_input}counter drop comment "host ports"
    }}
}}
table bridge {table} {{}}
delete table bridge {table}
table bridge {table} {{
    set port_addrs {{
        type ifname . ether_addr . ipv4_addr
        {bound}
    }}
    chain prerouting {{
        type filter hook prerouting priority filter; policy accept;
        iifname "{port_prefix(bridge)}*" jump from_port
    }}
    chain from_port {{
        ether type ip iifname . ether saddr . ip saddr @port_addrs accept
        ether type arp iifname . ether saddr . arp saddr ip @port_addrs iifname . arp saddr ether . arp saddr ip @port_addrs accept
        counter drop comment "spoofed or not IPv4/ARP"
    }}
}}
"""


def render_delete_tables(bridge: str) -> str:
    """Removes both tables; succeeds whether or not they exist."""
    table = table_name(bridge)
    return "".join(f"table {fam} {table} {{}}\ndelete table {fam} {table}\n" for fam in ("inet", "bridge"))


def _element_lines(verb: str, bridge: str, port: PortBinding, allow_internet: bool) -> str:
    table = table_name(bridge)
    lines = [f"{verb} element bridge {table} port_addrs {{ {port.element()} }}"]
    if not allow_internet:
        lines.append(f"{verb} element inet {table} no_egress {{ {port.ip} }}")
    return "\n".join(lines) + "\n"


def render_add_elements(bridge: str, port: PortBinding, allow_internet: bool) -> str:
    """Set elements for a newly attached sandbox (adding an existing element is not an error)."""
    return _element_lines("add", bridge, port, allow_internet)


def render_delete_elements(bridge: str, port: PortBinding, allow_internet: bool) -> str:
    """Set elements to remove when a sandbox detaches (deleting a missing one is an error)."""
    return _element_lines("delete", bridge, port, allow_internet)


def render_policy_update(
    bridge: str, ip: ipaddress.IPv4Address, policy: EgressPolicy, proxy_port: int | None
) -> str:
    """Install or replace one sandbox's egress and inspect chains and point the maps at them.

    One nft transaction: connections see the old policy or the new one, never a mix. Flushing and
    re-adding the rules is idempotent, as is adding a map element that is already there.
    """
    table = table_name(bridge)
    lines: list[str] = []
    for chain, rules in (
        (egress_chain(ip), egress_chain_rules(policy)),
        (inspect_chain(ip), inspect_chain_rules(policy, proxy_port)),
    ):
        lines += [f"add chain inet {table} {chain}", f"flush chain inet {table} {chain}"]
        lines += [f"add rule inet {table} {chain} {rule}" for rule in rules]
    lines.append(f"add element inet {table} egress_policy {{ {ip} : jump {egress_chain(ip)} }}")
    lines.append(f"add element inet {table} inspect_policy {{ {ip} : jump {inspect_chain(ip)} }}")
    return "\n".join(lines) + "\n"


def render_policy_delete(bridge: str, ip: ipaddress.IPv4Address) -> str:
    """Remove one sandbox's chains: map elements first (a chain still referenced cannot go).
    Each line fails alone when its object is missing (see `nft_error_is_missing`)."""
    table = table_name(bridge)
    return (
        f"delete element inet {table} egress_policy {{ {ip} }}\n"
        f"delete element inet {table} inspect_policy {{ {ip} }}\n"
        f"delete chain inet {table} {egress_chain(ip)}\n"
        f"delete chain inet {table} {inspect_chain(ip)}\n"
    )


def nft_error_is_missing(stderr: str) -> bool:
    """True when every error `nft -f` reported is about a missing object (element, set, table).

    nft follows each `Error:` line with the offending input and a caret line; only the former count.
    """
    errors = [line for line in stderr.splitlines() if "Error:" in line]
    return bool(errors) and all("No such file or directory" in line for line in errors)
