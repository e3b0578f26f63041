"""Signed download/upload URLs fetched without any sandbox header, GET /envs and GET /metrics, and
envd at http://localhost:49983 from inside a sandbox — all through the real server."""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from e2b import Sandbox

from tests.conftest import ServerProcess

pytestmark = pytest.mark.compat

EXPIRED = {"code": 401, "message": "signature is already expired"}


@pytest.fixture(scope="module")
def pair(e2b_env: ServerProcess) -> Iterator[tuple[Sandbox, Sandbox]]:
    a = Sandbox.create(timeout=300, secure=True, envs={"FROM_CREATE": "yes"})
    b = Sandbox.create(timeout=300, secure=True)
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


def _fetch(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_signed_download_urls_route_to_the_signing_sandbox(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    a.files.write("same-name.txt", "from a")
    b.files.write("same-name.txt", "from b")
    assert _fetch(a.download_url("same-name.txt", "user")) == (200, b"from a")
    assert _fetch(b.download_url("same-name.txt")) == (200, b"from b")
    assert _fetch(a.download_url("same-name.txt", "user", use_signature_expiration=120)) == (200, b"from a")
    status, body = _fetch(a.download_url("same-name.txt", "user", use_signature_expiration=-120))
    assert (status, json.loads(body)) == (401, EXPIRED)
    assert _fetch(a.download_url("/home/user/same-name.txt", "root")) == (200, b"from a")


def test_signed_upload_urls(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    r = httpx.post(
        a.upload_url("hello.txt", use_signature_expiration=10_000), files={"file": (None, "file content")}
    )
    assert (r.status_code, r.json()) == (
        200,
        [{"name": "hello.txt", "path": "/home/user/hello.txt", "type": "file"}],
    )
    assert a.files.read("hello.txt") == "file content"
    r = httpx.post(a.upload_url("hello.txt", user="root"), files={"file": ("x", b"as root")})
    assert (r.status_code, r.json()) == (
        200,
        [{"name": "hello.txt", "path": "/root/hello.txt", "type": "file"}],
    )
    r = httpx.post(a.upload_url("late.txt", use_signature_expiration=-100_000), files={"file": ("x", b"no")})
    assert (r.status_code, r.json()) == (401, EXPIRED)
    assert not a.files.exists("late.txt")


def test_forged_or_misused_signatures_get_401(pair: tuple[Sandbox, Sandbox], e2b_env: ServerProcess) -> None:
    a, _ = pair
    url = a.download_url("same-name.txt", "user")
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    forged = f"{e2b_env.url}/files?" + urlencode({**query, "signature": "v1_" + "A" * 43})
    status, body = _fetch(forged)
    assert (status, json.loads(body)) == (401, {"code": 401, "message": "invalid signature"})
    other_path = f"{e2b_env.url}/files?" + urlencode({**query, "path": "/etc/shadow"})
    assert _fetch(other_path)[0] == 401  # the signature covers the path
    status, _ = _fetch(url, data=b"x", headers={"Content-Type": "application/octet-stream"})
    assert status == 401  # a read signature does not allow a write
    assert a.files.read("same-name.txt") == "from a"


def _envd(sbx: Sandbox, server: ServerProcess, token: str | None = None) -> httpx.Client:
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    headers["X-Access-Token"] = token if token is not None else sbx._envd_access_token or ""
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def test_envs_and_metrics(pair: tuple[Sandbox, Sandbox], e2b_env: ServerProcess) -> None:
    a, _ = pair
    with _envd(a, e2b_env) as envd:
        envs = envd.get("/envs").json()
        assert envs["E2B_SANDBOX"] == "true" and envs["E2B_SANDBOX_ID"] == a.sandbox_id
        assert envs["FROM_CREATE"] == "yes"
        metrics = envd.get("/metrics").json()
        assert set(metrics) == {
            "ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "mem_cache",
            "mem_total_mib", "mem_used_mib", "disk_used", "disk_total",
        }  # fmt: skip
        assert metrics["cpu_count"] >= 1 and 0 <= metrics["cpu_used_pct"] <= 100
        assert 0 < metrics["mem_used"] <= metrics["mem_total"] and metrics["mem_total_mib"] > 0
        assert metrics["disk_total"] > 0
    with _envd(a, e2b_env, token="wrong") as envd:
        assert envd.get("/envs").status_code == 401
        assert envd.get("/metrics").status_code == 401


def _curl(sbx: Sandbox, *args: str) -> str:
    command = "curl -s -w '\\n%{http_code}' " + " ".join(shlex.quote(a) for a in args)
    return sbx.commands.run(command, timeout=30).stdout


def test_envd_on_localhost_inside_the_sandbox(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    token_a, token_b = a._envd_access_token or "", b._envd_access_token or ""
    assert _curl(a, "http://localhost:49983/health").endswith("\n204")
    body, status = _curl(a, "-H", f"X-Access-Token: {token_a}", "http://localhost:49983/envs").rsplit("\n", 1)
    assert status == "200" and json.loads(body)["E2B_SANDBOX_ID"] == a.sandbox_id
    assert _curl(a, "http://localhost:49983/envs").endswith("\n401")  # the token is still required
    a.files.write("local.txt", "via localhost")
    out = _curl(a, "-H", f"X-Access-Token: {token_a}", "http://localhost:49983/files?path=local.txt")
    assert out == "via localhost\n200"
    # headers naming another sandbox are ignored: it is always this sandbox (b's token fails here)
    for extra in (["-H", f"E2b-Sandbox-Id: {b.sandbox_id}"], ["-H", f"Host: 49983-{b.sandbox_id}.localhost"]):
        assert _curl(a, *extra, "-H", f"X-Access-Token: {token_b}", "http://localhost:49983/envs").endswith(
            "\n401"
        )
        body, status = _curl(
            a, *extra, "-H", f"X-Access-Token: {token_a}", "http://localhost:49983/envs"
        ).rsplit("\n", 1)
        assert json.loads(body)["E2B_SANDBOX_ID"] == a.sandbox_id
    # the server's control-plane API is not reachable that way
    assert _curl(a, "http://localhost:49983/v2/sandboxes").endswith("\n401")
