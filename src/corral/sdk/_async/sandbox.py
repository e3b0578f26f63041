"""`AsyncSandbox`: create, connect to, inspect and end sandboxes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Literal, Self, Unpack

import httpx

from corral.sdk._api import (
    ApiRequest,
    SandboxHandle,
    create_request,
    file_url,
    metrics_request,
    sandbox_path,
)
from corral.sdk._async._client import AsyncApiClient, AsyncEnvdClient, open_http
from corral.sdk._async.commands import AsyncCommands, AsyncPty
from corral.sdk._async.filesystem import AsyncFilesystem
from corral.sdk._async.git import AsyncGit
from corral.sdk._async.paginator import AsyncSandboxPaginator
from corral.sdk._config import ConnectionConfig, ConnectionOptions
from corral.sdk._dual import dual_method
from corral.sdk._errors import (
    AlreadyExistsException,
    SandboxException,
    SandboxNotFoundException,
    error_from_body,
)
from corral.sdk._models import (
    SandboxInfo,
    SandboxLifecycle,
    SandboxMetrics,
    SandboxNetworkOpts,
    SandboxQuery,
    sandbox_info_from_json,
    sandbox_metrics_from_json,
)

__all__ = ["AsyncSandbox"]

_NOT_FOUND = {"not_found": SandboxNotFoundException}


async def _call(
    config: ConnectionConfig,
    http: httpx.AsyncClient,
    request: ApiRequest,
    what: str,
    request_timeout: float | None = None,
) -> httpx.Response:
    """Send a control-plane request; raise for any error status except 404 and 409 (callers decide)."""
    response = await AsyncApiClient(config, http).send(request, what=what, request_timeout=request_timeout)
    if response.status_code >= 300 and response.status_code not in (404, 409):
        raise error_from_body(response.status_code, response.content, context=what)
    return response


def _not_found(response: httpx.Response, what: str) -> SandboxException:
    return error_from_body(response.status_code, response.content, overrides=_NOT_FOUND, context=what)


class AsyncSandbox:
    """A Corral sandbox: an isolated Linux machine for running untrusted code.

        sandbox = await AsyncSandbox.create()
        result = await sandbox.commands.run("echo hello")
        await sandbox.kill()

    `async with await AsyncSandbox.create() as sandbox:` kills it at the end of the block.
    """

    default_template = "base"
    """Template used when none is given."""
    default_timeout = 300
    """Seconds a new sandbox lives unless told otherwise."""

    def __init__(self, handle: SandboxHandle, config: ConnectionConfig, http: httpx.AsyncClient) -> None:
        """Use `AsyncSandbox.create()` or `AsyncSandbox.connect()` instead."""
        self._handle = handle
        self._config = config
        self._http = http
        self._envd = AsyncEnvdClient(config, handle, http)
        self._commands = AsyncCommands(self._envd)
        self._files = AsyncFilesystem(self._envd)
        self._pty = AsyncPty(self._envd, self._commands)
        self._git = AsyncGit(self._commands)

    # -- identity and modules ---------------------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        """The sandbox's id."""
        return self._handle.sandbox_id

    @property
    def envd_version(self) -> str:
        """Version of the envd protocol the sandbox speaks."""
        return self._handle.envd_version

    @property
    def sandbox_domain(self) -> str:
        """Domain of the sandbox's `{port}-{id}.{domain}` hosts."""
        return self._handle.domain or self._config.domain or self._config.api_host

    @property
    def traffic_access_token(self) -> str | None:
        """Token for sandbox ports when public traffic is off, else None."""
        return self._handle.traffic_access_token

    @property
    def connection_config(self) -> ConnectionConfig:
        """The connection settings this sandbox uses."""
        return self._config

    @property
    def envd_api_url(self) -> str:
        """Base URL of the sandbox's envd (requests add the sandbox headers)."""
        return self._envd.url

    @property
    def commands(self) -> AsyncCommands:
        """Run commands (`sandbox.commands.run("ls")`)."""
        return self._commands

    @property
    def files(self) -> AsyncFilesystem:
        """Read, write and watch files."""
        return self._files

    @property
    def pty(self) -> AsyncPty:
        """Interactive terminals."""
        return self._pty

    @property
    def git(self) -> AsyncGit:
        """Git operations (built on `commands`)."""
        return self._git

    # -- creating and connecting ------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        template: str = "base",
        timeout: int = 300,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        secure: bool = True,
        allow_internet_access: bool = True,
        network: SandboxNetworkOpts | None = None,
        lifecycle: SandboxLifecycle | None = None,
        volume_mounts: Mapping[str, str] | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> Self:
        """Start a new sandbox from `template` that lives `timeout` seconds (extend with `set_timeout`).

        `metadata` is kept for `list()` filters; `envs` are set for every command; `secure=False`
        lets envd run without an access token; `volume_mounts` maps a path to a volume name.
        Connection `options` (`api_url`, `api_key`, ...) override the environment.
        """
        config = ConnectionConfig.from_options(None, options)
        request = create_request(
            template=template,
            timeout=timeout,
            metadata=metadata,
            envs=envs,
            secure=secure,
            allow_internet_access=allow_internet_access,
            network=network,
            lifecycle=lifecycle,
            volume_mounts=volume_mounts,
        )
        http = open_http(transport)
        try:
            what = f"create a sandbox from template {template!r}"
            response = await _call(config, http, request, what)
            if response.status_code >= 300:
                raise error_from_body(response.status_code, response.content, context=what)
            return cls(SandboxHandle.from_json(response.json()), config, http)
        except BaseException:
            await http.aclose()
            raise

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        timeout: int = 300,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> Self:
        """Attach to a running sandbox (its timeout is extended to at least `timeout` s) or resume a paused one."""
        config = ConnectionConfig.from_options(None, options)
        http = open_http(transport)
        try:
            what = f"connect to sandbox {sandbox_id}"
            response = await _call(
                config,
                http,
                ApiRequest("POST", sandbox_path(sandbox_id, "/connect"), json={"timeout": timeout}),
                what,
            )
            if response.status_code >= 300:
                raise _not_found(response, what)
            return cls(SandboxHandle.from_json(response.json()), config, http)
        except BaseException:
            await http.aclose()
            raise

    # -- by id (on the class) or on this sandbox (on an instance) ----------------------------

    @classmethod
    async def _kill_by_id(
        cls,
        sandbox_id: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> bool:
        async with open_http(transport) as http:
            return await cls._kill_with(ConnectionConfig.from_options(None, options), http, sandbox_id, None)

    async def _kill(self, request_timeout: float | None = None) -> bool:
        """Kill the sandbox: its processes stop and its files are gone. False when it was already gone.

        On the class: `await AsyncSandbox.kill(sandbox_id, **options)`.
        """
        return await self._kill_with(self._config, self._http, self.sandbox_id, request_timeout)

    @staticmethod
    async def _kill_with(
        config: ConnectionConfig, http: httpx.AsyncClient, sandbox_id: str, request_timeout: float | None
    ) -> bool:
        what = f"kill sandbox {sandbox_id}"
        response = await _call(
            config, http, ApiRequest("DELETE", sandbox_path(sandbox_id)), what, request_timeout
        )
        if response.status_code == 404:
            return False
        if response.status_code >= 300:
            raise error_from_body(response.status_code, response.content, context=what)
        return True

    kill = dual_method(_kill_by_id, _kill)

    @classmethod
    async def _set_timeout_by_id(
        cls,
        sandbox_id: str,
        timeout: int,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        async with open_http(transport) as http:
            await cls._set_timeout_with(
                ConnectionConfig.from_options(None, options), http, sandbox_id, timeout, None
            )

    async def _set_timeout(self, timeout: int, request_timeout: float | None = None) -> None:
        """End the sandbox `timeout` seconds from now (may shorten its life; 0 ends it now).

        On the class: `await AsyncSandbox.set_timeout(sandbox_id, timeout, **options)`.
        """
        await self._set_timeout_with(self._config, self._http, self.sandbox_id, timeout, request_timeout)

    @staticmethod
    async def _set_timeout_with(
        config: ConnectionConfig,
        http: httpx.AsyncClient,
        sandbox_id: str,
        timeout: int,
        request_timeout: float | None,
    ) -> None:
        what = f"set the timeout of sandbox {sandbox_id}"
        request = ApiRequest("POST", sandbox_path(sandbox_id, "/timeout"), json={"timeout": int(timeout)})
        response = await _call(config, http, request, what, request_timeout)
        if response.status_code >= 300:
            raise _not_found(response, what)

    set_timeout = dual_method(_set_timeout_by_id, _set_timeout)

    @classmethod
    async def _get_info_by_id(
        cls,
        sandbox_id: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> SandboxInfo:
        async with open_http(transport) as http:
            return await cls._get_info_with(
                ConnectionConfig.from_options(None, options), http, sandbox_id, None
            )

    async def _get_info(self, request_timeout: float | None = None) -> SandboxInfo:
        """What the API knows about the sandbox (template, metadata, state, end time...).

        On the class: `await AsyncSandbox.get_info(sandbox_id, **options)`.
        """
        return await self._get_info_with(self._config, self._http, self.sandbox_id, request_timeout)

    @staticmethod
    async def _get_info_with(
        config: ConnectionConfig, http: httpx.AsyncClient, sandbox_id: str, request_timeout: float | None
    ) -> SandboxInfo:
        what = f"get sandbox {sandbox_id}"
        response = await _call(
            config, http, ApiRequest("GET", sandbox_path(sandbox_id)), what, request_timeout
        )
        if response.status_code >= 300:
            raise _not_found(response, what)
        return sandbox_info_from_json(response.json())

    get_info = dual_method(_get_info_by_id, _get_info)

    @classmethod
    async def _get_metrics_by_id(
        cls,
        sandbox_id: str,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> list[SandboxMetrics]:
        async with open_http(transport) as http:
            return await cls._get_metrics_with(
                ConnectionConfig.from_options(None, options), http, sandbox_id, start, end, None
            )

    async def _get_metrics(
        self,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        request_timeout: float | None = None,
    ) -> list[SandboxMetrics]:
        """Resource-usage samples between `start` and `end`. `NotSupportedException` if the server has none.

        On the class: `await AsyncSandbox.get_metrics(sandbox_id, start, end, **options)`.
        """
        return await self._get_metrics_with(
            self._config, self._http, self.sandbox_id, start, end, request_timeout
        )

    @staticmethod
    async def _get_metrics_with(
        config: ConnectionConfig,
        http: httpx.AsyncClient,
        sandbox_id: str,
        start: dt.datetime | None,
        end: dt.datetime | None,
        request_timeout: float | None,
    ) -> list[SandboxMetrics]:
        what = f"get metrics of sandbox {sandbox_id}"
        response = await _call(config, http, metrics_request(sandbox_id, start, end), what, request_timeout)
        if response.status_code >= 300:
            raise _not_found(response, what)
        return [sandbox_metrics_from_json(item) for item in response.json()]

    get_metrics = dual_method(_get_metrics_by_id, _get_metrics)

    @classmethod
    async def _pause_by_id(
        cls,
        sandbox_id: str,
        keep_memory: bool = True,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> bool:
        async with open_http(transport) as http:
            return await cls._pause_with(
                ConnectionConfig.from_options(None, options), http, sandbox_id, keep_memory, None
            )

    async def _pause(self, keep_memory: bool = True, request_timeout: float | None = None) -> bool:
        """Pause the sandbox (`connect()` resumes it); False when it was paused already.

        `NotSupportedException` when the server cannot pause sandboxes.
        On the class: `await AsyncSandbox.pause(sandbox_id, **options)`.
        """
        return await self._pause_with(self._config, self._http, self.sandbox_id, keep_memory, request_timeout)

    @staticmethod
    async def _pause_with(
        config: ConnectionConfig,
        http: httpx.AsyncClient,
        sandbox_id: str,
        keep_memory: bool,
        request_timeout: float | None,
    ) -> bool:
        what = f"pause sandbox {sandbox_id}"
        request = ApiRequest("POST", sandbox_path(sandbox_id, "/pause"), json={"memory": keep_memory})
        try:
            response = await _call(config, http, request, what, request_timeout)
            if response.status_code >= 300:
                raise _not_found(response, what)
        except AlreadyExistsException:
            return False
        return True

    pause = dual_method(_pause_by_id, _pause)

    # -- this sandbox -------------------------------------------------------------------------

    async def is_running(self, request_timeout: float | None = None) -> bool:
        """Whether envd answers: True when running, False when the sandbox is gone or paused."""
        status = await self._envd.health(request_timeout)
        if status is None:
            raise SandboxException(f"is_running: cannot reach {self._envd.url}", code="unavailable")
        if 200 <= status < 300:
            return True
        if status == 502:
            return False
        raise error_from_body(status, b"", context=f"health of sandbox {self.sandbox_id}")

    def get_host(self, port: int) -> str:
        """`{port}-{sandbox_id}.{domain}[:proxy port]`: the Host that reaches `port` inside the sandbox."""
        host = f"{port}-{self.sandbox_id}.{self.sandbox_domain}"
        proxy_port = httpx.URL(self._config.sandbox_url).port
        return f"{host}:{proxy_port}" if proxy_port else host

    def download_url(
        self, path: str, user: str | None = None, use_signature_expiration: int | None = None
    ) -> str:
        """A URL that downloads `path` with a plain GET, signed with the sandbox's token when secured."""
        return file_url(
            self._envd.url,
            path,
            "read",
            user=user,
            access_token=self._handle.envd_access_token,
            expiration_in_seconds=use_signature_expiration,
        )

    def upload_url(
        self, path: str, user: str | None = None, use_signature_expiration: int | None = None
    ) -> str:
        """A URL that uploads to `path` with a multipart POST, signed with the sandbox's token when secured."""
        return file_url(
            self._envd.url,
            path,
            "write",
            user=user,
            access_token=self._handle.envd_access_token,
            expiration_in_seconds=use_signature_expiration,
        )

    async def aclose(self) -> None:
        """Release this client's connections (the sandbox keeps running)."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.kill()
        finally:
            await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sandbox_id}>"

    # Last, so that `list` in the annotations above is the builtin.
    @classmethod
    def list(
        cls,
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        order: Literal["asc", "desc"] | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> AsyncSandboxPaginator:
        """Running and paused sandboxes, filtered by `query`, `limit` per page (no request until you ask)."""
        config = ConnectionConfig.from_options(None, options)
        return AsyncSandboxPaginator(config, query, limit, next_token, order, transport)
