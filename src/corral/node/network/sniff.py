"""The name a client connects to, read from the first bytes it sends: the SNI of a TLS ClientHello or
the Host header of an HTTP/1 request. Pure parsers for the inspecting egress proxy; no I/O.

`sniff_hostname(data)` returns `(complete, hostname)`: `complete=False` means more bytes may still
change the answer (read more, up to the caller's limit and deadline); once complete, `hostname` is
the normalised name, or None when the bytes carry none (not TLS or HTTP, no SNI, malformed).
"""

from __future__ import annotations

import re

from corral.node.network.policy import normalize_hostname

__all__ = ["MAX_SNIFF_BYTES", "host_header_name", "sniff_hostname"]

MAX_SNIFF_BYTES = 64 * 1024  # a ClientHello is at most one handshake message of this order
_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SNI_EXTENSION = 0
_HOST_NAME = 0
_REQUEST_LINE = re.compile(rb"^[A-Z][A-Z-]{0,19} \S+ HTTP/\d")
_METHOD_PREFIX = re.compile(rb"^[A-Z][A-Z-]{0,19}( |$)")


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _client_hello_sni(body: bytes) -> str | None:
    r = _Reader(body)
    r.take(2 + 32)  # client_version, random
    r.take(r.u8())  # session_id
    r.take(r.u16())  # cipher_suites
    r.take(r.u8())  # compression_methods
    if r.left == 0:
        return None  # no extensions at all
    extensions = _Reader(r.take(r.u16()))
    while extensions.left >= 4:
        kind, data = extensions.u16(), extensions.take(extensions.u16())
        if kind != _SNI_EXTENSION:
            continue
        names = _Reader(data)
        names = _Reader(names.take(names.u16()))
        while names.left >= 3:
            name_type, name = names.u8(), names.take(names.u16())
            if name_type == _HOST_NAME:
                try:
                    return normalize_hostname(name.decode("ascii"))
                except UnicodeDecodeError:
                    return None
        return None
    return None


def _tls_sni(data: bytes) -> tuple[bool, str | None]:
    """The ClientHello may span several TLS records: their payloads are joined first."""
    handshake = b""
    pos = 0
    while True:
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                return True, None
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if needed > MAX_SNIFF_BYTES:
                return True, None
            if len(handshake) >= needed:
                try:
                    return True, _client_hello_sni(handshake[4:needed])
                except _Malformed:
                    return True, None
        if len(data) < pos + 5:
            return False, None
        if data[pos] != _TLS_HANDSHAKE:
            return True, None  # the handshake message ended early: malformed
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        record = data[pos + 5 : pos + 5 + length]
        handshake += record
        if len(record) < length:
            if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
                continue  # the message is whole although its record is not
            return False, None
        pos += 5 + length


def host_header_name(value: bytes) -> str | None:
    """The name of a Host header value: port and IPv6 brackets removed, normalised."""
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        return None  # an IPv6 literal: no name
    return normalize_hostname(text.rsplit(":", 1)[0] if ":" in text else text)


def _http_host(data: bytes) -> tuple[bool, str | None]:
    end = data.find(b"\r\n\r\n")
    head = data[:end] if end >= 0 else data
    lines = head.split(b"\r\n")
    complete_lines = lines if end >= 0 else lines[:-1]
    if not complete_lines:
        return (False, None) if _METHOD_PREFIX.match(data) else (True, None)
    if not _REQUEST_LINE.match(complete_lines[0]):
        return True, None
    for line in complete_lines[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            return True, host_header_name(value)
    return (True, None) if end >= 0 else (False, None)


def sniff_hostname(data: bytes) -> tuple[bool, str | None]:
    if not data:
        return False, None
    if data[0] == _TLS_HANDSHAKE:
        return _tls_sni(data)
    if 0x41 <= data[0] <= 0x5A:  # an HTTP method starts with an upper-case letter
        return _http_host(data)
    return True, None
