"""Test hosts in a network namespace of the test's own, and TLS material: no packet leaves the machine.

`FakeNet` makes a namespace that stands for "the internet": a veth whose host end has no address
(so the host's own networks, which sandboxes may never reach, do not include it), host routes for
its addresses, and one server process inside answering on every address:

    tcp 80    HTTP       body `host=<Host header> peer=<client address> tls=no`
    tcp 443   HTTPS      the same with `tls=yes` (certificate for allowed.test, denied.test,
                         *.allowed.test; clients use `curl -k`)
    tcp 8080  plain TCP  one line `peer=<client address>` (no name anywhere: address rules only)
    GET /big/<n> answers n bytes (streams through proxies)

Addresses are chosen per run by the caller (`octet`), from ranges a sandbox is allowed to reach
(198.18.0.0/15, benchmarking) and from always-denied ones (172.16.0.0/12, 169.254.0.0/16) to show
those stay closed whatever a policy says.

`FakeResolver` is the DNS upstream of the test servers (`CORRAL_DNS_UPSTREAMS`): every name under
`.test` resolves to both reachable hosts of an octet, anything else is NXDOMAIN, so a sandbox's
DNS never leaves the machine and names allowed by a policy have addresses to be pinned to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from corral.node.network.dns import host_upstreams

__all__ = ["FakeNet", "FakeResolver", "fake_net", "make_ca", "make_cert", "run"]

SERVER = r"""
import http.server, socketserver, ssl, sys, threading

certdir = sys.argv[1]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.path.startswith("/big/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                self.wfile.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
            return
        tls = "yes" if isinstance(self.connection, ssl.SSLSocket) else "no"
        body = f"host={self.headers.get('Host')} peer={self.client_address[0]} tls={tls}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

plain = Server(("0.0.0.0", 80), Handler)
secure = Server(("0.0.0.0", 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(certdir + "/cert.pem", certdir + "/key.pem")
secure.socket = context.wrap_socket(secure.socket, server_side=True)

class Who(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(f"peer={self.client_address[0]}\n".encode())

class TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

who = TcpServer(("0.0.0.0", 8080), Who)
for server in (plain, secure, who):
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin (or dies)
"""


def run(
    *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {result.returncode}: {result.stderr.strip()}")
    return result


def make_ca(directory: Path, name: str = "Corral Test CA") -> tuple[Path, Path]:
    """A self-signed CA (EC P-256, valid 2 days): (cert, key)."""
    cert, key = directory / "ca.pem", directory / "ca.key"
    run(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_cert(
    directory: Path,
    names: list[str],
    ips: list[str] = (),
    ca: tuple[Path, Path] | None = None,  # type: ignore[assignment]
) -> tuple[Path, Path]:
    """A server certificate for `names` (and `ips`), signed by `ca` or self-signed: (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{i}" for i in ips])
    if ca is None:
        run(
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={names[0]}",
            "-addext", f"subjectAltName={san}",
        )  # fmt: skip
        return cert, key
    csr = directory / "cert.csr"
    run(
        "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}",
    )  # fmt: skip
    ext = directory / "cert.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    run(
        "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return cert, key


@dataclasses.dataclass
class FakeNet:
    """See the module docstring. `octet` picks the addresses: 198.18.<octet>.10 and .11 (reachable),
    172.29.<octet>.1 (private) and 169.254.<octet>.1 (link-local)."""

    name: str  # namespace; must not start with a sandbox bridge's netns prefix
    veth: str  # host end, at most 15 characters
    octet: int
    proc: subprocess.Popen[str] | None = None
    certdir: Path | None = None

    @property
    def host_a(self) -> str:
        return f"198.18.{self.octet}.10"

    @property
    def host_b(self) -> str:
        return f"198.18.{self.octet}.11"

    @property
    def private(self) -> str:
        return f"172.29.{self.octet}.1"

    @property
    def link_local(self) -> str:
        return f"169.254.{self.octet}.1"

    @property
    def routes(self) -> list[str]:
        return [f"198.18.{self.octet}.0/24", f"172.29.{self.octet}.0/24", f"169.254.{self.octet}.0/24"]

    def down(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        run("ip", "link", "del", self.veth, check=False)  # takes the host routes with it
        run("ip", "netns", "del", self.name, check=False)

    def up(self) -> FakeNet:
        self.down()  # leftovers of an interrupted run
        self.certdir = Path(tempfile.mkdtemp(prefix="corral-fakenet-"))
        make_cert(self.certdir, ["allowed.test", "denied.test", "*.allowed.test"])
        try:
            run("ip", "netns", "add", self.name)
            run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
            run("ip", "link", "set", "dev", self.veth, "addrgenmode", "none")
            run("ip", "link", "set", "dev", self.veth, "up")
            addrs = [self.host_a, self.host_b, self.private, self.link_local]
            batch = "link set dev lo up\nlink set dev eth0 addrgenmode none\n"
            batch += "".join(f"addr add {a}/24 dev eth0\n" for a in addrs)
            batch += "link set dev eth0 up\nroute add default dev eth0\n"
            run("ip", "-n", self.name, "-batch", "-", input=batch)
            for route in self.routes:
                run("ip", "route", "add", route, "dev", self.veth)
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, "-c", SERVER, str(self.certdir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self.proc.stdout is not None
            deadline = time.monotonic() + 15
            line = self.proc.stdout.readline()
            if line.strip() != "ready" or time.monotonic() > deadline:
                raise RuntimeError(f"fake internet server did not start: {line!r}")
        except BaseException:
            self.down()
            raise
        return self


@contextlib.contextmanager
def fake_net(prefix: str, bridge: str, subnet: str) -> Iterator[FakeNet]:
    """A FakeNet for one test module: named `<prefix><bridge>`, its addresses on the second octet of
    the test subnet (so runs that differ in bridge and subnet do not meet), down afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    octet = ipaddress.IPv4Network(subnet).network_address.packed[1]
    net = FakeNet(name=f"{prefix}{bridge}", veth=f"{prefix}{bridge}"[:15], octet=octet).up()
    try:
        yield net
    finally:
        net.down()


class FakeResolver:
    """A UDP DNS server on 127.0.0.1 in a daemon thread: `<anything>.test` A -> 198.18.<octet>.10
    and .11 (both `FakeNet` hosts). Other names go to the host's own resolver, as they did before
    test servers used this one: the tests that install packages in a sandbox need real names."""

    def __init__(self, octet: int) -> None:
        hosts = [f"198.18.{octet}.10", f"198.18.{octet}.11"]
        upstream = (host_upstreams()[0], 53)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                try:
                    request = DNSRecord.parse(data)
                except Exception:  # noqa: BLE001
                    return
                reply = request.reply()
                name = str(request.q.qname).rstrip(".").lower()
                if not name.endswith(".test"):
                    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                        up.settimeout(5)
                        up.sendto(data, upstream)
                        sock.sendto(up.recv(65535), self.client_address)
                    return
                if request.q.qtype == QTYPE.A:
                    for host in hosts:
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(host), ttl=60))
                sock.sendto(reply.pack(), self.client_address)

        self.server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
