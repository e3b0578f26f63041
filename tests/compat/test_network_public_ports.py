"""A sandbox's public ports through the official SDK and plain HTTP / WebSocket clients: Host and
header routing, closed ports, streaming both ways, WebSocket upgrades, `allowPublicTraffic=false`
(traffic access token) and `maskRequestHost`. Only loopback is involved.

Inside the sandbox runs `SERVER` (stdlib only, the template has no web framework):
  GET  /            `host=<Host header>`
  POST /echo        streams the request body back (length and sha256 on the last line)
  GET  /slow        one chunk, a pause, another chunk (is the response streamed or buffered?)
  GET  /ws          WebSocket echo; picks the subprotocol `chat` when offered
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TEST_API_KEY

pytestmark = [pytest.mark.timeout(180)]

PORT = 8000

SERVER = r"""
import base64, hashlib, http.server, struct, sys, time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass

    def _send(self, body, status=200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first\n", b"second\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part)); self.wfile.flush()
                time.sleep(2)
            self.wfile.write(b"0\r\n\r\n")
            return
        self._send(f"host={self.headers.get('Host')}".encode())

    def do_POST(self):
        digest, total = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline(); break
                data = self.rfile.read(size); self.rfile.readline()
                digest.update(data); total += len(data)
        else:
            left = int(self.headers.get("Content-Length", 0))
            while left:
                data = self.rfile.read(min(left, 65536)); left -= len(data)
                digest.update(data); total += len(data)
        self._send(f"{total} {digest.hexdigest()}".encode())

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1(self.headers["Sec-WebSocket-Key"].encode() + GUID).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if "chat" in offered:
            self.send_header("Sec-WebSocket-Protocol", "chat")
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 15, head[1] & 127
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 128 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.frame(8, data[:2]); return
            if opcode == 9:
                self.frame(10, data); continue
            if opcode in (1, 2):
                if opcode == 1 and data == b"host?":
                    data = (self.headers.get("Host") or "").encode()
                self.frame(opcode, data)

    def frame(self, opcode, data):
        n = len(data)
        head = bytes([128 | opcode]) + (bytes([n]) if n < 126 else (bytes([126]) + struct.pack("!H", n) if n < 65536 else bytes([127]) + struct.pack("!Q", n)))
        self.wfile.write(head + data); self.wfile.flush()

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

Server(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


def start_server(sbx, port: int = PORT) -> None:
    sbx.files.write("/tmp/srv.py", SERVER)
    sbx.commands.run(f"python3 /tmp/srv.py {port}", background=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = sbx.commands.run(
            f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/ || true"
        ).stdout
        if out.strip() == "200":
            return
        time.sleep(0.2)
    raise AssertionError("the sandbox's server did not start")


def by_header(sandbox_id: str, port: int = PORT, **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **extra}


@pytest.fixture(scope="module")
def served(e2b_env) -> Iterator[object]:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=120)
    try:
        start_server(sbx)
        yield sbx
    finally:
        sbx.kill()


def test_host_and_header_routing(e2b_env, served) -> None:
    url, sid = e2b_env.url, served.sandbox_id
    # Host `{port}-{id}.{domain}` (the test server's domain is the default, `localhost`)
    r = httpx.get(f"{url}/", headers={"Host": f"{PORT}-{sid}.localhost"})
    assert r.status_code == 200 and r.text == f"host={PORT}-{sid}.localhost"
    # headers on any Host
    r = httpx.get(f"{url}/", headers=by_header(sid))
    assert r.status_code == 200 and r.text.startswith("host=127.0.0.1:")
    assert served.get_host(PORT) == f"{PORT}-{sid}.localhost"  # what clients are told to use


def test_closed_port_and_unknown_sandbox(e2b_env, served) -> None:
    r = httpx.get(f"{e2b_env.url}/", headers=by_header(served.sandbox_id, 8001))
    assert r.status_code == 502 and r.json()["message"] == "The sandbox is running but port is not open"
    r = httpx.get(f"{e2b_env.url}/", headers=by_header("nosuchsandbox1", 8001))
    assert r.status_code == 502 and r.json()["message"] == "The sandbox was not found"


def test_streams_both_ways(e2b_env, served) -> None:
    payload = b"0123456789abcdef" * (1 << 16)  # 1 MiB, sent as a chunked stream of unknown length

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = httpx.post(f"{e2b_env.url}/echo", headers=by_header(served.sandbox_id), content=chunks(), timeout=30)
    assert r.status_code == 200 and r.text == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    with httpx.stream("GET", f"{e2b_env.url}/slow", headers=by_header(served.sandbox_id), timeout=30) as r:
        t0 = time.monotonic()
        lines = r.iter_lines()
        assert next(lines) == "first"
        first_at = time.monotonic() - t0
        assert next(lines) == "second"
    assert first_at < 1.5  # the first chunk came before the server finished: streamed, not buffered


def test_websocket_upgrade(e2b_env, served) -> None:
    from websockets.sync.client import connect

    ws_url = e2b_env.url.replace("http://", "ws://") + "/ws"
    with connect(
        ws_url, additional_headers=by_header(served.sandbox_id), subprotocols=["chat"], open_timeout=10
    ) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        blob = bytes(range(256)) * 1000
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
    with pytest.raises(Exception, match="502"):
        connect(ws_url, additional_headers=by_header(served.sandbox_id, 8001), open_timeout=10)


def test_traffic_access_token(e2b_env) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=60, network={"allow_public_traffic": False})
    try:
        token = sbx.traffic_access_token
        assert token and sbx.get_info().network == {"allow_public_traffic": False}
        start_server(sbx)  # envd (commands, files) needs no traffic token
        url, sid = e2b_env.url, sbx.sandbox_id
        missing = httpx.get(f"{url}/", headers=by_header(sid))
        assert missing.status_code == 403 and missing.json()["message"] == "missing traffic access token"
        wrong = httpx.get(f"{url}/", headers=by_header(sid, **{"e2b-traffic-access-token": "x" + token}))
        assert wrong.status_code == 403 and wrong.json()["message"] == "invalid traffic access token"
        ok = httpx.get(f"{url}/", headers=by_header(sid, **{"E2B-Traffic-Access-Token": token}))
        assert ok.status_code == 200
        # envd's own port is not subject to it
        assert httpx.get(f"{url}/health", headers=by_header(sid, 49983)).status_code in (200, 204)
        # nor can a WebSocket slip past it
        from websockets.sync.client import connect

        with pytest.raises(Exception, match="403"):
            connect(
                url.replace("http://", "ws://") + "/ws", additional_headers=by_header(sid), open_timeout=10
            )
        # connect() hands out the same token
        assert Sandbox.connect(sid).traffic_access_token == token
        # a token needs secure sandboxes
        with pytest.raises(Exception, match="requires secure"):
            Sandbox.create(timeout=30, secure=False, network={"allow_public_traffic": False})
    finally:
        sbx.kill()


def test_mask_request_host(e2b_env) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=60, network={"mask_request_host": "custom.example:${PORT}"})
    try:
        start_server(sbx)
        r = httpx.get(f"{e2b_env.url}/", headers={"Host": f"{PORT}-{sbx.sandbox_id}.localhost"})
        assert r.status_code == 200 and r.text == f"host=custom.example:{PORT}"
        assert sbx.get_info().network == {
            "allow_public_traffic": True,
            "mask_request_host": "custom.example:${PORT}",
        }
        from websockets.sync.client import connect

        ws_url = e2b_env.url.replace("http://", "ws://") + "/ws"
        with connect(ws_url, additional_headers=by_header(sbx.sandbox_id), open_timeout=10) as ws:
            ws.send("host?")
            assert ws.recv(timeout=10) == f"custom.example:{PORT}"
    finally:
        sbx.kill()


def test_api_reports_the_token_only_when_asked_for(e2b_env) -> None:
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": TEST_API_KEY}, timeout=30) as api:
        created = api.post("/sandboxes", json={"templateID": "base", "timeout": 30, "secure": True}).json()
        try:
            assert created["trafficAccessToken"] is None
            assert "network" not in api.get(f"/sandboxes/{created['sandboxID']}").json()
        finally:
            api.delete(f"/sandboxes/{created['sandboxID']}")
