"""`sandbox.files`: read, write, list and watch files in the sandbox.

Reads and writes go over envd's `/files` HTTP endpoint; everything else is a
`filesystem.Filesystem` RPC. Paths may be absolute or relative to the user's home.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal, Self, overload

import httpx

from corral.sdk._async._client import AsyncEnvdClient, AsyncRpcStream
from corral.sdk._envd import (
    DOWNLOAD_HEADERS,
    FILESYSTEM_OVERRIDES,
    KEEPALIVE_HEADERS,
    UPLOAD_CHUNK,
    supports_octet_stream,
    watch_message,
)
from corral.sdk._errors import (
    AlreadyExistsException,
    FileNotFoundException,
    InvalidArgumentException,
    SandboxException,
    TimeoutException,
    error_from_body,
)
from corral.sdk._handlers import AsyncOutputHandler, ainvoke
from corral.sdk._models import (
    EntryInfo,
    FilesystemEvent,
    WriteEntry,
    WriteInfo,
    entry_info_from_json,
    filesystem_event_from_json,
    write_info_from_json,
)

__all__ = ["AsyncFileStreamReader", "AsyncFilesystem", "AsyncWatchHandle"]

_FS = "filesystem.Filesystem/"


def _data_bytes(data: Any) -> bytes:
    """str, bytes or a file-like object (read whole) as bytes."""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if hasattr(data, "read"):
        content = data.read()
        return content.encode() if isinstance(content, str) else bytes(content)
    raise InvalidArgumentException(
        f"file data must be str, bytes or a file-like object, not {type(data).__name__}"
    )


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    """An upload body in UPLOAD_CHUNK pieces (see corral.sdk._envd.UPLOAD_CHUNK)."""
    for start in range(0, len(data), UPLOAD_CHUNK):
        yield data[start : start + UPLOAD_CHUNK]


async def _read_body(response: httpx.Response) -> bytearray:
    """The whole body, straight into one buffer sized by Content-Length when there is one:
    `.content` and a copy of it would be two more passes over a large file."""
    length = response.headers.get("content-length", "")
    if not length.isdigit() or response.headers.get("content-encoding", "identity") != "identity":
        content = bytearray()
        async for chunk in response.aiter_bytes():
            content += chunk
        return content
    content = bytearray(int(length))
    view = memoryview(content)
    filled = 0
    async for chunk in response.aiter_raw():
        end = filled + len(chunk)
        if end > len(content):  # more than announced: h11 would refuse this first
            raise httpx.RemoteProtocolError("the body is longer than its Content-Length")
        view[filled:end] = chunk
        filled = end
    if filled != len(content):
        raise httpx.RemoteProtocolError("the body ended before its Content-Length")
    return content


def _metadata_headers(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return {f"x-metadata-{key}": value for key, value in (metadata or {}).items()}


def _files_error(response: httpx.Response, body: bytes, context: str) -> SandboxException | None:
    if response.status_code < 300:
        return None
    return error_from_body(response.status_code, body, overrides=FILESYSTEM_OVERRIDES, context=context)


class AsyncFileStreamReader:
    """A file being downloaded: iterate it for byte chunks; `aclose()` (or `async with`) when done early."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """The file's bytes, chunk by chunk; releases the connection at the end."""
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        """Stop downloading and release the connection."""
        await self._response.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncWatchHandle:
    """A directory being watched. Iterate it for `FilesystemEvent`s, or `await wait()` to feed
    them to `on_event` until the watch ends; `stop()` ends it."""

    def __init__(
        self,
        stream: AsyncRpcStream,
        on_event: AsyncOutputHandler[FilesystemEvent] | None,
        on_exit: AsyncOutputHandler[Exception | None] | None,
    ) -> None:
        self._stream = stream
        self._on_event = on_event
        self._on_exit = on_exit
        self._ended = False

    async def _end(self, error: Exception | None) -> None:
        """Tell `on_exit` how the watch ended, once."""
        if not self._ended:
            self._ended = True
            await ainvoke(self._on_exit, error)

    async def __aiter__(self) -> AsyncIterator[FilesystemEvent]:
        """Events as they happen, until the watch times out or is stopped."""
        try:
            async for message in self._stream:
                raw = message.get("filesystem")
                if raw is None:
                    continue  # start and keepalive messages
                event = filesystem_event_from_json(raw)
                if event is None:
                    continue
                await ainvoke(self._on_event, event)
                yield event
        except TimeoutException as exc:
            if exc.code != "deadline_exceeded":
                await self._end(exc)
                raise
            # envd ended the watch at its `timeout`: the end that was asked for, not an error.
        except Exception as exc:
            await self._end(exc)
            raise
        await self._end(None)

    async def wait(self) -> None:
        """Deliver events to `on_event` until the watch ends: its `timeout` passes (a normal end),
        `stop()` is called, or an error is raised."""
        async for _event in self:
            pass

    async def stop(self) -> None:
        """Stop watching (`on_exit` gets None)."""
        await self._stream.aclose()
        await self._end(None)


class AsyncFilesystem:
    """Files and directories in the sandbox (`sandbox.files`)."""

    def __init__(self, envd: AsyncEnvdClient) -> None:
        self._envd = envd

    async def _rpc(
        self,
        method: str,
        message: Mapping[str, Any],
        user: str | None,
        request_timeout: float | None,
        context: str,
    ) -> dict[str, Any]:
        return await self._envd.unary(
            _FS + method,
            message,
            user=user,
            request_timeout=request_timeout,
            overrides=FILESYSTEM_OVERRIDES,
            context=context,
        )

    @overload
    async def read(
        self,
        path: str,
        format: Literal["text"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str: ...

    @overload
    async def read(
        self,
        path: str,
        format: Literal["bytes"],
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> bytearray: ...

    @overload
    async def read(
        self,
        path: str,
        format: Literal["stream"],
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> AsyncFileStreamReader: ...

    async def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str | bytearray | AsyncFileStreamReader:
        """A file's content as text (UTF-8), bytes, or a stream of chunks. `FileNotFoundException` if missing."""
        if format not in ("text", "bytes", "stream"):
            raise InvalidArgumentException(f"format must be 'text', 'bytes' or 'stream', got {format!r}")
        params = {"path": path, **({"username": user} if user else {})}
        context = f"read {path}"
        response = await self._envd.open(
            "GET", "/files", params=params, headers=DOWNLOAD_HEADERS, request_timeout=request_timeout, context=context
        )
        if response.status_code >= 300:
            body = await response.aread()
            await response.aclose()
            error = _files_error(response, body, context)
            if error is not None:
                raise error
        if format == "stream":
            return AsyncFileStreamReader(response)
        try:
            content = await _read_body(response)
        except httpx.HTTPError as exc:
            raise await self._envd.transport_failure(exc, context) from None
        finally:
            await response.aclose()
        if format == "bytes":
            return content
        return content.decode("utf-8", "replace")

    async def write(
        self,
        path: str,
        data: str | bytes | Any,
        user: str | None = None,
        request_timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> WriteInfo:
        """Write a file (created with its parent dirs, or overwritten). `data`: str, bytes or file-like.

        `metadata` is stored on the file (keys lowercased) and replaces what it had.
        """
        written = await self.write_files([WriteEntry(path=path, data=data)], user, request_timeout, metadata)
        if len(written) != 1:
            raise SandboxException(
                f"write {path}: the sandbox reported {len(written)} files written, expected 1",
                code="internal",
            )
        return written[0]

    async def write_files(
        self,
        files: Sequence[WriteEntry],
        user: str | None = None,
        request_timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[WriteInfo]:
        """Write several files in one request."""
        if not files:
            return []
        params: dict[str, str] = {"username": user} if user else {}
        if len(files) == 1:
            params["path"] = files[0]["path"]
        context = f"write {files[0]['path']}" if len(files) == 1 else f"write {len(files)} files"
        headers = _metadata_headers(metadata)
        if len(files) == 1 and supports_octet_stream(self._envd.handle.envd_version):
            # One file: its bytes as the body, streamed in pieces (no multipart framing to build).
            data = _data_bytes(files[0]["data"])
            headers.update({"content-type": "application/octet-stream", "content-length": str(len(data))})
            response = await self._envd.request(
                "POST",
                "/files",
                params=params,
                headers=headers,
                content=_pieces(data),
                request_timeout=request_timeout,
                context=context,
            )
        else:
            parts = [
                ("file", (entry["path"], _data_bytes(entry["data"]), "application/octet-stream"))
                for entry in files
            ]
            response = await self._envd.request(
                "POST",
                "/files",
                params=params,
                headers=headers,
                files=parts,
                request_timeout=request_timeout,
                context=context,
            )
        error = _files_error(response, response.content, context)
        if error is not None:
            raise error
        try:
            answer = json.loads(response.content)
        except ValueError:
            raise SandboxException(f"{context}: the sandbox's answer is not JSON", code="internal") from None
        return [write_info_from_json(item) for item in answer or []]

    async def list(
        self, path: str, depth: int = 1, user: str | None = None, request_timeout: float | None = None
    ) -> list[EntryInfo]:
        """Entries of a directory, `depth` levels deep (1 = direct children), in lexical order."""
        if depth < 1:
            raise InvalidArgumentException(f"depth must be at least 1, got {depth}")
        response = await self._rpc(
            "ListDir", {"path": path, "depth": depth}, user, request_timeout, f"list {path}"
        )
        entries = [entry_info_from_json(item) for item in response.get("entries") or []]
        return [entry for entry in entries if entry.type is not None]

    async def exists(self, path: str, user: str | None = None, request_timeout: float | None = None) -> bool:
        """Whether a file or directory exists at `path`."""
        try:
            await self._rpc("Stat", {"path": path}, user, request_timeout, f"stat {path}")
        except FileNotFoundException:
            return False
        return True

    async def get_info(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> EntryInfo:
        """Attributes of the entry at `path`."""
        response = await self._rpc("Stat", {"path": path}, user, request_timeout, f"stat {path}")
        return entry_info_from_json(response.get("entry") or {})

    async def make_dir(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> bool:
        """Create a directory and its parents; False when it already exists."""
        try:
            await self._rpc("MakeDir", {"path": path}, user, request_timeout, f"make directory {path}")
        except AlreadyExistsException:
            return False
        return True

    async def rename(
        self, old_path: str, new_path: str, user: str | None = None, request_timeout: float | None = None
    ) -> EntryInfo:
        """Move `old_path` to `new_path`; the moved entry."""
        response = await self._rpc(
            "Move",
            {"source": old_path, "destination": new_path},
            user,
            request_timeout,
            f"rename {old_path} to {new_path}",
        )
        return entry_info_from_json(response.get("entry") or {})

    async def remove(self, path: str, user: str | None = None, request_timeout: float | None = None) -> None:
        """Remove a file or a directory tree (a missing path is not an error)."""
        await self._rpc("Remove", {"path": path}, user, request_timeout, f"remove {path}")

    async def watch_dir(
        self,
        path: str,
        on_event: AsyncOutputHandler[FilesystemEvent] | None = None,
        on_exit: AsyncOutputHandler[Exception | None] | None = None,
        user: str | None = None,
        request_timeout: float | None = None,
        timeout: float | None = 60,
        recursive: bool = False,
        include_entry: bool = False,
    ) -> AsyncWatchHandle:
        """Watch a directory; returns once the watch is in place, so later changes are all seen.

        `timeout` (seconds, 0 = none) limits how long the watch lasts.
        """
        context = f"watch {path}"
        stream = await self._envd.stream(
            _FS + "WatchDir",
            watch_message(path, recursive, include_entry),
            user=user,
            timeout=timeout,
            request_timeout=request_timeout,
            headers=KEEPALIVE_HEADERS,
            overrides=FILESYSTEM_OVERRIDES,
            context=context,
        )
        try:
            first = await stream.receive()
            if first is None or "start" not in first:
                raise SandboxException(f"{context}: envd did not confirm the watch", code="internal")
        except BaseException:
            await stream.aclose()
            raise
        return AsyncWatchHandle(stream, on_event, on_exit)
