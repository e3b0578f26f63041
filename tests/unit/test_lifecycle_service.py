"""corral.server.service's lifecycle rules on a real store and an in-memory node: pause and resume,
timeouts that pause, auto-resume, snapshots and forks with their layers, metrics, reconcile input."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from corral.core.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, Unimplemented
from corral.core.sandbox import SandboxState
from corral.core.settings import Settings, load_settings
from corral.node.cgroups import CgroupUsage
from corral.node.sandboxes import NodeStatus, SandboxUsage
from corral.node.storage.templates import TemplateManifest, TemplateStore
from corral.server.api import CreateSandboxRequest
from corral.server.service import SandboxService, downsample, lifecycle_of, validate_snapshot_name
from corral.server.store import SandboxRow, Store

BASE_LAYER = "b" * 64


class FakeNode:
    """The node's lifecycle surface, in memory; commits make real (empty) layer directories."""

    def __init__(self, layers_dir: Path) -> None:
        self.layers_dir = layers_dir
        self.status: dict[str, NodeStatus] = {}
        self.specs: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []
        self.network = SimpleNamespace()
        self.waker: Any = None
        self.commits = 0
        self.reconciled: tuple[list[str], dict[str, bool]] | None = None

    async def create(self, spec: Any) -> Any:
        self.status[spec.sandbox_id] = NodeStatus.RUNNING
        self.specs[spec.sandbox_id] = spec
        return SimpleNamespace(ip="10.0.0.2")

    def lookup(self, sandbox_id: str) -> Any:
        status = self.status.get(sandbox_id)
        return None if status is None else SimpleNamespace(status=status)

    def __contains__(self, sandbox_id: str) -> bool:
        return self.status.get(sandbox_id) is NodeStatus.RUNNING

    def running_ids(self) -> list[str]:
        return [i for i, s in self.status.items() if s is NodeStatus.RUNNING]

    def usage(self, sandbox_id: str) -> SandboxUsage:
        if sandbox_id not in self.status:
            raise NotFound(sandbox_id)
        cgroup = CgroupUsage(cpu_ns=10**9, mem_usage=2048, mem_limit=512 * 2**20, mem_cache=1024, mem_inactive_file=1024)
        return SandboxUsage(cgroup=cgroup, cpu_count=2, disk_used=100, disk_total=2**30)

    async def _op(self, name: str, sandbox_id: str, new: NodeStatus) -> None:
        self.calls.append((name, sandbox_id))
        self.status[sandbox_id] = new

    async def freeze(self, sandbox_id: str) -> None:
        await self._op("freeze", sandbox_id, NodeStatus.FROZEN)

    async def thaw(self, sandbox_id: str) -> None:
        await self._op("thaw", sandbox_id, NodeStatus.RUNNING)

    async def stop(self, sandbox_id: str) -> None:
        await self._op("stop", sandbox_id, NodeStatus.STOPPED)

    async def cold_start(self, sandbox_id: str) -> None:
        await self._op("cold_start", sandbox_id, NodeStatus.RUNNING)

    async def destroy(self, sandbox_id: str) -> None:
        self.calls.append(("destroy", sandbox_id))
        self.status.pop(sandbox_id, None)

    def retire(self, sandbox_id: str) -> Any:
        """The real node finishes this in the background; here it is done at once."""
        self.calls.append(("destroy", sandbox_id))
        self.status.pop(sandbox_id, None)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def layers_in_use(self) -> set[str]:
        return set()

    async def commit_upper(self, sandbox_id: str, pin: Any = None) -> str:
        assert self.status[sandbox_id] is not NodeStatus.RUNNING, "files are copied from a frozen sandbox"
        self.commits += 1
        digest = f"{self.commits:064x}"
        if pin is not None:
            pin(digest)
        (self.layers_dir / digest).mkdir(parents=True)
        return digest

    async def reconcile(self, specs: list[Any], paused: dict[str, bool]) -> tuple[list[str], list[str]]:
        self.reconciled = ([s.sandbox_id for s in specs], dict(paused))
        return [s.sandbox_id for s in specs], []


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"home": tmp_path / "home"}, env={})


@pytest.fixture
def service(settings: Settings) -> Iterator[SandboxService]:
    store = Store.open(settings)
    templates = TemplateStore(settings)
    templates.save(TemplateManifest(template_id="base", names=("base",), layers=(BASE_LAYER,)))
    node = FakeNode(settings.layers_dir)
    yield SandboxService(settings, store, node, templates, SandboxRow)
    store.close()


@pytest.fixture
def team(service: SandboxService) -> str:
    service.store.ensure_default_team("e2b_" + "1" * 40)
    team_id = service.store.default_team_id()
    assert team_id is not None
    return team_id


def _req(**body: Any) -> CreateSandboxRequest:
    return CreateSandboxRequest.model_validate({"templateID": "base", **body})


def _node(service: SandboxService) -> FakeNode:
    return service.node  # type: ignore[no-any-return]


async def test_pause_and_resume_with_memory(service: SandboxService, team: str) -> None:
    row = await service.create(team, _req(timeout=60))
    await service.pause(team, row.sandbox_id, keep_memory=True)
    paused = await service.get(team, row.sandbox_id)
    assert paused.state is SandboxState.PAUSED and paused.paused_memory is True
    with pytest.raises(Aborted):
        await service.pause(team, row.sandbox_id, keep_memory=True)
    resumed, was_paused = await service.connect(team, row.sandbox_id, 120)
    assert was_paused and resumed.state is SandboxState.RUNNING and resumed.paused_memory is None
    assert resumed.envd_access_token == row.envd_access_token
    assert _node(service).calls == [("freeze", row.sandbox_id), ("thaw", row.sandbox_id)]
    assert resumed.end_at > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=100)


async def test_pause_without_memory_cold_boots(service: SandboxService, team: str) -> None:
    row = await service.create(team, _req())
    await service.pause(team, row.sandbox_id, keep_memory=False)
    assert (await service.get(team, row.sandbox_id)).paused_memory is False
    _, resumed = await service.connect(team, row.sandbox_id, 60)
    assert resumed and _node(service).calls == [("stop", row.sandbox_id), ("cold_start", row.sandbox_id)]


async def test_connect_on_running_never_shortens(service: SandboxService, team: str) -> None:
    row = await service.create(team, _req(timeout=600))
    same, resumed = await service.connect(team, row.sandbox_id, 10)
    assert not resumed and same.end_at == row.end_at
    longer, _ = await service.connect(team, row.sandbox_id, 3600)
    assert longer.end_at > row.end_at


async def test_unknown_sandboxes_are_not_found_and_get_no_lock(service: SandboxService, team: str) -> None:
    for call in (
        service.pause(team, "nope", True),
        service.connect(team, "nope", 10),
        service.fork(team, "nope", 10, 1),
        service.create_snapshot(team, "nope", None),
        service.metrics(team, "nope", None, None),
    ):
        with pytest.raises(NotFound):
            await call
    assert "nope" not in service._locks


async def test_timeout_kills_or_pauses_as_asked(service: SandboxService, team: str) -> None:
    plain = await service.create(team, _req(timeout=0))
    keep = await service.create(team, _req(timeout=0, autoPause=True))
    files_only = await service.create(team, _req(timeout=0, autoPause=True, autoPauseMemory=False))
    await service.expire_due()
    assert service.store.get_sandbox(plain.sandbox_id) is None  # killed
    assert (await service.get(team, keep.sandbox_id)).paused_memory is True
    assert (await service.get(team, files_only.sandbox_id)).paused_memory is False
    await service.expire_due()  # paused sandboxes do not expire
    assert (await service.get(team, keep.sandbox_id)).state is SandboxState.PAUSED


async def test_wake_resumes_only_frozen_auto_resume_sandboxes(service: SandboxService, team: str) -> None:
    auto = await service.create(team, _req(timeout=30, autoPause=True, autoResume={"enabled": True}))
    manual = await service.create(team, _req(timeout=30, autoPause=True))
    for row in (auto, manual):
        await service.pause(team, row.sandbox_id, keep_memory=True)
    assert _node(service).waker == service.wake
    assert await service.wake(auto.sandbox_id) is True
    assert (await service.get(team, auto.sandbox_id)).state is SandboxState.RUNNING
    assert await service.wake(manual.sandbox_id) is False
    await service.connect(team, auto.sandbox_id, 30)
    await service.pause(team, auto.sandbox_id, keep_memory=False)
    assert await service.wake(auto.sandbox_id) is False  # a stopped sandbox needs connect
    assert await service.wake("nope") is False


async def test_snapshots_are_templates_and_their_layers_are_collected(service: SandboxService, team: str, settings: Settings) -> None:
    row = await service.create(team, _req())
    snapshot_id, names = await service.create_snapshot(team, row.sandbox_id, "my-snap")
    assert names == ["my-snap"]
    assert _node(service).calls == [("freeze", row.sandbox_id), ("thaw", row.sandbox_id)]  # running again
    manifest = service.templates.get(snapshot_id)
    assert manifest.names == ("my-snap",) and manifest.layers[0] == BASE_LAYER and len(manifest.layers) == 2
    first_layer = manifest.layers[1]
    again, _ = await service.create_snapshot(team, row.sandbox_id, "my-snap")
    assert again == snapshot_id
    assert not (settings.layers_dir / first_layer).exists()  # the older build's layer went
    second_layer = service.templates.get(snapshot_id).layers[1]

    child = await service.create(team, _req(templateID=snapshot_id))
    assert child.template_id == snapshot_id and child.layers == (BASE_LAYER, second_layer)
    rows, token = await service.list_snapshots(team, sandbox_id=None, name="my-snap:default", limit=10, next_token=None)
    assert [r.snapshot_id for r in rows] == [snapshot_id] and token is None
    assert (await service.list_snapshots(team, sandbox_id=None, name="my-snap:v1", limit=10, next_token=None))[0] == []

    await service.delete_snapshot(team, snapshot_id)
    with pytest.raises(NotFound):
        await service.delete_snapshot(team, snapshot_id)
    assert (settings.layers_dir / second_layer).is_dir()  # the child still runs on it
    await service.kill(team, child.sandbox_id)
    assert not (settings.layers_dir / second_layer).exists()


async def test_snapshot_names_are_checked(service: SandboxService, team: str) -> None:
    row = await service.create(team, _req())
    with pytest.raises(AlreadyExists):
        await service.create_snapshot(team, row.sandbox_id, "base")  # a template's name
    with pytest.raises(InvalidArgument):
        await service.create_snapshot(team, row.sandbox_id, "name:tag")
    with pytest.raises(Unimplemented):
        await service.delete_snapshot(team, "base")  # built templates are not deleted here


async def test_fork_makes_independent_sandboxes_on_one_new_layer(service: SandboxService, team: str, settings: Settings) -> None:
    source = await service.create(team, _req(metadata={"k": "v"}, envVars={"A": "1"}))
    forks = await service.fork(team, source.sandbox_id, 60, 3)
    assert len(forks) == 3 and len({f.sandbox_id for f in forks}) == 3
    layer = forks[0].layers[-1]
    assert all(f.layers == (BASE_LAYER, layer) and f.metadata == {"k": "v"} and f.env_vars == {"A": "1"} for f in forks)
    assert all(f.envd_access_token != source.envd_access_token for f in forks)
    with pytest.raises(InvalidArgument):
        await service.fork(team, source.sandbox_id, 60, 0)
    for fork in forks[:-1]:
        await service.kill(team, fork.sandbox_id)
    assert (settings.layers_dir / layer).is_dir()
    await service.kill(team, forks[-1].sandbox_id)
    assert not (settings.layers_dir / layer).exists()


async def test_metrics_first_sample_at_create_and_time_filter(service: SandboxService, team: str) -> None:
    row = await service.create(team, _req())
    samples = await service.metrics(team, row.sandbox_id, None, None)
    assert len(samples) == 1 and samples[0].mem_total == 512 * 2**20 and samples[0].cpu_used_pct == 0.0
    now = int(dt.datetime.now(dt.UTC).timestamp())
    assert await service.metrics(team, row.sandbox_id, now - 7200, now - 3600) == []
    assert len(await service.metrics(team, row.sandbox_id, now - 5, now + 5)) == 1
    with pytest.raises(InvalidArgument):
        await service.metrics(team, row.sandbox_id, now, now - 10)
    await service.kill(team, row.sandbox_id)
    assert service.store.metrics(row.sandbox_id) == []  # purged with the sandbox


async def test_logs_record_transitions(service: SandboxService, team: str) -> None:
    row = await service.create(team, _req())
    await service.pause(team, row.sandbox_id, True)
    await service.connect(team, row.sandbox_id, 60)
    lines = await service.logs(team, row.sandbox_id, cursor_ms=None, limit=10, forward=True, level=None, search=None)
    assert [line.message.split(" (")[0].split(" by")[0] for line in lines] == [
        "sandbox created from template base",
        "sandbox paused",
        "sandbox resumed",
    ]
    last = await service.logs(team, row.sandbox_id, cursor_ms=None, limit=1, forward=False, level=None, search="resumed")
    assert [line.message for line in last] == ["sandbox resumed by connect"]


async def test_reconcile_passes_paused_kinds(service: SandboxService, team: str) -> None:
    running = await service.create(team, _req())
    frozen = await service.create(team, _req())
    stopped = await service.create(team, _req())
    await service.pause(team, frozen.sandbox_id, True)
    await service.pause(team, stopped.sandbox_id, False)
    await service.reconcile()
    ids, paused = _node(service).reconciled  # type: ignore[misc]
    assert set(ids) == {running.sandbox_id, frozen.sandbox_id, stopped.sandbox_id}
    assert paused == {frozen.sandbox_id: True, stopped.sandbox_id: False}


# -- pure helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, (False, True, False)),
        ({"autoPause": True}, (True, True, False)),
        ({"autoPause": True, "autoPauseMemory": False}, (True, False, False)),
        ({"autoPause": True, "autoResume": {"enabled": True}}, (True, True, True)),
        ({"lifecycle": {"onTimeout": "pause", "autoResume": True}}, (True, True, True)),
        ({"lifecycle": {"onTimeout": {"action": "pause", "keepMemory": False}}}, (True, False, False)),
        ({"autoPause": True, "lifecycle": {"onTimeout": "kill"}}, (False, True, False)),
    ],
)
def test_lifecycle_of(body: dict[str, Any], expected: tuple[bool, bool, bool]) -> None:
    got = lifecycle_of(_req(**body))
    assert (got.auto_pause, got.auto_pause_memory, got.auto_resume) == expected


def test_auto_resume_without_auto_pause_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        lifecycle_of(_req(autoResume={"enabled": True}))


def test_downsample_keeps_ends_and_bounds_count() -> None:
    items = list(range(10_000))
    out = downsample(items, 1000)
    assert len(out) == 1000 and out[0] == 0 and out[-1] == 9999 and out == sorted(out)
    assert downsample([1, 2], 1000) == [1, 2]


@pytest.mark.parametrize("name", ["snap-1", "a/b.c_d", "X" * 128])
def test_snapshot_names_ok(name: str) -> None:
    assert validate_snapshot_name(name) == name


@pytest.mark.parametrize("name", ["-x", "a:b", "a b", "X" * 129, "é"])
def test_snapshot_names_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_snapshot_name(name)


def test_rows_carry_lifecycle_fields() -> None:
    fields = {f.name for f in dataclasses.fields(SandboxRow)}
    assert {"auto_pause_memory", "auto_resume", "timeout_s", "paused_memory", "layers"} <= fields
