"""A small Connect-protocol client over JSON, as envd speaks it. No I/O: it builds requests and
reads responses; the async and sync clients move the bytes.

Unary: `POST /<package.Service>/<Method>`, `content-type: application/json`, the JSON message as
the body; the answer is 200 + a JSON message, or non-200 + `{"code": "<connect code>", "message"}`.

Server-streaming: `content-type: application/connect+json`, the body is one *envelope*
(flags byte, big-endian uint32 length, JSON); the answer is 200 and a sequence of envelopes, the
last with flag 0x02 (end of stream) carrying `{}` or `{"error": {"code", "message"}}`.

Messages are protobuf-JSON dicts: lowerCamelCase keys, bytes as base64, int64 as strings,
enums by name (e2b-protocol.md §1.5). Errors become SDK exceptions through `_errors`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from typing import Any, Final

from corral.sdk._errors import SandboxException, code_for_status, error_from_body, exception_for

__all__ = [
    "FLAG_COMPRESSED",
    "FLAG_END_STREAM",
    "MAX_MESSAGE_BYTES",
    "STREAM_CONTENT_TYPE",
    "UNARY_CONTENT_TYPE",
    "EnvelopeReader",
    "RpcCall",
    "encode_envelope",
    "parse_stream_frame",
    "parse_unary_response",
    "stream_call",
    "stream_response_error",
    "unary_call",
]

UNARY_CONTENT_TYPE: Final = "application/json"
STREAM_CONTENT_TYPE: Final = "application/connect+json"
FLAG_COMPRESSED: Final = 0x01
FLAG_END_STREAM: Final = 0x02
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
_HEADER = struct.Struct(">BI")

Overrides = Mapping[str, type[SandboxException]]


@dataclasses.dataclass(frozen=True, slots=True)
class RpcCall:
    """One RPC as an HTTP request: POST `path` with `headers` and `body`."""

    procedure: str
    """`package.Service/Method`, e.g. `process.Process/Start`."""
    headers: dict[str, str]
    body: bytes
    streaming: bool

    @property
    def path(self) -> str:
        return "/" + self.procedure


def _timeout_headers(timeout: float | None) -> dict[str, str]:
    if not timeout:
        return {}
    return {"connect-timeout-ms": str(max(1, int(timeout * 1000)))}


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def unary_call(
    procedure: str,
    message: Mapping[str, Any],
    *,
    timeout: float | None,
    headers: Mapping[str, str] | None = None,
) -> RpcCall:
    """A unary call. `timeout` (seconds) travels as `connect-timeout-ms`; None/0 sends none."""
    return RpcCall(
        procedure=procedure,
        headers={
            "content-type": UNARY_CONTENT_TYPE,
            "connect-protocol-version": "1",
            "accept-encoding": "identity",
            **_timeout_headers(timeout),
            **(headers or {}),
        },
        body=_encode(message),
        streaming=False,
    )


def stream_call(
    procedure: str,
    message: Mapping[str, Any],
    *,
    timeout: float | None,
    headers: Mapping[str, str] | None = None,
) -> RpcCall:
    """A server-streaming call: the request message goes in one envelope."""
    return RpcCall(
        procedure=procedure,
        headers={
            "content-type": STREAM_CONTENT_TYPE,
            "connect-protocol-version": "1",
            "connect-accept-encoding": "identity",
            "connect-content-encoding": "identity",
            **_timeout_headers(timeout),
            **(headers or {}),
        },
        body=encode_envelope(_encode(message)),
        streaming=True,
    )


def encode_envelope(payload: bytes, flags: int = 0) -> bytes:
    """`flags | uint32 BE length | payload`."""
    return _HEADER.pack(flags, len(payload)) + payload


class EnvelopeReader:
    """Splits a byte stream into `(flags, payload)` envelopes, whatever the chunking."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_message_bytes

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return every envelope now complete."""
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        while len(self._buffer) >= _HEADER.size:
            flags, length = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise SandboxException(
                    f"envd sent a {length}-byte message, over the {self._max}-byte limit",
                    code="resource_exhausted",
                )
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((flags, bytes(self._buffer[_HEADER.size : end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete envelope still buffered."""
        return len(self._buffer)


def _is_json(content_type: str, expected: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == expected


def parse_unary_response(
    status: int, content_type: str, body: bytes, *, overrides: Overrides | None = None, context: str = ""
) -> dict[str, Any]:
    """The response message, or raise the mapped exception."""
    if status != 200:
        raise error_from_body(status, body, overrides=overrides, context=context)
    if not _is_json(content_type, UNARY_CONTENT_TYPE):
        raise SandboxException(
            f"{context or 'envd'}: unexpected content-type {content_type!r}", code="internal"
        )
    try:
        message = json.loads(body) if body else {}
    except ValueError:
        raise SandboxException(f"{context or 'envd'}: the response is not JSON", code="internal") from None
    if not isinstance(message, dict):
        raise SandboxException(f"{context or 'envd'}: the response is not a JSON object", code="internal")
    return message


def stream_response_error(
    status: int, content_type: str, body: bytes, *, overrides: Overrides | None = None, context: str = ""
) -> SandboxException | None:
    """The error a streaming response's head announces, or None when the stream is good.

    Connect sends errors that happen before the first message as a plain non-200 JSON answer
    (or a proxy sends one of its own: 502 when the sandbox is gone).
    """
    if status != 200:
        return error_from_body(status, body, overrides=overrides, context=context)
    if not _is_json(content_type, STREAM_CONTENT_TYPE):
        return SandboxException(
            f"{context or 'envd'}: unexpected content-type {content_type!r}", code="internal"
        )
    return None


def parse_stream_frame(
    flags: int, payload: bytes, *, overrides: Overrides | None = None, context: str = ""
) -> dict[str, Any] | None:
    """A message of the stream, None for a clean end of stream; raise for an end with an error."""
    if flags & FLAG_COMPRESSED:
        raise SandboxException(
            f"{context or 'envd'}: got a compressed message without asking", code="internal"
        )
    try:
        data = json.loads(payload) if payload else {}
    except ValueError:
        raise SandboxException(
            f"{context or 'envd'}: a stream message is not JSON", code="internal"
        ) from None
    if not isinstance(data, dict):
        raise SandboxException(f"{context or 'envd'}: a stream message is not a JSON object", code="internal")
    if not flags & FLAG_END_STREAM:
        return data
    error = data.get("error")
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        if not isinstance(code, str):
            code = code_for_status(code) if isinstance(code, int) else "unknown"
        text = f"{context}: {message}" if context else message
        raise exception_for(code, text, overrides=overrides)
    return None
