"""The seam between the node and sandbox networking: what a sandbox gets, and the operations on it.

Lifecycle of an attachment: `ensure_host()` once per process (idempotent; re-adopts sandboxes that
survived a server restart) → `attach(id, allow_internet)` before the sandbox's container starts →
the container joins `Attachment.netns_path` → `detach(id)` after the container is gone (idempotent).
`set_policy(id, policy)` replaces an attached sandbox's `NetworkPolicy`, or stages it for the
attach to come; `policy(id)` is the one in force.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from corral.node.network.policy import NetworkPolicy

__all__ = ["Attachment", "Network"]


@dataclasses.dataclass(frozen=True, slots=True)
class Attachment:
    """One sandbox's network: a named namespace holding `eth0` = `ip`/`prefixlen`, default route via
    `gateway` (which also serves DNS), wired to the host bridge through the veth `veth_host`."""

    sandbox_id: str
    netns_name: str
    netns_path: str  # "/var/run/netns/<netns_name>": the OCI config's network namespace path
    ip: ipaddress.IPv4Address
    prefixlen: int
    gateway: ipaddress.IPv4Address
    veth_host: str
    mac: str
    allow_internet: bool


class Network(Protocol):
    async def ensure_host(self) -> None: ...
    async def attach(self, sandbox_id: str, allow_internet: bool) -> Attachment: ...
    async def detach(self, sandbox_id: str) -> None: ...
    async def set_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None: ...
    def policy(self, sandbox_id: str) -> NetworkPolicy | None: ...
    async def list_attached(self) -> dict[str, Attachment]: ...
    async def used_ips(self) -> set[ipaddress.IPv4Address]: ...
    async def close(self) -> None: ...
