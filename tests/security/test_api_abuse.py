"""Hostile clients of the control plane and of envd (gVisor classes Lateral / Exfil / HostDoS,
attacker = Remote, or a sandbox's owner going after another sandbox).

- the REST API refuses requests without an API key or with a wrong one, on every route;
- envd refuses a request without the sandbox's access token, or with another sandbox's token;
- signed file URLs refuse forged, cross-sandbox and expired signatures;
- oversized, malformed and deeply nested JSON, and oversized or lying Connect envelopes get an
  error answer; the server stays up, does not balloon, and serves the next normal request.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from tests.conftest import TEST_API_KEY, ServerProcess
from tests.security.conftest import SandboxFactory

pytestmark = [pytest.mark.integration, pytest.mark.compat]

WRONG_KEY = "e2b_" + "0" * 40


def _envd_headers(sbx: Sandbox, token: str | None) -> dict[str, str]:
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "Content-Type": "application/json",
    }
    if token is not None:
        headers["X-Access-Token"] = token
    return headers


def _token(sbx: Sandbox) -> str:
    token = sbx._envd_access_token
    assert token, "sandboxes are created secure: they must have an envd access token"
    return token


def _rss_bytes(server: ServerProcess) -> int:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _still_serving(server: ServerProcess, sbx: Sandbox | None = None) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    with server.api() as api:
        assert api.get("/v2/sandboxes").status_code == 200
    if sbx is not None:
        assert sbx.commands.run("echo ok", timeout=30).stdout == "ok\n"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/sandboxes"),
        ("POST", "/sandboxes"),
        ("GET", "/sandboxes/{id}"),
        ("DELETE", "/sandboxes/{id}"),
        ("POST", "/sandboxes/{id}/timeout"),
        ("POST", "/sandboxes/{id}/connect"),
        ("POST", "/sandboxes/{id}/pause"),
        ("POST", "/sandboxes/{id}/snapshots"),
        ("GET", "/sandboxes/{id}/metrics"),
        ("GET", "/v2/sandboxes/{id}/logs"),
        ("PUT", "/sandboxes/{id}/network"),
        ("GET", "/snapshots"),
        ("GET", "/templates"),
        ("POST", "/v3/templates"),
        ("DELETE", "/templates/base"),
    ],
)
def test_api_needs_the_right_key(
    corral_server: ServerProcess, make_sandbox: SandboxFactory, method: str, path: str
) -> None:
    """Lateral/Exfil (Remote): no key → 401, a wrong key → 401, and nothing happens to the sandbox."""
    sbx = make_sandbox()
    url = corral_server.url + path.format(id=sbx.sandbox_id)
    body = {"templateID": "base", "timeout": 30} if path == "/sandboxes" else {"timeout": 30}
    for headers in (
        {},
        {"X-API-Key": WRONG_KEY},
        {"X-API-Key": ""},
        {"Authorization": f"Bearer {TEST_API_KEY}"},
    ):
        answer = httpx.request(
            method, url, headers=headers, json=body if method == "POST" else None, timeout=10
        )
        assert answer.status_code == 401, (headers, answer.status_code, answer.text)
    assert sbx.is_running()


def test_envd_needs_the_sandboxs_own_token(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """Lateral: envd of sandbox A answers only with A's access token — not without one, not with
    B's — for process and filesystem RPCs and for /files."""
    a, b = make_sandbox(), make_sandbox()
    a.files.write("/home/user/secret.txt", "a-secret")
    calls = [
        ("POST", "/process.Process/List", b"{}"),
        ("POST", "/filesystem.Filesystem/ListDir", json.dumps({"path": "/home/user"}).encode()),
        ("POST", "/filesystem.Filesystem/Stat", json.dumps({"path": "/home/user/secret.txt"}).encode()),
        ("GET", "/files?path=/home/user/secret.txt&username=user", b""),
    ]
    for method, path, body in calls:
        for token in (None, _token(b), "", _token(a)[:-1] + ("0" if _token(a)[-1] != "0" else "1")):
            answer = httpx.request(
                method, corral_server.url + path, headers=_envd_headers(a, token), content=body, timeout=10
            )
            assert answer.status_code == 401, (path, token, answer.status_code, answer.text)
            assert "a-secret" not in answer.text
        own = httpx.request(
            method, corral_server.url + path, headers=_envd_headers(a, _token(a)), content=body, timeout=10
        )
        assert own.status_code == 200, (path, own.status_code, own.text)


def test_signed_urls_refuse_forged_foreign_and_expired_signatures(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """Lateral/Exfil (Remote with a URL): a download URL works as signed; with a flipped signature,
    another sandbox's signature for the same path, a changed path, a changed user, a widened
    expiry or an expired signature it is refused and leaks nothing."""
    a, b = make_sandbox(), make_sandbox()
    a.files.write("/home/user/secret.txt", "a-secret")
    b.files.write("/home/user/secret.txt", "b-secret")
    good = a.download_url("/home/user/secret.txt", user="user", use_signature_expiration=120)
    assert httpx.get(good, timeout=10).text == "a-secret"
    parsed = httpx.URL(good)
    params = dict(parsed.params)
    signature = params["signature"]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    foreign = dict(
        httpx.URL(b.download_url("/home/user/secret.txt", user="user", use_signature_expiration=120)).params
    )
    # B's valid URL, sent to A's envd by header: it must not open A's file.
    to_a = httpx.get(
        f"{corral_server.url}/files", params=foreign, timeout=10,
        headers={"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "49983"},
    )  # fmt: skip
    assert to_a.status_code == 401 and "a-secret" not in to_a.text, (to_a.status_code, to_a.text)
    variants = [
        {**params, "signature": flipped},
        {**params, "signature": "v1_"},
        {**params, "path": "/home/user/../user/secret.txt"},
        {**params, "path": "/etc/shadow"},
        {**params, "username": "root"},
        {**params, "signature_expiration": str(int(params["signature_expiration"]) + 3600)},
    ]
    for query in variants:
        answer = httpx.get(str(parsed.copy_with(params=query)), timeout=10)
        assert answer.status_code in (401, 403), (query, answer.status_code, answer.text)
        assert "secret" not in answer.text.replace("secret.txt", "")
    expired = a.download_url("/home/user/secret.txt", user="user", use_signature_expiration=1)
    time.sleep(2.5)
    answer = httpx.get(expired, timeout=10)
    assert answer.status_code == 401 and "a-secret" not in answer.text


def test_oversized_malformed_and_nested_json(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """HostDoS (Remote with a key): JSON bodies that are huge (declared or streamed), not JSON, not
    UTF-8, nested 100 000 deep, or of the wrong shape get 4xx answers; the server keeps serving."""
    sbx = make_sandbox()
    rss_before = _rss_bytes(corral_server)
    headers = {"X-API-Key": TEST_API_KEY, "Content-Type": "application/json"}
    big = b'{"templateID": "base", "metadata": {"k": "' + b"x" * (64 << 20) + b'"}}'

    def chunks():
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    bodies: list[object] = [
        big,
        chunks(),  # no content-length: streamed
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"templateID": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'"just a string"',
        b'{"templateID": 42, "timeout": "soon"}',
        b'{"templateID": "base", "timeout": 1e400}',
    ]
    with httpx.Client(base_url=corral_server.url, timeout=60) as client:
        for body in bodies:
            answer = client.post("/sandboxes", headers=headers, content=body)
            assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:200])
        timeout_answer = client.post(
            f"/sandboxes/{sbx.sandbox_id}/timeout", headers=headers, content=b"[" * 50_000
        )
        assert 400 <= timeout_answer.status_code < 500
    _still_serving(corral_server, sbx)
    assert _rss_bytes(corral_server) < rss_before + (200 << 20)


def test_oversized_and_lying_connect_bodies(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """HostDoS (sandbox owner): envd RPCs with an 80 MB body, an envelope that claims 2 GiB and
    stops, garbage protobuf, and a truncated envelope get errors; envd and the server keep serving."""
    sbx = make_sandbox()
    rss_before = _rss_bytes(corral_server)
    base = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": _token(sbx)}
    with httpx.Client(base_url=corral_server.url, timeout=60) as client:
        huge = json.dumps({"path": "/tmp/" + "a" * (80 << 20)}).encode()
        answer = client.post(
            "/filesystem.Filesystem/Stat", headers={**base, "Content-Type": "application/json"}, content=huge
        )
        assert answer.status_code >= 400
        garbage = client.post(
            "/process.Process/List",
            headers={**base, "Content-Type": "application/proto"},
            content=b"\xff" * 64,
        )
        assert garbage.status_code >= 400
        streaming = {**base, "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
        truncated = client.post("/process.Process/Start", headers=streaming, content=b"\x00\x00\x00")
        assert truncated.status_code >= 400 or "error" in truncated.text
        not_json = client.post(
            "/process.Process/Start", headers=streaming, content=struct.pack(">BI", 0, 5) + b"{nope"
        )
        assert not_json.status_code >= 400 or "error" in not_json.text
    # An envelope that claims 2 GiB, sends a little and stalls: the server must not wait for or
    # reserve the rest; it answers (or drops us) and serves others meanwhile.
    host, port = "127.0.0.1", corral_server.port
    with socket.create_connection((host, port), timeout=10) as sock:
        head = (
            "POST /process.Process/Start HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"E2b-Sandbox-Id: {sbx.sandbox_id}\r\nE2b-Sandbox-Port: 49983\r\nX-Access-Token: {_token(sbx)}\r\n"
            "Content-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        envelope = struct.pack(">BI", 0, 0x7FFFFFFF) + b"{}"
        sock.sendall(head + f"{len(envelope):x}\r\n".encode() + envelope + b"\r\n")
        _still_serving(corral_server, sbx)
        sock.settimeout(15)
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            reply = b""
        assert (
            reply == b""
            or b" 200 " not in reply.split(b"\r\n", 1)[0]
            or b"error" in reply
            or b"resource_exhausted" in reply
        )
    _still_serving(corral_server, sbx)
    assert _rss_bytes(corral_server) < rss_before + (300 << 20)
