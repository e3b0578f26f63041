"""The composition root of `corral server`: `create_app(settings)` builds every part once and wires them.

One ASGI app serves the one port: requests for a sandbox (by Host or E2b-Sandbox-* headers) go to
the proxy, everything else to the control-plane API. Startup re-adopts sandboxes that kept running
while the server was down; shutdown leaves sandboxes running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

from corral.builder.service import TemplateBuildService
from corral.core.errors import NotFound
from corral.core.settings import Settings
from corral.node.envd.app import build_envd_app
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.localhost import LocalEnvd
from corral.node.network import SandboxNetwork
from corral.node.pool import PoolConfig, WarmPool
from corral.node.runtime.crun import OciRuntime
from corral.node.sandboxes import Node
from corral.node.storage.templates import TemplateStore
from corral.server.api import build_api
from corral.server.proxy import SandboxProxy, route_target, scope_headers
from corral.server.service import SandboxService
from corral.server.signed_routing import is_signed_files_request, serve_signed_files
from corral.server.store import SandboxRow, Store

__all__ = ["CorralApp", "create_app"]

log = logging.getLogger(__name__)


class CorralApp:
    """The ASGI app. `on_ready(api_key)` is called once startup has finished."""

    def __init__(self, settings: Settings, on_ready: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_ready = on_ready
        self.store = Store(settings)
        self.templates = TemplateStore(settings)
        self.runtime = OciRuntime(settings.runtime, settings.runtime_root)
        self.network = SandboxNetwork(settings)
        self.node = Node(settings, self.runtime, self.network, self.templates)
        self.pool = WarmPool(self.node, self.templates, PoolConfig.from_env())  # CORRAL_POOL_SIZE/_TEMPLATES
        self.service = SandboxService(settings, self.store, self.node, self.templates, SandboxRow, pool=self.pool)
        self.builder = TemplateBuildService(
            settings,
            self.node,
            self.templates,
            own_layer=self.store.add_owned_layer,  # layers builds make are collected when unused
            collect_layers=self.service.collect_layers,
            template_owner=self.service.template_owner,  # snapshots are their team's, as bases too
            layer_sizes=self.store,  # owned layers' sizes: the build cache's byte budget
        )
        self.service.layer_holders.append(self.builder.layers_to_keep)  # in-flight builds, kept cache
        self.api = build_api(self.service, self.store, settings, templates=self.builder)
        self.proxy = SandboxProxy(self.node, build_envd_app(self._envd_lookup))
        self.node.local_envd = LocalEnvd(self.proxy)  # envd at localhost:49983 inside each sandbox
        self._tasks: list[asyncio.Task[Any]] = []
        self.api_key = ""

    def _envd_lookup(self, headers: Mapping[str, str]) -> EnvdSandbox:
        sandbox_id = headers.get("e2b-sandbox-id", "")
        if sandbox_id not in self.node:
            raise NotFound(f"sandbox '{sandbox_id}' not found")
        return self.node.get(sandbox_id).envd

    async def startup(self) -> None:
        self.store.migrate()
        self.api_key = self.store.ensure_default_team(self.settings.api_key)
        await self.builder.start()  # before reconcile's layer collection; no build runs yet
        await self.node.start()
        adopted, lost = await self.service.reconcile()
        if adopted or lost:
            log.warning("re-adopted %d running sandbox(es); %d were gone", len(adopted), len(lost))
        await self.service.adopt_unowned_layers()  # layers older versions left unowned, then collected
        self._tasks.append(asyncio.create_task(self.builder.measure_and_collect(), name="layer-sizes"))
        self._tasks.append(asyncio.create_task(self.service.run_expiry(), name="sandbox-expiry"))
        self._tasks.append(asyncio.create_task(self.pool.run(), name="warm-pool"))
        if self.on_ready is not None:
            self.on_ready(self.api_key)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.builder.aclose()
        await self.service.aclose()
        await self.pool.drain()  # pooled sandboxes have no row: nothing would re-adopt them
        await self.proxy.aclose()
        await self.node.close()
        self.store.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        self.pool.note_activity()  # the warm pool refills in quiet moments
        target = route_target(scope_headers(scope), self.settings.domain)
        if target is not None:
            await self.proxy(scope, receive, send, target)
        elif is_signed_files_request(scope):  # a header-less signed download/upload URL
            await serve_signed_files(scope, receive, send, self.node, self.proxy)
        else:
            await self.api(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings, on_ready: Callable[[str], None] | None = None) -> CorralApp:
    return CorralApp(settings, on_ready)
