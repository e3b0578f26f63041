"""The build cache's byte budget: the pure plan, the budget from the environment, measuring a layer
once, the store's sizes (migration 0004), and the collector applying the budget to real layer
directories on a real store (no sandboxes)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from corral.builder.cache import CacheEntry
from corral.builder.layer_sizes import layer_disk_bytes, unmeasured
from corral.builder.retention import CacheBudget, CacheUse, parse_bytes, plan_cache_retention
from corral.builder.service import TemplateBuildService
from corral.builder.steps import BuildContext
from corral.core.settings import Settings, load_settings
from corral.node.storage.templates import TemplateManifest
from corral.server.service import SandboxService
from corral.server.store import Store, create_engine, migrate
from corral.server.store._migrate import _config
from tests.unit._layer_services import layer_services

NOW = 1_000_000.0
HOUR = 3600.0
MIB = 1024**2
LOOSE = {"max_age_s": 1000 * HOUR, "max_entries": 100}


def _d(n: int) -> str:
    return f"{n:064x}"


def _use(key: str, layers: tuple[int, ...], age_h: float) -> CacheUse:
    return CacheUse(key, tuple(_d(n) for n in layers), NOW - age_h * HOUR)


def _sizes(**by_layer: int) -> dict[str, int]:
    return {_d(int(n[1:])): size for n, size in by_layer.items()}


def test_least_recently_used_entries_go_until_the_rest_fits() -> None:
    entries = [
        _use("oldest", (1, 5), 4),  # 3 MiB
        _use("old", (1, 4), 3),  # 3 MiB
        _use("new", (1, 3), 2),  # 3 MiB
        _use("newest", (1, 2), 1),  # 3 MiB
    ]
    sizes = _sizes(l2=3 * MIB, l3=3 * MIB, l4=3 * MIB, l5=3 * MIB)
    plan = plan_cache_retention(entries, {_d(1)}, CacheBudget(**LOOSE, max_bytes=7 * MIB), NOW, sizes)
    assert plan.drop_keys == ("oldest", "old")  # least recently used first
    assert plan.keep_layers == {_d(1), _d(2), _d(3)}
    exact = plan_cache_retention(entries, {_d(1)}, CacheBudget(**LOOSE, max_bytes=6 * MIB), NOW, sizes)
    assert exact.drop_keys == ("oldest", "old")  # at the budget is within it
    roomy = plan_cache_retention(entries, {_d(1)}, CacheBudget(**LOOSE, max_bytes=12 * MIB), NOW, sizes)
    assert roomy.drop_keys == ()


def test_a_smaller_older_entry_does_not_outlive_a_newer_one_that_did_not_fit() -> None:
    entries = [_use("small-old", (3,), 3), _use("big", (2,), 2), _use("newest", (1,), 1)]
    sizes = _sizes(l1=4 * MIB, l2=8 * MIB, l3=1 * MIB)
    plan = plan_cache_retention(entries, set(), CacheBudget(**LOOSE, max_bytes=10 * MIB), NOW, sizes)
    assert plan.drop_keys == ("small-old", "big") and plan.keep_layers == {_d(1)}


def test_shared_and_referenced_layers_cost_nothing_twice() -> None:
    """Steps of one build share their lower layers: each layer counts once, for the newest entry
    that needs it; a layer a live template or sandbox uses is not given back by a drop: 0."""
    entries = [
        _use("step1", (1, 2), 3),
        _use("step2", (1, 2, 3), 2),
        _use("finalize", (1, 2, 3), 1),
        _use("other", (1, 9, 4), 0.5),  # 9 is referenced: costs only 4
    ]
    sizes = _sizes(l1=100 * MIB, l2=2 * MIB, l3=2 * MIB, l4=1 * MIB, l9=50 * MIB)
    referenced = {_d(1), _d(9)}
    plan = plan_cache_retention(entries, referenced, CacheBudget(**LOOSE, max_bytes=5 * MIB), NOW, sizes)
    assert plan.drop_keys == ()
    after_full = plan_cache_retention(
        entries, referenced, CacheBudget(**LOOSE, max_bytes=4 * MIB), NOW, sizes
    )  # `other` (1 MiB) fits, then `finalize` (4 MiB) does not; the steps would add its layers again
    assert after_full.drop_keys == ("step1", "step2", "finalize")
    assert after_full.keep_layers == {_d(1), _d(9), _d(4)}


def test_zero_keeps_only_free_entries_even_unmeasured_ones_and_age_and_count_still_apply() -> None:
    entries = [_use("free", (1,), 500), _use("unmeasured", (1, 2), 1), _use("stale", (1, 3), 200)]
    none = plan_cache_retention(entries, {_d(1)}, CacheBudget(**LOOSE, max_bytes=0), NOW, {})
    assert set(none.drop_keys) == {"unmeasured", "stale"} and none.keep_layers == {_d(1)}
    week = CacheBudget(max_age_s=168 * HOUR, max_entries=100, max_bytes=1)
    unknown_is_zero = plan_cache_retention(entries, {_d(1)}, week, NOW, {})
    assert unknown_is_zero.drop_keys == ("stale",)  # not measured yet: counts 0 bytes


def test_budget_bytes_from_env() -> None:
    assert CacheBudget.from_env({}).max_bytes == 10 * 1024**3
    assert CacheBudget.from_env({"CORRAL_BUILD_CACHE_MAX_BYTES": "512M"}).max_bytes == 512 * MIB
    assert CacheBudget.from_env({"CORRAL_BUILD_CACHE_MAX_BYTES": "0"}).max_bytes == 0
    assert parse_bytes("10GiB") == parse_bytes("10g") == parse_bytes("10 GB") == 10 * 1024**3
    assert parse_bytes("1234") == 1234 and parse_bytes("2T") == 2 * 1024**4
    for bad in ("-1", "1.5G", "ten", "10X"):
        with pytest.raises(ValueError):
            CacheBudget.from_env({"CORRAL_BUILD_CACHE_MAX_BYTES": bad})


def test_layer_disk_bytes_counts_blocks_and_a_hard_linked_file_once(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "dir").mkdir(parents=True)
    (layer / "dir" / "big").write_bytes(os.urandom(MIB))
    os.link(layer / "dir" / "big", layer / "again")
    os.symlink("/etc/passwd", layer / "link")  # never followed
    (layer / "sparse").touch()
    os.truncate(layer / "sparse", 100 * MIB)  # a hole uses no disk
    size = layer_disk_bytes(layer)
    assert size is not None and MIB <= size < MIB + 64 * 1024
    assert layer_disk_bytes(tmp_path / "missing") is None
    assert layer_disk_bytes(layer / "dir" / "big") is None  # not a directory


def test_unmeasured_names_owned_layers_without_a_size() -> None:
    sizes = {_d(1): None, _d(2): 5, _d(3): None}
    assert unmeasured(sizes, [_d(3), _d(1), _d(2), _d(4), _d(1)]) == [_d(1), _d(3)]


# --- the store ---------------------------------------------------------------------------------------


def test_store_keeps_owned_layer_sizes(tmp_path: Path) -> None:
    store = Store.open(load_settings({"home": tmp_path / "home"}, env={}))
    try:
        store.add_owned_layer(_d(1), "build")
        store.add_owned_layer(_d(2), "adopted")
        assert store.owned_layer_sizes() == {_d(1): None, _d(2): None}
        store.set_owned_layer_size(_d(1), 4096)
        store.set_owned_layer_size(_d(3), 1)  # not owned: nothing
        assert store.owned_layer_sizes() == {_d(1): 4096, _d(2): None}
        store.remove_owned_layer(_d(1))
        assert store.owned_layer_sizes() == {_d(2): None}
    finally:
        store.close()


def test_migration_0004_keeps_owned_layers_unmeasured(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    config = _config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO owned_layers (digest, kind, created_at) VALUES (:d, 'pull', :t)"),
            {"d": _d(7), "t": "2026-01-01 00:00:00.000000"},
        )
    migrate(engine)
    store = Store.from_engine(engine)
    assert store.owned_layer_sizes() == {_d(7): None}
    store.set_owned_layer_size(_d(7), 10)
    assert store.owned_layer_sizes() == {_d(7): 10}
    engine.dispose()


# --- the collector with measured layers ------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"home": tmp_path / "home"}, env={})


@pytest.fixture
def parts(settings: Settings) -> Iterator[tuple[SandboxService, TemplateBuildService]]:
    with layer_services(settings, CacheBudget(max_age_s=1000 * HOUR, max_entries=100, max_bytes=3 * MIB)) as both:
        yield both


def _layer(settings: Settings, store: Store | None, n: int, mib: int) -> str:
    path = settings.layers_dir / _d(n)
    path.mkdir(parents=True, exist_ok=True)
    if mib:
        (path / "data").write_bytes(os.urandom(mib * MIB))
    if store is not None:
        store.add_owned_layer(_d(n), "build")
    return _d(n)


def _present(settings: Settings) -> set[str]:
    return {p.name for p in settings.layers_dir.iterdir()}


async def test_the_collector_measures_once_and_keeps_the_newest_entries_within_bytes(
    parts, settings: Settings
) -> None:
    sandboxes, builder = parts
    store = sandboxes.store
    base = _layer(settings, None, 1, 0)  # a recipe's layer: not owned, never collected, 0 bytes
    live = _layer(settings, store, 2, 2)  # a live template's: not counted
    old, mid, new = (_layer(settings, store, n, 1) for n in (3, 4, 5))
    sandboxes.templates.save(
        TemplateManifest(template_id="t", names=("t",), layers=(base, live), team_id="team", build_id="b")
    )
    for key, layer in (("a" * 64, old), ("b" * 64, mid), ("c" * 64, new), ("d" * 64, live)):
        builder.cache.put(key, CacheEntry(layers=(base, layer), context=BuildContext(user="user")))
        await asyncio.sleep(0.01)  # distinct last-use times: a is the least recently used
    builder.cache.touch("b" * 64)  # b is now the most recently used

    assert await builder.measure_layers() == 4  # every owned layer an entry names
    sizes = store.owned_layer_sizes()
    assert all(sizes[d] is not None and sizes[d] >= MIB for d in (old, mid, new))
    assert await builder.measure_layers() == 0  # once

    # b, c and a (most recently used first) add a little over 1 MiB each: a does not fit in 3 MiB
    assert await sandboxes.collect_layers() == [old]
    assert {u.key for u in builder.cache.usage()} == {"b" * 64, "c" * 64, "d" * 64}
    assert await sandboxes.collect_layers() == []

    builder.cache_budget = CacheBudget(max_age_s=1000 * HOUR, max_entries=100, max_bytes=MIB + 64 * 1024)
    assert await sandboxes.collect_layers() == [new]  # only b (most recently used) fits
    assert {u.key for u in builder.cache.usage()} == {"b" * 64, "d" * 64}
    assert _present(settings) == {base, live, mid}
    assert set(store.owned_layer_sizes()) == {live, mid}
