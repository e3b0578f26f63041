"""The inspecting egress proxy: decides a sandbox's redirected TCP connections by the name inside them.

nftables redirects the TCP that a sandbox's domain rules concern (ports 80 and 443 unless a rule
names others; `ruleset.inspect_chain_rules`) to this proxy on the gateway. For each connection it
1. reads the original destination (`SO_ORIGINAL_DST`: the address and port the sandbox dialled)
   and the sandbox by its source address,
2. peeks the first bytes the client sends until they name a host (TLS ClientHello SNI or HTTP
   Host header, `sniff.sniff_hostname`), at most `MAX_SNIFF_BYTES` or `sniff_timeout` seconds,
3. refuses the always-denied ranges whatever the policy says, then asks the sandbox's
   `EgressPolicy.verdict(destination, port, hostname)`: addresses and domains, allow before deny,
4. when only the name allows it (`Verdict.ALLOW_BY_NAME`), requires the destination to be an
   address of that name: one the node's DNS forwarder answered for it to this sandbox (`resolved`,
   see `resolutions`), else one a fresh resolution through the same upstreams gives (`resolve`).
   Otherwise the sandbox named an allowed domain while dialling some other address: denied
   (`decisions["name mismatch"]`). E2B's firewall lets that through; we do not.
5. if allowed, connects to the original destination, replays the peeked bytes and splices both
   directions (bounded reads, each write drained before the next read: memory per connection is
   bounded and a slow side slows the other), half-closes each direction on EOF;
   if denied, closes the connection.

Work is bounded: at most `max_connections` at once and `max_per_client` per sandbox (beyond that,
new connections are closed). The proxy owns every task it starts; `aclose()` ends them all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from corral.node.network.policy import EgressPolicy, Verdict
from corral.node.network.resolutions import Resolution, ResolvedAddresses
from corral.node.network.sniff import MAX_SNIFF_BYTES, sniff_hostname

__all__ = ["SO_ORIGINAL_DST", "EgressProxy", "original_destination"]

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IPv4 = ipaddress.IPv4Address
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_CHUNK = 64 * 1024


def original_destination(sock: socket.socket) -> tuple[IPv4, int]:
    """Where a redirected IPv4 TCP connection was going (conntrack's original tuple)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    return IPv4(raw[4:8]), int.from_bytes(raw[2:4], "big")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side; a reset ends the copy quietly."""
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class EgressProxy:
    """One listening socket on `bind_ip`; `policy_of(sandbox_ip)` gives the sandbox's policy (None:
    not a sandbox of ours, connection closed), `is_denied(ip)` the always-denied check,
    `resolved` what the DNS forwarder told each sandbox, `resolve(name, ipv6=)` a fresh resolution
    (None: none; a name not in `resolved` then allows nothing)."""

    def __init__(
        self,
        bind_ip: str,
        policy_of: Callable[[IPAddress], EgressPolicy | None],
        is_denied: Callable[[IPAddress], bool],
        *,
        resolved: ResolvedAddresses | None = None,
        resolve: Callable[..., Awaitable[list[Resolution]]] | None = None,
        port: int = 0,
        sniff_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        max_connections: int = 4096,
        max_per_client: int = 512,
    ) -> None:
        self.bind_ip = bind_ip
        self.policy_of = policy_of
        self.is_denied = is_denied
        self.resolved = resolved if resolved is not None else ResolvedAddresses()
        self.resolve = resolve
        self.port = port
        self.sniff_timeout = sniff_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_client: collections.Counter[IPAddress] = collections.Counter()
        self.decisions: collections.Counter[str] = collections.Counter()  # for logs and tests

    async def start(self) -> int:
        """Listen; returns the port (chosen by the kernel when `port` was 0)."""
        self._server = await asyncio.start_server(
            self._handle, self.bind_ip, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            client = ipaddress.ip_address(writer.get_extra_info("peername")[0])
        except (TypeError, ValueError, IndexError):
            writer.transport.abort()
            return
        if (
            task is None
            or len(self._tasks) >= self.max_connections
            or self._per_client[client] >= self.max_per_client
        ):
            self.decisions["overloaded"] += 1
            writer.transport.abort()
            return
        self._tasks.add(task)
        self._per_client[client] += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            upstream = await self._serve(client, reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            log.debug("egress proxy: connection from %s ended: %r", client, exc)
        finally:
            self._tasks.discard(task)
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    async def _serve(
        self, client: IPAddress, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> asyncio.StreamWriter | None:
        sock = writer.get_extra_info("socket")
        try:
            dst, dst_port = original_destination(sock)
        except OSError:
            self.decisions["not redirected"] += 1
            return None
        if str(dst) == self.bind_ip and dst_port == self.port:
            self.decisions["not redirected"] += 1  # dialled the proxy itself
            return None
        policy = self.policy_of(client)
        if policy is None:
            self.decisions["unknown client"] += 1
            return None
        if self.is_denied(dst):
            self.decisions["denied range"] += 1
            log.info("egress proxy: %s -> %s:%s refused (always-denied range)", client, dst, dst_port)
            return None
        head, hostname = await self._sniff(reader)
        verdict = policy.verdict(dst, dst_port, hostname)
        if verdict is Verdict.ALLOW_BY_NAME and not await self._resolves_to(client, hostname, dst):
            self.decisions["name mismatch"] += 1
            log.info(
                "egress proxy: %s -> %s:%s (%s) denied: not an address of that name",
                client,
                dst,
                dst_port,
                hostname,
            )
            return None
        if verdict is Verdict.DENY:
            self.decisions["denied"] += 1
            log.info(
                "egress proxy: %s -> %s:%s (%s) denied by policy",
                client,
                dst,
                dst_port,
                hostname or "no name",
            )
            return None
        self.decisions["allowed"] += 1
        log.debug("egress proxy: %s -> %s:%s (%s) allowed", client, dst, dst_port, hostname or "no name")
        try:
            async with asyncio.timeout(self.connect_timeout):
                up_reader, upstream = await asyncio.open_connection(str(dst), dst_port)
        except (OSError, TimeoutError) as exc:
            log.debug("egress proxy: %s -> %s:%s unreachable: %r", client, dst, dst_port, exc)
            writer.transport.abort()  # the client sees a reset, as it would without the proxy
            return None
        if head:
            upstream.write(head)
            await upstream.drain()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_pipe(reader, upstream))
            tg.create_task(_pipe(up_reader, writer))
        return upstream

    async def _resolves_to(self, client: IPAddress, hostname: str | None, dst: IPAddress) -> bool:
        """Whether `dst` is an address of `hostname`: as this sandbox was told, else as the
        upstreams say now (remembered for the sandbox like an answer it got)."""
        if hostname is None:
            return False
        if self.resolved.resolves_to(client, hostname, dst):
            return True
        if self.resolve is None:
            return False
        try:
            found = await self.resolve(hostname, ipv6=dst.version == 6)
        except Exception:
            log.exception("egress proxy: resolving %s failed", hostname)
            return False
        self.resolved.record(client, hostname, found)
        return any(address == dst for address, _ in found)

    async def _sniff(self, reader: asyncio.StreamReader) -> tuple[bytes, str | None]:
        """The bytes read so far and the name in them. A client that sends nothing in time (a
        server-speaks-first protocol) gets decided by address alone."""
        data = b""
        try:
            async with asyncio.timeout(self.sniff_timeout):
                while len(data) < MAX_SNIFF_BYTES:
                    chunk = await reader.read(MAX_SNIFF_BYTES - len(data))
                    if not chunk:
                        break
                    data += chunk
                    complete, hostname = sniff_hostname(data)
                    if complete:
                        return data, hostname
        except TimeoutError:
            pass
        return data, sniff_hostname(data)[1]
