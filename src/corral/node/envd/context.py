"""What the envd service knows about one sandbox.

The proxy puts an `EnvdSandbox` into the ASGI scope under `SCOPE_KEY` before it hands a request
to the envd app; every envd handler reads it from there (`sandbox_from_scope`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from corral.core.sandbox import DEFAULT_USER
from corral.node.envd.watch import WatcherRegistry

if TYPE_CHECKING:
    from corral.node.envd.confined import ConfinedRoot
    from corral.node.envd.process import ProcessTable
    from corral.node.runtime.base import Spawner
    from corral.node.runtime.idmap import IdMap
    from corral.node.sandboxes import SandboxUsage

__all__ = ["SCOPE_KEY", "EnvdSandbox", "sandbox_from_scope"]

SCOPE_KEY = "corral.sandbox"


@dataclasses.dataclass(eq=False)
class EnvdSandbox:
    sandbox_id: str
    template_id: str
    access_token: str | None  # None = not secured: no X-Access-Token / signature checks
    env_vars: Mapping[str, str]  # create-time envVars (E2B_SANDBOX* are added by the service)
    root: ConfinedRoot  # confined access to the sandbox's file tree
    spawner: Spawner  # starts processes inside the sandbox
    processes: ProcessTable  # processes started through envd
    watchers: WatcherRegistry = dataclasses.field(default_factory=WatcherRegistry)  # directory watches
    usage: Callable[[], SandboxUsage] | None = None  # what it uses now, for GET /metrics (blocking)
    default_user: str = DEFAULT_USER  # the template's user: requests naming no user act as it
    default_workdir: str | None = None  # the template's workdir: processes started without a cwd run here

    @property
    def id_map(self) -> IdMap | None:
        """The sandbox's user namespace (None: none, sandbox ids are host ids). It lives on the
        root, so every file operation through it, envd's or the builder's, maps owners."""
        return self.root.id_map

    def default_env(self) -> dict[str, str]:
        """Sandbox-level env vars every process gets (e2b-protocol.md §6.3), also served by GET /envs."""
        env = {"E2B_SANDBOX": "true", "E2B_SANDBOX_ID": self.sandbox_id, "E2B_TEMPLATE_ID": self.template_id}
        env.update(self.env_vars)
        return env


def sandbox_from_scope(scope: MutableMapping[str, Any]) -> EnvdSandbox:
    return scope[SCOPE_KEY]
