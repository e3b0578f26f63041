"""Template routes of the E2B REST API (e2b-protocol.md §2.3 builds, §2.4 tags). Each handler
authenticates, parses, calls the template service once and serialises; build logic lives in
`corral.builder.service.TemplateBuildService`.

Template ids and names travel percent-encoded in one path segment (`ns%2Fname%3Atag`); the server
decodes the path before routing, so those parameters use the `path` convertor.

`PUT /upload/{token}` is the pre-signed upload URL `GET /templates/{id}/files/{hash}` hands out:
it carries no API key (E2B's SDK sends none), the token is the credential.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from corral.core.errors import InvalidArgument, NotFound
from corral.server.api._auth import ApiKeyAuth
from corral.server.api._body import read_model

__all__ = ["TemplateRoutes", "TemplateServiceProtocol"]

MAX_CPU_COUNT = 64
MAX_MEMORY_MB = 256 * 1024


class TemplateServiceProtocol(Protocol):
    """What the template routes need (implemented by `corral.builder.service.TemplateBuildService`)."""

    async def request_build(
        self,
        team_id: str,
        name: str,
        tags: Sequence[str],
        cpu_count: int,
        memory_mb: int,
        runtime: str | None = None,
    ) -> dict[str, Any]: ...

    async def upload_link(
        self, team_id: str, template_id: str, files_hash: str, base_url: str
    ) -> dict[str, Any]: ...

    async def receive_upload(self, token: str, chunks: Any, declared_size: int | None) -> int: ...

    async def start_build(
        self, team_id: str, template_id: str, build_id: str, body: Mapping[str, Any]
    ) -> None: ...

    async def build_status(
        self, team_id: str, template_id: str, build_id: str, logs_offset: int
    ) -> dict[str, Any]: ...

    async def alias(self, team_id: str, alias: str) -> dict[str, Any]: ...

    async def assign_tags(self, team_id: str, target: str, tags: Sequence[str]) -> dict[str, Any]: ...

    async def remove_tags(self, team_id: str, name: str, tags: Sequence[str]) -> None: ...

    async def list_tags(self, team_id: str, id_or_name: str) -> builtins.list[dict[str, Any]]: ...

    async def list_templates(self, team_id: str) -> builtins.list[dict[str, Any]]: ...

    async def delete_template(self, team_id: str, id_or_name: str) -> bool:
        """Delete a template the builder made for the team; False when it made no such template."""
        ...


class _RequestBuildBody(BaseModel):
    """`POST /v3/templates` (E2B `TemplateBuildRequestV3`); `alias` is the deprecated `name`."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, validation_alias=AliasChoices("name", "alias"), max_length=512)
    tags: list[str] = Field(default_factory=list)
    cpu_count: int = Field(2, alias="cpuCount", ge=1, le=MAX_CPU_COUNT)
    memory_mb: int = Field(1024, alias="memoryMB", ge=128, le=MAX_MEMORY_MB)
    runtime: str | None = Field(None, max_length=64)  # Corral's: the OCI runtime of its sandboxes


class _StartBuildBody(BaseModel):
    """`POST /v2/templates/{id}/builds/{buildID}` (E2B `TemplateBuildStartV2`), checked by the service."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    steps: list[dict[str, Any]] = Field(default_factory=list)
    force: bool = False
    from_image: str | None = Field(None, alias="fromImage")
    from_template: str | None = Field(None, alias="fromTemplate")
    from_image_registry: dict[str, Any] | None = Field(None, alias="fromImageRegistry")
    start_cmd: str | None = Field(None, alias="startCmd")
    ready_cmd: str | None = Field(None, alias="readyCmd")


class _AssignTagsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    target: str
    tags: list[str]


class _DeleteTagsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    tags: list[str]


def _logs_offset(request: Request) -> int:
    raw = request.query_params.get("logsOffset", "0") or "0"
    if not raw.isdigit():
        raise InvalidArgument(f"logsOffset must be a non-negative integer, got {raw!r}")
    return int(raw)


class TemplateRoutes:
    def __init__(
        self,
        service: TemplateServiceProtocol,
        auth: ApiKeyAuth,
        delete_other: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        """`delete_other(team_id, template_id)` deletes templates the builder did not make
        (snapshots: `DELETE /templates/{id}` is how the SDK deletes those too)."""
        self._service = service
        self._auth = auth
        self._delete_other = delete_other

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v3/templates", self.request_build, methods=["POST"]),
            Route("/templates", self.list, methods=["GET"]),
            Route("/templates/tags", self.assign_tags, methods=["POST"]),
            Route("/templates/tags", self.remove_tags, methods=["DELETE"]),
            Route("/templates/aliases/{alias:path}", self.alias, methods=["GET"]),
            Route("/templates/{templateID:path}/files/{hash}", self.upload_link, methods=["GET"]),
            Route("/v2/templates/{templateID:path}/builds/{buildID}", self.start_build, methods=["POST"]),
            Route("/templates/{templateID:path}/builds/{buildID}/status", self.build_status, methods=["GET"]),
            Route("/templates/{templateID:path}/tags", self.list_tags, methods=["GET"]),
            Route("/templates/{templateID:path}", self.delete, methods=["DELETE"]),
            Route("/upload/{token}", self.upload, methods=["PUT"]),
        ]

    async def request_build(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        body = await read_model(request, _RequestBuildBody)
        if not body.name:
            raise InvalidArgument("Name is required")
        result = await self._service.request_build(
            team_id, body.name, body.tags, body.cpu_count, body.memory_mb, runtime=body.runtime
        )
        return JSONResponse(result, status_code=202)

    async def upload_link(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        result = await self._service.upload_link(
            team_id, request.path_params["templateID"], request.path_params["hash"], str(request.base_url)
        )
        return JSONResponse(result, status_code=201)

    async def upload(self, request: Request) -> Response:
        declared = request.headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        await self._service.receive_upload(request.path_params["token"], request.stream(), size)
        return Response(status_code=200)

    async def start_build(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        body = await read_model(request, _StartBuildBody)
        await self._service.start_build(
            team_id,
            request.path_params["templateID"],
            request.path_params["buildID"],
            body.model_dump(by_alias=True, exclude_none=True),
        )
        return Response(status_code=202)

    async def build_status(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        result = await self._service.build_status(
            team_id, request.path_params["templateID"], request.path_params["buildID"], _logs_offset(request)
        )
        return JSONResponse(result)

    async def alias(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        return JSONResponse(await self._service.alias(team_id, request.path_params["alias"]))

    async def assign_tags(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        body = await read_model(request, _AssignTagsBody)
        return JSONResponse(await self._service.assign_tags(team_id, body.target, body.tags), status_code=201)

    async def remove_tags(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        body = await read_model(request, _DeleteTagsBody)
        await self._service.remove_tags(team_id, body.name, body.tags)
        return Response(status_code=204)

    async def list_tags(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        return JSONResponse(await self._service.list_tags(team_id, request.path_params["templateID"]))

    async def list(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        return JSONResponse(await self._service.list_templates(team_id))

    async def delete(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        template_id = request.path_params["templateID"]
        if not await self._service.delete_template(team_id, template_id):
            if self._delete_other is None:
                raise NotFound(f"template '{template_id}' not found")
            await self._delete_other(team_id, template_id)
        return Response(status_code=204)
