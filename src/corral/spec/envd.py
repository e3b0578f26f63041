"""Short names for the generated envd code, plus the JSON codec the envd wire needs.

The generated modules (``corral.spec._generated.{process,filesystem}.*``) come from our own
``spec/envd/**.proto`` via ``scripts/generate.sh``; this module only re-exports them so callers
write ``from corral.spec.envd import process_pb, process_connect``.

Why codecs here: connectrpc's stock server codecs differ from envd (connect-go) in two ways that
clients can see. Its JSON codec *rejects* unknown fields, where envd (``protojson`` with
``DiscardUnknown``) and the e2b SDK's own client codec ignore them; and a body that does not
decode escapes as a plain exception (HTTP 500 ``unknown`` plus a server traceback) where envd
answers ``invalid_argument``. A server therefore passes ``codecs=envd_codecs()`` to the generated
``*ASGIApplication``, so a newer SDK sending a field we don't know yet still works and garbage is
the client's error.
"""

from __future__ import annotations

from typing import TypeVar

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.errors import ConnectError
from protobuf import Message

from corral.spec._generated.filesystem import filesystem_connect, filesystem_pb
from corral.spec._generated.process import process_connect, process_pb

__all__ = [
    "BinaryCodec",
    "LenientJSONCodec",
    "envd_codecs",
    "filesystem_connect",
    "filesystem_pb",
    "process_connect",
    "process_pb",
]

_M = TypeVar("_M", bound=Message)


class LenientJSONCodec:
    """Protobuf JSON codec (name ``json``) that ignores unknown fields when decoding.

    Encoding is protobuf-py's canonical ProtoJSON: lowerCamelCase names, defaults omitted
    except fields with presence, int64 as strings, enums by name, Timestamp as RFC 3339.
    Decoding accepts camelCase or snake_case names, enum names or numbers and int64 as
    string or number.
    """

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        return message.to_json().encode("utf-8")

    def decode(self, data: bytes | bytearray, message_class: type[_M]) -> _M:
        try:
            return message_class.from_json(data, ignore_unknown_fields=True)
        except Exception as e:
            raise _undecodable(message_class, e) from e


class BinaryCodec:
    """Binary protobuf codec (name ``proto``) whose decode errors are ``invalid_argument``."""

    def name(self) -> str:
        return "proto"

    def encode(self, message: Message) -> bytes:
        return message.to_binary()

    def decode(self, data: bytes | bytearray, message_class: type[_M]) -> _M:
        try:
            return message_class.from_binary(data)
        except Exception as e:
            raise _undecodable(message_class, e) from e


def _undecodable(message_class: type[Message], error: Exception) -> ConnectError:
    return ConnectError(Code.INVALID_ARGUMENT, f"cannot decode {message_class.__name__}: {error}")


def envd_codecs() -> list[Codec]:
    """The codecs an envd server offers: binary protobuf and lenient JSON (what the SDKs send)."""
    return [BinaryCodec(), LenientJSONCodec()]
