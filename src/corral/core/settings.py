"""Server settings: one frozen object, built once per process.

Precedence: explicit argument (CLI flag) > environment variable > default.

| env var          | default            | meaning                                              |
|------------------|--------------------|------------------------------------------------------|
| CORRAL_HOME      | /var/lib/corral    | state dir: database, template layers, sandbox dirs   |
| CORRAL_HOST      | 127.0.0.1          | address the server listens on                        |
| CORRAL_PORT      | 3000               | the one port for API, envd and sandbox ports         |
| CORRAL_DOMAIN    | localhost          | `{port}-{sandboxID}.{domain}` host routing           |
| CORRAL_API_KEY   | generated + stored | key accepted for the default team (`e2b_` + 40 hex)  |
| CORRAL_BRIDGE    | corral0            | host bridge the sandboxes' veths attach to           |
| CORRAL_SUBNET    | 10.201.0.0/16      | private pool sandbox addresses come from             |
| CORRAL_RUNTIME   | crun               | OCI runtime binary                                   |
| CORRAL_ALLOW_VULNERABLE_RUNTIME | off | run on a runtime with known escapes anyway      |
| CORRAL_USERNS    | on                 | new sandboxes in a user namespace (crun; 0 = off)    |
| CORRAL_EXEC_AGENT | on                | crun: sandboxes' PID 1 forks commands (no `crun exec`) |
| CORRAL_INIT_BINARY | /usr/local/libexec/corral/corral-init | that PID 1 (native/corral-init.c) |
| CORRAL_DNS_UPSTREAMS | /etc/resolv.conf's | resolvers sandboxes' DNS goes to: `ip[:port],...`  |
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Settings", "load_settings"]

_ENV = {
    "home": ("CORRAL_HOME", Path, Path("/var/lib/corral")),
    "host": ("CORRAL_HOST", str, "127.0.0.1"),
    "port": ("CORRAL_PORT", int, 3000),
    "domain": ("CORRAL_DOMAIN", str, "localhost"),
    "api_key": ("CORRAL_API_KEY", str, None),
    "bridge": ("CORRAL_BRIDGE", str, "corral0"),
    "subnet": ("CORRAL_SUBNET", ipaddress.IPv4Network, ipaddress.IPv4Network("10.201.0.0/16")),
    "runtime": ("CORRAL_RUNTIME", str, "crun"),
    "allow_vulnerable_runtime": ("CORRAL_ALLOW_VULNERABLE_RUNTIME", bool, False),
    "userns": ("CORRAL_USERNS", bool, True),
    "exec_agent": ("CORRAL_EXEC_AGENT", bool, True),
    "init_binary": ("CORRAL_INIT_BINARY", Path, Path("/usr/local/libexec/corral/corral-init")),
    "dns_upstreams": ("CORRAL_DNS_UPSTREAMS", str, None),
}


def _flag(raw: str) -> bool:
    """Environment flags: 1/true/yes/on are on, 0/false/no/off are off."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a flag value: {raw!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    host: str
    port: int
    domain: str
    api_key: str | None
    bridge: str
    subnet: ipaddress.IPv4Network
    runtime: str
    allow_vulnerable_runtime: bool = False
    userns: bool = True
    exec_agent: bool = True  # with a runtime that has the trait (corral.node.runtime.agent)
    init_binary: Path = Path("/usr/local/libexec/corral/corral-init")  # built by scripts/bootstrap.sh
    dns_upstreams: str | None = None  # comma-separated ip[:port]; None: the host's resolv.conf

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.home / 'corral.db'}"

    @property
    def layers_dir(self) -> Path:
        return self.home / "layers"

    @property
    def templates_dir(self) -> Path:
        return self.home / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.home / "sandboxes"

    @property
    def runtime_root(self) -> Path:
        """State dir of the OCI runtime (`crun --root`), kept apart from other users of crun."""
        return self.home / "runtime"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's own address: sandboxes' default route and DNS server."""
        return self.subnet.network_address + 1

    @property
    def netns_prefix(self) -> str:
        return f"{self.bridge}-"


def load_settings(overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from explicit overrides (None means unset), then the environment, then defaults."""
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(_ENV)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, (var, kind, default) in _ENV.items():
        if name in overrides:
            raw = overrides[name]
        elif env.get(var):
            raw = env[var]
        else:
            values[name] = default
            continue
        if isinstance(raw, kind):
            values[name] = raw
        else:
            values[name] = _flag(raw) if kind is bool else kind(raw)
    return Settings(**values)
