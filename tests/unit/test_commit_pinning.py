"""A committed layer is pinned before it becomes visible, so layer collection never removes the layer
a new snapshot or fork is about to refer to — even when an equal layer already existed unused (a
just-deleted snapshot of the same files). Real store, real `commit_layer`, an in-memory node."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.core.errors import Internal
from corral.core.settings import Settings, load_settings
from corral.node.storage.commit import commit_layer
from corral.node.storage.templates import TemplateManifest, TemplateStore
from corral.server.service import SandboxService
from corral.server.store import SandboxRow, Store
from tests.unit.test_lifecycle_service import BASE_LAYER, FakeNode, _req


class CommittingNode(FakeNode):
    """FakeNode whose commits copy a real upper dir (the same files each time) with `commit_layer`.
    `during_thaw` runs once, while the sandbox thaws after its files were copied."""

    def __init__(self, layers_dir: Path, uppers: Path) -> None:
        super().__init__(layers_dir)
        self.uppers = uppers
        self.during_thaw: Callable[[], Awaitable[None]] | None = None
        self.fail_after_pin = False

    async def commit_upper(self, sandbox_id: str, pin: Any = None) -> str:
        upper = self.uppers / sandbox_id
        if not upper.is_dir():
            upper.mkdir(parents=True)
            (upper / "notes.txt").write_text("the same files every time\n")

        def pin_then_fail(digest: str) -> None:
            if pin is not None:
                pin(digest)
            raise Internal("disk full")

        return await commit_layer(upper, self.layers_dir, pin=pin_then_fail if self.fail_after_pin else pin)

    async def thaw(self, sandbox_id: str) -> None:
        hook, self.during_thaw = self.during_thaw, None
        if hook is not None:
            await hook()
        await super().thaw(sandbox_id)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"home": tmp_path / "home"}, env={})


@pytest.fixture
def service(settings: Settings, tmp_path: Path) -> Iterator[SandboxService]:
    store = Store.open(settings)
    templates = TemplateStore(settings)
    templates.save(TemplateManifest(template_id="base", names=("base",), layers=(BASE_LAYER,)))
    node = CommittingNode(settings.layers_dir, tmp_path / "uppers")
    service = SandboxService(settings, store, node, templates, SandboxRow)
    store.ensure_default_team("e2b_" + "1" * 40)
    yield service
    store.close()


def _node(service: SandboxService) -> CommittingNode:
    return service.node  # type: ignore[no-any-return]


@pytest.mark.parametrize("make", ["snapshot", "fork"])
async def test_an_equal_unused_layer_collected_mid_commit_is_kept(
    service: SandboxService, settings: Settings, make: str
) -> None:
    team = service.store.default_team_id()
    row = await service.create(team, _req(timeout=60))
    first, _ = await service.create_snapshot(team, row.sandbox_id, None)
    layer = service.templates.get(first).layers[-1]

    async def delete_first_snapshot() -> None:  # runs collect_layers: `layer` is unused but for us
        await service.delete_snapshot(team, first)

    _node(service).during_thaw = delete_first_snapshot
    if make == "snapshot":
        second, _ = await service.create_snapshot(team, row.sandbox_id, None)
        assert service.templates.get(second).layers == (BASE_LAYER, layer)
    else:
        [fork] = await service.fork(team, row.sandbox_id, 60, 1)
        assert fork.layers == (BASE_LAYER, layer)
    assert _node(service).during_thaw is None, "the collection ran between the copy and the reference"
    assert (settings.layers_dir / layer).is_dir()  # the equal layer was kept for the new one
    assert layer in service.store.owned_layers()
    assert not service._pinned_layers
    assert await service.collect_layers() == []  # referenced now: stays


async def test_a_failed_commit_leaves_nothing_pinned(service: SandboxService, settings: Settings) -> None:
    team = service.store.default_team_id()
    row = await service.create(team, _req(timeout=60))
    _node(service).fail_after_pin = True
    with pytest.raises(Internal):
        await service.create_snapshot(team, row.sandbox_id, None)
    assert not service._pinned_layers
    assert _node(service).status[row.sandbox_id].name == "RUNNING"  # thawed again


async def test_pins_are_counted(service: SandboxService, settings: Settings) -> None:
    """Two commits of equal files share one digest: the first one done must not unpin the other."""
    layer = "c" * 64
    (settings.layers_dir / layer).mkdir(parents=True)
    service.store.add_owned_layer(layer, "snapshot")
    service._pin(layer)
    service._pin(layer)
    service._unpin(layer)
    assert await service.collect_layers() == []
    service._unpin(layer)
    assert await service.collect_layers() == [layer]


async def test_commit_layer_pins_before_the_layer_is_visible(tmp_path: Path) -> None:
    upper, layers = tmp_path / "upper", tmp_path / "layers"
    upper.mkdir()
    (upper / "f").write_text("x")
    seen: list[tuple[str, bool]] = []
    digest = await commit_layer(upper, layers, pin=lambda d: seen.append((d, (layers / d).exists())))
    assert seen == [(digest, False)] and (layers / digest).is_dir()
    seen.clear()
    assert await commit_layer(upper, layers, pin=lambda d: seen.append((d, (layers / d).exists()))) == digest
    assert seen == [(digest, True)]  # an equal layer: reused, pinned as well
    assert sorted(p.name for p in layers.iterdir()) == [digest]  # the second copy went
