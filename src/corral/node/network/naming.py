"""Names of everything the network layer creates on a host, all derived from the bridge name.

Several Corral servers may share one host (a dev server and a test server), each with its own
bridge. Every object is therefore namespaced by the bridge name:

| object            | name                                  | example (bridge `corral0`)      |
|-------------------|---------------------------------------|---------------------------------|
| nftables tables   | `corral_<bridge>` (inet and bridge)   | `corral_corral0`                |
| network namespace | `<bridge>-<sandbox id>`               | `corral0-i7x2k...`              |
| host end of veth  | `vc` + 4 hex of bridge + 9 hex of id  | `vc1a2b3c4d5e6f7` (15 chars)    |

Interface names are capped at 15 characters (IFNAMSIZ - 1), hence the hashes. The bridge part is a
fixed prefix so that one nftables wildcard (`iifname "vc1a2b*"`) matches exactly the ports of one
bridge.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from corral.core.ids import is_sandbox_id

__all__ = [
    "IFNAME_MAX",
    "NETNS_DIR",
    "SANDBOX_IFNAME",
    "bridge_mac",
    "netns_name",
    "netns_path",
    "port_prefix",
    "sandbox_id_from_netns",
    "sandbox_mac",
    "table_name",
    "veth_name",
]

IFNAME_MAX = 15
NETNS_DIR = "/var/run/netns"  # where `ip netns add` bind-mounts named namespaces
SANDBOX_IFNAME = "eth0"  # the sandbox's side of its veth, inside its namespace

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_bridge(bridge: str) -> str:
    if not _IFNAME_RE.match(bridge):
        raise ValueError(f"bad bridge name {bridge!r}: want 1-15 of [A-Za-z0-9_.-]")
    return bridge


def table_name(bridge: str) -> str:
    """nftables table name (used for both the `inet` and the `bridge` family table)."""
    return "corral_" + re.sub(r"[^A-Za-z0-9_]", "_", _check_bridge(bridge))


def port_prefix(bridge: str) -> str:
    """Common prefix of the host ends of all veths attached to `bridge`."""
    return "vc" + _digest("bridge/" + _check_bridge(bridge))[:4]


def veth_name(bridge: str, sandbox_id: str) -> str:
    """Host end of the sandbox's veth pair: 15 characters, unique per (bridge, sandbox)."""
    name = port_prefix(bridge) + _digest(f"{bridge}/{sandbox_id}")[:9]
    assert len(name) == IFNAME_MAX
    return name


def netns_name(netns_prefix: str, sandbox_id: str) -> str:
    if not is_sandbox_id(sandbox_id):
        raise ValueError(f"bad sandbox id {sandbox_id!r}")
    return netns_prefix + sandbox_id


def netns_path(name: str) -> str:
    """The bind mount an OCI config points `linux.namespaces[type=network].path` at."""
    return f"{NETNS_DIR}/{name}"


def sandbox_id_from_netns(netns_prefix: str, name: str) -> str | None:
    """Inverse of `netns_name`; None for namespaces that are not ours (other bridges, other tools)."""
    if not name.startswith(netns_prefix):
        return None
    rest = name[len(netns_prefix) :]
    return rest if is_sandbox_id(rest) else None


def sandbox_mac(ip: ipaddress.IPv4Address) -> str:
    """A fixed, locally administered MAC for a sandbox address (as Docker does: 02:42 + the IPv4).

    Fixed rather than random so the bridge-level anti-spoofing set can name it before the link exists.
    """
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


def bridge_mac(bridge: str) -> str:
    """A fixed MAC for the bridge; otherwise Linux gives it the lowest port MAC, which changes as
    sandboxes come and go and leaves stale gateway entries in the sandboxes' ARP caches."""
    tail = _digest("mac/" + _check_bridge(bridge))[:10]
    return "06:" + ":".join(tail[i : i + 2] for i in range(0, 10, 2))  # never 02:42:..., a sandbox's
