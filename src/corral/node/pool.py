"""A warm pool: sandboxes booted ahead of time, per template, that `create` hands out.

Why: a cold create costs a disk image (mkfs + loop mount), a network namespace wired to the bridge
(`ip`, `bridge`, `nft`), the overlay root and `crun run`: about 100 ms of mostly process spawns on
an idle 2-core machine, several times that under load. Claiming a pooled sandbox costs only what
differs per request: its database row, env vars, access token and, when asked, a network policy.

A pooled sandbox is a complete running sandbox that is not served yet (`NodeStatus.POOLED`): it
has its own id from the start (the hostname is the id, fixed at boot), no env vars, a throwaway
access token, the default network (internet allowed) and the template's resources. The proxy does
not route to it, the API has no row for it (so lists and metrics never show it), and the metrics
sampler skips it. `claim(manifest)` takes one out; the caller then applies the request and serves
it (`Node.serve`). A server restart removes pooled sandboxes as strays (they have no row), and a
clean shutdown destroys them (`drain`).

Bounds (environment, read once at start):

| env var                | default | meaning                                                  |
|------------------------|---------|----------------------------------------------------------|
| CORRAL_POOL_SIZE       | 2       | ready sandboxes kept per pooled template; 0 = no pool     |
| CORRAL_POOL_TEMPLATES  | base    | comma-separated template names or ids that are pooled     |

Refills run one sandbox at a time in one task (`run`), so a pool never takes more than one core's
worth of create work; after a failure it backs off (1 s doubling to 60 s). A refill waits for a
quiet moment: `QUIET_S` without requests (`note_activity`, called for every request), or at most
`MAX_DEFER_S`, so that the exec and kill that usually follow a create do not compete with it for
the CPU. A template that was rebuilt (its layers, resources or runtime changed) gets fresh sandboxes;
stale ones are destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from corral.core.errors import CorralError
from corral.core.ids import new_access_token, new_sandbox_id
from corral.core.sandbox import SandboxSpec

__all__ = ["DEFAULT_POOL_SIZE", "DEFAULT_POOL_TEMPLATES", "PoolConfig", "PoolKey", "WarmPool", "pool_key"]

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 2
DEFAULT_POOL_TEMPLATES = ("base",)
MAX_POOL_SIZE = 64
_BACKOFF_S = (1.0, 60.0)
QUIET_S = 0.1  # a refill starts once no request came for this long ...
MAX_DEFER_S = 1.0  # ... or this long after it was wanted, whichever is first


@dataclasses.dataclass(frozen=True, slots=True)
class PoolConfig:
    size: int = DEFAULT_POOL_SIZE
    templates: tuple[str, ...] = DEFAULT_POOL_TEMPLATES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PoolConfig:
        """From CORRAL_POOL_SIZE and CORRAL_POOL_TEMPLATES (ValueError on a bad size)."""
        env = os.environ if env is None else env
        raw_size = env.get("CORRAL_POOL_SIZE", "").strip()
        size = int(raw_size) if raw_size else DEFAULT_POOL_SIZE
        if not 0 <= size <= MAX_POOL_SIZE:
            raise ValueError(f"CORRAL_POOL_SIZE must be between 0 and {MAX_POOL_SIZE}, got {size}")
        raw_templates = env.get("CORRAL_POOL_TEMPLATES")
        templates = DEFAULT_POOL_TEMPLATES if raw_templates is None else tuple(
            name.strip() for name in raw_templates.split(",") if name.strip()
        )
        return cls(size=size, templates=templates)

    @property
    def enabled(self) -> bool:
        return self.size > 0 and bool(self.templates)


@dataclasses.dataclass(frozen=True, slots=True)
class PoolKey:
    """What makes two sandboxes of a template interchangeable (a rebuild changes it)."""

    template_id: str
    layers: tuple[str, ...]
    cpu_count: int
    memory_mb: int
    disk_size_mb: int
    runtime: str = ""  # the template's OCI runtime ("" = the server's default)


def pool_key(manifest: Any) -> PoolKey:
    """The key of a template manifest (`corral.node.storage.templates.TemplateManifest`)."""
    return PoolKey(
        template_id=manifest.template_id,
        layers=tuple(manifest.layers),
        cpu_count=manifest.cpu_count,
        memory_mb=manifest.memory_mb,
        disk_size_mb=manifest.disk_size_mb,
        runtime=getattr(manifest, "runtime", None) or "",
    )


def pooled_spec(key: PoolKey) -> SandboxSpec:
    """The spec a pooled sandbox boots with: a fresh id, nothing of any request."""
    return SandboxSpec(
        sandbox_id=new_sandbox_id(),
        template_id=key.template_id,
        layers=key.layers,
        cpu_count=key.cpu_count,
        memory_mb=key.memory_mb,
        disk_size_mb=key.disk_size_mb,
        allow_internet_access=True,
        access_token=new_access_token(),  # never handed out; replaced at claim
        runtime=key.runtime,
    )


class WarmPool:
    """Ready sandboxes per pooled template. `node` is the `corral.node.sandboxes.Node`;
    `templates` resolves names (`get(name) -> manifest`)."""

    def __init__(self, node: Any, templates: Any, config: PoolConfig) -> None:
        self.node = node
        self.templates = templates
        self.config = config
        self._ready: dict[PoolKey, list[str]] = {}  # key -> ids of pooled sandboxes, oldest first
        self._wanted = asyncio.Event()
        self._stale: list[str] = []
        self._last_activity = 0.0  # time.monotonic() of the last request
        self.quiet_s, self.max_defer_s = QUIET_S, MAX_DEFER_S

    def note_activity(self) -> None:
        """A request came in (called for every request: keep it cheap)."""
        self._last_activity = time.monotonic()

    async def _quiet_moment(self, wanted_at: float) -> None:
        while True:
            now = time.monotonic()
            wait = min(self._last_activity + self.quiet_s, wanted_at + self.max_defer_s) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    # -- claim -----------------------------------------------------------------------------

    def claim(self, manifest: Any) -> str | None:
        """The id of a ready pooled sandbox of this template (now the caller's), or None."""
        if not self.config.enabled:
            return None
        ready = self._ready.get(pool_key(manifest))
        self._wanted.set()  # a miss asks for a pool too, once the template is a pooled one
        while ready:
            sandbox_id = ready.pop(0)
            if self.node.is_pooled(sandbox_id):
                return sandbox_id
        return None

    def ready_count(self) -> int:
        return sum(len(ids) for ids in self._ready.values())

    # -- refill ----------------------------------------------------------------------------

    def _wanted_keys(self) -> list[PoolKey]:
        keys = []
        for name in self.config.templates:
            try:
                keys.append(pool_key(self.templates.get(name)))
            except CorralError:
                continue  # not built (yet): nothing to pool
        return keys

    async def run(self) -> None:
        """Keep every pooled template at `size` ready sandboxes, until cancelled."""
        if not self.config.enabled:
            return
        delay = _BACKOFF_S[0]
        self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self._refill()
                delay = _BACKOFF_S[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any boot failure: back off, the pool is optional
                log.warning("warm pool: cannot boot a sandbox (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_S[1])
                self._wanted.set()

    async def _refill(self) -> None:
        keys = self._wanted_keys()
        for key in list(self._ready):
            if key not in keys:  # rebuilt or removed template: its sandboxes are of no use
                self._stale.extend(self._ready.pop(key))
        await self._discard_stale()
        wanted_at = time.monotonic()
        for key in keys:
            ready = self._ready.setdefault(key, [])
            while len(ready) < self.config.size:
                await self._quiet_moment(wanted_at)
                spec = pooled_spec(key)
                await self.node.create(spec, pooled=True)
                ready.append(spec.sandbox_id)

    async def _discard_stale(self) -> None:
        while self._stale:
            sandbox_id = self._stale.pop()
            with contextlib.suppress(Exception):
                await self.node.destroy(sandbox_id)

    # -- shutdown --------------------------------------------------------------------------

    async def drain(self) -> None:
        """Destroy every pooled sandbox (clean shutdown; after a crash, reconcile removes them)."""
        ids: Iterable[str] = [i for ready in self._ready.values() for i in ready]
        self._ready.clear()
        self._stale.extend(ids)
        await self._discard_stale()
