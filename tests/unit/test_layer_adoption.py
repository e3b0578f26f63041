"""Adopting the layers older versions left unowned: the pure plan, the scan of the layers
directory, and `SandboxService.adopt_unowned_layers` on a real store and real directories."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.builder.cache import CacheEntry
from corral.builder.retention import CacheBudget
from corral.builder.service import TemplateBuildService
from corral.builder.steps import BuildContext
from corral.core.sandbox import SandboxState
from corral.core.settings import Settings, load_settings
from corral.node.storage.templates import TemplateManifest
from corral.server.layer_adoption import ADOPTION_MIN_AGE_S, LayerDir, plan_adoption, scan_layer_dirs
from corral.server.service import SandboxService
from corral.server.store import SandboxRow, SnapshotRow, Store
from tests.unit._layer_services import layer_services

NOW = 1_000_000.0
OLD = NOW - 2 * 3600


def _d(n: int) -> str:
    return f"{n:064x}"


def test_plan_adopts_only_old_unowned_unreferenced_layers_that_are_no_whole_root() -> None:
    dirs = [
        LayerDir(_d(1), OLD, False),  # legacy: adopted
        LayerDir(_d(2), OLD, False),  # owned already
        LayerDir(_d(3), OLD, False),  # referenced
        LayerDir(_d(4), NOW - 60, False),  # fresh: maybe another server's in-flight build
        LayerDir(_d(5), OLD, True),  # a recipe's root file system
        LayerDir(".tmp-commit-x", OLD, False),  # not a layer name
        LayerDir(_d(6), NOW - ADOPTION_MIN_AGE_S, False),  # exactly an hour: adopted
    ]
    assert plan_adoption(dirs, {_d(2)}, {_d(3)}, NOW) == [_d(1), _d(6)]
    assert plan_adoption(dirs, {_d(2)}, {_d(3)}, NOW, min_age_s=0) == [_d(1), _d(4), _d(6)]


def _root(path: Path) -> None:
    for marker in ("var/lib/dpkg/status", "usr/bin/dpkg", "etc/passwd"):
        (path / marker).parent.mkdir(parents=True, exist_ok=True)
        (path / marker).write_text("x")


def test_scan_sees_layer_directories_and_whole_roots(tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    (layers / _d(1) / "etc").mkdir(parents=True)
    (layers / _d(1) / "etc" / "passwd").write_text("a step that only added a user")
    _root(layers / _d(2))
    (layers / _d(3)).write_text("a file, not a layer")
    (layers / _d(4)).symlink_to(layers / _d(1))  # never a layer
    (layers / ".tmp-oci-1").mkdir()
    (layers / "ABC").mkdir()
    os.utime(layers / _d(1), (OLD, OLD))
    found = {d.digest: d for d in scan_layer_dirs(layers)}
    assert set(found) == {_d(1), _d(2)}
    assert found[_d(1)] == LayerDir(_d(1), OLD, False)
    assert found[_d(2)].whole_root
    assert scan_layer_dirs(tmp_path / "missing") == []


# --- the service --------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"home": tmp_path / "home"}, env={})


@pytest.fixture
def parts(settings: Settings) -> Iterator[tuple[SandboxService, TemplateBuildService]]:
    with layer_services(settings, CacheBudget(max_age_s=3600, max_entries=10)) as both:
        yield both


def _legacy(settings: Settings, n: int, *, age_s: float = 2 * 3600, root: bool = False) -> str:
    path = settings.layers_dir / _d(n)
    path.mkdir(parents=True)
    (path / "file").write_text(f"layer {n}")
    if root:
        _root(path)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return _d(n)


def _present(settings: Settings) -> set[str]:
    return {p.name for p in settings.layers_dir.iterdir()}


def _sandbox(store: Store, sandbox_id: str, template: str, layers: tuple[str, ...] | None) -> None:
    team = store.default_team_id()
    assert team is not None
    now = dt.datetime.now(dt.UTC)
    store.insert_sandbox(
        SandboxRow(sandbox_id=sandbox_id, team_id=team, template_id=template, state=SandboxState.RUNNING,
                   started_at=now, end_at=now + dt.timedelta(minutes=5), layers=layers)
    )  # fmt: skip


async def test_unreferenced_legacy_layers_are_adopted_and_collected(parts, settings: Settings) -> None:
    sandboxes, builder = parts
    store = sandboxes.store
    legacy, failed_build = _legacy(settings, 1), _legacy(settings, 2)
    base = _legacy(settings, 3, root=True)  # the base template's layer
    old_recipe = _legacy(settings, 4, root=True)  # an older recipe's: nothing refers to it, it stays
    latest, tagged = _legacy(settings, 5), _legacy(settings, 6)
    in_sandbox, in_snapshot, cached = (_legacy(settings, n) for n in (7, 8, 9))
    fresh = _legacy(settings, 10, age_s=60)  # maybe another server's, in the making
    owned = _legacy(settings, 11)  # a snapshot's: owned already
    store.add_owned_layer(owned, "snapshot")
    old_build = TemplateManifest(
        template_id="t", names=("t",), layers=(base, tagged), build_id="old"
    ).build_fields()
    sandboxes.templates.save(
        TemplateManifest(template_id="base", names=("base",), layers=(base,), build_id="b0")
    )
    sandboxes.templates.save(
        TemplateManifest(
            template_id="t",
            names=("t",),
            layers=(base, latest),
            team_id="team",
            tags={"default": "new", "v1": "old"},
            tagged_builds={"old": old_build},
            build_id="new",
        )
    )
    _sandbox(store, "sb", "base", (base, in_sandbox))
    team = store.default_team_id() or ""
    store.insert_snapshot(SnapshotRow("snap1", team, "sb", None, owned, dt.datetime.now(dt.UTC)))
    store.insert_snapshot(SnapshotRow("snap2", team, "sb", None, in_snapshot, dt.datetime.now(dt.UTC)))
    builder.cache.put("a" * 64, CacheEntry(layers=(base, cached), context=BuildContext(user="user")))

    adopted = await sandboxes.adopt_unowned_layers()
    assert adopted == sorted([legacy, failed_build])
    assert _present(settings) == {
        base,
        old_recipe,
        latest,
        tagged,
        in_sandbox,
        in_snapshot,
        cached,
        fresh,
        owned,
    }
    assert set(store.owned_layers()) == {owned}  # the adopted ones were collected with their records
    assert [u.key for u in builder.cache.usage()] == ["a" * 64]  # kept: its layer stays unowned

    # Once the entry is dropped (older than the budget's age), the next start adopts its layer.
    builder.cache_budget = CacheBudget(max_age_s=0, max_entries=10)
    assert await sandboxes.adopt_unowned_layers() == [cached]
    assert cached not in _present(settings)


async def test_nothing_is_adopted_when_a_live_sandbox_s_layers_cannot_be_known(
    parts, settings: Settings
) -> None:
    """A sandbox row from before rows listed their layers refers to its template's; if that is gone,
    what it uses is unknown and nothing is adopted."""
    sandboxes, _ = parts
    legacy = _legacy(settings, 1)
    _sandbox(sandboxes.store, "old-row", "deleted-template", None)
    assert await sandboxes.adopt_unowned_layers() == []
    assert legacy in _present(settings) and sandboxes.store.owned_layers() == []

    sandboxes.templates.save(
        TemplateManifest(template_id="deleted-template", names=("x",), layers=(legacy,), build_id="b")
    )
    assert await sandboxes.adopt_unowned_layers() == []  # now known: the row's template uses it
    sandboxes.templates.delete("deleted-template")
    sandboxes.store.mark_killed("old-row", "test")
    assert await sandboxes.adopt_unowned_layers() == [legacy]
    assert _present(settings) == set()


async def test_a_commit_in_progress_stops_adoption(parts, settings: Settings) -> None:
    sandboxes, builder = parts
    legacy = _legacy(settings, 1)
    with builder.holds.commit():  # the builder then keeps every layer
        assert await sandboxes.adopt_unowned_layers() == []
    assert await sandboxes.adopt_unowned_layers() == [legacy]
