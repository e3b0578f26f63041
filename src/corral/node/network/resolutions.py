"""What each sandbox was told a name resolves to: the addresses a connection allowed by its name
may go to.

The inspecting proxy decides a connection by the name in it (SNI / Host) but connects to the
address the sandbox dialled. Without a check, a sandbox allowed `example.com` could send
`SNI: example.com` to any address. So a connection that only its name allows must go to an address
the name resolves to: one that the node's DNS forwarder answered for that name to that sandbox
(recorded here, per client, for the answer's TTL), or, failing that, one a fresh resolution by the
proxy gives (`egress_proxy`).

Answers are read as resolvers hand them out: the A/AAAA records of a CNAME chain belong to the name
that was asked (`www.example.com CNAME edge.cdn.net`, `edge.cdn.net A 192.0.2.7` records
192.0.2.7 under `www.example.com`). The name recorded is always the concrete one asked, so a
wildcard rule (`*.example.com`) pins each name below it to its own addresses.

Memory is bounded: at most `max_per_client` (name, address) pairs per sandbox, the oldest dropped
first; entries live max(TTL, `min_keep`) seconds, at most `max_keep`; `forget(client)` when a
sandbox's network goes (its address may be given to another sandbox). Pure apart from the clock.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable, Iterable

from dnslib import QTYPE, RCODE, DNSRecord

__all__ = ["Resolution", "ResolvedAddresses", "answer_addresses"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolution = tuple[IPAddress, int]  # an address and its TTL in seconds

_ADDRESS_TYPES = (QTYPE.A, QTYPE.AAAA)


def _name(label: object) -> str:
    return str(label).rstrip(".").lower()


def answer_addresses(reply: bytes | DNSRecord) -> tuple[str, list[Resolution]] | None:
    """The name a DNS response answers and its addresses (CNAME chains followed, each TTL the
    smallest along its chain); None for anything but a NOERROR response with a question."""
    try:
        record = reply if isinstance(reply, DNSRecord) else DNSRecord.parse(reply)
    except Exception:  # noqa: BLE001 (dnslib raises several types on garbage)
        return None
    if not record.header.qr or record.header.rcode != RCODE.NOERROR or not record.questions:
        return None
    qname = _name(record.q.qname)
    chain = {qname: 1 << 31}  # name -> smallest TTL on the way to it
    grew = True
    while grew:  # the chain may be listed in any order; it grows by one name per pass at least
        grew = False
        for rr in record.rr:
            if rr.rtype == QTYPE.CNAME and _name(rr.rname) in chain:
                target = _name(rr.rdata.label)
                if target not in chain:
                    chain[target] = min(chain[_name(rr.rname)], rr.ttl)
                    grew = True
    found: list[Resolution] = []
    for rr in record.rr:
        if rr.rtype in _ADDRESS_TYPES and _name(rr.rname) in chain:
            try:
                address = ipaddress.ip_address(str(rr.rdata))
            except ValueError:
                continue
            found.append((address, min(chain[_name(rr.rname)], rr.ttl)))
    return qname, found


class ResolvedAddresses:
    """Per client: (name, address) -> when it stops counting. See the module docstring."""

    def __init__(
        self,
        *,
        max_per_client: int = 1024,
        min_keep: float = 60.0,
        max_keep: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_per_client = max_per_client
        self.min_keep = min_keep
        self.max_keep = max_keep
        self.clock = clock
        self._clients: dict[IPAddress, collections.OrderedDict[tuple[str, IPAddress], float]] = {}

    def record(self, client: IPAddress, name: str, resolutions: Iterable[Resolution]) -> None:
        now = self.clock()
        entries = self._clients.setdefault(client, collections.OrderedDict())
        for address, ttl in resolutions:
            key = (name, address)
            entries.pop(key, None)  # refreshed: now the newest
            entries[key] = now + min(max(float(ttl), self.min_keep), self.max_keep)
        if len(entries) > self.max_per_client:
            for key in [k for k, until in entries.items() if until <= now]:
                del entries[key]
            while len(entries) > self.max_per_client:
                entries.popitem(last=False)
        if not entries:
            del self._clients[client]

    def record_answer(self, client: IPAddress, reply: bytes | DNSRecord) -> None:
        """Record what a DNS response told `client` (anything but a usable answer is ignored)."""
        answer = answer_addresses(reply)
        if answer is not None and answer[1]:
            self.record(client, *answer)

    def resolves_to(self, client: IPAddress, name: str, address: IPAddress) -> bool:
        entries = self._clients.get(client)
        until = entries.get((name, address)) if entries is not None else None
        if entries is None or until is None:
            return False
        if until <= self.clock():
            del entries[(name, address)]
            return False
        return True

    def forget(self, client: IPAddress) -> None:
        self._clients.pop(client, None)

    def clear(self) -> None:
        self._clients.clear()

    def count(self, client: IPAddress) -> int:
        return len(self._clients.get(client) or ())
