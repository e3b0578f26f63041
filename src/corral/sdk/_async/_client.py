"""The network edge of the SDK: REST calls, envd RPCs (unary and server-streaming) and envd
HTTP, all over one `httpx.AsyncClient` (the transport seam: pass `transport=` to use
`httpx.MockTransport` or an ASGI app in tests).

Everything that is not moving bytes (request building, error mapping, framing) lives in the
neutral modules `_api`, `_connect`, `_http` and `_errors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from corral.sdk._api import ENVD_PORT, ApiRequest, SandboxHandle, api_headers, basic_user_header
from corral.sdk._async._transport import open_transport
from corral.sdk._config import ConnectionConfig
from corral.sdk._connect import (
    EnvelopeReader,
    RpcCall,
    parse_stream_frame,
    parse_unary_response,
    stream_call,
    stream_response_error,
    unary_call,
)
from corral.sdk._errors import SandboxException, TimeoutException
from corral.sdk._http import (
    is_dropped_connection,
    shared_ssl_context,
    stream_timeout_for,
    timeout_for,
    transport_error,
)

__all__ = ["AsyncApiClient", "AsyncEnvdClient", "AsyncRpcStream", "open_http"]

Overrides = Mapping[str, type[SandboxException]]

_MAX_TRAILING = 64 * 1024  # bytes read after an end-of-stream message, at most, to reuse the connection
_GONE = "the sandbox was killed or reached its end of life while the request was in flight"


def open_http(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """A new HTTP client; the caller owns it (and closes it with `aclose`)."""
    if transport is not None:  # a given transport brings its own TLS
        return httpx.AsyncClient(transport=transport, follow_redirects=False, timeout=None)
    tls = shared_ssl_context()
    return httpx.AsyncClient(transport=open_transport(tls), follow_redirects=False, timeout=None, verify=tls)


class AsyncApiClient:
    """Control-plane REST calls for one `ConnectionConfig`."""

    def __init__(self, config: ConnectionConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self._http = http

    async def send(
        self, request: ApiRequest, *, what: str, request_timeout: float | None = None
    ) -> httpx.Response:
        """Send one request and read the whole answer; transport failures become SDK exceptions."""
        url = self.config.api_url + request.path
        try:
            return await self._http.request(
                request.method,
                url,
                params=list(request.params),
                json=request.json,
                headers=api_headers(self.config),
                timeout=timeout_for(self.config.timeout(request_timeout)),
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, what, self.config.api_url) from None


class AsyncRpcStream:
    """An open server-streaming RPC: iterate its messages; `aclose()` drops it early.

    Dropping a stream never stops what it watches (a process keeps running).
    """

    def __init__(
        self, envd: AsyncEnvdClient, response: httpx.Response, overrides: Overrides | None, context: str
    ) -> None:
        self._envd = envd
        self._response = response
        self._overrides = overrides
        self._context = context
        self._reader = EnvelopeReader()
        self._chunks = response.aiter_raw()
        self._pending: list[tuple[int, bytes]] = []
        self.closed = False

    def __aiter__(self) -> AsyncRpcStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        message = await self.receive()
        if message is None:
            raise StopAsyncIteration
        return message

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None at a clean end of stream. Raises the stream's error."""
        while not self._pending:
            if self.closed:
                return None
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                await self.aclose()
                if self._reader.pending:
                    raise SandboxException(
                        f"{self._context}: the stream ended in the middle of a message", code="unavailable"
                    ) from None
                raise SandboxException(
                    f"{self._context}: the stream ended without an end-of-stream message", code="unavailable"
                ) from None
            except httpx.HTTPError as exc:
                await self.aclose()
                raise await self._envd.transport_failure(exc, self._context) from None
            self._pending.extend(self._reader.feed(chunk))
        flags, payload = self._pending.pop(0)
        try:
            message = parse_stream_frame(flags, payload, overrides=self._overrides, context=self._context)
        except SandboxException:
            await self.aclose()
            raise
        if message is None:
            await self._finish()
        return message

    async def _finish(self) -> None:
        """After the end-of-stream message only the body's end is left: read it, so that the
        connection goes back to the pool instead of being closed (a new TCP connection per
        command otherwise). Anything more than a little trailing data is not waited for."""
        extra = 0
        try:
            async for chunk in self._chunks:
                extra += len(chunk)
                if extra > _MAX_TRAILING:
                    break
        except httpx.HTTPError:
            pass  # the stream itself was complete
        await self.aclose()

    async def aclose(self) -> None:
        """Stop receiving and release the connection."""
        if not self.closed:
            self.closed = True
            await self._response.aclose()


class AsyncEnvdClient:
    """Calls to one sandbox's envd: Connect RPCs and its HTTP endpoints (`/files`, `/health`)."""

    def __init__(self, config: ConnectionConfig, handle: SandboxHandle, http: httpx.AsyncClient) -> None:
        self.config = config
        self.handle = handle
        self._http = http
        self.url = config.sandbox_url

    def headers(self, user: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The sandbox headers (§1.3): which sandbox, which port, its token; the acting user."""
        headers = {"e2b-sandbox-id": self.handle.sandbox_id, "e2b-sandbox-port": str(ENVD_PORT)}
        if self.handle.envd_access_token:
            headers["x-access-token"] = self.handle.envd_access_token
        headers.update(basic_user_header(user))
        headers.update(extra or {})
        return headers

    async def health(self, request_timeout: float | None = None) -> int | None:
        """Status of `GET /health` (204 running, 502 gone), None when unreachable."""
        try:
            response = await self._http.get(
                self.url + "/health",
                headers=self.headers(),
                timeout=timeout_for(self.config.timeout(request_timeout)),
            )
        except httpx.HTTPError:
            return None
        return response.status_code

    async def transport_failure(self, exc: httpx.HTTPError, context: str) -> SandboxException:
        """A dropped connection means the sandbox died when `/health` says so (502)."""
        if is_dropped_connection(exc) and await self.health(5.0) == 502:
            return TimeoutException(f"{context}: {_GONE}", code="unavailable")
        return transport_error(exc, context, self.url)

    async def unary(
        self,
        procedure: str,
        message: Mapping[str, Any],
        *,
        user: str | None = None,
        request_timeout: float | None = None,
        overrides: Overrides | None = None,
        context: str = "",
    ) -> dict[str, Any]:
        """Call a unary RPC; the response message, or the mapped exception."""
        timeout = self.config.timeout(request_timeout)
        call = unary_call(procedure, message, timeout=timeout, headers=self.headers(user))
        try:
            response = await self._http.post(
                self.url + call.path, content=call.body, headers=call.headers, timeout=timeout_for(timeout)
            )
        except httpx.HTTPError as exc:
            raise await self.transport_failure(exc, context or procedure) from None
        return parse_unary_response(
            response.status_code,
            response.headers.get("content-type", ""),
            response.content,
            overrides=overrides,
            context=context,
        )

    async def stream(
        self,
        procedure: str,
        message: Mapping[str, Any],
        *,
        user: str | None = None,
        timeout: float | None = None,
        request_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        overrides: Overrides | None = None,
        context: str = "",
    ) -> AsyncRpcStream:
        """Open a server-streaming RPC. `timeout` bounds the whole stream (envd enforces it too)."""
        call: RpcCall = stream_call(procedure, message, timeout=timeout, headers=self.headers(user, headers))
        request = self._http.build_request(
            "POST",
            self.url + call.path,
            content=call.body,
            headers=call.headers,
            timeout=stream_timeout_for(self.config.timeout(request_timeout), timeout),
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise await self.transport_failure(exc, context or procedure) from None
        error = None
        if response.status_code != 200 or "connect+json" not in response.headers.get("content-type", ""):
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            error = stream_response_error(
                response.status_code,
                response.headers.get("content-type", ""),
                body,
                overrides=overrides,
                context=context,
            )
            await response.aclose()
        if error is not None:
            raise error
        return AsyncRpcStream(self, response, overrides, context or procedure)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: Any = None,
        files: Any = None,
        request_timeout: float | None = None,
        context: str = "",
    ) -> httpx.Response:
        """An envd HTTP request (e.g. `/files`), answer read whole. Raises only for transport failures."""
        try:
            return await self._http.request(
                method,
                self.url + path,
                params=params,
                headers=self.headers(None, headers),
                content=content,
                files=files,
                timeout=timeout_for(self.config.timeout(request_timeout)),
            )
        except httpx.HTTPError as exc:
            raise await self.transport_failure(exc, context or path) from None

    async def open(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float | None = None,
        context: str = "",
    ) -> httpx.Response:
        """An envd HTTP request whose body the caller streams (and closes)."""
        request = self._http.build_request(
            method,
            self.url + path,
            params=params,
            headers=self.headers(None, headers),
            timeout=timeout_for(self.config.timeout(request_timeout)),
        )
        try:
            return await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise await self.transport_failure(exc, context or path) from None
