"""The template service behind the REST routes, end to end through the ASGI app with a fake
executor (no sandboxes): E2B's status codes and shapes (checked with the SDK's own models), the
upload URL, build states and logs, tags, aliases, list and delete, queueing and failures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b.api.client.models import (
    AssignedTemplateTags,
    TemplateAliasResponse,
    TemplateBuildFileUpload,
    TemplateBuildInfo,
    TemplateRequestResponseV3,
    TemplateTag,
)
from e2b.api.client.models import Template as SdkTemplate

from corral.builder.cache import MemoryBuildCache
from corral.builder.executor import BuildJob, BuildOutcome, StepFailed
from corral.builder.logs import MAX_LINE, BuildLog
from corral.builder.service import INTERRUPTED_MESSAGE, TemplateBuildService, parse_name, validate_tags
from corral.builder.steps import BuildContext, FromTemplate
from corral.builder.uploads import UploadStore
from corral.core.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from corral.core.settings import load_settings
from corral.node.storage.templates import TemplateManifest, TemplateStore
from corral.server.api import build_api

KEY = "e2b_" + "ab" * 20
OTHER_KEY = "e2b_" + "cd" * 20
LAYER = "a" * 64
HASH = "f" * 64


class FakeExecutor:
    """Records jobs; each build waits for `release` (if set) and ends as `outcome` or `failure`."""

    def __init__(self) -> None:
        self.jobs: list[BuildJob] = []
        self.running = 0
        self.max_running = 0
        self.release: asyncio.Event | None = None
        self.failure: StepFailed | None = None

    async def run(self, job: BuildJob) -> BuildOutcome:
        self.jobs.append(job)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            job.log.add("[builder 1/1] RUN true [abc]", "info", "1")
            if self.release is not None:
                await self.release.wait()
            if self.failure is not None:
                raise self.failure
            return BuildOutcome(
                layers=(LAYER, "b" * 64),
                context=BuildContext(user="user", workdir="/app", env=(("A", "1"),)),
                start_cmd="serve",
                ready_cmd="sleep 1",
            )
        finally:
            self.running -= 1


class Keys:
    def team_for_api_key(self, key: str) -> str | None:
        return {KEY: "team-a", OTHER_KEY: "team-b"}.get(key)


class NoSandboxes:
    """The sandbox service's part in `DELETE /templates/{id}`: it owns no snapshot here."""

    async def delete_snapshot(self, team_id: str, template_id: str) -> None:
        raise NotFound(f"template '{template_id}' not found")


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings({"home": tmp_path}, env={})


@pytest.fixture
def executor() -> FakeExecutor:
    return FakeExecutor()


@pytest.fixture
def service(settings, executor: FakeExecutor) -> TemplateBuildService:
    store = TemplateStore(settings)
    store.save(TemplateManifest(template_id="base", names=("base",), layers=(LAYER,)))
    return TemplateBuildService(
        settings,
        None,
        store,
        cache=MemoryBuildCache(),
        uploads=UploadStore(settings.home / "files"),
        executor=executor,
    )


@pytest.fixture
async def client(service: TemplateBuildService, settings) -> AsyncIterator[httpx.AsyncClient]:
    app = build_api(NoSandboxes(), Keys(), settings, templates=service)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://corral.test", headers={"X-API-Key": KEY}
    ) as c:
        yield c
    await service.aclose()


async def _request(client: httpx.AsyncClient, name: str, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v3/templates", json={"name": name, "cpuCount": 1, "memoryMB": 1024, **body}
    )
    assert response.status_code == 202, response.text
    TemplateRequestResponseV3.from_dict(response.json())  # the SDK can read it
    return response.json()


async def _start(
    client: httpx.AsyncClient, created: dict[str, Any], body: dict[str, Any] | None = None
) -> None:
    response = await client.post(
        f"/v2/templates/{created['templateID']}/builds/{created['buildID']}",
        json=body
        or {
            "fromTemplate": "base",
            "steps": [{"type": "RUN", "args": ["true"], "force": False}],
            "force": False,
        },
    )
    assert response.status_code == 202, response.text


async def _wait(
    client: httpx.AsyncClient, created: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll like the SDK: advance logsOffset, stop once finished and drained."""
    offset, entries = 0, []
    for _ in range(500):
        response = await client.get(
            f"/templates/{created['templateID']}/builds/{created['buildID']}/status",
            params={"logsOffset": offset},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        TemplateBuildInfo.from_dict(body)
        offset += len(body["logEntries"])
        entries += body["logEntries"]
        if body["status"] in ("ready", "error") and not body["logEntries"]:
            return body, entries
        await asyncio.sleep(0.01)
    raise AssertionError("build did not finish")


async def test_build_flow_publishes_the_template(
    client: httpx.AsyncClient, service: TemplateBuildService
) -> None:
    created = await _request(client, "My-App:v1", tags=["stable"])
    assert (created["names"], created["aliases"], created["public"]) == (["my-app"], ["my-app"], False)
    assert created["tags"] == ["v1", "stable"]
    uuid.UUID(created["buildID"])
    # Before the build ends there is no template.
    assert (await client.get("/templates/aliases/my-app")).status_code == 404
    await _start(client, created)
    status, entries = await _wait(client, created)
    assert status["status"] == "ready" and "reason" not in status
    messages = [e["message"] for e in entries]
    assert messages[0] == f"Building template {created['templateID']}/{created['buildID']}"
    assert "[builder 1/1] RUN true [abc]" in messages and messages[-1].startswith("Build finished, took ")
    assert {e["level"] for e in entries} == {"info"}

    manifest = service.templates.get("my-app")
    assert manifest.template_id == created["templateID"] and manifest.team_id == "team-a"
    assert manifest.layers == (LAYER, "b" * 64)
    assert (manifest.default_user, manifest.default_workdir, manifest.env_vars) == (
        "user",
        "/app",
        {"A": "1"},
    )
    assert (manifest.start_cmd, manifest.ready_cmd, manifest.cpu_count) == ("serve", "sleep 1", 1)
    assert service.templates.get("my-app:stable") == manifest
    alias = await client.get("/templates/aliases/my-app")
    assert alias.status_code == 200 and alias.json() == {"templateID": created["templateID"], "public": False}
    TemplateAliasResponse.from_dict(alias.json())


async def test_failed_first_build_leaves_no_template(
    client: httpx.AsyncClient, executor: FakeExecutor
) -> None:
    executor.failure = StepFailed("failed to run command 'false': exit status 1", "1")
    created = await _request(client, "broken")
    await _start(client, created)
    status, entries = await _wait(client, created)
    assert status["status"] == "error"
    assert status["reason"]["message"] == "failed to run command 'false': exit status 1"
    assert status["reason"]["step"] == "1"
    assert entries[-1] == {
        **entries[-1],
        "level": "error",
        "message": "Build failed: failed to run command 'false': exit status 1",
    }
    assert (await client.get("/templates/aliases/broken")).status_code == 404


async def test_rebuild_moves_tags_and_keeps_older_tagged_builds(
    client: httpx.AsyncClient, service: TemplateBuildService, executor: FakeExecutor
) -> None:
    first = await _request(client, "app:v1")
    await _start(client, first)
    await _wait(client, first)
    second = await _request(client, "app:v2")
    assert second["templateID"] == first["templateID"]
    executor.failure = None
    await _start(client, second)
    await _wait(client, second)
    manifest = service.templates.get("app")
    assert manifest.tags == {"v1": first["buildID"], "v2": second["buildID"]}
    assert service.templates.get("app:v1").build_id == first["buildID"]
    assert service.templates.get("app:v2").build_id == second["buildID"]
    assert service.templates.get("app").build_id == second["buildID"]  # no `default` tag: the latest

    # A failing rebuild changes nothing.
    executor.failure = StepFailed("nope", "1")
    third = await _request(client, "app:v1")
    await _start(client, third)
    await _wait(client, third)
    assert service.templates.get("app:v1").build_id == first["buildID"]

    listed = await client.get(f"/templates/{first['templateID']}/tags")
    assert listed.status_code == 200
    tags = [TemplateTag.from_dict(item) for item in listed.json()]
    assert {(t.tag, str(t.build_id)) for t in tags} == {("v1", first["buildID"]), ("v2", second["buildID"])}

    assigned = await client.post(
        "/templates/tags", json={"target": "app:v1", "tags": ["Production", "latest"]}
    )
    assert assigned.status_code == 201
    parsed = AssignedTemplateTags.from_dict(assigned.json())
    assert str(parsed.build_id) == first["buildID"] and parsed.tags == ["production", "latest"]
    assert service.templates.get("app:production").build_id == first["buildID"]

    removed = await client.request(
        "DELETE", "/templates/tags", json={"name": "app", "tags": ["v1", "production", "latest"]}
    )
    assert removed.status_code == 204
    manifest = service.templates.get("app")
    assert manifest.tags == {"v2": second["buildID"]} and manifest.tagged_builds == {}
    with pytest.raises(NotFound):
        service.templates.get("app:v1")


@pytest.mark.parametrize(
    "body",
    [
        {"target": "app:v1", "tags": [":invalid-tag"]},
        {"target": "app:v1", "tags": ["app:"]},
        {"target": "app:v1", "tags": [str(uuid.uuid4())]},
        {"target": "app:v1", "tags": []},
        {"target": ":v1", "tags": ["x"]},
    ],
)
async def test_invalid_tags_are_400(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    created = await _request(client, "app:v1")
    await _start(client, created)
    await _wait(client, created)
    response = await client.post("/templates/tags", json=body)
    assert response.status_code == 400, response.text


async def test_templates_of_other_teams_and_system_templates(client: httpx.AsyncClient) -> None:
    created = await _request(client, "mine")
    await _start(client, created)
    await _wait(client, created)
    other = {"X-API-Key": OTHER_KEY}
    assert (await client.get("/templates/aliases/mine", headers=other)).status_code == 404  # not E2B's 403
    assert (await client.get("/templates/aliases/base", headers=other)).json() == {
        "templateID": "base",
        "public": True,
    }
    assert (await client.post("/v3/templates", json={"name": "mine"}, headers=other)).status_code == 409
    assert (await client.post("/v3/templates", json={"name": "base"})).status_code == 403
    assert (
        await client.get(f"/templates/{created['templateID']}/files/{HASH}", headers=other)
    ).status_code == 404
    assert (
        await client.request("DELETE", f"/templates/{created['templateID']}", headers=other)
    ).status_code == 404
    assert (await client.request("DELETE", "/templates/base")).status_code == 404  # not the builder's
    assert (await client.get("/templates", headers=other)).json() == []


async def test_another_teams_snapshot_is_unknown_and_the_teams_own_is_not_public(
    client: httpx.AsyncClient, service: TemplateBuildService
) -> None:
    """A snapshot's manifest names no team (the sandbox service knows its owner): it must not pass
    for a public template. For another team every lookup answers as for a name nobody has."""
    service.templates.save(TemplateManifest(template_id="snap1", names=("a-snap",), layers=(LAYER,)))
    service._template_owner = lambda m: "team-a" if m.template_id == "snap1" else m.team_id
    other = {"X-API-Key": OTHER_KEY}
    for ref, unknown in (("a-snap", "nobody"), ("snap1", "nobody1")):
        for method, url, body in (
            ("GET", "/templates/aliases/{}", None),
            ("GET", "/templates/{}/tags", None),
            ("POST", "/templates/tags", {"target": "{}", "tags": ["x"]}),
            ("DELETE", "/templates/tags", {"name": "{}", "tags": ["default"]}),
            ("POST", "/v3/templates", {"name": "{}"}),
        ):
            answers = []
            for name in (ref, unknown):
                json = {k: v.format(name) if isinstance(v, str) else v for k, v in (body or {}).items()}
                response = await client.request(method, url.format(name), json=json or None, headers=other)
                answers.append((response.status_code, response.text.replace(name, "<n>")))
            if url == "/v3/templates":  # names are one namespace: taken, but no id or kind told
                assert answers[0][0] == 409 and "snap1" not in answers[0][1]
            else:
                assert answers[0] == answers[1] and answers[0][0] == 404, (url, answers)
    mine = await client.get("/templates/aliases/a-snap")
    assert mine.json() == {"templateID": "snap1", "public": False}
    assert [t["tag"] for t in (await client.get("/templates/a-snap/tags")).json()] == ["default"]
    tagged = await client.post("/templates/tags", json={"target": "a-snap", "tags": ["x"]})
    assert tagged.status_code == 403 and "snapshot" in tagged.text
    assert (await client.post("/v3/templates", json={"name": "a-snap"})).status_code == 403


async def test_list_and_delete(client: httpx.AsyncClient) -> None:
    created = await _request(client, "listed")
    await _start(client, created)
    await _wait(client, created)
    listed = (await client.get("/templates")).json()
    assert [SdkTemplate.from_dict(item).template_id for item in listed] == [created["templateID"]]
    assert listed[0]["names"] == ["listed"] and listed[0]["buildStatus"] == "ready"
    assert (await client.request("DELETE", f"/templates/{created['templateID']}")).status_code == 204
    assert (await client.get("/templates/aliases/listed")).status_code == 404
    assert (await client.request("DELETE", f"/templates/{created['templateID']}")).status_code == 404


async def test_upload_link_and_signed_put(client: httpx.AsyncClient, service: TemplateBuildService) -> None:
    created = await _request(client, "files")
    link = await client.get(f"/templates/{created['templateID']}/files/{HASH}")
    assert link.status_code == 201
    parsed = TemplateBuildFileUpload.from_dict(link.json())
    assert parsed.present is False and parsed.url.startswith("http://corral.test/upload/")
    put = await client.put(parsed.url, content=b"archive bytes", headers={"X-API-Key": ""})
    assert put.status_code == 200
    assert service.uploads.path("team-a", HASH).read_bytes() == b"archive bytes"
    again = (await client.get(f"/templates/{created['templateID']}/files/{HASH}")).json()
    assert again["present"] is True
    assert service.uploads.present("team-b", HASH) is False  # per team
    assert (await client.put("/upload/not-a-token", content=b"x")).status_code == 404
    assert (await client.get(f"/templates/{created['templateID']}/files/nothex")).status_code == 400


async def test_builds_queue_for_a_slot(client: httpx.AsyncClient, executor: FakeExecutor) -> None:
    executor.release = asyncio.Event()
    builds = [await _request(client, f"queued-{i}") for i in range(3)]
    for created in builds:
        await _start(client, created)
    for _ in range(100):
        if executor.running == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert executor.running == 2  # the third waits
    status = (
        await client.get(f"/templates/{builds[2]['templateID']}/builds/{builds[2]['buildID']}/status")
    ).json()
    assert status["status"] == "building"
    assert "Waiting for a free build slot" in status["logEntries"][-1]["message"]
    executor.release.set()
    for created in builds:
        assert (await _wait(client, created))[0]["status"] == "ready"
    assert executor.max_running == 2


async def test_start_errors(client: httpx.AsyncClient) -> None:
    created = await _request(client, "errs")
    path = f"/v2/templates/{created['templateID']}/builds/{created['buildID']}"
    assert (await client.post(path, json={"steps": []})).status_code == 400
    assert (await client.post(path, json={"fromTemplate": "nope", "steps": []})).status_code == 404
    assert (
        await client.post(
            f"/v2/templates/{created['templateID']}/builds/{uuid.uuid4()}", json={"fromTemplate": "base"}
        )
    ).status_code == 404
    await _start(client, created)
    assert (await client.post(path, json={"fromTemplate": "base"})).status_code == 409
    status = await client.get(
        f"/templates/{created['templateID']}/builds/{created['buildID']}/status?logsOffset=x"
    )
    assert status.status_code == 400
    assert (await client.post("/v3/templates", json={"name": "bad name!"})).status_code == 400
    assert (await client.post("/v3/templates", json={"cpuCount": 1})).status_code == 400
    assert (await client.post("/v3/templates", json={"name": "x", "memoryMB": 1})).status_code == 400
    assert (
        await client.post("/v3/templates", json={"name": "x"}, headers={"X-API-Key": ""})
    ).status_code == 401


async def test_builds_running_at_server_stop_end_as_errors(
    service: TemplateBuildService, executor: FakeExecutor
) -> None:
    executor.release = asyncio.Event()
    created = await service.request_build("team-a", "cancelled", [], 1, 512)
    await service.start_build("team-a", created["templateID"], created["buildID"], {"fromTemplate": "base"})
    await asyncio.sleep(0.01)
    await service.aclose()
    status = await service.build_status("team-a", created["templateID"], created["buildID"], 0)
    assert status["status"] == "error" and status["reason"]["message"] == INTERRUPTED_MESSAGE
    assert isinstance(executor.jobs[0].plan.base, FromTemplate)


def _second_service(settings, executor: FakeExecutor) -> TemplateBuildService:
    """Another service on the same home: what a restarted server reads back."""
    return TemplateBuildService(
        settings,
        None,
        TemplateStore(settings),
        cache=MemoryBuildCache(),
        uploads=UploadStore(settings.home / "files"),
        executor=executor,
    )


async def test_build_status_and_logs_outlive_the_service(
    service: TemplateBuildService, executor: FakeExecutor, settings
) -> None:
    done = await service.request_build("team-a", "kept", ["v1"], 1, 512)
    await service.start_build("team-a", done["templateID"], done["buildID"], {"fromTemplate": "base"})
    for _ in range(200):
        if (await service.build_status("team-a", done["templateID"], done["buildID"], 0))["status"] == "ready":
            break
        await asyncio.sleep(0.01)
    executor.failure = StepFailed("failed to run command 'false': exit status 1", "1")
    failed = await service.request_build("team-a", "kept", [], 1, 512)
    waiting = await service.request_build("team-a", "kept", [], 1, 512)
    await service.start_build("team-a", failed["templateID"], failed["buildID"], {"fromTemplate": "base"})
    for _ in range(200):
        if not executor.running and len(executor.jobs) == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    before = {
        b["buildID"]: await service.build_status("team-a", b["templateID"], b["buildID"], 0)
        for b in (done, failed)
    }
    # A crash, not a clean stop: the waiting record is still on disk as `waiting`.
    restarted = _second_service(settings, executor)
    await restarted.start()
    for build in (done, failed):
        after = await restarted.build_status("team-a", build["templateID"], build["buildID"], 0)
        assert after == before[build["buildID"]]
    assert before[done["buildID"]]["status"] == "ready"
    assert any("Build finished" in line for line in before[done["buildID"]]["logs"])
    assert before[failed["buildID"]]["reason"]["step"] == "1"
    interrupted = await restarted.build_status("team-a", waiting["templateID"], waiting["buildID"], 0)
    assert interrupted["status"] == "error"
    assert interrupted["reason"]["message"] == INTERRUPTED_MESSAGE
    assert interrupted["logEntries"][-1]["message"] == f"Build failed: {INTERRUPTED_MESSAGE}"
    with pytest.raises(NotFound):  # still per team
        await restarted.build_status("team-b", done["templateID"], done["buildID"], 0)
    # the next restart reads the finished record as it is, without a second failure line
    third = _second_service(settings, executor)
    await third.start()
    again = await third.build_status("team-a", waiting["templateID"], waiting["buildID"], 0)
    assert again["logEntries"] == interrupted["logEntries"]
    await restarted.aclose()
    await third.aclose()


async def test_a_torn_log_line_and_a_foreign_record_are_skipped(service: TemplateBuildService, settings) -> None:
    done = await service.request_build("team-a", "torn", [], 1, 512)
    await service.start_build("team-a", done["templateID"], done["buildID"], {"fromTemplate": "base"})
    for _ in range(200):
        status = await service.build_status("team-a", done["templateID"], done["buildID"], 0)
        if status["status"] == "ready":
            break
        await asyncio.sleep(0.01)
    builds = settings.home / "builds"
    with (builds / f"{done['buildID']}.log").open("a") as f:
        f.write('{"timestamp": "2025-01-0')
    (builds / "not-a-uuid.json").write_text("{}")
    (builds / f"{uuid.uuid4()}.json").write_text("[1, 2")
    restarted = _second_service(settings, FakeExecutor())
    await restarted.start()
    after = await restarted.build_status("team-a", done["templateID"], done["buildID"], 0)
    assert after["logEntries"] == status["logEntries"]
    await restarted.aclose()


# --- names, tags, logs, uploads, manifests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("app", ("app", None)),
        ("App:V1", ("app", "v1")),
        ("team/app:default", ("team/app", None)),
        (" a-b_c ", ("a-b_c", None)),
    ],
)
def test_parse_name(value: str, expected: tuple[str, str | None]) -> None:
    assert parse_name(value) == expected


@pytest.mark.parametrize("value", ["", ":v1", "app:", "a/b/c", "app:v 1", "ap p"])
def test_parse_name_rejects(value: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_name(value)


def test_validate_tags() -> None:
    assert validate_tags(["A", "a", "v1.0"]) == ["a", "v1.0"]
    for bad in (":x", "x:", "two words", str(uuid.uuid4())):
        with pytest.raises(InvalidArgument):
            validate_tags([bad])


def test_build_log_pages_and_truncates() -> None:
    log = BuildLog()
    for i in range(250):
        log.add(f"line {i}")
    assert len(log.page(0)) == 100 and log.page(200)[0].message == "line 200" and log.page(250) == []
    log.add("x" * (MAX_LINE + 10), "warn", "2")
    entry = log.tail(1)[0].to_json()
    assert entry["level"] == "warn" and entry["step"] == "2" and entry["message"].endswith(" …")
    assert entry["timestamp"].endswith("Z")


async def test_upload_store_limits_and_expiry(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, max_bytes=10)

    async def body(*chunks: bytes) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    token = store.issue("t", HASH)
    with pytest.raises(ResourceExhausted):
        await store.receive(token, body(b"123456", b"789012"))
    assert not store.present("t", HASH) and list(tmp_path.rglob("*.tar")) == []
    assert await store.receive(token, body(b"1234")) == 4
    assert store.present("t", HASH)
    store._tickets[token] = store._tickets[token].__class__("t", HASH, 0.0)  # expired
    with pytest.raises(PermissionDenied):
        store.ticket(token)
    with pytest.raises(InvalidArgument):
        store.issue("t", "../x")


def test_manifest_builds_and_tags(tmp_path: Path) -> None:
    store = TemplateStore(load_settings({"home": tmp_path}, env={}))
    old = {
        "layers": ["b" * 64],
        "build_id": "old-build",
        "default_user": "root",
        "created_at": "2025-01-01T00:00:00.000Z",
    }
    manifest = TemplateManifest(
        template_id="tpl1",
        names=("app",),
        layers=(LAYER,),
        build_id="new-build",
        tags={"v1": "old-build", "v2": "new-build"},
        tagged_builds={"old-build": old},
        env_vars={"A": "1"},
        team_id="team-a",
    )
    store.save(manifest)
    assert store.get("app") == manifest  # no `default` tag: the latest build
    assert store.get("app:v2") == manifest
    v1 = store.get("app:v1")
    assert (v1.build_id, v1.layers, v1.default_user, v1.template_id) == (
        "old-build",
        ("b" * 64,),
        "root",
        "tpl1",
    )
    assert manifest.all_layers() == (LAYER, "b" * 64)
    with pytest.raises(NotFound, match="template 'app:v3' not found"):
        store.get("app:v3")
    assert not manifest.public and TemplateManifest(template_id="base", names=(), layers=()).public
    with pytest.raises(InvalidArgument):
        TemplateManifest(template_id="x", names=(), layers=(), tagged_builds={"b": {"layers": ["../x"]}})
