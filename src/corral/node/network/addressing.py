"""Sandbox addresses: allocation from the pool, and the ranges a sandbox may never reach."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable

from corral.core.errors import ResourceExhausted

__all__ = ["ALWAYS_DENIED_V4", "allocate_ip", "denied_networks", "reserved_ips"]

IPv4 = ipaddress.IPv4Address
Net4 = ipaddress.IPv4Network

# Never reachable from a sandbox, whatever its policy (as E2B's DeniedSandboxCIDRs; security
# anchors §0.5): private, CGNAT, loopback, link-local (cloud metadata), "this network", multicast
# and reserved. The host's own networks and the sandbox pool are added per host (`denied_networks`).
ALWAYS_DENIED_V4: tuple[Net4, ...] = tuple(
    Net4(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)


def reserved_ips(subnet: Net4) -> frozenset[IPv4]:
    """Addresses of the pool no sandbox gets: network, gateway (.1, the bridge) and broadcast."""
    return frozenset({subnet.network_address, subnet.network_address + 1, subnet.broadcast_address})


def allocate_ip(subnet: Net4, used: Collection[IPv4], after: IPv4 | None = None) -> IPv4:
    """The first free sandbox address of `subnet` after `after` (wrapping around), else from the start.

    Handing out addresses round-robin rather than lowest-first keeps a just-freed address (and the
    conntrack entries still naming it) away from the next sandbox for as long as the pool allows.
    Raises ResourceExhausted when every address is taken.
    """
    reserved = reserved_ips(subnet)
    first, last = int(subnet.network_address) + 2, int(subnet.broadcast_address) - 1
    if first > last:
        raise ValueError(f"subnet {subnet} has no room for sandboxes")
    start = first
    if after is not None and after in subnet and first <= int(after) + 1 <= last:
        start = int(after) + 1
    size = last - first + 1
    for i in range(size):
        candidate = IPv4(first + (start - first + i) % size)
        if candidate not in used and candidate not in reserved:
            return candidate
    raise ResourceExhausted(f"no free sandbox address left in {subnet}")


def denied_networks(subnet: Net4, host_networks: Iterable[Net4] = ()) -> list[Net4]:
    """Everything forwarded traffic from a sandbox may not reach, collapsed (nftables interval
    sets reject overlapping elements): the always-denied ranges, the host's own networks (its
    addresses and the LANs they sit on) and the sandbox pool itself (sandboxes never reach each other).
    """
    nets = [*ALWAYS_DENIED_V4, subnet, *(n for n in host_networks if n.version == 4)]
    return list(ipaddress.collapse_addresses(nets))
