"""The proxy sends a stream's last message together with the end of stream that follows it (one
write, one client wake-up), and never loses or reorders a message."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from corral.node.envd.process import END_OF_STREAM_FOLLOWS
from corral.server.proxy import SandboxProxy

START = {"type": "http.response.start", "status": 200, "headers": []}


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _handle() -> Any:
    envd = types.SimpleNamespace(processes=types.SimpleNamespace(closed=False))
    return types.SimpleNamespace(sandbox_id="sbx", envd=envd)


async def _serve(app: Any) -> list[tuple[str, Any]]:
    """Run `app` behind the proxy; the log has the app's own steps and what reached the server."""
    log: list[tuple[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        log.append(("sent", message.get("body", message["type"])))

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def logged_app(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send, log)

    proxy = SandboxProxy(types.SimpleNamespace(), logged_app)
    scope = {"type": "http", "path": "/process.Process/Start", "headers": []}
    await proxy._envd(_handle(), scope, receive, send)
    await proxy.aclose()
    return log


async def test_the_last_message_waits_for_the_end_of_stream() -> None:
    async def app(scope: Any, receive: Any, send: Any, log: list) -> None:
        await send(START)
        await send(_body(b"start"))
        END_OF_STREAM_FOLLOWS.set(True)
        await send(_body(b"end"))
        log.append(("app", "end sent"))
        await asyncio.sleep(0)  # the Connect server finishes the handler in between
        await send(_body(b"eos", more=False))

    log = await _serve(app)
    assert log == [
        ("sent", "http.response.start"),
        ("sent", b"start"),
        ("app", "end sent"),
        ("sent", b"end"),
        ("sent", b"eos"),
    ]


async def test_a_held_message_is_sent_when_no_end_of_stream_follows() -> None:
    async def app(scope: Any, receive: Any, send: Any, log: list) -> None:
        await send(START)
        END_OF_STREAM_FOLLOWS.set(True)
        await send(_body(b"end"))

    assert await _serve(app) == [("sent", "http.response.start"), ("sent", b"end")]


async def test_without_the_flag_nothing_is_held() -> None:
    async def app(scope: Any, receive: Any, send: Any, log: list) -> None:
        await send(START)
        await send(_body(b"data"))
        log.append(("app", "data sent"))
        await send(_body(b"", more=False))

    log = await _serve(app)
    assert log == [("sent", "http.response.start"), ("sent", b"data"), ("app", "data sent"), ("sent", b"")]
