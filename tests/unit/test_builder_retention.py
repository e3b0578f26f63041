"""Which build-cache entries and builder layers survive layer collection: the pure retention plan,
the caches' use times, and the one collector (`SandboxService.collect_layers`) with the builder's
holds and cache entries, on a real store and real layer directories (no sandboxes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.builder.cache import CacheEntry, FileBuildCache, MemoryBuildCache
from corral.builder.retention import CacheBudget, CacheUse, plan_cache_retention
from corral.builder.service import TemplateBuildService
from corral.builder.steps import BuildContext
from corral.core.settings import Settings, load_settings
from corral.node.storage.templates import TemplateManifest
from corral.server.service import SandboxService
from tests.unit._layer_services import layer_services

NOW = 1_000_000.0
HOUR = 3600.0


def _d(n: int) -> str:
    return f"{n:064x}"


def _use(key: str, layers: tuple[int, ...], age_h: float) -> CacheUse:
    return CacheUse(key, tuple(_d(n) for n in layers), NOW - age_h * HOUR)


def test_entries_whose_layers_are_referenced_anyway_are_always_kept() -> None:
    plan = plan_cache_retention(
        [_use("a", (1,), 10_000), _use("b", (1, 2), 10_000)], {_d(1), _d(2)}, CacheBudget(0, 0), NOW
    )
    assert plan.drop_keys == () and plan.keep_layers == {_d(1), _d(2)}


def test_other_entries_are_kept_within_age_and_count_least_recently_used_dropped_first() -> None:
    entries = [
        _use("old", (1, 3), 200),  # beyond a week
        _use("a", (1, 4), 3),
        _use("b", (1, 5), 2),
        _use("c", (1, 6), 1),
    ]
    plan = plan_cache_retention(entries, {_d(1)}, CacheBudget(max_age_s=168 * HOUR, max_entries=2), NOW)
    assert plan.drop_keys == ("old", "a")  # least recently used first
    assert plan.keep_layers == {_d(1), _d(5), _d(6)}
    everything = plan_cache_retention(
        entries, {_d(1)}, CacheBudget(max_age_s=1000 * HOUR, max_entries=10), NOW
    )
    assert everything.drop_keys == ()
    nothing = plan_cache_retention(entries, {_d(1)}, CacheBudget(max_age_s=0, max_entries=10), NOW)
    assert set(nothing.drop_keys) == {"old", "a", "b", "c"} and nothing.keep_layers == frozenset()


def test_budget_from_env() -> None:
    assert CacheBudget.from_env({}) == CacheBudget(168 * HOUR, 1000)
    assert CacheBudget.from_env(
        {"CORRAL_BUILD_CACHE_MAX_AGE_HOURS": "0.5", "CORRAL_BUILD_CACHE_MAX_ENTRIES": "0"}
    ) == CacheBudget(1800, 0)
    with pytest.raises(ValueError):
        CacheBudget.from_env({"CORRAL_BUILD_CACHE_MAX_ENTRIES": "-1"})


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_caches_report_last_use(kind: str, tmp_path: Path) -> None:
    cache = MemoryBuildCache() if kind == "memory" else FileBuildCache(tmp_path / "cache")
    entry = CacheEntry(layers=(_d(1),), context=BuildContext(user="root"))
    cache.put("1" * 64, entry)
    cache.put("2" * 64, entry)
    before = {u.key: u.used_at for u in cache.usage()}
    assert set(before) == {"1" * 64, "2" * 64}
    time.sleep(0.02)
    cache.touch("1" * 64)
    cache.touch("3" * 64)  # unknown: nothing happens
    after = {u.key: u for u in cache.usage()}
    assert after["1" * 64].used_at > before["1" * 64] and after["2" * 64].used_at == before["2" * 64]
    assert after["1" * 64].layers == (_d(1),)


# --- the collector with the builder's references ------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"home": tmp_path / "home"}, env={})


@pytest.fixture
def parts(settings: Settings) -> Iterator[tuple[SandboxService, TemplateBuildService]]:
    with layer_services(settings, CacheBudget(max_age_s=0, max_entries=0)) as both:
        yield both


def _layer(settings: Settings, n: int, owner: SandboxService | None = None, kind: str = "build") -> str:
    (settings.layers_dir / _d(n)).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        owner.store.add_owned_layer(_d(n), kind)
    return _d(n)


def _present(settings: Settings) -> set[str]:
    return {p.name for p in settings.layers_dir.iterdir()}


async def test_only_owned_unreferenced_layers_go(parts, settings: Settings) -> None:
    sandboxes, builder = parts
    base = _layer(settings, 1)  # made by a recipe: not owned, never collected
    live, tagged, dead, pulled = (_layer(settings, n, sandboxes) for n in (2, 3, 4, 5))
    sandboxes.store.add_owned_layer(pulled, "pull")
    old_build = TemplateManifest(
        template_id="t", names=("t",), layers=(base, tagged), build_id="old"
    ).build_fields()
    sandboxes.templates.save(
        TemplateManifest(
            template_id="t",
            names=("t",),
            layers=(base, live),
            team_id="team",
            tags={"default": "new", "v1": "old"},
            tagged_builds={"old": old_build},
            build_id="new",
        )
    )
    builder.cache.put("a" * 64, CacheEntry(layers=(base, live), context=BuildContext(user="user")))
    builder.cache.put("b" * 64, CacheEntry(layers=(base, dead), context=BuildContext(user="user")))
    removed = await sandboxes.collect_layers()
    assert set(removed) == {dead, pulled}
    assert _present(settings) == {base, live, tagged}
    assert [u.key for u in builder.cache.usage()] == ["a" * 64]  # the costly entry went (budget 0)
    assert set(sandboxes.store.owned_layers()) == {live, tagged}


async def test_held_layers_and_layers_of_a_commit_in_progress_stay(parts, settings: Settings) -> None:
    sandboxes, builder = parts
    held, other = _layer(settings, 1, sandboxes), _layer(settings, 2, sandboxes)
    builder.holds.hold("build-1", [held])
    builder.cache.put("a" * 64, CacheEntry(layers=(held,), context=BuildContext(user="user")))
    with builder.holds.commit():
        assert await sandboxes.collect_layers() == []
    assert await sandboxes.collect_layers() == [other]
    assert [u.key for u in builder.cache.usage()] == ["a" * 64]  # its layers are held: it is free
    builder.holds.release("build-1")
    assert await sandboxes.collect_layers() == [held]
    assert list(builder.cache.usage()) == [] and _present(settings) == set()


async def test_a_create_mounting_layers_keeps_them(parts, settings: Settings) -> None:
    """The real node counts creates in progress (see Node.layers_in_use); the collector asks it."""
    sandboxes, _ = parts
    layer = _layer(settings, 1, sandboxes)
    node = sandboxes.node
    node.layers_in_use = lambda: {layer}  # type: ignore[method-assign]
    assert await sandboxes.collect_layers() == []
    node.layers_in_use = lambda: set()  # type: ignore[method-assign]
    assert await sandboxes.collect_layers() == [layer]
