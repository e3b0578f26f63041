"""Per-sandbox networking: a network namespace per sandbox, wired by a veth to a host bridge, with
NAT to the internet, nftables egress policy and a DNS forwarder on the bridge address.

Plans are pure data (`naming`, `addressing`, `links`, `ruleset`, `policy`, `sniff`; `resolutions`
records what DNS told each sandbox);
`host.SandboxNetwork` applies them with `ip` and `nft`; `dns` is the forwarder; `egress_proxy` the
inspecting proxy for domain rules; `fake.FakeNetwork` is an in-memory stand-in.

What a sandbox gets: `eth0` = `ip/prefixlen` in `/var/run/netns/<bridge>-<id>`, default route and
DNS via the gateway (the bridge address). It reaches the internet (unless `allow_internet=False`)
and the gateway's port 53, nothing else: no private, CGNAT, loopback, link-local or multicast
range, no host port, no other sandbox, no IPv6. Its `NetworkPolicy` narrows that further (E2B's
allowOut/denyOut by address and by domain) and carries the settings of its public ports.
"""

from corral.node.network.base import Attachment, Network
from corral.node.network.dns import DnsForwarder, resolv_conf_text, start_dns_forwarder
from corral.node.network.fake import FakeNetwork
from corral.node.network.host import SandboxNetwork
from corral.node.network.policy import EgressPolicy, IngressPolicy, NetworkPolicy, PolicyError

__all__ = [
    "Attachment",
    "DnsForwarder",
    "EgressPolicy",
    "FakeNetwork",
    "IngressPolicy",
    "Network",
    "NetworkPolicy",
    "PolicyError",
    "SandboxNetwork",
    "resolv_conf_text",
    "start_dns_forwarder",
]
