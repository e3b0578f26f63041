"""Plans for iproute2 (`ip -batch -` scripts) and parsers for its `-json` output. No I/O here.

Attaching a sandbox takes two `ip` batches, because a batch line cannot carry `-n <netns>`, and a
static MAC-table entry (`bridge -batch -`, `fdb_batch`) that runs beside the second:

    host batch (`ip -batch -`)            netns batch (`ip -n <netns> -batch -`)
      netns add <ns>                        link set lo up
      link add <veth> type veth             link set eth0 addrgenmode none   (no IPv6 link-local)
        peer name eth0 address <mac>        addr add <ip>/<len> dev eth0
        netns <ns>                          link set eth0 up
      link set <veth> master <bridge>       route add default via <gateway>
      ... type bridge_slave isolated on
      link set <veth> alias <alias>
      link set <veth> up

The host end's alias records `sandbox id, ip, internet` so a restarted server rebuilds its state from
the kernel alone (`parse_ports`): the kernel is the source of truth, not a file beside it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from corral.core.ids import is_sandbox_id
from corral.node.network.naming import SANDBOX_IFNAME, bridge_mac, sandbox_mac

__all__ = [
    "DEFAULT_MTU",
    "PortInfo",
    "bridge_batch",
    "detach_batch",
    "fdb_batch",
    "host_attach_batch",
    "is_missing_object_error",
    "netns_attach_batch",
    "parse_host_networks",
    "parse_port_alias",
    "parse_ports",
    "parse_uplink_mtu",
    "port_alias",
]

DEFAULT_MTU = 1500
_ALIAS_TAG = "corral"


@dataclasses.dataclass(frozen=True, slots=True)
class PortInfo:
    """A sandbox port found on the bridge, as its alias describes it."""

    sandbox_id: str
    veth: str
    mac: str  # of the sandbox end (we choose it), as recorded; not the host end's MAC
    ip: ipaddress.IPv4Address
    allow_internet: bool


def port_alias(sandbox_id: str, ip: ipaddress.IPv4Address, allow_internet: bool) -> str:
    """`corral:<id>:<ip>:<internet|no-internet>` (no spaces, so no quoting in a batch line)."""
    return f"{_ALIAS_TAG}:{sandbox_id}:{ip}:{'internet' if allow_internet else 'no-internet'}"


def parse_port_alias(alias: str) -> tuple[str, ipaddress.IPv4Address, bool] | None:
    parts = alias.split(":")
    if len(parts) != 4 or parts[0] != _ALIAS_TAG or parts[3] not in ("internet", "no-internet"):
        return None
    if not is_sandbox_id(parts[1]):
        return None
    try:
        ip = ipaddress.IPv4Address(parts[2])
    except ValueError:
        return None
    return parts[1], ip, parts[3] == "internet"


def bridge_batch(
    bridge: str,
    existing: Mapping[str, Any] | None,
    gateway_iface: ipaddress.IPv4Interface,
    mtu: int,
    addrs: Iterable[Mapping[str, Any]] = (),
) -> str:
    """Create (or converge) the bridge: fixed MAC, no IPv6, MTU of the uplink, the gateway address
    and no other, up.

    `existing` is the bridge's `ip -json -d link show` entry, or None. A non-bridge link of that
    name is refused rather than repurposed. `addrs` is `ip -json addr show`: an address left on the
    bridge by a server that ran with another subnet goes, because `redirect` sends the egress
    proxy's traffic to the bridge's first address, which must be the gateway.
    """
    lines = []
    if existing is None:
        lines += [
            f"link add name {bridge} type bridge",
            f"link set dev {bridge} address {bridge_mac(bridge)}",
            f"link set dev {bridge} addrgenmode none",
        ]
    else:
        kind = (existing.get("linkinfo") or {}).get("info_kind")
        if kind != "bridge":
            raise ValueError(f"link {bridge!r} exists and is a {kind or 'plain'} link, not a bridge")
    lines += [
        f"link set dev {bridge} mtu {mtu}",
        f"addr replace {gateway_iface} dev {bridge}",
        *(
            f"addr del {stale} dev {bridge}"
            for stale in _inet_addresses(addrs, bridge)
            if stale != gateway_iface
        ),
        f"link set dev {bridge} up",
    ]
    return "\n".join(lines) + "\n"


def host_attach_batch(*, bridge: str, netns: str, veth: str, mac: str, alias: str, mtu: int) -> str:
    """The port is `isolated` (no frames to or from other isolated ports: sandboxes never reach
    each other at layer 2), does not learn MACs and gets no flooded unknown unicast or multicast
    (a sandbox with a raw socket would otherwise read frames meant for its neighbours): the bridge
    forwards to it by the static entry of `fdb_batch` alone."""
    return (
        f"netns add {netns}\n"
        f"link add {veth} mtu {mtu} type veth peer name {SANDBOX_IFNAME} mtu {mtu} address {mac} netns {netns}\n"
        f"link set dev {veth} master {bridge}\n"
        f"link set dev {veth} type bridge_slave isolated on learning off flood off mcast_flood off\n"
        f"link set dev {veth} alias {alias}\n"
        f"link set dev {veth} up\n"
    )


def netns_attach_batch(ip: ipaddress.IPv4Interface, gateway: ipaddress.IPv4Address) -> str:
    return (
        "link set dev lo up\n"
        f"link set dev {SANDBOX_IFNAME} addrgenmode none\n"
        f"addr add {ip} dev {SANDBOX_IFNAME}\n"
        f"link set dev {SANDBOX_IFNAME} up\n"
        f"route add default via {gateway} dev {SANDBOX_IFNAME}\n"
    )


def fdb_batch(*, veth: str, mac: str) -> str:
    """For `bridge -batch -`: the sandbox's MAC lives on its port, from the first frame on and
    whether or not the sandbox ever spoke (the port does not learn, see `host_attach_batch`)."""
    return f"fdb replace {mac} dev {veth} master static\n"


def detach_batch(*, netns: str, veth: str) -> str:
    """Deleting the host end destroys both ends at once, even while a process still holds the
    namespace (left to the kernel, a veth outlives `netns del` by a while); then the namespace's
    name goes. Run with `-force`: either may be gone already.

    The host's neighbour entry for the address is left alone: a sandbox's MAC follows from its
    address (`sandbox_mac`), so the entry stays right for the next sandbox that gets the address.
    """
    return f"link del dev {veth}\nnetns del {netns}\n"


_MISSING = ("Cannot find device", "No such file or directory", "does not exist")


def is_missing_object_error(stderr: str) -> bool:
    """True when every error line of an `ip -force -batch` run only says an object was missing.

    `Dump was interrupted` is a warning of link-name lookups that overlap links coming and going
    (concurrent detaches); it is not an error of the command itself.
    """
    benign = ("Command failed", "Dump was interrupted")
    errors = [line for line in stderr.splitlines() if line.strip() and not line.startswith(benign)]
    return bool(errors) and all(any(m in line for m in _MISSING) for line in errors)


def parse_ports(links: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, PortInfo]:
    """Sandbox ports among `ip -json -d link show master <bridge>` entries, by sandbox id.

    Links whose name lacks the bridge's port prefix or whose alias is not ours are ignored.
    """
    ports: dict[str, PortInfo] = {}
    for link in links:
        name = link.get("ifname", "")
        if not name.startswith(prefix):
            continue
        parsed = parse_port_alias(link.get("ifalias") or "")
        if parsed is None:
            continue
        sandbox_id, ip, allow_internet = parsed
        ports[sandbox_id] = PortInfo(sandbox_id, name, sandbox_mac(ip), ip, allow_internet)
    return ports


def _inet_addresses(
    addrs: Iterable[Mapping[str, Any]], ifname: str | None = None
) -> list[ipaddress.IPv4Interface]:
    """The IPv4 addresses in `ip -json addr show`, of one link or of all."""
    return [
        ipaddress.IPv4Interface(f"{info['local']}/{info.get('prefixlen', 32)}")
        for link in addrs
        if ifname is None or link.get("ifname") == ifname
        for info in link.get("addr_info", [])
        if info.get("family") == "inet"
    ]


def parse_host_networks(addrs: Iterable[Mapping[str, Any]]) -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the host's addresses (`ip -json addr show`), e.g. 192.0.2.0/24 for
    192.0.2.2/24 on eth0, plus each address as a /32."""
    return [
        net for iface in _inet_addresses(addrs) for net in (iface.network, ipaddress.IPv4Network(iface.ip))
    ]


def parse_uplink_mtu(routes: Sequence[Mapping[str, Any]], links: Sequence[Mapping[str, Any]]) -> int:
    """MTU of the default route's interface (`ip -json route show default`, `ip -json link show`).

    Sandboxes use it too: a veth at 1500 behind a 1400 uplink breaks large TCP segments wherever
    path MTU discovery is filtered.
    """
    dev = next((r.get("dev") for r in routes if r.get("dst") == "default" and r.get("dev")), None)
    mtu = next((link.get("mtu") for link in links if link.get("ifname") == dev), None)
    return int(mtu) if mtu else DEFAULT_MTU
