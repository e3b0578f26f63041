"""Sandbox routes of the E2B REST API. Each handler authenticates, parses, calls the service once
and serialises; decisions (timeouts, states, resume) belong to the service."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from corral.core.errors import NotFound
from corral.core.ids import is_sandbox_id
from corral.server.api._auth import ApiKeyAuth
from corral.server.api._body import read_model
from corral.server.api._service import MAX_TIMEOUT_SECONDS, CreateSandboxRequest, SandboxServiceProtocol
from corral.server.api._wire import listed_sandbox_json, sandbox_detail_json, sandbox_json
from corral.server.query import parse_sandbox_query

__all__ = ["SandboxRoutes"]


class _TimeoutBody(BaseModel):
    """`POST /sandboxes/{id}/timeout`: `{"timeout": N}`, required."""

    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(ge=0, le=MAX_TIMEOUT_SECONDS)


class _ConnectBody(BaseModel):
    """`POST /sandboxes/{id}/connect`: `{"timeout": N}` (the SDK always sends it; 300 if absent)."""

    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(300, ge=0, le=MAX_TIMEOUT_SECONDS)


class _PauseBody(BaseModel):
    """`POST /sandboxes/{id}/pause`: `{"memory": bool}` - keep process memory (default) or only files."""

    model_config = ConfigDict(extra="ignore")
    memory: bool = True


def _sandbox_id(request: Request) -> str:
    """The path's sandbox id. Ids are `[a-z0-9]+`, so anything else cannot name a sandbox."""
    sandbox_id: str = request.path_params["sandboxID"]
    if not is_sandbox_id(sandbox_id):
        raise NotFound(f'sandbox "{sandbox_id}" not found')
    return sandbox_id


class SandboxRoutes:
    def __init__(self, service: SandboxServiceProtocol, auth: ApiKeyAuth, domain: str | None) -> None:
        self._service = service
        self._auth = auth
        self._domain = domain or None

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/sandboxes", self.create, methods=["POST"]),
            Route("/v2/sandboxes", self.list, methods=["GET"]),
            Route("/sandboxes/{sandboxID}", self.get, methods=["GET"]),
            Route("/sandboxes/{sandboxID}", self.kill, methods=["DELETE"]),
            Route("/sandboxes/{sandboxID}/timeout", self.set_timeout, methods=["POST"]),
            Route("/sandboxes/{sandboxID}/connect", self.connect, methods=["POST"]),
            Route("/sandboxes/{sandboxID}/pause", self.pause, methods=["POST"]),
        ]

    async def create(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        command = await read_model(request, CreateSandboxRequest)
        row = await self._service.create(team_id, command)
        return JSONResponse(sandbox_json(row, self._domain), status_code=201)

    async def list(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        params = request.query_params
        query = parse_sandbox_query(
            metadata=params.get("metadata"),
            state=params.getlist("state"),
            order=params.get("order"),
            started_after=params.get("startedAfter"),
            template=params.get("template"),
            limit=params.get("limit"),
            next_token=params.get("nextToken"),
        )
        rows, next_token = await self._service.list(team_id, query)
        headers = {"X-Next-Token": next_token} if next_token else None
        return JSONResponse([listed_sandbox_json(row) for row in rows], headers=headers)

    async def get(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        row = await self._service.get(team_id, _sandbox_id(request))
        return JSONResponse(sandbox_detail_json(row, self._domain))

    async def kill(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        await self._service.kill(team_id, _sandbox_id(request))
        return Response(status_code=204)

    async def set_timeout(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        body = await read_model(request, _TimeoutBody)
        await self._service.set_timeout(team_id, sandbox_id, body.timeout)
        return Response(status_code=204)

    async def connect(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        body = await read_model(request, _ConnectBody)
        row, resumed = await self._service.connect(team_id, sandbox_id, body.timeout)
        return JSONResponse(sandbox_json(row, self._domain), status_code=201 if resumed else 200)

    async def pause(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        body = await read_model(request, _PauseBody)
        await self._service.pause(team_id, sandbox_id, keep_memory=body.memory)
        return Response(status_code=204)
