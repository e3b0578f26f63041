"""The host's nftables rules for one sandbox bridge, rendered as text for `nft -f -`.

Two tables, both named `corral_<bridge>` and owned entirely by this bridge:

`table inet` (routed traffic)
  postrouting  masquerade what leaves the pool through anything but the bridge (internet egress)
  forward      policy accept, so the host's other traffic is untouched. From the bridge:
               IPv6 dropped; replies (established/related) accepted; spoofed sources, the denied
               ranges (private, CGNAT, loopback, link-local, multicast, the host's networks and the
               pool itself) and members of `no_egress` dropped; the rest (the internet) accepted.
               Towards the bridge: only replies; nobody outside opens connections to sandboxes.
  input        from the bridge: replies, and DNS (udp/tcp 53) to the gateway address, which is the
               node's DNS forwarder; nothing else (no API, no host port).

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
from collections.abc import Iterable

from corral.node.network.addressing import denied_networks
from corral.node.network.naming import port_prefix, table_name

__all__ = [
    "DNS_PORT",
    "PortBinding",
    "nft_error_is_missing",
    "render_add_elements",
    "render_delete_elements",
    "render_delete_tables",
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


def render_ruleset(
    bridge: str,
    subnet: ipaddress.IPv4Network,
    *,
    host_networks: Iterable[ipaddress.IPv4Network] = (),
    ports: Iterable[PortBinding] = (),
    no_egress: Iterable[ipaddress.IPv4Address] = (),
) -> str:
    """The whole nft script for `bridge`: (re)creates both tables with the given set elements."""
    table = table_name(bridge)
    gateway = subnet.network_address + 1
    denied = _elements(str(n) for n in denied_networks(subnet, host_networks))
    blocked = _elements(str(ip) for ip in sorted(set(no_egress)))
    bound = _elements(p.element() for p in sorted(set(ports), key=lambda p: p.veth))
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
        counter drop comment "host ports"
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


def nft_error_is_missing(stderr: str) -> bool:
    """True when every error `nft -f` reported is about a missing object (element, set, table).

    nft follows each `Error:` line with the offending input and a caret line; only the former count.
    """
    errors = [line for line in stderr.splitlines() if "Error:" in line]
    return bool(errors) and all("No such file or directory" in line for line in errors)
