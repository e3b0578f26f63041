"""corral.node.pool: bounds from the environment; filling, claiming, refilling, rebuilt templates, drain."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from corral.core.errors import NotFound
from corral.node.pool import PoolConfig, WarmPool, pool_key


@dataclasses.dataclass(frozen=True)
class Manifest:
    template_id: str
    layers: tuple[str, ...]
    cpu_count: int = 2
    memory_mb: int = 512
    disk_size_mb: int = 2048
    runtime: str | None = None


class FakeTemplates:
    def __init__(self, *manifests: Manifest) -> None:
        self.by_name = {m.template_id: m for m in manifests}

    def get(self, name: str) -> Manifest:
        if name not in self.by_name:
            raise NotFound(name)
        return self.by_name[name]


class FakeNode:
    def __init__(self) -> None:
        self.pooled: dict[str, Any] = {}
        self.destroyed: list[str] = []
        self.created = 0

    async def create(self, spec: Any, *, pooled: bool = False) -> None:
        assert pooled and spec.access_token  # never booted without a (throwaway) token
        await asyncio.sleep(0)
        self.created += 1
        self.pooled[spec.sandbox_id] = spec

    def is_pooled(self, sandbox_id: str) -> bool:
        return sandbox_id in self.pooled

    async def destroy(self, sandbox_id: str) -> None:
        self.pooled.pop(sandbox_id, None)
        self.destroyed.append(sandbox_id)


async def _until(check: Any, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def test_config_from_the_environment() -> None:
    assert PoolConfig.from_env({}) == PoolConfig(size=2, templates=("base",))
    config = PoolConfig.from_env({"CORRAL_POOL_SIZE": "5", "CORRAL_POOL_TEMPLATES": "base, py ,"})
    assert config == PoolConfig(size=5, templates=("base", "py")) and config.enabled
    assert not PoolConfig.from_env({"CORRAL_POOL_SIZE": "0"}).enabled
    assert not PoolConfig.from_env({"CORRAL_POOL_TEMPLATES": ""}).enabled
    with pytest.raises(ValueError):
        PoolConfig.from_env({"CORRAL_POOL_SIZE": "65"})


async def test_fills_claims_and_refills_within_its_bound() -> None:
    base = Manifest("base", ("a" * 64,))
    node, templates = FakeNode(), FakeTemplates(base)
    pool = WarmPool(node, templates, PoolConfig(size=2))
    pool.quiet_s, pool.max_defer_s = 0.0, 0.0
    runner = asyncio.ensure_future(pool.run())
    try:
        await _until(lambda: pool.ready_count() == 2)
        first = pool.claim(base)
        assert first is not None and first in node.pooled
        await _until(lambda: pool.ready_count() == 2)
        assert node.created == 3  # one replacement, never more than the size
        other = Manifest("other", ("b" * 64,))
        assert pool.claim(other) is None  # not a pooled template
        assert pool.claim(dataclasses.replace(base, memory_mb=1024)) is None  # other resources
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_rebuilt_template_gets_fresh_sandboxes_and_drain_removes_all() -> None:
    node, templates = FakeNode(), FakeTemplates(Manifest("base", ("a" * 64,)))
    pool = WarmPool(node, templates, PoolConfig(size=2))
    pool.quiet_s, pool.max_defer_s = 0.0, 0.0
    runner = asyncio.ensure_future(pool.run())
    try:
        await _until(lambda: pool.ready_count() == 2)
        old = set(node.pooled)
        rebuilt = Manifest("base", ("c" * 64,))
        templates.by_name["base"] = rebuilt
        assert pool.claim(rebuilt) is None  # nothing of the new build yet; the miss wakes the pool
        await _until(lambda: set(node.destroyed) == old and pool.ready_count() == 2)
        assert all(spec.layers == rebuilt.layers for spec in node.pooled.values())
        assert pool_key(rebuilt) != pool_key(Manifest("base", ("a" * 64,)))
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    await pool.drain()
    assert node.pooled == {} and pool.ready_count() == 0


async def test_a_refill_waits_for_a_quiet_moment() -> None:
    base = Manifest("base", ("a" * 64,))
    node = FakeNode()
    pool = WarmPool(node, FakeTemplates(base), PoolConfig(size=1))
    pool.quiet_s, pool.max_defer_s = 0.05, 0.3
    runner = asyncio.ensure_future(pool.run())
    try:
        for _ in range(10):  # requests keep coming: the refill waits, but not past max_defer_s
            pool.note_activity()
            await asyncio.sleep(0.01)
        assert node.created == 0
        await _until(lambda: node.created == 1, timeout=1.0)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_pooled_sandboxes_boot_on_their_template_runtime() -> None:
    """A template with its own runtime (runsc) gets pooled sandboxes booted on it, and a claim for
    one runtime never hands out a sandbox booted on another."""
    gvisor = Manifest("gvisor", ("a" * 64,), runtime="runsc")
    node, templates = FakeNode(), FakeTemplates(gvisor)
    pool = WarmPool(node, templates, PoolConfig(size=1, templates=("gvisor",)))
    pool.quiet_s, pool.max_defer_s = 0.0, 0.0
    runner = asyncio.ensure_future(pool.run())
    try:
        await _until(lambda: pool.ready_count() == 1)
        assert [spec.runtime for spec in node.pooled.values()] == ["runsc"]
        assert pool.claim(dataclasses.replace(gvisor, runtime=None)) is None  # not for another runtime
        claimed = pool.claim(gvisor)
        assert claimed is not None and node.pooled[claimed].runtime == "runsc"
        rebuilt = dataclasses.replace(gvisor, runtime=None)  # rebuilt for the server's default
        templates.by_name["gvisor"] = rebuilt
        assert pool.claim(rebuilt) is None  # the miss wakes the pool
        await _until(lambda: any(spec.runtime == "" for spec in node.pooled.values()))
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
