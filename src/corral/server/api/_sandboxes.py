"""Sandbox routes of the E2B REST API. Each handler authenticates, parses, calls the service once
and serialises; decisions (timeouts, states, resume) belong to the service."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from corral.core.errors import InvalidArgument, NotFound
from corral.core.ids import is_sandbox_id
from corral.server.api._auth import ApiKeyAuth
from corral.server.api._body import read_model
from corral.server.api._service import MAX_TIMEOUT_SECONDS, CreateSandboxRequest, SandboxServiceProtocol
from corral.server.api._wire import (
    fork_result_json,
    listed_sandbox_json,
    log_json,
    metric_json,
    sandbox_detail_json,
    sandbox_json,
    snapshot_json,
)
from corral.server.network_policy import NetworkUpdateRequest
from corral.server.query import parse_limit, parse_sandbox_query

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


class _SnapshotBody(BaseModel):
    """`POST /sandboxes/{id}/snapshots`: `{"name": "..."}`, name optional."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, max_length=255)


class _ForkBody(BaseModel):
    """`POST /sandboxes/{id}/fork`: `{"timeout": N, "count": N}` (the SDK sends both)."""

    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(300, ge=0, le=MAX_TIMEOUT_SECONDS)
    count: int = Field(1, ge=1)


_LOG_LIMIT_MAX = 1000


def _int_param(request: Request, name: str, *, minimum: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"invalid {name} {raw!r}: expected an integer") from None
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"invalid {name} {raw!r}: must be at least {minimum}")
    return value


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
            Route("/sandboxes/{sandboxID}/fork", self.fork, methods=["POST"]),
            Route("/sandboxes/{sandboxID}/snapshots", self.create_snapshot, methods=["POST"]),
            Route("/sandboxes/{sandboxID}/metrics", self.metrics, methods=["GET"]),
            Route("/v2/sandboxes/{sandboxID}/logs", self.logs, methods=["GET"]),
            Route("/snapshots", self.list_snapshots, methods=["GET"]),
            Route("/templates/{templateID}", self.delete_template, methods=["DELETE"]),
            Route("/sandboxes/{sandboxID}/network", self.update_network, methods=["PUT"]),
        ]

    async def create(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        command = await read_model(request, CreateSandboxRequest)
        row = await self._service.create(team_id, command)
        # Only a `network` config can issue a traffic token: skip the read without one.
        token = self._service.network_policies.traffic_access_token(row.sandbox_id) if command.network else None
        return JSONResponse(sandbox_json(row, self._domain, traffic_access_token=token), status_code=201)

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
        network = self._service.network_policies.config(row.sandbox_id)
        return JSONResponse(sandbox_detail_json(row, self._domain, network=network))

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
        token = self._service.network_policies.traffic_access_token(row.sandbox_id)
        body_json = sandbox_json(row, self._domain, traffic_access_token=token)
        return JSONResponse(body_json, status_code=201 if resumed else 200)

    async def update_network(self, request: Request) -> Response:
        """`PUT /sandboxes/{id}/network`: replace the egress policy (204; 404 unknown)."""
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        body = await read_model(request, NetworkUpdateRequest)
        await self._service.network_policies.update(team_id, sandbox_id, body)
        return Response(status_code=204)

    async def pause(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        body = await read_model(request, _PauseBody)
        await self._service.pause(team_id, sandbox_id, keep_memory=body.memory)
        return Response(status_code=204)

    async def fork(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        body = await read_model(request, _ForkBody)
        results = await self._service.fork(team_id, sandbox_id, body.timeout, body.count)
        token_of = self._service.network_policies.traffic_access_token  # forks keep the parent's setting
        items = [
            fork_result_json(
                r, self._domain, traffic_access_token=None if isinstance(r, Exception) else token_of(r.sandbox_id)
            )
            for r in results
        ]
        return JSONResponse(items, status_code=201)

    async def create_snapshot(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        body = await read_model(request, _SnapshotBody)
        snapshot_id, names = await self._service.create_snapshot(team_id, sandbox_id, body.name)
        return JSONResponse(snapshot_json(snapshot_id, names), status_code=201)

    async def list_snapshots(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        params = request.query_params
        rows, next_token = await self._service.list_snapshots(
            team_id,
            sandbox_id=params.get("sandboxID") or None,
            name=params.get("name") or None,
            limit=parse_limit(params.get("limit")),
            next_token=params.get("nextToken") or None,
        )
        headers = {"X-Next-Token": next_token} if next_token else None
        return JSONResponse([snapshot_json(r.snapshot_id, [r.name] if r.name else []) for r in rows], headers=headers)

    async def delete_template(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        await self._service.delete_snapshot(team_id, request.path_params["templateID"])
        return Response(status_code=204)

    async def metrics(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        rows = await self._service.metrics(
            team_id, sandbox_id, _int_param(request, "start", minimum=0), _int_param(request, "end", minimum=0)
        )
        return JSONResponse([metric_json(r) for r in rows])

    async def logs(self, request: Request) -> Response:
        team_id = await self._auth.team_id(request)
        sandbox_id = _sandbox_id(request)
        direction = request.query_params.get("direction") or "forward"
        if direction not in ("forward", "backward"):
            raise InvalidArgument(f"invalid direction {direction!r}: expected 'forward' or 'backward'")
        limit = _int_param(request, "limit", minimum=0)
        rows = await self._service.logs(
            team_id,
            sandbox_id,
            cursor_ms=_int_param(request, "cursor", minimum=0),
            limit=min(_LOG_LIMIT_MAX, 1000 if limit is None else limit),
            forward=direction == "forward",
            level=request.query_params.get("level") or None,
            search=request.query_params.get("search") or None,
        )
        return JSONResponse({"logs": [log_json(r) for r in rows]})
