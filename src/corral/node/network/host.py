"""The executor: applies the plans of `links`, `ruleset` and `dns` to this host.

State lives in the kernel, not beside it: named namespaces `<bridge>-<id>` under /var/run/netns,
bridge ports whose alias records `id, ip, internet`, and the nftables sets. A restarted server
rebuilds everything from those (`ensure_host`), so sandboxes that kept running keep their
addresses, their policy and their connectivity.

Concurrency: one asyncio lock guards the in-memory view (addresses in use, attachments, attaches
in progress) and the whole-ruleset rewrite of `ensure_host`, which renders the sets from that view;
so allocation is race-free. Set elements are added and deleted outside the lock, in an order that
keeps the sets right whichever way they interleave with a rewrite: an element is added only after
its sandbox joined the view, and deleted only after it left it. A per-sandbox lock orders
attach/detach of the same id. Everything else of different sandboxes runs in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from corral.core.errors import AlreadyExists, FailedPrecondition, Internal
from corral.core.settings import Settings
from corral.node.network import _exec
from corral.node.network.addressing import allocate_ip
from corral.node.network.base import Attachment
from corral.node.network.dns import (
    DNS_PORT,
    DnsForwarder,
    DnsPolicy,
    IPAddress,
    Upstream,
    host_upstreams,
    start_dns_forwarder,
)
from corral.node.network.links import (
    DEFAULT_MTU,
    PortInfo,
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
    NETNS_DIR,
    netns_name,
    netns_path,
    port_prefix,
    sandbox_id_from_netns,
    sandbox_mac,
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

__all__ = ["SandboxNetwork"]

log = logging.getLogger(__name__)
IPv4 = ipaddress.IPv4Address


class SandboxNetwork:
    """Per-sandbox network namespaces on one bridge of this host (see the package docstring).

    `dns_upstreams`: resolvers the forwarder asks (default: the host's /etc/resolv.conf);
    `dns=False` runs no forwarder (tests of the rules alone); `dns_policy(qname, client)` is
    consulted for every query from a sandbox allowed to resolve; sandboxes without internet access
    get REFUSED unless `dns_without_internet=True`, since DNS would be their one way out.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        dns: bool = True,
        dns_upstreams: Iterable[Upstream] | None = None,
        dns_port: int = DNS_PORT,
        dns_policy: DnsPolicy | None = None,
        dns_without_internet: bool = False,
        command_timeout: float = 10.0,
    ) -> None:
        self.bridge = settings.bridge
        self.subnet = settings.subnet
        self.gateway = settings.gateway
        self.netns_prefix = settings.netns_prefix
        self._port_prefix = port_prefix(self.bridge)
        self._dns_enabled = dns
        self._dns_upstreams = list(dns_upstreams) if dns_upstreams is not None else None
        self._dns_port = dns_port
        self._dns_policy = dns_policy
        self._dns_without_internet = dns_without_internet
        self._timeout = command_timeout
        self._ip = _exec.tool("ip")
        self._nft = _exec.tool("nft")
        self._bridge_tool = _exec.tool("bridge")

        self._lock = asyncio.Lock()
        self._sandbox_locks: dict[str, list] = {}  # id -> [lock, users]
        self._attached: dict[str, Attachment] = {}
        self._pending: dict[str, Attachment] = {}  # attach in progress: address reserved
        self._releasing: dict[str, Attachment] = {}  # detach in progress: address still reserved
        self._cursor: IPv4 | None = None
        self._mtu = DEFAULT_MTU
        self._host_ready = False
        self._dns: DnsForwarder | None = None

    # -- host ------------------------------------------------------------------------------

    async def ensure_host(self) -> None:
        """Bridge up with the gateway address, forwarding on, rules applied with the current
        sandboxes re-adopted, DNS forwarder running. Idempotent."""
        async with self._lock:
            existing = await self._link(self.bridge, details=True)
            routes = _exec.parse_json((await self._ip_run("-json", "route", "show", "default")).stdout)
            links = _exec.parse_json((await self._ip_run("-json", "link", "show")).stdout)
            self._mtu = parse_uplink_mtu(routes, links)
            gateway_iface = ipaddress.IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")
            try:
                batch = bridge_batch(self.bridge, existing, gateway_iface, self._mtu)
            except ValueError as exc:
                raise FailedPrecondition(str(exc)) from None
            await self._ip_batch(batch)
            _write_sysctl("net/ipv6/conf/" + self.bridge + "/disable_ipv6", "1")
            _write_sysctl("net/ipv4/ip_forward", "1")
            addrs = _exec.parse_json((await self._ip_run("-json", "addr", "show")).stdout)

            if not self._host_ready:  # first time in this process: the kernel is the truth
                self._attached = await self._scan()
            await self._apply_ruleset(parse_host_networks(addrs))
            self._host_ready = True

            if self._dns_enabled and self._dns is None:
                upstreams = self._dns_upstreams or host_upstreams()
                self._dns = await start_dns_forwarder(
                    str(self.gateway),
                    upstreams,
                    port=self._dns_port,
                    policy=self._dns_allows,
                    allowed_clients=self.subnet,
                )
                log.info("dns forwarder on %s:%s -> %s", self.gateway, self._dns_port, upstreams)

    async def close(self) -> None:
        """Stop the DNS forwarder; namespaces, bridge and rules stay (sandboxes keep running)."""
        if self._dns is not None:
            dns, self._dns = self._dns, None
            await dns.aclose()

    async def teardown_host(self) -> None:
        """Remove every sandbox network of this bridge, the rules and the bridge. For tests."""
        await self.close()
        await self.reconcile(keep=())
        async with self._lock:
            await self._nft_apply(render_delete_tables(self.bridge))
            result = await self._ip_run("link", "del", "dev", self.bridge, check=False)
            if result.returncode != 0 and not is_missing_object_error(result.stderr):
                raise Internal(f"cannot delete bridge {self.bridge}: {result.stderr.strip()}")
            self._attached.clear()
            self._host_ready = False

    # -- sandboxes -------------------------------------------------------------------------

    async def attach(self, sandbox_id: str, allow_internet: bool) -> Attachment:
        """Create the sandbox's namespace, wired to the bridge with a fresh address."""
        netns_name(self.netns_prefix, sandbox_id)  # rejects a malformed id before anything happens
        if not self._host_ready:
            raise FailedPrecondition("ensure_host() must run before attach()")
        async with self._for_sandbox(sandbox_id):
            async with self._lock:
                if sandbox_id in self._attached:
                    raise AlreadyExists(f"sandbox {sandbox_id} already has a network")
                ip = allocate_ip(self.subnet, self._used(), after=self._cursor)
                self._cursor = ip
                att = self._attachment(sandbox_id, ip, allow_internet)
                self._pending[sandbox_id] = att
            try:
                if os.path.lexists(att.netns_path):  # left by a crash mid-attach: start clean
                    await self._unwire(att.netns_name, att.veth_host, await self._lookup_unowned(sandbox_id))
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._add_elements(att))
                    tg.create_task(self._wire(att))
            except BaseException as exc:
                async with self._lock:
                    self._releasing[sandbox_id] = self._pending.pop(sandbox_id)
                try:
                    with contextlib.suppress(Exception):
                        await self._unwire(att.netns_name, att.veth_host, att)
                finally:
                    async with self._lock:
                        self._releasing.pop(sandbox_id, None)
                if isinstance(exc, BaseExceptionGroup):
                    first = exc.exceptions[0]
                    raise (first if isinstance(first, Internal) else Internal(str(first))) from exc
                raise
            async with self._lock:
                self._pending.pop(sandbox_id, None)
                self._attached[sandbox_id] = att
            return att

    async def detach(self, sandbox_id: str) -> None:
        """Remove the sandbox's veth, namespace and rule elements. Missing pieces are fine."""
        ns = netns_name(self.netns_prefix, sandbox_id)
        veth = veth_name(self.bridge, sandbox_id)
        async with self._for_sandbox(sandbox_id):
            async with self._lock:  # out of the rules' view first, address kept until the end
                att = self._attached.pop(sandbox_id, None)
                if att is not None:
                    self._releasing[sandbox_id] = att
            done = False
            try:
                await self._unwire(ns, veth, att or await self._lookup_unowned(sandbox_id))
                done = True
            finally:
                async with self._lock:
                    self._releasing.pop(sandbox_id, None)
                    if att is not None and not done:  # still there: a retry must find it
                        self._attached.setdefault(sandbox_id, att)

    async def list_attached(self) -> dict[str, Attachment]:
        """Sandboxes with a complete network on this bridge, read from the kernel."""
        return await self._scan()

    async def used_ips(self) -> set[IPv4]:
        async with self._lock:
            if not self._host_ready and not self._attached:
                self._attached = await self._scan()
            return self._used()

    async def reconcile(self, keep: Iterable[str]) -> list[str]:
        """Detach every sandbox of this bridge not in `keep`, including half-made ones (a namespace
        without a port, or a port without a namespace). Returns the ids removed."""
        keep = set(keep)
        candidates = set(self._netns_ids())
        candidates |= set((await self._ports()).keys())
        async with self._lock:
            candidates |= set(self._attached)
        removed = sorted(candidates - keep)
        for sandbox_id in removed:
            await self.detach(sandbox_id)
        return removed

    # -- internals -------------------------------------------------------------------------

    def _used(self) -> set[IPv4]:
        return {a.ip for d in (self._attached, self._pending, self._releasing) for a in d.values()}

    def _attachment(self, sandbox_id: str, ip: IPv4, allow_internet: bool) -> Attachment:
        name = netns_name(self.netns_prefix, sandbox_id)
        return Attachment(
            sandbox_id=sandbox_id,
            netns_name=name,
            netns_path=netns_path(name),
            ip=ip,
            prefixlen=self.subnet.prefixlen,
            gateway=self.gateway,
            veth_host=veth_name(self.bridge, sandbox_id),
            mac=sandbox_mac(ip),
            allow_internet=allow_internet,
        )

    @contextlib.asynccontextmanager
    async def _for_sandbox(self, sandbox_id: str) -> AsyncIterator[None]:
        entry = self._sandbox_locks.setdefault(sandbox_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._sandbox_locks.pop(sandbox_id, None)

    def _dns_allows(self, qname: str, client: IPAddress) -> bool:
        if client == self.gateway:
            return self._dns_policy(qname, client) if self._dns_policy else True
        att = next((a for a in (*self._attached.values(), *self._pending.values()) if a.ip == client), None)
        if att is None or (not att.allow_internet and not self._dns_without_internet):
            return False
        return self._dns_policy(qname, client) if self._dns_policy else True

    async def _wire(self, att: Attachment) -> None:
        host = host_attach_batch(
            bridge=self.bridge,
            netns=att.netns_name,
            veth=att.veth_host,
            mac=att.mac,
            alias=port_alias(att.sandbox_id, att.ip, att.allow_internet),
            mtu=self._mtu,
        )
        await self._ip_batch(host)
        inside = netns_attach_batch(ipaddress.IPv4Interface(f"{att.ip}/{att.prefixlen}"), att.gateway)
        fdb = fdb_batch(veth=att.veth_host, mac=att.mac)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._ip_batch(inside, netns=att.netns_name))
            tg.create_task(self._run_checked([self._bridge_tool, "-batch", "-"], fdb))

    async def _unwire(self, ns: str, veth: str, att: Attachment | PortInfo | None) -> None:
        """Deleting the veth cuts the sandbox off even if a process still holds its namespace;
        the elements can go at the same time (a port without its element can send nothing)."""
        batch = detach_batch(netns=ns, veth=veth)
        async with asyncio.TaskGroup() as tg:
            links = tg.create_task(self._ip_run("-force", "-batch", "-", stdin=batch, check=False))
            if att is not None:
                tg.create_task(self._delete_elements(att))
        result = links.result()
        if result.returncode != 0 and not is_missing_object_error(result.stderr):
            raise Internal(f"detaching {ns}: {result.stderr.strip()}")

    async def _add_elements(self, att: Attachment) -> None:
        port = PortBinding(att.veth_host, att.mac, att.ip)
        await self._nft_apply(render_add_elements(self.bridge, port, att.allow_internet))

    async def _delete_elements(self, att: Attachment | PortInfo) -> None:
        veth = att.veth_host if isinstance(att, Attachment) else att.veth
        port = PortBinding(veth, att.mac, att.ip)
        script = render_delete_elements(self.bridge, port, att.allow_internet)
        result = await self._nft_run(script)
        if result.returncode == 0:
            return
        for line in script.splitlines():  # one transaction fails if any element is missing
            result = await self._nft_run(line + "\n")
            if result.returncode != 0 and not nft_error_is_missing(result.stderr):
                raise Internal(f"nft: {result.stderr.strip()}")

    async def _apply_ruleset(self, host_networks: list[ipaddress.IPv4Network]) -> None:
        live = [*self._attached.values(), *self._pending.values()]
        script = render_ruleset(
            self.bridge,
            self.subnet,
            host_networks=host_networks,
            ports=[PortBinding(a.veth_host, a.mac, a.ip) for a in live],
            no_egress=[a.ip for a in live if not a.allow_internet],
        )
        await self._nft_apply(script)

    async def _scan(self) -> dict[str, Attachment]:
        ports = await self._ports()
        found = {}
        for sandbox_id in self._netns_ids():
            port = ports.get(sandbox_id)
            if port is not None and port.veth == veth_name(self.bridge, sandbox_id):
                found[sandbox_id] = self._attachment(sandbox_id, port.ip, port.allow_internet)
        return found

    def _netns_ids(self) -> list[str]:
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return [i for i in (sandbox_id_from_netns(self.netns_prefix, n) for n in names) if i is not None]

    async def _ports(self) -> dict[str, PortInfo]:
        result = await self._ip_run("-json", "-d", "link", "show", "master", self.bridge, check=False)
        if result.returncode != 0:
            return {}  # no bridge, no ports
        return parse_ports(_exec.parse_json(result.stdout), self._port_prefix)

    async def _lookup(self, sandbox_id: str) -> PortInfo | None:
        veth = veth_name(self.bridge, sandbox_id)
        link = await self._link(veth, details=False)
        parsed = parse_port_alias((link or {}).get("ifalias") or "")
        if parsed is None or parsed[0] != sandbox_id:
            return None
        _, ip, allow_internet = parsed
        return PortInfo(sandbox_id, veth, sandbox_mac(ip), ip, allow_internet)

    async def _lookup_unowned(self, sandbox_id: str) -> PortInfo | None:
        """A port this process does not know (half-made, or from before a restart without
        `ensure_host`). If its address now belongs to a live sandbox, the `no_egress` element is
        that sandbox's: leave it, and delete only the port's own element."""
        port = await self._lookup(sandbox_id)
        if port is not None and not port.allow_internet:
            async with self._lock:
                if port.ip in self._used():
                    port = dataclasses.replace(port, allow_internet=True)
        return port

    async def _link(self, name: str, *, details: bool) -> dict | None:
        args = ["-json", *(["-d"] if details else []), "link", "show", "dev", name]
        result = await self._ip_run(*args, check=False)
        if result.returncode != 0:
            if is_missing_object_error(result.stderr):
                return None
            raise Internal(f"ip link show {name}: {result.stderr.strip()}")
        links = _exec.parse_json(result.stdout)
        return links[0] if links else None

    async def _ip_run(self, *args: str, stdin: str | None = None, check: bool = True) -> _exec.Completed:
        result = await _exec.run([self._ip, *args], stdin=stdin, timeout=self._timeout)
        return result.check() if check else result

    async def _ip_batch(self, batch: str, *, netns: str | None = None) -> None:
        prefix = ["-n", netns] if netns else []
        await self._ip_run(*prefix, "-batch", "-", stdin=batch)

    async def _run_checked(self, argv: list[str], stdin: str) -> None:
        (await _exec.run(argv, stdin=stdin, timeout=self._timeout)).check()

    async def _nft_run(self, script: str) -> _exec.Completed:
        return await _exec.run([self._nft, "-f", "-"], stdin=script, timeout=self._timeout)

    async def _nft_apply(self, script: str) -> None:
        (await self._nft_run(script)).check()


def _write_sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except FileNotFoundError:
        pass  # e.g. IPv6 compiled out: nothing to disable
    except OSError as exc:  # e.g. a read-only /proc/sys in an unprivileged container
        raise FailedPrecondition(f"cannot set {key.replace('/', '.')}={value}: {exc}") from None
