"""`AsyncTemplate`: describe a template (the fluent builder of `corral.sdk._template`), build it on
the server, and manage templates and their tags — E2B's `AsyncTemplate`, call for call.

    template = AsyncTemplate().from_template("base").apt_install("jq").copy("app/", "app/")
    info = await AsyncTemplate.build(template, "my-app:v1", on_build_logs=print)
    sandbox = await AsyncSandbox.create("my-app:v1")

A build: hash the COPY sources → `POST /v3/templates` → for each COPY, ask whether the server has
its files and upload them if not → `POST /v2/templates/{id}/builds/{buildID}` with the plan →
poll the status every 0.2 s, passing every log entry to `on_build_logs` (e2b-protocol.md §2.3).
"""

from __future__ import annotations

import builtins
import datetime as dt
import os
from collections.abc import Sequence
from typing import Unpack

import httpx

from corral.sdk._api import ApiRequest
from corral.sdk._async._client import AsyncApiClient, open_http
from corral.sdk._config import ConnectionConfig, ConnectionOptions
from corral.sdk._errors import InvalidArgumentException, error_from_body
from corral.sdk._handlers import AsyncOutputHandler, ainvoke, asleep
from corral.sdk._http import timeout_for, transport_error
from corral.sdk._template import (
    CopyUpload,
    PreparedBuild,
    TemplateBase,
    TemplateClass,
    build_failure,
    prepare_build,
)
from corral.sdk._template_api import (
    BuildInfo,
    FileUploadException,
    LogEntry,
    LogEntryEnd,
    LogEntryStart,
    TemplateBuildStatus,
    TemplateBuildStatusResponse,
    TemplateInfo,
    TemplateTag,
    TemplateTagInfo,
    alias_request,
    assign_tags_request,
    build_error,
    build_info_from_json,
    build_status_from_json,
    build_status_request,
    delete_template_request,
    list_tags_request,
    list_templates_request,
    remove_tags_request,
    request_build_request,
    start_build_request,
    tag_info_from_json,
    tags_from_json,
    template_info_from_json,
    upload_link_from_json,
    upload_link_request,
)
from corral.sdk._template_files import AsyncFileWork, aiter_file_chunks

__all__ = ["AsyncTemplate"]

POLL_INTERVAL_S = 0.2
_PAGE = 100  # log entries per status answer: a full page means more are waiting


def _now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def _name(name: str | None, alias: str | None) -> str:
    if name:
        return name
    if alias:
        return alias
    raise InvalidArgumentException("a template name is required, e.g. 'my-template' or 'my-template:v1'")


async def _log(on_build_logs: AsyncOutputHandler[LogEntry] | None, message: str) -> None:
    await ainvoke(on_build_logs, LogEntry(timestamp=_now(), level="info", message=message))


async def _call(
    config: ConnectionConfig, http: httpx.AsyncClient, request: ApiRequest, what: str
) -> httpx.Response:
    """Send a control-plane request; a transport failure raises, every answer is returned."""
    return await AsyncApiClient(config, http).send(request, what=what)


async def _start(
    config: ConnectionConfig,
    http: httpx.AsyncClient,
    template: TemplateClass | TemplateBase,
    name: str,
    tags: Sequence[str] | None,
    cpu_count: int,
    memory_mb: int,
    skip_cache: bool,
    on_build_logs: AsyncOutputHandler[LogEntry] | None,
    runtime: str | None = None,
) -> tuple[BuildInfo, PreparedBuild]:
    """Everything up to a started build: hashes, the build record, uploads, the plan."""
    request = request_build_request(name, tags, cpu_count, memory_mb, runtime)  # checks the arguments first
    prepared = await AsyncFileWork.run(prepare_build, template, skip_cache=skip_cache)
    await _log(
        on_build_logs,
        f"Requesting build for template: {name}" + (f" with tags: {', '.join(tags)}" if tags else ""),
    )
    what = f"request a build of template {name!r}"
    response = await _call(config, http, request, what)
    if response.status_code >= 300:
        raise build_error(response.status_code, response.content, what)
    info = build_info_from_json(response.json(), name)
    await _log(on_build_logs, f"Template created with ID: {info.template_id}, Build ID: {info.build_id}")
    for upload in prepared.uploads:
        what = f"upload the files of COPY {upload.src}"
        response = await _call(config, http, upload_link_request(info.template_id, upload.files_hash), what)
        if response.status_code >= 300:
            raise build_error(response.status_code, response.content, what, upload=True)
        link = upload_link_from_json(response.json())
        if link.url and (upload.force_upload or not link.present):
            await _upload(config, http, upload, link.url)
            await _log(on_build_logs, f"Uploaded '{upload.src}'")
        else:
            await _log(on_build_logs, f"Skipping upload of '{upload.src}', already cached")
    await _log(on_build_logs, "All file uploads completed")
    await _log(on_build_logs, "Starting building...")
    what = f"start the build of template {name!r}"
    response = await _call(
        config, http, start_build_request(info.template_id, info.build_id, prepared.body), what
    )
    if response.status_code >= 300:
        raise build_error(response.status_code, response.content, what)
    return info, prepared


async def _upload(config: ConnectionConfig, http: httpx.AsyncClient, upload: CopyUpload, url: str) -> None:
    """PUT the archive to the server's upload URL: its own credential, so no API key is sent."""
    what = f"upload the files of COPY {upload.src} (step {upload.step})"
    try:
        archive = await AsyncFileWork.run(upload.pack)
    except (ValueError, OSError) as exc:
        raise FileUploadException(f"{what}: {exc}", code="invalid_argument", step=upload.step) from None
    try:
        size = os.fstat(archive.fileno()).st_size
        response = await http.put(
            url,
            content=aiter_file_chunks(archive),
            headers={"content-length": str(size)},
            timeout=timeout_for(config.request_timeout),
        )
    except httpx.HTTPError as exc:
        failure = transport_error(exc, what, url)
        raise FileUploadException(failure.message, code=failure.code, step=upload.step) from None
    finally:
        archive.close()
    if response.status_code >= 300:
        raise build_error(response.status_code, response.content, what, upload=True)


async def _status(
    config: ConnectionConfig, http: httpx.AsyncClient, template_id: str, build_id: str, logs_offset: int
) -> TemplateBuildStatusResponse:
    what = f"get the status of build {build_id}"
    response = await _call(config, http, build_status_request(template_id, build_id, logs_offset), what)
    if response.status_code >= 300:
        raise build_error(response.status_code, response.content, what)
    return build_status_from_json(response.json())


async def _wait(
    config: ConnectionConfig,
    http: httpx.AsyncClient,
    info: BuildInfo,
    template: TemplateBase,
    on_build_logs: AsyncOutputHandler[LogEntry] | None,
) -> None:
    """Poll until the build is over, passing on every log entry; raise `BuildException` on error."""
    offset = 0
    while True:
        status = await _status(config, http, info.template_id, info.build_id, offset)
        offset += len(status.log_entries)
        for entry in status.log_entries:
            await ainvoke(on_build_logs, entry)
        if status.status in (TemplateBuildStatus.READY, TemplateBuildStatus.ERROR):
            tail = status  # the last page may not have held every entry: drain them
            while tail.log_entries:
                tail = await _status(config, http, info.template_id, info.build_id, offset)
                offset += len(tail.log_entries)
                for entry in tail.log_entries:
                    await ainvoke(on_build_logs, entry)
            if status.status is TemplateBuildStatus.READY:
                return
            raise build_failure(status.reason, template)
        if len(status.log_entries) < _PAGE:
            await asleep(POLL_INTERVAL_S)


class AsyncTemplate(TemplateBase):
    """A template to build: `AsyncTemplate().from_template("base").run_cmd(...)`, then
    `await AsyncTemplate.build(template, "name:tag")`. The builder methods are `TemplateBase`'s
    (steps: `TemplateBuilder`); the class methods below talk to the server.
    """

    @classmethod
    async def build(
        cls,
        template: TemplateClass | TemplateBase,
        name: str | None = None,
        *,
        alias: str | None = None,
        tags: Sequence[str] | None = None,
        cpu_count: int = 2,
        memory_mb: int = 1024,
        skip_cache: bool = False,
        on_build_logs: AsyncOutputHandler[LogEntry] | None = None,
        runtime: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> BuildInfo:
        """Build `template` as `name` (`name` or `name:tag`, plus any `tags`) and wait until it is ready.

        Sandboxes get `cpu_count` CPUs and `memory_mb` MiB; `skip_cache` builds every step again.
        `runtime` (Corral only) picks the OCI runtime its sandboxes run on, e.g. "runsc" for gVisor
        (default: the server's).
        `on_build_logs` gets every log entry (a function or a coroutine function). A failure raises
        `BuildException` naming the failing step; the previous build of `name` stays in place.
        """
        config = ConnectionConfig.from_options(None, options)
        build_name = _name(name, alias)
        await ainvoke(on_build_logs, LogEntryStart(timestamp=_now(), message="Build started"))
        try:
            async with open_http(transport) as http:
                info, prepared = await _start(
                    config, http, template, build_name, tags, cpu_count, memory_mb, skip_cache, on_build_logs,
                    runtime,
                )  # fmt: skip
                await _log(on_build_logs, "Waiting for logs...")
                await _wait(config, http, info, prepared.template, on_build_logs)
                return info
        finally:
            await ainvoke(on_build_logs, LogEntryEnd(timestamp=_now(), message="Build finished"))

    @classmethod
    async def build_in_background(
        cls,
        template: TemplateClass | TemplateBase,
        name: str | None = None,
        *,
        alias: str | None = None,
        tags: Sequence[str] | None = None,
        cpu_count: int = 2,
        memory_mb: int = 1024,
        skip_cache: bool = False,
        on_build_logs: AsyncOutputHandler[LogEntry] | None = None,
        runtime: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> BuildInfo:
        """Start building `template` and return at once; follow it with `get_build_status`."""
        config = ConnectionConfig.from_options(None, options)
        build_name = _name(name, alias)
        async with open_http(transport) as http:
            info, _ = await _start(
                config, http, template, build_name, tags, cpu_count, memory_mb, skip_cache, on_build_logs, runtime
            )
        return info

    @classmethod
    async def get_build_status(
        cls,
        build_info: BuildInfo,
        logs_offset: int = 0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> TemplateBuildStatusResponse:
        """A build's status and its log entries from `logs_offset` on (at most 100 per call)."""
        config = ConnectionConfig.from_options(None, options)
        async with open_http(transport) as http:
            return await _status(config, http, build_info.template_id, build_info.build_id, logs_offset)

    @classmethod
    async def exists(
        cls,
        name: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> bool:
        """Whether a template called `name` exists for this team: its own, or a public one (a Corral server
        answers another team's name as unknown; E2B's cloud answers 403, which counts as existing)."""
        config = ConnectionConfig.from_options(None, options)
        what = f"look up template {name!r}"
        async with open_http(transport) as http:
            response = await _call(config, http, alias_request(name), what)
        if response.status_code in (200, 403):
            return True
        if response.status_code == 404:
            return False
        raise error_from_body(response.status_code, response.content, context=what)

    @classmethod
    async def alias_exists(
        cls,
        alias: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> bool:
        """Whether a template called `alias` exists (E2B's older name of `exists`)."""
        return await cls.exists(alias, transport=transport, **options)

    @classmethod
    async def assign_tags(
        cls,
        target_name: str,
        tags: str | Sequence[str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> TemplateTagInfo:
        """Point `tags` at the build `target_name` (`name:tag`, or `name` for its default tag) names."""
        config = ConnectionConfig.from_options(None, options)
        what = f"tag {target_name!r}"
        async with open_http(transport) as http:
            response = await _call(config, http, assign_tags_request(target_name, tags), what)
        if response.status_code >= 300:
            raise error_from_body(response.status_code, response.content, context=what)
        return tag_info_from_json(response.json())

    @classmethod
    async def remove_tags(
        cls,
        name: str,
        tags: str | Sequence[str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        """Remove `tags` from the template `name` (builds no tag names any more are let go)."""
        config = ConnectionConfig.from_options(None, options)
        what = f"remove tags from template {name!r}"
        async with open_http(transport) as http:
            response = await _call(config, http, remove_tags_request(name, tags), what)
        if response.status_code >= 300:
            raise error_from_body(response.status_code, response.content, context=what)

    @classmethod
    async def get_tags(
        cls,
        template_id: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> builtins.list[TemplateTag]:
        """The tags of a template (by id or name) and the builds they point to."""
        config = ConnectionConfig.from_options(None, options)
        what = f"list the tags of template {template_id!r}"
        async with open_http(transport) as http:
            response = await _call(config, http, list_tags_request(template_id), what)
        if response.status_code >= 300:
            raise error_from_body(response.status_code, response.content, context=what)
        return tags_from_json(response.json())

    @classmethod
    async def delete(
        cls,
        template: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> bool:
        """Delete a template of your team (by name or id) with all its tags; False when there is none."""
        config = ConnectionConfig.from_options(None, options)
        what = f"delete template {template!r}"
        async with open_http(transport) as http:
            response = await _call(config, http, delete_template_request(template), what)
        if response.status_code == 404:
            return False
        if response.status_code >= 300:
            raise error_from_body(response.status_code, response.content, context=what)
        return True

    # Last, so that `list` in the annotations above is the builtin.
    @classmethod
    async def list(
        cls, *, transport: httpx.AsyncBaseTransport | None = None, **options: Unpack[ConnectionOptions]
    ) -> builtins.list[TemplateInfo]:
        """The templates of your team (not the server's own, like `base`)."""
        config = ConnectionConfig.from_options(None, options)
        what = "list templates"
        async with open_http(transport) as http:
            response = await _call(config, http, list_templates_request(), what)
        if response.status_code >= 300:
            raise error_from_body(response.status_code, response.content, context=what)
        return [template_info_from_json(item) for item in response.json()]
