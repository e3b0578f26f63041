"""The executor: applies the plans of `links`, `ruleset` and `dns` to this host.

State lives in the kernel, not beside it: named namespaces `<bridge>-<id>` under /var/run/netns,
bridge ports whose alias records `id, ip, internet`, and the nftables sets. The one thing the kernel
cannot hold in a readable form, a sandbox's egress rules and ingress settings (`NetworkPolicy`),
is kept beside it in `<state_dir>/<id>.json` (a tmpfs under /run: it lives as long as the
namespaces do), written before the rules it describes are applied. A restarted server rebuilds
everything from those (`ensure_host`), so sandboxes that kept running keep their addresses, their
policy and their connectivity.

Policies: `set_policy(id, policy)` before `attach` stages the policy the sandbox starts with (so
it never runs a moment without it); on an attached sandbox it replaces the policy at once (one nft
transaction for the chains, then the `no_egress` element and the port alias when "nothing gets
out" flips). Domain rules are enforced by the inspecting proxy (`egress_proxy`), which this class
runs on the gateway beside the DNS forwarder.

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
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from corral.core.errors import AlreadyExists, FailedPrecondition, Internal
from corral.core.settings import Settings
from corral.node.network import _exec
from corral.node.network._nft_batch import NftBatcher
from corral.node.network.addressing import allocate_ip, denied_networks
from corral.node.network.base import Attachment
from corral.node.network.dns import (
    DNS_PORT,
    DnsForwarder,
    DnsPolicy,
    IPAddress,
    Upstream,
    host_upstreams,
    parse_upstreams,
    start_dns_forwarder,
)
from corral.node.network.egress_proxy import EgressProxy
from corral.node.network.in_netns import set_sysctls
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
    table_name,
    veth_name,
)
from corral.node.network.policy import EgressPolicy, NetworkPolicy
from corral.node.network.resolutions import Resolution, ResolvedAddresses
from corral.node.network.ruleset import (
    PortBinding,
    nft_error_is_missing,
    render_add_elements,
    render_delete_elements,
    render_delete_tables,
    render_policy_delete,
    render_policy_update,
    render_ruleset,
)

__all__ = ["SandboxNetwork"]

log = logging.getLogger(__name__)
IPv4 = ipaddress.IPv4Address

# Set in every sandbox's netns. Any gid may open ICMP echo (datagram) sockets, as Docker does:
# `ping` works without CAP_NET_RAW, which sandboxes never get. The kernel compares host gids, and
# under a user namespace those are the sandbox's range (from 2^20 up), so the range is all of them.
SANDBOX_NETNS_SYSCTLS = {"net/ipv4/ping_group_range": "0 2147483647"}


class SandboxNetwork:
    """Per-sandbox network namespaces on one bridge of this host (see the package docstring).

    `dns_upstreams`: resolvers the forwarder asks (default: `settings.dns_upstreams`, else the
    host's /etc/resolv.conf); what it answers each sandbox is recorded (`resolved_names`) for the
    egress proxy's check of connections allowed by their name;
    `dns=False` runs no forwarder (tests of the rules alone); `dns_policy(qname, client)` is
    consulted for every query from a sandbox allowed to resolve; sandboxes without internet access
    get REFUSED unless `dns_without_internet=True`, since DNS would be their one way out; the
    others get REFUSED for names their egress policy does not allow (`EgressPolicy.allows_name`).
    `egress_proxy=False` runs no inspecting proxy: TCP that a domain rule would need inspected is
    then dropped. `state_dir` holds the policies (default `/run/corral/network-<bridge>`).
    `policy_source(sandbox_id)`, when set, gives the policy of a sandbox being attached that has
    none staged (the control plane's record; None: the default for its `allow_internet`).
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
        egress_proxy: bool = True,
        state_dir: Path | None = None,
        command_timeout: float = 10.0,
    ) -> None:
        self.bridge = settings.bridge
        self.subnet = settings.subnet
        self.gateway = settings.gateway
        self.netns_prefix = settings.netns_prefix
        self._port_prefix = port_prefix(self.bridge)
        self._dns_enabled = dns
        if dns_upstreams is None and settings.dns_upstreams:
            dns_upstreams = parse_upstreams(settings.dns_upstreams)
        self._dns_upstreams = list(dns_upstreams) if dns_upstreams is not None else None
        self._dns_port = dns_port
        self._dns_policy = dns_policy
        self._dns_without_internet = dns_without_internet
        self._timeout = command_timeout
        self._ip = _exec.tool("ip")
        self._nft = _exec.tool("nft")
        # Concurrent scripts share one transaction (see _nft_batch): 48 attaches at once, 4.8 s -> 0.03 s.
        self._nft_batcher = NftBatcher(
            lambda script: _exec.run([self._nft, "-f", "-"], stdin=script, timeout=self._timeout)
        )
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
        self._proxy_enabled = egress_proxy
        self._proxy: EgressProxy | None = None
        self._resolved = ResolvedAddresses()  # per sandbox address: what DNS told it
        self._state_dir = state_dir or Path("/run/corral") / f"network-{self.bridge}"
        self._policies: dict[str, NetworkPolicy] = {}  # of attached, pending and releasing sandboxes
        self._staged: dict[str, NetworkPolicy] = {}  # set before attach
        self._denied: list[ipaddress.IPv4Network] = denied_networks(self.subnet)
        self.policy_source: Callable[[str], NetworkPolicy | None] | None = None

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
            addrs = _exec.parse_json((await self._ip_run("-json", "addr", "show")).stdout)
            try:
                batch = bridge_batch(self.bridge, existing, gateway_iface, self._mtu, addrs)
            except ValueError as exc:
                raise FailedPrecondition(str(exc)) from None
            await self._ip_batch(batch)
            _write_sysctl("net/ipv6/conf/" + self.bridge + "/disable_ipv6", "1")
            _write_sysctl("net/ipv4/ip_forward", "1")
            addrs = [a for a in addrs if a.get("ifname") != self.bridge]  # its own addresses come below
            host_networks = parse_host_networks(addrs)
            self._denied = denied_networks(self.subnet, host_networks)

            if not self._host_ready:  # first time in this process: the kernel is the truth
                self._attached = await self._scan()
                self._policies = {i: self._load_policy(a) for i, a in self._attached.items()}
                self._forget_other_policies(keep=set(self._attached))
            if self._proxy_enabled and self._proxy is None:
                self._proxy = EgressProxy(
                    str(self.gateway),
                    self._egress_policy_of,
                    self._is_denied,
                    resolved=self._resolved,
                    resolve=self._lookup_name,
                )
                await self._proxy.start()
                log.info("egress proxy on %s:%s", self.gateway, self._proxy.port)
            await self._apply_ruleset(host_networks)
            self._host_ready = True

            if self._dns_enabled and self._dns is None:
                upstreams = self._dns_upstreams or host_upstreams()
                self._dns = await start_dns_forwarder(
                    str(self.gateway),
                    upstreams,
                    port=self._dns_port,
                    policy=self._dns_allows,
                    allowed_clients=self.subnet,
                    on_answer=self._record_answer,
                )
                log.info("dns forwarder on %s:%s -> %s", self.gateway, self._dns_port, upstreams)

    async def close(self) -> None:
        """Stop the DNS forwarder and the egress proxy; namespaces, bridge and rules stay
        (sandboxes keep running; until the next start, inspected connections are refused)."""
        if self._dns is not None:
            dns, self._dns = self._dns, None
            await dns.aclose()
        if self._proxy is not None:
            proxy, self._proxy = self._proxy, None
            await proxy.aclose()
        await self._nft_batcher.aclose()

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
            self._policies.clear()
            self._host_ready = False
            self._resolved.clear()
        with contextlib.suppress(OSError):
            for leftover in self._state_dir.glob("*.json"):
                leftover.unlink()

    # -- sandboxes -------------------------------------------------------------------------

    async def attach(self, sandbox_id: str, allow_internet: bool) -> Attachment:
        """Create the sandbox's namespace, wired to the bridge with a fresh address.

        Its policy is the one staged by `set_policy`, else the default: open, or nothing out
        when `allow_internet` is False.
        """
        netns_name(self.netns_prefix, sandbox_id)  # rejects a malformed id before anything happens
        if not self._host_ready:
            raise FailedPrecondition("ensure_host() must run before attach()")
        async with self._for_sandbox(sandbox_id):
            policy = self._staged.pop(sandbox_id, None)
            if policy is None and self.policy_source is not None:
                policy = self.policy_source(sandbox_id)
            policy = policy or NetworkPolicy.default(allow_internet)
            async with self._lock:
                if sandbox_id in self._attached:
                    raise AlreadyExists(f"sandbox {sandbox_id} already has a network")
                ip = allocate_ip(self.subnet, self._used(), after=self._cursor)
                self._cursor = ip
                self._resolved.forget(ip)  # answers given to a former holder of the address
                att = self._attachment(sandbox_id, ip, policy.allow_internet)
                self._pending[sandbox_id] = att
                self._policies[sandbox_id] = policy
            try:
                await asyncio.to_thread(self._save_policy, sandbox_id, policy)
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
                    self._forget_policy(sandbox_id)
                finally:
                    async with self._lock:
                        self._releasing.pop(sandbox_id, None)
                        self._policies.pop(sandbox_id, None)
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
                self._forget_policy(sandbox_id)
                done = True
            finally:
                async with self._lock:
                    self._releasing.pop(sandbox_id, None)
                    self._staged.pop(sandbox_id, None)
                    if done:
                        self._policies.pop(sandbox_id, None)
                        if att is not None:
                            self._resolved.forget(att.ip)
                    elif att is not None:  # still there: a retry must find it
                        self._attached.setdefault(sandbox_id, att)

    async def set_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        """Replace the sandbox's network policy now; before its `attach`, stage it for the attach.

        Fails closed: the policy file is written first, then the chains are replaced in one nft
        transaction, then `no_egress` and the alias follow when "nothing gets out" changed.
        """
        netns_name(self.netns_prefix, sandbox_id)
        async with self._for_sandbox(sandbox_id):
            async with self._lock:
                att = self._attached.get(sandbox_id)
                if att is None:
                    self._staged[sandbox_id] = policy
                    return
                old = self._policies.get(sandbox_id) or NetworkPolicy.default(att.allow_internet)
                new_att = dataclasses.replace(att, allow_internet=policy.allow_internet)
            await asyncio.to_thread(self._save_policy, sandbox_id, policy)
            async with self._lock:  # from here on, a concurrent ruleset rewrite renders the new one
                self._policies[sandbox_id] = policy
                self._attached[sandbox_id] = new_att
            await self._nft_apply(render_policy_update(self.bridge, att.ip, policy.egress, self._proxy_port))
            if old.allow_internet != policy.allow_internet:
                table = table_name(self.bridge)
                verb = "add" if not policy.allow_internet else "delete"
                result = await self._nft_run(f"{verb} element inet {table} no_egress {{ {att.ip} }}\n")
                if result.returncode != 0 and not nft_error_is_missing(result.stderr):
                    raise Internal(f"nft: {result.stderr.strip()}")
                alias = port_alias(sandbox_id, att.ip, policy.allow_internet)
                await self._ip_run("link", "set", "dev", att.veth_host, "alias", alias)

    def policy(self, sandbox_id: str) -> NetworkPolicy | None:
        """The policy in force (or staged) for a sandbox; None for one this network does not know."""
        return self._policies.get(sandbox_id) or self._staged.get(sandbox_id)

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
        policy = self._policy_of_ip(client)
        if policy is None:
            return False
        if policy.egress.blocks_everything:
            if not self._dns_without_internet:
                return False
        elif not policy.egress.allows_name(qname):
            return False
        return self._dns_policy(qname, client) if self._dns_policy else True

    def _record_answer(self, client: IPAddress, reply: bytes) -> None:
        if client != self.gateway and self._policy_of_ip(client) is not None:
            self._resolved.record_answer(client, reply)

    async def _lookup_name(self, name: str, *, ipv6: bool = False) -> list[Resolution]:
        return await self._dns.lookup(name, ipv6=ipv6) if self._dns is not None else []

    @property
    def resolved_names(self) -> ResolvedAddresses:
        """What the DNS forwarder answered each sandbox (by address), for the egress proxy."""
        return self._resolved

    def _policy_of_ip(self, ip: IPAddress) -> NetworkPolicy | None:
        att = next((a for a in (*self._attached.values(), *self._pending.values()) if a.ip == ip), None)
        if att is None:
            return None
        return self._policies.get(att.sandbox_id) or NetworkPolicy.default(att.allow_internet)

    def _egress_policy_of(self, ip: IPAddress) -> EgressPolicy | None:
        policy = self._policy_of_ip(ip)
        return policy.egress if policy is not None else None

    def _is_denied(self, ip: IPAddress) -> bool:
        return ip.version != 4 or any(ip in net for net in self._denied)

    @property
    def _proxy_port(self) -> int | None:
        return self._proxy.port if self._proxy is not None else None

    @property
    def egress_proxy_port(self) -> int | None:
        """Where the inspecting proxy listens on the gateway (None when it does not run)."""
        return self._proxy_port

    # -- policy files ----------------------------------------------------------------------

    def _policy_path(self, sandbox_id: str) -> Path:
        return self._state_dir / f"{sandbox_id}.json"

    def _save_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        """Atomically (write, fsync, rename); private to root: it holds the traffic access token."""
        self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = json.dumps({"sandboxId": sandbox_id, "policy": policy.to_json()})
        fd, tmp = tempfile.mkstemp(dir=self._state_dir, prefix=f".{sandbox_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._policy_path(sandbox_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _load_policy(self, att: Attachment) -> NetworkPolicy:
        """The saved policy; without one (or a broken one) the alias decides, failing closed for
        a sandbox that had rules we can no longer read."""
        path = self._policy_path(att.sandbox_id)
        try:
            data = json.loads(path.read_text())
            return NetworkPolicy.from_json(data["policy"])
        except FileNotFoundError:
            return NetworkPolicy.default(att.allow_internet)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "unreadable network policy %s (%s): sandbox %s gets no egress", path, exc, att.sandbox_id
            )
            return NetworkPolicy.default(False)

    def _forget_policy(self, sandbox_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._policy_path(sandbox_id).unlink()

    def _forget_other_policies(self, keep: set[str]) -> None:
        """Files of sandboxes whose network is gone (a crash between unwiring and forgetting)."""
        with contextlib.suppress(FileNotFoundError):
            for path in self._state_dir.iterdir():
                torn_write = path.name.startswith(".")
                if torn_write or (path.suffix == ".json" and path.stem not in keep):
                    with contextlib.suppress(OSError):
                        path.unlink()

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
            tg.create_task(set_sysctls(att.netns_path, SANDBOX_NETNS_SYSCTLS))

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
        policy = self._policies.get(att.sandbox_id) or NetworkPolicy.default(att.allow_internet)
        script = render_add_elements(self.bridge, port, att.allow_internet)
        script += render_policy_update(self.bridge, att.ip, policy.egress, self._proxy_port)
        await self._nft_apply(script)

    async def _delete_elements(self, att: Attachment | PortInfo) -> None:
        veth = att.veth_host if isinstance(att, Attachment) else att.veth
        port = PortBinding(veth, att.mac, att.ip)
        script = render_delete_elements(self.bridge, port, att.allow_internet)
        async with self._lock:  # an address a live sandbox uses again: its chains are that sandbox's
            reused = any(
                a.ip == att.ip and a.sandbox_id != att.sandbox_id
                for a in (*self._attached.values(), *self._pending.values())
            )
        if not reused:
            script += render_policy_delete(self.bridge, att.ip)
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
            policies={
                a.ip: (self._policies.get(a.sandbox_id) or NetworkPolicy.default(a.allow_internet)).egress
                for a in live
            },
            proxy_port=self._proxy_port,
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
        return await self._nft_batcher.run(script)  # type: ignore[no-any-return]

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
