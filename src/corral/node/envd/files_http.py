"""envd's `/files` HTTP endpoints: download (GET) and upload (POST) inside a sandbox.

Both read the sandbox from the ASGI scope (`sandbox_from_scope`) and follow e2b-protocol.md §3.4:

* Auth, in envd's order: a present `X-Access-Token` header must match the sandbox's token;
  otherwise a `signature` query parameter (`sign(...)`, v1 scheme) must match; then an expired
  `signature_expiration` is refused. A sandbox without a token checks nothing.
* `username` (default `user`) must exist in the sandbox (401 otherwise); relative paths and `~`
  resolve under that user's home.
* GET streams the file from a confined fd (single `Range`, gzip when accepted); POST streams
  `multipart/form-data` parts or one `application/octet-stream` body (optionally gzip-encoded)
  into files created with mode 0644 and owned by the user, parents 0755, and answers
  `[{"name","path","type":"file"[, "metadata"]}]`. Metadata comes from `X-Metadata-<key>` headers.

Errors are JSON `{"code": <status>, "message": ...}`; a full disk answers 507.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import mimetypes
import os
import posixpath
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from email.utils import formatdate
from typing import Any, TypeVar
from urllib.parse import quote

import anyio.to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from corral.core.errors import CorralError, InvalidArgument, Unauthenticated
from corral.node.envd.confined import ConfinedRoot, DiskFull, error_from_oserror
from corral.node.envd.context import EnvdSandbox, sandbox_from_scope
from corral.node.envd.entry import resolve_user_path, validate_metadata, write_metadata
from corral.node.envd.users import lookup_user
from corral.node.runtime.base import UserIds

__all__ = [
    "READ",
    "WRITE",
    "content_disposition",
    "get_file",
    "negotiate_encoding",
    "parse_range",
    "post_files",
    "sign",
    "signature_error",
]

READ, WRITE = "read", "write"
METADATA_HEADER_PREFIX = "x-metadata-"
# Read size for downloads: each piece costs a thread hop and a send through the ASGI stack, so
# 1 MiB pieces (not 64 KiB) took a 100 MB download from ~160 to ~400 MB/s here.
CHUNK = 1024 * 1024
FLUSH = 1024 * 1024  # uploads hop to a worker thread once this much body is buffered (as CHUNK)
_T = TypeVar("_T")


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _status_of(exc: CorralError) -> int:
    return 507 if isinstance(exc, DiskFull) else exc.http_status


# -- signing ---------------------------------------------------------------------------------------


def sign(path: str, operation: str, username: str, token: str, expiration: int | None = None) -> str:
    """The v1 signature of a `/files` URL (what the E2B SDK's `download_url`/`upload_url` send)."""
    raw = f"{path}:{operation}:{username}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode("utf-8")).digest()
    return "v1_" + base64.b64encode(digest).decode("ascii").rstrip("=")


def signature_error(
    token: str | None,
    *,
    header_token: str | None,
    signature: str | None,
    expiration: int | None,
    path: str,
    username: str | None,
    operation: str,
    now: float,
) -> str | None:
    """envd's `validateSigning`: None when allowed, else the 401 message. Pure."""
    if token is None:
        return None
    if header_token:
        if hmac.compare_digest(header_token.encode(), token.encode()):
            return None
        return "access token present in header but does not match"
    if signature is None:
        return "missing signature query parameter"
    expected = sign(path, operation, username or "", token, expiration)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
        return "invalid signature"
    if expiration is not None and expiration < int(now):
        return "signature is already expired"
    return None


def _authorize(request: Request, sandbox: EnvdSandbox, operation: str) -> None:
    params = request.query_params
    raw_expiration = params.get("signature_expiration")
    expiration: int | None = None
    if raw_expiration is not None:
        if not re.fullmatch(r"-?[0-9]{1,19}", raw_expiration):
            raise _HttpError(400, f"invalid signature_expiration: '{raw_expiration}'")
        expiration = int(raw_expiration)
    message = signature_error(
        sandbox.access_token,
        header_token=request.headers.get("x-access-token"),
        signature=params.get("signature"),
        expiration=expiration,
        path=params.get("path", ""),
        username=params.get("username"),
        operation=operation,
        now=time.time(),
    )
    if message is not None:
        raise _HttpError(401, message)


async def _acting_user(request: Request, sandbox: EnvdSandbox) -> UserIds:
    username = request.query_params.get("username") or sandbox.default_user
    try:
        return await anyio.to_thread.run_sync(lookup_user, sandbox.root, username)
    except Unauthenticated:
        raise _HttpError(401, f"error looking up user '{username}': user: unknown user {username}") from None


def _target(path: str | None, user: UserIds) -> str:
    try:
        return resolve_user_path(path or "", user.home)
    except InvalidArgument as exc:
        raise _HttpError(400, f"error resolving path: {exc.message}") from None


async def _in_thread(func: Callable[..., _T], *args: Any) -> _T:
    try:
        return await anyio.to_thread.run_sync(func, *args)
    except CorralError as exc:
        raise _HttpError(_status_of(exc), exc.message) from None


# -- GET /files ------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def content_disposition(filename: str) -> str:
    """`inline; filename=...` as Go's `mime.FormatMediaType` writes it (RFC 2231 for non-ASCII)."""
    if _TOKEN.fullmatch(filename):
        return f"inline; filename={filename}"
    if all(" " <= ch <= "~" for ch in filename):
        escaped = filename.replace("\\", "\\\\").replace('"', '\\"')
        return f'inline; filename="{escaped}"'
    encoded = quote(filename.encode("utf-8", "surrogateescape"), safe="!#$&+-.^_`|~")
    return f"inline; filename*=utf-8''{encoded}"


def negotiate_encoding(accept_encoding: str | None) -> str | None:
    """envd's Accept-Encoding choice: "gzip" or "identity", None when nothing acceptable (406)."""
    if not accept_encoding:
        return "identity"
    choices: list[tuple[str, float]] = []
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            param = param.strip()
            if param.lower().startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    pass
        choices.append((name.strip().lower(), quality))
    choices.sort(key=lambda choice: -choice[1])  # stable: header order breaks ties
    identity_rejected = any(name == "identity" and q == 0 for name, q in choices)
    for name, quality in choices:
        if quality == 0:
            continue
        if name == "identity":
            return "identity"
        if name == "*":
            return "gzip" if identity_rejected else "identity"
        if name == "gzip":
            return "gzip"
    return None if identity_rejected else "identity"


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range → `(start, length)`; None means serve the whole file (several
    ranges). Raises ValueError when the range is malformed or unsatisfiable (416)."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or not spec:
        raise ValueError("invalid range")
    if "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        raise ValueError("invalid range")
    if first == "":
        if last == "" or int(last) == 0 or size == 0:
            raise ValueError("unsatisfiable range")
        length = min(int(last), size)
        return size - length, length
    start = int(first)
    if start >= size:
        raise ValueError("unsatisfiable range")
    end = size - 1 if last == "" else min(int(last), size - 1)
    if end < start:
        raise ValueError("invalid range")
    return start, end - start + 1


class _FileStream(StreamingResponse):
    """Streams a range of an open fd; owns the fd and closes it whatever happens to the request."""

    def __init__(self, fd: int, offset: int, length: int, gzip: bool, **kwargs: Any) -> None:
        self._fd = fd
        super().__init__(self._chunks(offset, length, gzip), **kwargs)

    async def _chunks(self, offset: int, length: int, gzip: bool) -> AsyncIterator[bytes]:
        # Level 1: envd serves local links, where level 6 made gzip downloads CPU-bound (~25 MB/s).
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31) if gzip else None
        remaining = length
        while remaining > 0:
            data = await anyio.to_thread.run_sync(os.pread, self._fd, min(CHUNK, remaining), offset)
            if not data:
                break  # the file shrank meanwhile
            offset += len(data)
            remaining -= len(data)
            if compressor is not None:
                data = compressor.compress(data)
            if data:
                yield data
        if compressor is not None:
            yield compressor.flush()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self._fd)


def _open_for_read(root: ConfinedRoot, path: str) -> tuple[int, os.stat_result]:
    fd = root.open_regular(path)
    return fd, os.fstat(fd)


async def get_file(request: Request) -> Response:
    """GET /files?path=&username=&signature=&signature_expiration= — download one file."""
    sandbox = sandbox_from_scope(request.scope)
    try:
        _authorize(request, sandbox, READ)
        user = await _acting_user(request, sandbox)
        path = _target(request.query_params.get("path"), user)
        encoding = negotiate_encoding(request.headers.get("accept-encoding"))
        if encoding is None:
            raise _HttpError(406, "no acceptable encoding found, supported: [gzip]")
        fd, st = await _in_thread(_open_for_read, sandbox.root, path)
    except _HttpError as exc:
        return _error_response(exc.status, exc.message)

    name = posixpath.basename(path)
    headers = {
        "Content-Disposition": content_disposition(name),
        "Last-Modified": formatdate(st.st_mtime, usegmt=True),
        "Accept-Ranges": "bytes",
        "Vary": "Accept-Encoding",
    }
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    size = st.st_size
    range_header = request.headers.get("range")
    conditional = any(request.headers.get(h) for h in ("if-modified-since", "if-none-match", "if-range"))
    if range_header is not None or conditional:
        encoding = "identity"  # envd keeps Range/conditional requests uncompressed
    offset, length, status = 0, size, 200
    if range_header is not None:
        try:
            chosen = parse_range(range_header, size)
        except ValueError as exc:
            os.close(fd)
            response = _error_response(416, str(exc))
            response.headers["Content-Range"] = f"bytes */{size}"
            return response
        if chosen is not None:
            offset, length = chosen
            status = 206
            headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{size}"
    if encoding == "gzip":
        headers["Content-Encoding"] = "gzip"
    else:
        headers["Content-Length"] = str(length)
    return _FileStream(
        fd, offset, length, encoding == "gzip", status_code=status, headers=headers, media_type=media_type
    )


# -- POST /files -----------------------------------------------------------------------------------


class _FileSink:
    """One uploaded file being written: created/truncated and chowned first, data streamed in,
    metadata replaced at the end. Its methods do blocking I/O (call them from a worker thread)."""

    def __init__(
        self,
        root: ConfinedRoot,
        path: str,
        user: UserIds,
        metadata: Mapping[str, str],
        sync: Callable[[], None],
    ) -> None:
        self.path = path
        self._metadata = metadata
        root.makedirs(posixpath.dirname(path), 0o755, uid=user.uid, gid=user.gid)
        # Recursive watchers must watch the parent before the file appears in it (a directory
        # made just now by us or by MakeDir), or its CREATE/CHMOD/WRITE would go unseen.
        sync()
        self._fd, _ = root.open_for_write(path, uid=user.uid, gid=user.gid)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise error_from_oserror(exc, self.path) from None

    def finish(self) -> None:
        try:
            write_metadata(self._fd, self._metadata)
        except OSError as exc:
            raise error_from_oserror(exc, self.path) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _result(path: str, metadata: Mapping[str, str]) -> dict[str, Any]:
    item: dict[str, Any] = {"name": posixpath.basename(path), "path": path, "type": "file"}
    if metadata:
        item["metadata"] = dict(metadata)
    return item


class _MultipartUpload:
    """Streaming multipart/form-data → files. Every `file` part becomes one file, named by
    `?path=` when given, else by the part's filename (kept verbatim, relative → user's home)."""

    def __init__(
        self,
        root: ConfinedRoot,
        user: UserIds,
        path: str | None,
        metadata: Mapping[str, str],
        boundary: bytes,
        sync: Callable[[], None],
    ) -> None:
        self._root, self._user, self._path, self._metadata = root, user, path, metadata
        self._sync = sync
        self.results: list[dict[str, Any]] = []
        self._sink: _FileSink | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    def feed(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise _HttpError(400, f"error reading form: {exc}") from None

    def finish(self) -> None:
        self._parser.finalize()
        if self._sink is not None:
            raise _HttpError(400, "error reading form: unexpected end of multipart body")

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") != b"file":
            return  # other form fields are ignored
        name = self._path
        if name is None:
            filename = options.get(b"filename")
            if not filename:
                raise _HttpError(400, "error resolving path: the file part has no filename")
            name = filename.decode("utf-8", "surrogateescape")
        target = _target(name, self._user)
        if any(item["path"] == target for item in self.results):
            message = (
                f"you cannot upload multiple files to the same path '{target}' in one upload request, "
                "only the first specified file was uploaded"
            )
            others = [item["path"] for item in self.results if item["path"] != target]
            if len(others) > 1:
                message += f", also the following files were uploaded: {', '.join(others)}"
            raise _HttpError(400, message)
        self._sink = _FileSink(self._root, target, self._user, self._metadata, self._sync)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            self._sink.write(data[start:end])

    def _on_part_end(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.finish()
            self.results.append(_result(sink.path, self._metadata))


class _Gunzip:
    """Incremental gunzip of a possibly multi-member stream, at most FLUSH bytes per output."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(31)

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while True:
                out = self._inflate.decompress(data, FLUSH)
                if out:
                    yield out
                if self._inflate.eof:
                    data = self._inflate.unused_data
                    if not data:
                        return
                    self._inflate = zlib.decompressobj(31)  # the next gzip member
                    continue
                data = self._inflate.unconsumed_tail
                if not data and len(out) < FLUSH:
                    return
        except zlib.error as exc:
            raise _HttpError(400, f"error decompressing request body: {exc}") from None

    def finish(self) -> None:
        if not self._inflate.eof:
            raise _HttpError(400, "error decompressing request body: unexpected EOF")


async def _decoded_body(request: Request, gzip: bool) -> AsyncIterator[bytes]:
    """The request body (gunzipped if asked) in pieces of about FLUSH bytes."""
    gunzip = _Gunzip() if gzip else None
    buffer = bytearray()
    async for chunk in request.stream():
        for data in gunzip.feed(chunk) if gunzip is not None else (chunk,):
            buffer += data
            if len(buffer) >= FLUSH:
                yield bytes(buffer)
                buffer.clear()
    if gunzip is not None:
        gunzip.finish()
    if buffer:
        yield bytes(buffer)


def _metadata_from(request: Request) -> dict[str, str]:
    metadata = {
        key[len(METADATA_HEADER_PREFIX) :]: value
        for key, value in request.headers.items()
        if key.startswith(METADATA_HEADER_PREFIX)
    }
    try:
        validate_metadata(metadata)
    except InvalidArgument as exc:
        raise _HttpError(400, exc.message) from None
    return metadata


async def post_files(request: Request) -> Response:
    """POST /files?path=&username=&signature=&signature_expiration= — upload files."""
    sandbox = sandbox_from_scope(request.scope)
    try:
        _authorize(request, sandbox, WRITE)
        user = await _acting_user(request, sandbox)
        metadata = _metadata_from(request)
        encoding = request.headers.get("content-encoding", "").split(";")[0].strip().lower()
        if encoding not in ("", "identity", "gzip"):
            raise _HttpError(400, f"unsupported Content-Encoding: {encoding}, supported: [gzip]")
        media_type, options = parse_options_header(request.headers.get("content-type", ""))
        body = _decoded_body(request, encoding == "gzip")
        path = request.query_params.get("path")
        if media_type == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise _HttpError(400, "error parsing multipart form: no boundary")
            results = await _upload_multipart(sandbox, user, path, metadata, boundary, body)
        elif media_type == b"application/octet-stream":
            if not path:
                raise _HttpError(
                    400, "the path query parameter is required for application/octet-stream uploads"
                )
            results = [await _upload_octet_stream(sandbox, user, _target(path, user), metadata, body)]
        else:
            raise _HttpError(
                400, "unsupported Content-Type: use multipart/form-data or application/octet-stream"
            )
    except _HttpError as exc:
        return _error_response(exc.status, exc.message)
    except ClientDisconnect:
        return Response(status_code=499)
    return JSONResponse(results)


async def _upload_octet_stream(
    sandbox: EnvdSandbox, user: UserIds, path: str, metadata: Mapping[str, str], body: AsyncIterator[bytes]
) -> dict[str, Any]:
    sink = await _in_thread(_FileSink, sandbox.root, path, user, metadata, sandbox.watchers.sync)
    try:
        async for data in body:
            await _in_thread(sink.write, data)
        await _in_thread(sink.finish)
    finally:
        sink.close()
    return _result(path, metadata)


async def _upload_multipart(
    sandbox: EnvdSandbox,
    user: UserIds,
    path: str | None,
    metadata: Mapping[str, str],
    boundary: bytes,
    body: AsyncIterator[bytes],
) -> list[dict[str, Any]]:
    upload = _MultipartUpload(sandbox.root, user, path, metadata, boundary, sandbox.watchers.sync)
    try:
        async for data in body:
            await _in_thread(upload.feed, data)
        await _in_thread(upload.finish)
    finally:
        upload.abort()
    return upload.results
