"""An in-memory `Network` for tests of code above the node: same allocation and naming, no kernel."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable

from corral.core.errors import AlreadyExists, FailedPrecondition
from corral.core.settings import Settings
from corral.node.network.addressing import allocate_ip
from corral.node.network.base import Attachment
from corral.node.network.naming import netns_name, netns_path, sandbox_mac, veth_name
from corral.node.network.policy import NetworkPolicy

__all__ = ["FakeNetwork"]


class FakeNetwork:
    """Behaves like `SandboxNetwork` towards its caller; `netns_path` points at nothing real."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = asyncio.Lock()
        self._attached: dict[str, Attachment] = {}
        self._cursor: ipaddress.IPv4Address | None = None
        self._policies: dict[str, NetworkPolicy] = {}
        self.host_ready = False
        self.policy_source: Callable[[str], NetworkPolicy | None] | None = None

    async def ensure_host(self) -> None:
        self.host_ready = True

    async def attach(self, sandbox_id: str, allow_internet: bool) -> Attachment:
        name = netns_name(self.settings.netns_prefix, sandbox_id)
        if not self.host_ready:
            raise FailedPrecondition("ensure_host() must run before attach()")
        policy = self._policies.get(sandbox_id)
        if policy is None and self.policy_source is not None:
            policy = self.policy_source(sandbox_id)
        policy = policy or NetworkPolicy.default(allow_internet)
        async with self._lock:
            if sandbox_id in self._attached:
                raise AlreadyExists(f"sandbox {sandbox_id} already has a network")
            self._policies[sandbox_id] = policy
            allow_internet = policy.allow_internet
            ip = allocate_ip(
                self.settings.subnet, {a.ip for a in self._attached.values()}, after=self._cursor
            )
            self._cursor = ip
            att = Attachment(
                sandbox_id=sandbox_id,
                netns_name=name,
                netns_path=netns_path(name),
                ip=ip,
                prefixlen=self.settings.subnet.prefixlen,
                gateway=self.settings.gateway,
                veth_host=veth_name(self.settings.bridge, sandbox_id),
                mac=sandbox_mac(ip),
                allow_internet=allow_internet,
            )
            self._attached[sandbox_id] = att
            return att

    async def detach(self, sandbox_id: str) -> None:
        async with self._lock:
            self._attached.pop(sandbox_id, None)
            self._policies.pop(sandbox_id, None)

    async def set_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        netns_name(self.settings.netns_prefix, sandbox_id)
        async with self._lock:
            self._policies[sandbox_id] = policy
            att = self._attached.get(sandbox_id)
            if att is not None:
                self._attached[sandbox_id] = dataclasses.replace(att, allow_internet=policy.allow_internet)

    def policy(self, sandbox_id: str) -> NetworkPolicy | None:
        return self._policies.get(sandbox_id)

    async def list_attached(self) -> dict[str, Attachment]:
        return dict(self._attached)

    async def used_ips(self) -> set[ipaddress.IPv4Address]:
        return {a.ip for a in self._attached.values()}

    async def close(self) -> None:
        pass
