"""Pulling images from an OCI registry: Debian's `docker-registry` on loopback, loaded with a small
image built here from the `base` layer's files with `umoci` and pushed with `skopeo` (no traffic
leaves the machine). Covers manifests, multi-arch indexes, the layer cache, whiteouts, auth,
hostile layer archives, and a template build from the image through the official SDK.

Needs root and the Debian packages docker-registry, umoci and skopeo (installed here if missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.builder.logs import BuildLog
from corral.builder.registry import (
    ImageRef,
    RegistryConfig,
    RegistryPuller,
    host_platform,
    oci_layer_digest,
    unpack_layer,
)
from corral.core.errors import FailedPrecondition, NotFound
from corral.node.envd.confined import ConfinedRoot
from tests.conftest import TEST_HOME, ensure_test_template

pytestmark = pytest.mark.integration

TOOLS = {"docker-registry": "docker-registry", "umoci": "umoci", "skopeo": "skopeo"}
BINARIES = [
    "bash", "sh", "dash", "id", "whoami", "cat", "echo", "ls", "mkdir", "chown", "chmod", "rm", "mv", "cp",
    "env", "printf", "dirname", "basename", "getent", "tar", "gzip", "grep", "sleep", "true", "false",
    "touch", "stat", "cut", "readlink", "test", "[", "sed", "passwd", "pwd", "head", "tail", "ln", "sort",
]  # fmt: skip
SBINARIES = ["useradd", "usermod", "groupadd", "nologin"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = [pkg for binary, pkg in TOOLS.items() if shutil.which(binary) is None]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing],
            check=False,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot install {missing}: {result.stderr[-300:]}")


def _mini_rootfs(base: Path, dest: Path) -> None:
    """A ~15 MB Debian tree: some tools of the base layer, their libraries, PAM, the base's /etc."""
    paths = [f"/usr/bin/{b}" for b in BINARIES] + [f"/usr/sbin/{b}" for b in SBINARIES]
    paths += [
        f"/usr/lib/x86_64-linux-gnu/security/{p.name}"
        for p in (base / "usr/lib/x86_64-linux-gnu/security").glob("*")
    ]
    ldd = subprocess.run(
        ["chroot", str(base), "ldd", *paths], check=False, capture_output=True, text=True
    ).stdout
    libs = {m.group(1) for m in re.finditer(r"(/\S+) \(0x", ldd)}
    for sub in (
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "tmp",
        "root",
        "home",
        "proc",
        "sys",
        "dev",
        "opt",
        "run",
    ):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ):
        os.symlink(target, dest / name)
    os.chmod(dest / "tmp", 0o1777)
    with ConfinedRoot.open_path(str(base)) as root:  # links resolve inside the base tree
        resolved = {
            os.path.join(root.realpath(os.path.dirname(wanted)), os.path.basename(wanted)): root.realpath(
                wanted
            )
            for wanted in paths + sorted(libs)
        }
    for name, real in resolved.items():
        target = dest / real.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(base / real.lstrip("/"), target)
        link = dest / name.lstrip("/")
        if link != target and not link.exists() and not link.is_symlink():  # e.g. a soname or ld.so link
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(target, link.parent), link)
    shutil.copytree(base / "etc", dest / "etc", symlinks=True, dirs_exist_ok=True)


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"


class Registry:
    def __init__(self, workdir: Path, htpasswd: Path | None = None) -> None:
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = workdir / f"registry-{self.port}.yml"
        auth = f"auth:\n  htpasswd:\n    realm: corral-test\n    path: {htpasswd}\n" if htpasswd else ""
        config.write_text(
            f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {workdir / str(self.port)}\n"
            f"http:\n  addr: {self.host}\n{auth}"
        )
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code in (200, 401):
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _htpasswd(path: Path, user: str, password: str) -> None:
    import crypt as _crypt  # deprecated, but bcrypt through libxcrypt is all the registry takes

    path.write_text(f"{user}:{_crypt.crypt(password, _crypt.mksalt(_crypt.METHOD_BLOWFISH, rounds=16))}\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def oci_layout(tools: None, workdir: Path) -> Path:
    """An OCI layout with image `1`: layer 1 = a small Debian tree (+ /etc/corral-remove-me,
    /opt/data/{a,b}); layer 2 = that file removed, /opt/data replaced by {c}, /opt/hello.txt."""
    ensure_test_template()
    manifest = json.loads((TEST_HOME / "templates" / "base.json").read_text())
    base = TEST_HOME / "layers" / manifest["layers"][0]
    layout, bundle = workdir / "oci", workdir / "bundle"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:1")
    _run("umoci", "unpack", "--image", f"{layout}:1", str(bundle))
    rootfs = bundle / "rootfs"
    _mini_rootfs(base, rootfs)
    (rootfs / "etc/corral-remove-me").write_text("gone soon\n")
    (rootfs / "opt/data").mkdir()
    (rootfs / "opt/data/a").write_text("a")
    (rootfs / "opt/data/b").write_text("b")
    _run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:1", str(bundle))
    (rootfs / "etc/corral-remove-me").unlink()
    shutil.rmtree(rootfs / "opt/data")
    (rootfs / "opt/data").mkdir()
    (rootfs / "opt/data/c").write_text("c")
    (rootfs / "opt/hello.txt").write_text("hello from the registry\n")
    _run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:1", str(bundle))
    _run("umoci", "config", "--image", f"{layout}:1", "--config.env", "FOO=from-image", "--config.env",
         "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")  # fmt: skip
    return layout


@pytest.fixture(scope="module")
def registry(oci_layout: Path, workdir: Path) -> Iterator[Registry]:
    reg = Registry(workdir)
    try:
        _run(
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{oci_layout}:1",
            f"docker://{reg.host}/test/mini:1",
        )
        _push_index(reg.host)
        yield reg
    finally:
        reg.stop()


def _push_blob(host: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = httpx.post(f"http://{host}/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = start.headers["location"]
    url = location if location.startswith("http") else f"http://{host}{location}"
    url += ("&" if "?" in url else "?") + f"digest={digest}"
    put = httpx.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
    assert put.status_code == 201, put.text
    return digest


def _push_index(host: str) -> None:
    """`test/multi:1`: an index with an arm64/s390x image (listed first) and this host's one."""
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    amd = httpx.get(f"http://{host}/v2/test/mini/manifests/1", headers=accept)
    arch, _ = host_platform()
    other = "s390x" if arch != "s390x" else "arm64"
    config = json.dumps(
        {"architecture": other, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _push_blob(host, "test/multi", config),
            "size": len(config),
        },
        "layers": [],
    }
    raw = json.dumps(manifest).encode()
    other_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    assert (
        httpx.put(
            f"http://{host}/v2/test/multi/manifests/{other_digest}", content=raw, headers=headers
        ).status_code
        == 201
    )
    # The index's amd64 entry must exist in this repository too: mount the blobs, put the manifest.
    mini = amd.json()
    for blob in [mini["config"], *mini["layers"]]:
        mounted = httpx.post(
            f"http://{host}/v2/test/multi/blobs/uploads/",
            params={"mount": blob["digest"], "from": "test/mini"},
        )
        assert mounted.status_code == 201, mounted.text
    assert (
        httpx.put(
            f"http://{host}/v2/test/multi/manifests/{amd.headers['docker-content-digest']}",
            content=amd.content,
            headers=headers,
        ).status_code
        == 201
    )
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": other_digest,
                "size": len(raw),
                "platform": {"architecture": other, "os": "linux"},
            },
            {
                "mediaType": manifest["mediaType"],
                "digest": amd.headers["docker-content-digest"],
                "size": len(amd.content),
                "platform": {"architecture": arch, "os": "linux"},
            },
        ],
    }
    put = httpx.put(
        f"http://{host}/v2/test/multi/manifests/1",
        content=json.dumps(index).encode(),
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
    )
    assert put.status_code == 201, put.text


class CountingTransport(httpx.AsyncBaseTransport):
    """Records request paths; a fresh connection pool per event loop (each `_pull` has its own)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._inner: dict[int, httpx.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        loop = id(asyncio.get_running_loop())
        inner = self._inner.setdefault(loop, httpx.AsyncHTTPTransport())
        return await inner.handle_async_request(request)


def _pull(layers: Path, reference: str, credentials=None, transport=None):
    log = BuildLog()
    image = asyncio.run(
        RegistryPuller(layers, RegistryConfig(), transport=transport).pull(reference, credentials, log)
    )
    return image, [e.message for e in log.page(0, 1000)]


# --- pulls ------------------------------------------------------------------------------------------


def test_pull_unpacks_layers_with_whiteouts_and_caches_them(registry: Registry, tmp_path: Path) -> None:
    counting = CountingTransport()
    image, messages = _pull(tmp_path, f"{registry.host}/test/mini:1", transport=counting)
    assert len(image.layers) == 2 and image.manifest_digest.startswith("sha256:")
    assert dict(image.context.env)["FOO"] == "from-image" and image.context.user == "root"
    lower, upper = (tmp_path / d for d in image.layers)
    assert (lower / "usr/bin/bash").is_file() and (lower / "bin").is_symlink()
    passwd = os.lstat(lower / "usr/bin/passwd")
    assert passwd.st_mode & stat.S_ISUID and passwd.st_uid == 0  # setuid kept (sudo, passwd need it)
    removed = os.lstat(upper / "etc/corral-remove-me")
    assert stat.S_ISCHR(removed.st_mode) and removed.st_rdev == os.makedev(0, 0)  # an overlay whiteout
    assert (upper / "opt/hello.txt").read_text() == "hello from the registry\n"
    assert not any(p.name.startswith(".wh.") for p in upper.rglob("*"))
    assert any(m.endswith("pulled (5.9 MB)") or "pulled" in m for m in messages)

    seen = len(counting.paths)
    again, messages = _pull(tmp_path, f"{registry.host}/test/mini:1", transport=counting)
    assert again.layers == image.layers
    assert len([p for p in counting.paths[seen:] if "/blobs/" in p]) == 1  # the config; no layer again
    assert sum("cached" in m for m in messages) == 2


def test_a_multi_arch_index_picks_this_hosts_image(registry: Registry, tmp_path: Path) -> None:
    plain, _ = _pull(tmp_path, f"{registry.host}/test/mini:1")
    multi, _ = _pull(tmp_path, f"{registry.host}/test/multi:1")
    assert multi.layers == plain.layers and multi.manifest_digest == plain.manifest_digest
    with pytest.raises(FailedPrecondition, match="has no image for linux/mips"):
        log = BuildLog()
        asyncio.run(
            RegistryPuller(tmp_path, platform_=("mips", None)).pull(
                f"{registry.host}/test/multi:1", None, log
            )
        )


def test_pull_by_digest_and_unknown_images(registry: Registry, tmp_path: Path) -> None:
    plain, _ = _pull(tmp_path, f"{registry.host}/test/mini:1")
    pinned, _ = _pull(tmp_path, f"{registry.host}/test/mini@{plain.manifest_digest}")
    assert pinned.layers == plain.layers
    with pytest.raises(NotFound):
        _pull(tmp_path, f"{registry.host}/test/nope:1")


def test_registry_auth_basic(oci_layout: Path, workdir: Path, tmp_path: Path) -> None:
    htpasswd = workdir / "htpasswd"
    _htpasswd(htpasswd, "corral", "s3cret")
    reg = Registry(workdir, htpasswd)
    try:
        _run(
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "corral:s3cret",
            f"oci:{oci_layout}:1",
            f"docker://{reg.host}/private/mini:1",
        )
        with pytest.raises(FailedPrecondition, match="may need a username and password"):
            _pull(tmp_path, f"{reg.host}/private/mini:1")
        with pytest.raises(FailedPrecondition, match="refused access"):
            _pull(
                tmp_path,
                f"{reg.host}/private/mini:1",
                {"type": "registry", "username": "corral", "password": "bad"},
            )
        image, _ = _pull(
            tmp_path,
            f"{reg.host}/private/mini:1",
            {"type": "registry", "username": "corral", "password": "s3cret"},
        )
        assert len(image.layers) == 2
    finally:
        reg.stop()


def test_references() -> None:
    assert ImageRef.parse("debian") == ImageRef("registry-1.docker.io", "library/debian", "latest", None)
    assert ImageRef.parse("docker.io/acme/app:1.2") == ImageRef(
        "registry-1.docker.io", "acme/app", "1.2", None
    )
    assert ImageRef.parse("localhost:5000/a/b") == ImageRef("localhost:5000", "a/b", "latest", None)
    assert str(ImageRef.parse("ghcr.io/x/y:t")) == "ghcr.io/x/y:t"
    config = RegistryConfig.from_env(
        {
            "CORRAL_REGISTRY_MIRRORS": "docker.io=http://127.0.0.1:1",
            "CORRAL_INSECURE_REGISTRIES": "reg.lan:5000",
        }
    )
    assert config.endpoints("registry-1.docker.io") == ["http://127.0.0.1:1", "https://registry-1.docker.io"]
    assert config.endpoints("reg.lan:5000") == ["http://reg.lan:5000"]
    assert config.endpoints("127.0.0.1:5000") == ["http://127.0.0.1:5000"]


# --- hostile layers ------------------------------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            info.size = len(data) if data is not None else 0
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def test_opaque_dirs_owners_and_xattrs(tmp_path: Path) -> None:
    blob = tmp_path / "layer.tar.gz"
    cap = _info("bin/ping", mode=0o755, uid=0, gid=0)
    cap.pax_headers = {
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    }
    blob.write_bytes(
        _tar([
            (_info("data", tarfile.DIRTYPE, mode=0o755), None),
            (_info("data/.wh..wh..opq"), b""),
            (_info("data/new", uid=1000, gid=1000, mode=0o640), b"new"),
            (_info("bin", tarfile.DIRTYPE, mode=0o755), None),
            (cap, b"#!/bin/sh\n"),
            (_info("etc/.wh.gone"), b""),
            (_info("dev/evil", tarfile.CHRTYPE, devmajor=8, devminor=0), None),
        ])
    )  # fmt: skip
    layers = tmp_path / "layers"
    layers.mkdir()
    unpack_layer(blob, layers, "l" * 64)
    root = layers / ("l" * 64)
    assert os.getxattr(root / "data", "trusted.overlay.opaque") == b"y"
    new = os.lstat(root / "data/new")
    assert (new.st_uid, new.st_gid, stat.S_IMODE(new.st_mode)) == (1000, 1000, 0o640)
    assert os.getxattr(root / "bin/ping", "security.capability")[:4] == b"\x01\x00\x00\x02"
    assert stat.S_ISCHR(os.lstat(root / "etc/gone").st_mode)
    assert not (root / "dev/evil").exists()  # device nodes are dropped


@pytest.mark.parametrize(
    "members",
    [
        [(_info("../escape"), b"x")],
        [(_info("a", tarfile.SYMTYPE, linkname="/etc"), None), (_info("a/corral-test-escape"), b"x")],
        [(_info("a", tarfile.SYMTYPE, linkname="../.."), None), (_info("a/corral-test-escape"), b"x")],
        [(_info("link", tarfile.LNKTYPE, linkname="../../../../etc/hostname"), None)],
        [(_info("link", tarfile.LNKTYPE, linkname="/etc/hostname"), None)],
    ],
)
def test_hostile_layers_are_refused(tmp_path: Path, members) -> None:
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(_tar(members))
    layers = tmp_path / "deep" / "layers"
    layers.mkdir(parents=True)
    hostname_links = os.stat("/etc/hostname").st_nlink
    with pytest.raises(FailedPrecondition, match="cannot unpack layer"):
        unpack_layer(blob, layers, "h" * 64)
    assert not (layers / ("h" * 64)).exists() and list(layers.iterdir()) == []
    assert not Path("/etc/corral-test-escape").exists() and not (tmp_path / "escape").exists()
    assert os.stat("/etc/hostname").st_nlink == hostname_links


# --- a template from a registry image, through the official SDK ------------------------------------------


def test_template_from_a_registry_image(registry: Registry, e2b_env) -> None:
    from e2b import Sandbox, Template

    name = f"corral-registry-{uuid.uuid4().hex[:8]}"
    template = (
        Template()
        .from_image(f"{registry.host}/test/multi:1")
        .run_cmd('echo "$FOO $(whoami)" > /tmp/run.txt; cat /opt/hello.txt')
        .set_user("dev")
        .run_cmd("whoami > ~/me")
    )
    messages: list[str] = []
    Template.build(template, name, on_build_logs=lambda e: messages.append(e.message))
    assert any(m.startswith(f"Pulling {registry.host}/test/multi:1") for m in messages), messages
    assert any("[stdout]: hello from the registry" in m for m in messages), messages
    sandbox = Sandbox.create(name, timeout=60)
    try:
        assert sandbox.files.read("/tmp/run.txt") == "from-image user\n"
        assert sandbox.files.read("/home/dev/me") == "dev\n"
        out = sandbox.commands.run(
            "ls /opt/data; test -e /etc/corral-remove-me || echo removed", user="root"
        ).stdout
        assert out == "c\nremoved\n"
    finally:
        sandbox.kill()


def test_pulled_layers_of_a_deleted_template_go(registry: Registry, gc_server) -> None:
    """On a server that keeps no spare build cache, an image's layers live exactly as long as a
    template needs them."""
    from e2b import Template

    from tests.integration.test_template_gc import _delete, _eventually, _layers, _opts

    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    manifest = httpx.get(f"http://{registry.host}/v2/test/mini/manifests/1", headers=accept).json()
    image_layers = {oci_layer_digest(layer["digest"]) for layer in manifest["layers"]}
    before = _layers(gc_server)
    assert not image_layers & before
    name = f"corral-registry-gc-{uuid.uuid4().hex[:8]}"
    Template.build(Template().from_image(f"{registry.host}/test/multi:1").run_cmd("true"), name, **_opts(gc_server))
    assert image_layers <= _layers(gc_server) - before
    _delete(gc_server, name)
    _eventually(lambda: _layers(gc_server) == before, "the pulled layers are collected")
