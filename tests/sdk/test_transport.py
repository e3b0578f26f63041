"""The SDK end to end over the transport seam (`transport=httpx.MockTransport(...)`): what goes
on the wire and how answers and failures come back, without a server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from corral import (
    AsyncSandbox,
    FileNotFoundException,
    NotSupportedException,
    Sandbox,
    SandboxException,
    TimeoutException,
)
from corral.sdk._connect import FLAG_END_STREAM, encode_envelope

OPTIONS = {"api_url": "http://corral.test", "api_key": "key-1", "sandbox_url": "http://envd.test"}
SANDBOX = {
    "sandboxID": "abc123",
    "templateID": "base",
    "clientID": "c",
    "envdVersion": "0.6.13",
    "envdAccessToken": "tok",
    "domain": "corral.test",
}


def _frames(*messages: dict, error: dict | None = None) -> list[bytes]:
    """A streaming answer, one envelope per chunk, split mid-envelope to test reassembly."""
    data = b"".join(encode_envelope(json.dumps(m).encode()) for m in messages)
    data += encode_envelope(json.dumps({"error": error} if error else {}).encode(), FLAG_END_STREAM)
    return [data[i : i + 7] for i in range(0, len(data), 7)]


class Recorder:
    """A MockTransport handler that answers by path and remembers every request."""

    def __init__(self, routes: dict) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes[(request.method, request.url.path)]
        return answer(request) if callable(answer) else answer


def _stream(chunks: list[bytes], asynchronous: bool = False) -> httpx.Response:
    """A 200 streaming answer whose body arrives in `chunks` (an async body for AsyncClient)."""

    def body() -> Iterator[bytes]:
        yield from chunks

    async def abody() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    content = abody() if asynchronous else body()
    return httpx.Response(200, headers={"content-type": "application/connect+json"}, content=content)


def test_create_and_run_over_the_wire() -> None:
    start = _frames(
        {"event": {"start": {"pid": 7}}},
        {"event": {"data": {"stdout": "aGkK"}}},
        {"event": {"keepalive": {}}},
        {"event": {"end": {"exited": True, "status": "exit status 0"}}},
    )
    recorder = Recorder(
        {
            ("POST", "/sandboxes"): httpx.Response(201, json=SANDBOX),
            ("POST", "/process.Process/Start"): lambda request: _stream(start),
        }
    )
    sandbox = Sandbox.create(metadata={"m": "1"}, transport=httpx.MockTransport(recorder), **OPTIONS)
    result = sandbox.commands.run("echo hi", user="root", timeout=5)
    assert (result.stdout, result.exit_code) == ("hi\n", 0)
    create, run = recorder.requests
    assert create.headers["x-api-key"] == "key-1" and json.loads(create.content)["metadata"] == {"m": "1"}
    assert str(run.url) == "http://envd.test/process.Process/Start"
    assert run.headers["e2b-sandbox-id"] == "abc123" and run.headers["x-access-token"] == "tok"
    assert run.headers["authorization"] == "Basic cm9vdDo=" and run.headers["connect-timeout-ms"] == "5000"
    assert "x-api-key" not in run.headers
    assert sandbox.get_host(8080) == "8080-abc123.corral.test"


async def test_async_errors_from_envd_and_the_api() -> None:
    recorder = Recorder(
        {
            ("POST", "/sandboxes/abc123/connect"): httpx.Response(200, json=SANDBOX),
            ("POST", "/filesystem.Filesystem/Stat"): httpx.Response(
                404, json={"code": "not_found", "message": "path not found"}
            ),
            ("POST", "/process.Process/Start"): lambda request: _stream(
                _frames(
                    {"event": {"start": {"pid": 1}}},
                    error={"code": "deadline_exceeded", "message": "limit reached"},
                ),
                asynchronous=True,
            ),
            ("POST", "/sandboxes/abc123/pause"): httpx.Response(
                501, json={"code": 501, "message": "pausing is not supported yet"}
            ),
        }
    )
    sandbox = await AsyncSandbox.connect("abc123", transport=httpx.MockTransport(recorder), **OPTIONS)
    with pytest.raises(FileNotFoundException, match="stat /nope: path not found"):
        await sandbox.files.get_info("/nope")
    assert await sandbox.files.exists("/nope") is False
    with pytest.raises(TimeoutException, match="limit reached"):
        await sandbox.commands.run("sleep 100", timeout=1)
    with pytest.raises(NotSupportedException, match="not supported"):
        await sandbox.pause()
    await sandbox.aclose()


def test_a_dropped_stream_of_a_dead_sandbox_is_a_timeout() -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            yield _frames({"event": {"start": {"pid": 1}}})[0]
            raise httpx.ReadError("connection reset")

        return httpx.Response(200, headers={"content-type": "application/connect+json"}, content=body())

    recorder = Recorder(
        {
            ("POST", "/sandboxes"): httpx.Response(201, json=SANDBOX),
            ("POST", "/process.Process/Start"): cut,
            ("GET", "/health"): httpx.Response(
                502, json={"code": 502, "message": "The sandbox was not found"}
            ),
        }
    )
    sandbox = Sandbox.create(transport=httpx.MockTransport(recorder), **OPTIONS)
    with pytest.raises(TimeoutException, match="killed or reached its end of life"):
        sandbox.commands.run("sleep 100")
    assert sandbox.is_running() is False


def test_a_stream_without_its_end_is_an_error() -> None:
    data = encode_envelope(json.dumps({"event": {"start": {"pid": 1}}}).encode())
    recorder = Recorder(
        {
            ("POST", "/sandboxes"): httpx.Response(201, json=SANDBOX),
            ("POST", "/process.Process/Start"): lambda request: _stream([data]),
        }
    )
    sandbox = Sandbox.create(transport=httpx.MockTransport(recorder), **OPTIONS)
    with pytest.raises(SandboxException, match="without an end"):
        sandbox.commands.run("true")
