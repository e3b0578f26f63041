"""A sandbox's network policy as data: egress rules (E2B `allowOut` / `denyOut`) and ingress settings.

Egress entries are IPs, CIDRs or domain names, each optionally with a port or port range, as E2B
parses them (`packages/shared/pkg/sandbox-network/rule.go`):

    "8.8.8.8"  "8.8.8.0/24"  "8.8.8.8:53"  "8.8.8.0/24:1-1024"  "example.com"  "*.example.com:443"  "*"

Decision order (E2B `isEgressAllowed`): an allow entry that matches wins; else a deny entry that
matches denies; else the connection is allowed. `0.0.0.0/0` in `denyOut` (ALL_TRAFFIC) turns the
allow list into an allowlist. `allow_internet_access=false` replaces `denyOut` with ALL_TRAFFIC and
keeps `allowOut`, as E2B's API does.

Where each part is enforced (see `ruleset` and `egress_proxy`):
- addresses: nftables, per sandbox, for every protocol;
- domains: by the SNI of a TLS ClientHello or the Host of an HTTP request, for TCP to the ports
  of the domain rules (80 and 443 when a rule names none), which are redirected to the node's
  inspecting proxy; the proxy applies the whole policy (addresses too) to those connections;
- names: the DNS forwarder answers only names the policy allows (`allows_name`);
- a connection that only its name allows (`Verdict.ALLOW_BY_NAME`) must go to an address that
  name resolves to (`resolutions`; the proxy checks).
What no policy can open: the always-denied ranges (`addressing.denied_networks`), checked first.

Domain entries in `denyOut` are accepted here (E2B's API refuses them): they deny matching TLS/HTTP
connections and DNS names, unless an allow entry matches first. Domains in `allowOut` need some
`denyOut` entry (E2B insists on ALL_TRAFFIC; any deny gives an allowed name a meaning here).

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "ALL_TRAFFIC",
    "CLOSED_EGRESS",
    "MAX_RULES",
    "WEB_PORTS",
    "EgressPolicy",
    "EgressRule",
    "IngressPolicy",
    "NetworkPolicy",
    "PolicyError",
    "Verdict",
    "match_domain",
    "merge_port_ranges",
    "normalize_hostname",
    "parse_rule",
]

ALL_TRAFFIC = "0.0.0.0/0"
WEB_PORTS: tuple[tuple[int, int], ...] = ((80, 80), (443, 443))
MAX_RULES = 1000  # per list; nftables copes with far more, but a policy is meant to be read

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PortRange = tuple[int, int]  # inclusive

_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class PolicyError(ValueError):
    """An entry or a combination of entries the API must refuse (400)."""


class Verdict(enum.Enum):
    """A policy's answer for one connection (`EgressPolicy.verdict`)."""

    ALLOW = "allow"  # an address entry allows it, or no entry denies it
    ALLOW_BY_NAME = "allow by name"  # only a domain entry allows it: the address must be the name's
    DENY = "deny"


def normalize_hostname(name: str) -> str | None:
    """`name` lower-cased, without a trailing dot, IDNA-encoded; None when it is no DNS name."""
    name = name.strip().rstrip(".").lower()
    if not name or len(name) > 253:
        return None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = name.split(".")
    if labels[-1].isdigit():  # "300.1.1.1": a broken address, not a name (no TLD is numeric)
        return None
    return name if all(_LABEL_RE.match(label) for label in labels) else None


def match_domain(hostname: str, pattern: str) -> bool:
    """E2B's `matchDomain`: exact (case-insensitive), `*` for any name, or `*.suffix` for names
    strictly below `suffix` (`*.example.com` does not match `example.com` itself)."""
    hostname = hostname.lower()
    if pattern == "*":
        return bool(hostname)
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:]) and len(hostname) > len(pattern) - 1
    return hostname == pattern


def merge_port_ranges(ranges: Iterable[PortRange]) -> list[PortRange]:
    """Sorted, with overlapping and adjacent ranges joined (nftables refuses overlapping elements)."""
    merged: list[PortRange] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise PolicyError(f"invalid port {text!r}: must be between 1 and 65535")
    return int(text)


def _parse_ports(text: str) -> PortRange | None:
    if text == "":
        return None  # "host:" = all ports, explicitly
    first, sep, last = text.partition("-")
    start = _parse_port(first)
    end = _parse_port(last) if sep else start
    if start > end:
        raise PolicyError(f"port range start {start} is greater than end {end}")
    return (start, end)


def _split_host_port(entry: str) -> tuple[str, PortRange | None]:
    if entry.startswith("["):  # [IPv6]:port
        host, sep, rest = entry[1:].partition("]")
        if not sep:
            raise PolicyError(f"missing closing bracket in {entry!r}")
        if rest and not rest.startswith(":"):
            raise PolicyError(f"expected ':' after ']' in {entry!r}")
        return host, _parse_ports(rest[1:]) if rest else None
    if entry.count(":") > 1:
        return entry, None  # bare IPv6: no port without brackets
    host, sep, ports = entry.rpartition(":")
    if not sep:
        return entry, None
    return host, _parse_ports(ports)


@dataclasses.dataclass(frozen=True, slots=True)
class EgressRule:
    """One `allowOut`/`denyOut` entry: an address range or a domain pattern, and its ports."""

    entry: str  # as given, kept for the API's answers
    network: IPNetwork | None = None
    domain: str | None = None  # "example.com", "*.example.com" or "*"; lower case
    ports: PortRange | None = None  # None: every port

    @property
    def is_all_traffic(self) -> bool:
        return self.ports is None and self.network == ipaddress.IPv4Network(ALL_TRAFFIC)

    def port_matches(self, port: int) -> bool:
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    def matches(self, ip: IPAddress, port: int, hostname: str | None = None) -> bool:
        if not self.port_matches(port):
            return False
        if self.domain is not None:
            return hostname is not None and match_domain(hostname, self.domain)
        assert self.network is not None
        return ip.version == self.network.version and ip in self.network

    def matches_name(self, qname: str) -> bool:
        return self.domain is not None and match_domain(qname, self.domain)


def parse_rule(entry: str) -> EgressRule:
    """One entry (see the module docstring); raises PolicyError."""
    if not isinstance(entry, str):
        raise PolicyError(f"network rule must be a string, got {type(entry).__name__}")
    text = entry.strip()
    if not text:
        raise PolicyError("empty network rule")
    host, ports = _split_host_port(text)
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        network = None
    if network is not None:
        return EgressRule(entry=text, network=network, ports=ports)
    if host == "*":
        return EgressRule(entry=text, domain="*", ports=ports)
    wildcard = host.startswith("*.")
    name = normalize_hostname(host[2:] if wildcard else host)
    if name is None or (not wildcard and "*" in host):
        raise PolicyError(f"invalid network rule {entry!r}: not an IP, CIDR or domain name")
    return EgressRule(entry=text, domain=("*." + name) if wildcard else name, ports=ports)


def _parse_list(entries: Sequence[str] | None, what: str) -> tuple[EgressRule, ...]:
    if entries is None:
        return ()
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise PolicyError(f"{what} must be a list of strings")
    if len(entries) > MAX_RULES:
        raise PolicyError(f"{what} has {len(entries)} entries; at most {MAX_RULES} are allowed")
    rules: dict[str, EgressRule] = {}
    for entry in entries:
        rule = parse_rule(entry)
        rules.setdefault(rule.entry, rule)  # duplicates are harmless; keep the first
    return tuple(rules.values())


@dataclasses.dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Where a sandbox may connect to. The default (no rules) allows the whole internet."""

    allow: tuple[EgressRule, ...] = ()
    deny: tuple[EgressRule, ...] = ()

    @classmethod
    def from_lists(
        cls,
        allow_out: Sequence[str] | None = None,
        deny_out: Sequence[str] | None = None,
        *,
        allow_internet_access: bool = True,
    ) -> EgressPolicy:
        """Validate E2B's lists into a policy; raises PolicyError (the API answers 400)."""
        allow = _parse_list(allow_out, "allowOut")
        deny = _parse_list(deny_out, "denyOut")
        if not allow_internet_access:
            deny = (parse_rule(ALL_TRAFFIC),)
        policy = cls(allow, deny)
        if any(r.domain is not None for r in allow) and not deny:  # allowing by name alone means nothing
            raise PolicyError("allow out contains domains but deny out is missing 0.0.0.0/0 (ALL_TRAFFIC)")
        return policy

    @property
    def denies_all(self) -> bool:
        """ALL_TRAFFIC is denied: only what `allow` names gets out (allowlist mode)."""
        return any(r.is_all_traffic for r in self.deny)

    @property
    def blocks_everything(self) -> bool:
        """Nothing gets out, not even DNS: E2B's `allow_internet_access=false` without allow rules."""
        return self.denies_all and not self.allow

    @property
    def is_open(self) -> bool:
        return not self.allow and not self.deny

    @property
    def domain_rules(self) -> tuple[EgressRule, ...]:
        return tuple(r for r in (*self.allow, *self.deny) if r.domain is not None)

    def inspected_ports(self) -> list[PortRange]:
        """TCP ports whose connections must go through the inspecting proxy: those of the domain
        rules (80 and 443 for a rule without ports). Empty when the policy names no domain."""
        ranges: list[PortRange] = []
        for rule in self.domain_rules:
            ranges += [rule.ports] if rule.ports else WEB_PORTS
        return merge_port_ranges(ranges)

    def verdict(self, ip: IPAddress, port: int, hostname: str | None = None) -> Verdict:
        """The decision for one connection (the always-denied ranges are not this function's job).

        `ALLOW_BY_NAME` when the connection would be denied but for an allow entry matching its
        name: it may go only to an address that name resolves to (the caller checks, see
        `resolutions`). A name never narrows what addresses and the default already allow.
        """
        if any(r.network is not None and r.matches(ip, port) for r in self.allow):
            return Verdict.ALLOW
        if not any(r.matches(ip, port, hostname) for r in self.deny):
            return Verdict.ALLOW
        if hostname is not None and any(r.matches(ip, port, hostname) for r in self.allow):
            return Verdict.ALLOW_BY_NAME
        return Verdict.DENY

    def allows(self, ip: IPAddress, port: int, hostname: str | None = None) -> bool:
        """The verdict as a yes/no, trusting the name (`ALLOW_BY_NAME` counts as allowed)."""
        return self.verdict(ip, port, hostname) is not Verdict.DENY

    def allows_name(self, qname: str) -> bool:
        """Whether the DNS forwarder answers `qname` for this sandbox.

        An allowed domain resolves; a denied domain does not; in allowlist mode nothing else
        resolves either (a name that could not be connected to by name is only a channel out).
        """
        if self.blocks_everything:
            return False
        if any(r.matches_name(qname) for r in self.allow):
            return True
        if any(r.matches_name(qname) for r in self.deny):
            return False
        return not self.denies_all

    def to_json(self) -> dict[str, list[str]]:
        return {"allowOut": [r.entry for r in self.allow], "denyOut": [r.entry for r in self.deny]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EgressPolicy:
        return cls(
            _parse_list(data.get("allowOut") or [], "allowOut"),
            _parse_list(data.get("denyOut") or [], "denyOut"),
        )


CLOSED_EGRESS = EgressPolicy(deny=(parse_rule(ALL_TRAFFIC),))


@dataclasses.dataclass(frozen=True, slots=True)
class IngressPolicy:
    """What the sandbox proxy applies to traffic for the sandbox's ports (not envd's).

    `traffic_access_token`: required in the `e2b-traffic-access-token` header when set
    (E2B `allowPublicTraffic=false`). `mask_request_host`: the Host header sent to the sandbox
    instead of the client's, with `${PORT}` replaced by the port.
    """

    traffic_access_token: str | None = None
    mask_request_host: str | None = None

    def host_for(self, port: int) -> str | None:
        return self.mask_request_host.replace("${PORT}", str(port)) if self.mask_request_host else None

    def to_json(self) -> dict[str, Any]:
        return {"trafficAccessToken": self.traffic_access_token, "maskRequestHost": self.mask_request_host}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IngressPolicy:
        return cls(data.get("trafficAccessToken"), data.get("maskRequestHost"))


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """Everything the node enforces for one sandbox's network."""

    egress: EgressPolicy = EgressPolicy()
    ingress: IngressPolicy = IngressPolicy()

    @classmethod
    def default(cls, allow_internet: bool) -> NetworkPolicy:
        return cls(EgressPolicy() if allow_internet else CLOSED_EGRESS)

    @property
    def allow_internet(self) -> bool:
        """False only when nothing at all may leave (the `no_egress` set; DNS refused)."""
        return not self.egress.blocks_everything

    def to_json(self) -> dict[str, Any]:
        return {"egress": self.egress.to_json(), "ingress": self.ingress.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkPolicy:
        return cls(
            EgressPolicy.from_json(data.get("egress") or {}),
            IngressPolicy.from_json(data.get("ingress") or {}),
        )
