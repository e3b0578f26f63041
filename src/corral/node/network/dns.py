"""The DNS forwarder sandboxes use: `<gateway>:53` (UDP and TCP) relayed to the host's resolvers.

Why: names resolve here through a resolver on a private address, which sandboxes must never reach
directly (the firewall denies private ranges). As Docker's embedded DNS and podman's aardvark-dns
do, the node answers on the bridge address itself and asks the host's resolvers on the sandboxes'
behalf. It is also the place for domain-based egress policy (`policy`), and the only way out for a
sandbox without internet access, so by default it refuses those (DNS is an exfiltration channel).

Queries are relayed byte for byte (the answer keeps the client's id and EDNS options); dnslib only
reads the question for the policy and writes the REFUSED / SERVFAIL answers we make ourselves.
Each upstream query uses its own connected socket, so its source port is random and only the
upstream can answer it. Work is bounded: at most `max_inflight` UDP queries and `max_tcp_clients`
TCP connections at once, and a quarter of each per client so that one sandbox cannot starve its
neighbours (beyond that, UDP queries are dropped and the client retries; TCP connections are
closed), and `timeout` seconds per upstream attempt.

Every answer relayed to a sandbox is handed to `on_answer(client, reply)` (the node records the
addresses it gave, `resolutions`), and `lookup(name)` resolves a name for the node itself through
the same upstreams (the proxy's check of a connection allowed by its name).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Self

from dnslib import QTYPE, RCODE, DNSRecord

from corral.core.settings import Settings
from corral.node.network.resolutions import Resolution, answer_addresses
from corral.node.network.ruleset import DNS_PORT

__all__ = [
    "DNS_PORT",
    "DnsForwarder",
    "DnsPolicy",
    "Upstream",
    "allow_all",
    "host_upstreams",
    "parse_resolv_conf",
    "parse_upstreams",
    "resolv_conf_text",
    "start_dns_forwarder",
]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# policy(qname, client) -> allowed. qname is lower case without the trailing dot.
DnsPolicy = Callable[[str, IPAddress], bool]
# An upstream resolver: an address (port 53) or (address, port).
Upstream = str | tuple[str, int]


def allow_all(qname: str, client: IPAddress) -> bool:
    return True


def parse_resolv_conf(text: str) -> list[str]:
    """`nameserver` addresses of a resolv.conf, in order (invalid entries skipped).

    Loopback stubs (127.0.0.53 of systemd-resolved) are kept: the forwarder runs in the host's
    namespace, where they answer.
    """
    servers = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(str(ipaddress.ip_address(fields[1].split("%", 1)[0])))
            except ValueError:
                continue
    return servers


def parse_upstreams(text: str) -> list[Upstream]:
    """`CORRAL_DNS_UPSTREAMS`: comma-separated `address`, `address:port` or `[v6]:port`; raises
    ValueError on anything else."""
    upstreams: list[Upstream] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, port = item, DNS_PORT
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else DNS_PORT
        elif item.count(":") == 1:
            host, _, raw = item.partition(":")
            port = int(raw)
        ipaddress.ip_address(host)
        if not 0 < port < 65536:
            raise ValueError(f"invalid DNS upstream port in {item!r}")
        upstreams.append(host if port == DNS_PORT else (host, port))
    return upstreams


def host_upstreams(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's resolvers; like glibc, 127.0.0.1 when none are configured."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            servers = parse_resolv_conf(f.read())
    except FileNotFoundError:
        servers = []
    return servers or ["127.0.0.1"]


def resolv_conf_text(settings: Settings) -> str:
    """The /etc/resolv.conf every sandbox gets: the node's forwarder on the bridge, nothing else."""
    return f"nameserver {settings.gateway}\noptions edns0 timeout:2 attempts:3\n"


def _error_reply(request: DNSRecord, rcode: int) -> bytes:
    reply = request.reply()
    reply.header.rcode = rcode
    return reply.pack()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DnsForwarder) -> None:
        self.forwarder = forwarder

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.forwarder._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns forwarder: udp error %s", exc)


class DnsForwarder:
    """A running forwarder. Owns its sockets and every task it starts; `close()` ends them all."""

    def __init__(
        self,
        bind_ip: str,
        upstreams: Sequence[Upstream],
        *,
        port: int = DNS_PORT,
        policy: DnsPolicy = allow_all,
        allowed_clients: ipaddress.IPv4Network | None = None,
        on_answer: Callable[[IPAddress, bytes], None] | None = None,
        timeout: float = 2.0,
        max_inflight: int = 256,
        max_tcp_clients: int = 64,
        tcp_idle_timeout: float = 10.0,
    ) -> None:
        if not upstreams:
            raise ValueError("a DNS forwarder needs at least one upstream resolver")
        self.bind_ip = bind_ip
        self.port = port
        self.upstreams = tuple((u, DNS_PORT) if isinstance(u, str) else (u[0], int(u[1])) for u in upstreams)
        self.policy = policy
        self.allowed_clients = allowed_clients
        self.on_answer = on_answer
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.max_tcp_clients = max_tcp_clients
        self.tcp_idle_timeout = tcp_idle_timeout
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # UDP queries in flight
        self._tcp_tasks: set[asyncio.Task[None]] = set()  # TCP connections (started by the server)
        self._per_client: collections.Counter[IPAddress] = collections.Counter()  # UDP + TCP work
        self._closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpServer(self), local_addr=(self.bind_ip, self.port), reuse_port=False
        )
        try:
            self._tcp = await asyncio.start_server(
                self._serve_tcp, self.bind_ip, self.port, reuse_address=True, backlog=64
            )
        except BaseException:
            self._udp.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and cancel every query in flight. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in [*self._tasks, *self._tcp_tasks]:
            task.cancel()

    async def wait_closed(self) -> None:
        pending = [*self._tasks, *self._tcp_tasks]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 5)

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- serving ---------------------------------------------------------------------------

    def _client_allowed(self, host: str) -> IPAddress | None:
        try:
            client = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
        if self.allowed_clients is not None and client not in self.allowed_clients:
            return None
        return client

    def _has_room(self, client: IPAddress, used: int, limit: int) -> bool:
        return not self._closed and used < limit and self._per_client[client] < max(1, limit // 4)

    def _release(self, client: IPAddress) -> None:
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    def _spawn(self, client: IPAddress, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        self._per_client[client] += 1

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._release(client)

        task.add_done_callback(done)

    def _on_datagram(self, data: bytes, addr: tuple) -> None:
        client = self._client_allowed(addr[0])
        if client is None or not self._has_room(client, len(self._tasks), self.max_inflight):
            return  # not ours to answer, or too busy: the client retries
        self._spawn(client, self._answer_udp(data, addr, client))

    async def _answer_udp(self, data: bytes, addr: tuple, client: IPAddress) -> None:
        reply = await self.resolve(data, client, tcp=False)
        if reply is not None and self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        client = self._client_allowed(peer[0])
        task = asyncio.current_task()
        if (
            client is None
            or task is None
            or not self._has_room(client, len(self._tcp_tasks), self.max_tcp_clients)
        ):
            writer.close()
            return
        self._tcp_tasks.add(task)  # so that close() can cancel it
        self._per_client[client] += 1
        try:
            while True:
                async with asyncio.timeout(self.tcp_idle_timeout):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    query = await reader.readexactly(length)
                reply = await self.resolve(query, client, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            self._release(client)
            writer.close()

    # -- resolving -------------------------------------------------------------------------

    async def resolve(self, query: bytes, client: IPAddress, *, tcp: bool) -> bytes | None:
        """The answer to send back for `query`, or None to stay silent (not a DNS query)."""
        try:
            request = DNSRecord.parse(query)
        except Exception:  # noqa: BLE001 (dnslib raises several types on garbage)
            return None
        if request.header.qr:
            return None  # a response, not a query
        if not request.questions:
            return _error_reply(request, RCODE.FORMERR)
        qname = str(request.q.qname).rstrip(".").lower()
        try:
            allowed = self.policy(qname, client)
        except Exception:
            log.exception("dns policy failed for %s from %s", qname, client)
            allowed = False
        if not allowed:
            log.debug("dns refused %s %s for %s", qname, QTYPE.get(request.q.qtype), client)
            return _error_reply(request, RCODE.REFUSED)
        for upstream in self.upstreams:
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await (self._ask_tcp(upstream, query) if tcp else self._ask_udp(upstream, query))
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                log.debug("dns upstream %s failed for %s: %r", upstream, qname, exc)
                continue
            if self.on_answer is not None:
                try:
                    self.on_answer(client, answer)
                except Exception:
                    log.exception("dns: recording the answer for %s to %s failed", qname, client)
            return answer
        return _error_reply(request, RCODE.SERVFAIL)

    async def lookup(self, name: str, *, ipv6: bool = False) -> list[Resolution]:
        """The A (or AAAA) addresses of `name` per the upstreams, for the node itself; [] when
        none answers or the name has none."""
        request = DNSRecord.question(name, "AAAA" if ipv6 else "A")
        request.header.id = secrets.randbelow(1 << 16)
        query = request.pack()
        for upstream in self.upstreams:
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await self._ask_udp(upstream, query)
                    if len(answer) > 2 and answer[2] & 0x02:  # truncated: ask again over TCP
                        answer = await self._ask_tcp(upstream, query)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                log.debug("dns upstream %s failed for lookup of %s: %r", upstream, name, exc)
                continue
            found = answer_addresses(answer)
            if found is not None and found[0] == name.rstrip(".").lower():
                return found[1]
            return []
        return []

    @staticmethod
    async def _ask_udp(upstream: tuple[str, int], query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(upstream)  # only the upstream's answers reach this socket
            await loop.sock_sendall(sock, query)
            while True:
                answer = await loop.sock_recv(sock, 65535)
                if len(answer) >= 2 and answer[:2] == query[:2]:
                    return answer

    @staticmethod
    async def _ask_tcp(upstream: tuple[str, int], query: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*upstream)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()


async def start_dns_forwarder(
    bind_ip: str,
    upstreams: Sequence[Upstream],
    *,
    port: int = DNS_PORT,
    policy: DnsPolicy = allow_all,
    allowed_clients: ipaddress.IPv4Network | None = None,
    on_answer: Callable[[IPAddress, bytes], None] | None = None,
    timeout: float = 2.0,
) -> DnsForwarder:
    """Serve DNS on `bind_ip:port` (UDP and TCP) until the returned handle's `close()`."""
    forwarder = DnsForwarder(
        bind_ip,
        upstreams,
        port=port,
        policy=policy,
        allowed_clients=allowed_clients,
        on_answer=on_answer,
        timeout=timeout,
    )
    await forwarder.start()
    return forwarder
