"""HTTPS on the server's one port (`corral server --tls-cert F --tls-key F`): with a wildcard
certificate for `*.{domain}` and names that resolve to the server, `https://{port}-{id}.{domain}`
reaches a sandbox's port, which is what `sandbox.get_host(port)` tells clients to use.

A second server of this module's own (home `<test home>-tls`, bridge `<test bridge>s`, subnet moved
up by 48 in its second octet; CORRAL_TEST_TLS_HOME / _BRIDGE / _SUBNET override them) serves a
certificate for `*.corral.test` from a CA made here. Nothing touches the machine's DNS: the client
connects to 127.0.0.1 and sends the name in SNI and Host. The official SDK runs in a subprocess,
because it loads its trusted certificates (system ones, `SSL_CERT_FILE`) once per process.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    TEST_API_KEY,
    TEST_BRIDGE,
    TEST_HOME,
    TEST_SUBNET,
    ServerProcess,
    extra_server,
    shifted_subnet,
)
from tests.network_fixtures import make_ca, make_cert

pytestmark = [pytest.mark.timeout(240)]

DOMAIN = "corral.test"
TLS_HOME = Path(os.environ.get("CORRAL_TEST_TLS_HOME", f"{TEST_HOME}-tls"))
TLS_BRIDGE = os.environ.get("CORRAL_TEST_TLS_BRIDGE", TEST_BRIDGE[:14] + "s")
TLS_SUBNET = os.environ.get("CORRAL_TEST_TLS_SUBNET", shifted_subnet(TEST_SUBNET, 48))

# Run with the official SDK against the TLS server: create a sandbox, serve a port in it.
SDK_SCRIPT = r"""
import json, time
from e2b import Sandbox
sbx = Sandbox.create(timeout=120)
sbx.files.write("/home/user/www/index.html", "hello over tls\n")
sbx.commands.run("cd /home/user/www && python3 -m http.server 8000", background=True)
for _ in range(100):
    if sbx.commands.run("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/ || true").stdout.strip() == "200":
        break
    time.sleep(0.1)
print(json.dumps({"id": sbx.sandbox_id, "host": sbx.get_host(8000), "domain": sbx.sandbox_domain}))
"""


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root and the real OCI runtime")
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory)
    (directory / "server").mkdir()
    cert, key = make_cert(directory / "server", [f"*.{DOMAIN}", DOMAIN, "localhost"], ["127.0.0.1"], ca=ca)
    with extra_server(
        TLS_HOME, TLS_BRIDGE, TLS_SUBNET, tls_ca=ca[0],
        extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--domain", DOMAIN],
    ) as server:  # fmt: skip
        yield server, ca[0]


def test_https_to_a_sandbox_port_by_name(tls_server: tuple[ServerProcess, Path]) -> None:
    server, ca = tls_server
    env = {
        **os.environ,
        "E2B_API_URL": server.url,
        "E2B_SANDBOX_URL": server.url,
        "E2B_API_KEY": TEST_API_KEY,
        "E2B_DOMAIN": DOMAIN,
        "SSL_CERT_FILE": str(ca),
    }
    run = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    made = json.loads(run.stdout.strip().splitlines()[-1])
    host = f"8000-{made['id']}.{DOMAIN}"
    assert made["host"] == host and made["domain"] == DOMAIN  # what the SDK tells clients to use

    # The name travels in SNI and Host; the connection goes to 127.0.0.1 (no DNS involved).
    trust = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(verify=trust, timeout=10) as client:
        r = client.get(
            f"https://127.0.0.1:{server.port}/index.html",
            headers={"Host": f"{host}:{server.port}"},
            extensions={"sni_hostname": host},
        )
        assert r.status_code == 200 and r.text == "hello over tls\n"
        assert r.http_version == "HTTP/1.1"
        # and a closed port says so, over TLS too
        closed = client.get(
            f"https://127.0.0.1:{server.port}/",
            headers={"Host": f"8001-{made['id']}.{DOMAIN}"},
            extensions={"sni_hostname": f"8001-{made['id']}.{DOMAIN}"},
        )
        assert closed.status_code == 502
    # the certificate really is checked against the name: another name does not verify (new connection)
    with (
        httpx.Client(verify=trust, timeout=10) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(f"https://127.0.0.1:{server.port}/", extensions={"sni_hostname": "8000-x.elsewhere.test"})
    # plain HTTP on the TLS port is refused, not served
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)
    with server.api() as api:
        assert api.delete(f"/sandboxes/{made['id']}").status_code == 204
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the SDK's subprocess left nothing else behind
        with server.api() as api:
            if not api.get("/v2/sandboxes").json():
                break
        time.sleep(0.2)
