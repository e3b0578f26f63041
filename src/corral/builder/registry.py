"""Pulling images from OCI registries (the distribution API over httpx) into layers.

    puller = RegistryPuller(layers_dir, RegistryConfig.from_env())
    image = await puller.pull("ghcr.io/acme/tool:1", credentials=None, log=build_log)
    image.layers   # our layer digests, lowest first; image.context: root + the image's Env

`claim(name)` (optional) is called with each layer's name before the layer is looked for or made:
the builder holds it for the build and records it as owned, so unused pulled layers are collected
(`corral.builder.retention`).

Steps: resolve the manifest (a multi-arch index picks `linux/<this arch>`), then each layer blob by
digest. A layer is unpacked once into `layers_dir/<sha256("oci-layer:" + blob digest)>` and reused
by every image that has it (the layer cache is keyed by the content digest the registry vouches
for, and every download is checked against it). Docker Hub names (`debian`, `user/app`) resolve
to `registry-1.docker.io/library/...`; mirrors are tried first (`CORRAL_REGISTRY_MIRRORS`).

Auth: anonymous first; a 401 with `Bearer realm=...` gets a token (with the credentials as Basic
when given: `fromImageRegistry {"type":"registry","username","password"}`), `Basic` gets the
credentials directly. Loopback registries and those in `CORRAL_INSECURE_REGISTRIES` use http.

Unpacking treats the archive as hostile: no absolute paths, no `..`, nothing written through a
symlink (Python's tar filter checks), hard links only inside the layer, device nodes dropped,
ownership numeric; setuid/setgid bits are kept (sudo needs them). OCI whiteouts become overlay
whiteouts: `.wh.<name>` → a 0/0 character device `<name>`, `.wh..wh..opq` → the directory gets
`trusted.overlay.opaque=y`; both are made through a `ConfinedRoot` of the new layer.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import platform
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from corral.builder.steps import BuildContext
from corral.core.errors import CorralError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from corral.node.envd.confined import ConfinedRoot

__all__ = [
    "DOCKER_HUB",
    "ImageRef",
    "PulledImage",
    "RegistryConfig",
    "RegistryPuller",
    "host_platform",
    "oci_layer_digest",
    "unpack_layer",
]

log = logging.getLogger(__name__)

DOCKER_HUB = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))
_MAX_MANIFEST = 4 << 20
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def host_platform() -> tuple[str, str | None]:
    """(OCI architecture, variant) of this host."""
    machine = platform.machine().lower()
    return {
        "x86_64": ("amd64", None),
        "amd64": ("amd64", None),
        "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"),
        "armv7l": ("arm", "v7"),
        "ppc64le": ("ppc64le", None),
        "s390x": ("s390x", None),
        "riscv64": ("riscv64", None),
    }.get(machine, (machine, None))


def oci_layer_digest(blob_digest: str) -> str:
    """Our layer dir name for an image layer blob (its own namespace among layer digests)."""
    return hashlib.sha256(f"oci-layer:{blob_digest}".encode()).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRef:
    registry: str  # host[:port]
    repository: str  # e.g. library/debian
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, reference: str) -> ImageRef:
        ref = reference.strip()
        digest = None
        if "@" in ref:
            ref, digest = ref.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise InvalidArgument(
                    f"invalid image reference {reference!r}: only sha256 digests are supported"
                )
        tag = None
        last = ref.rsplit("/", 1)[-1]
        if ":" in last:
            ref, tag = ref.rsplit(":", 1)
            if not _TAG_RE.match(tag):
                raise InvalidArgument(f"invalid image reference {reference!r}: bad tag")
        first, _, rest = ref.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, ref
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in repository:
                repository = f"library/{repository}"
        if not repository or not all(_COMPONENT_RE.match(part) for part in repository.split("/")):
            raise InvalidArgument(f"invalid image reference {reference!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    @property
    def reference(self) -> str:
        """The tag or digest to ask the registry for (a digest wins)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}"
        return name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Mirrors per registry host (tried in order before the registry itself) and registries spoken
    to over plain http (loopback ones always are)."""

    mirrors: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    insecure: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistryConfig:
        """`CORRAL_REGISTRY_MIRRORS="docker.io=https://mirror.example,ghcr.io=http://10.0.0.5:5000"`,
        `CORRAL_INSECURE_REGISTRIES="registry.lan:5000,10.0.0.5:5000"`."""
        env = os.environ if env is None else env
        mirrors: dict[str, list[str]] = {}
        for item in filter(None, (p.strip() for p in env.get("CORRAL_REGISTRY_MIRRORS", "").split(","))):
            host, sep, url = item.partition("=")
            if not sep or not url.startswith(("http://", "https://")):
                raise InvalidArgument(
                    f"CORRAL_REGISTRY_MIRRORS: expected host=http(s)://mirror, got {item!r}"
                )
            host = DOCKER_HUB if host.strip() in _HUB_ALIASES else host.strip()
            mirrors.setdefault(host, []).append(url.rstrip("/"))
        insecure = frozenset(
            filter(None, (p.strip() for p in env.get("CORRAL_INSECURE_REGISTRIES", "").split(",")))
        )
        return cls({k: tuple(v) for k, v in mirrors.items()}, insecure)

    def endpoints(self, registry: str) -> list[str]:
        return [*self.mirrors.get(registry, ()), f"{self._scheme(registry)}://{registry}"]

    def _scheme(self, registry: str) -> str:
        host = (
            registry.rsplit(":", 1)[0].strip("[]")
            if not registry.startswith("[")
            else registry[1:].split("]")[0]
        )
        if registry in self.insecure or host == "localhost":
            return "http"
        try:
            return "http" if ipaddress.ip_address(host).is_loopback else "https"
        except ValueError:
            return "https"


@dataclasses.dataclass(frozen=True, slots=True)
class PulledImage:
    reference: str
    manifest_digest: str
    layers: tuple[str, ...]  # our layer digests, lowest first
    context: BuildContext  # root, the image's Env


class _Session:
    """One repository on one endpoint, with its auth state."""

    def __init__(
        self, client: httpx.AsyncClient, endpoint: str, ref: ImageRef, credentials: Mapping[str, str] | None
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.ref = ref
        self.credentials = credentials
        self.auth: str | None = None

    def _basic(self) -> str | None:
        """The `Authorization` value for the credentials (None without a username)."""
        if self.credentials and self.credentials.get("username"):
            pair = f"{self.credentials['username']}:{self.credentials.get('password', '')}"
            return "Basic " + base64.b64encode(pair.encode()).decode()
        return None

    async def get(self, path: str, *, accept: str | None = None, stream: bool = False) -> httpx.Response:
        url = f"{self.endpoint}/v2/{self.ref.repository}/{path}"
        for _ in range(2):
            headers = {"Accept": accept} if accept else {}
            if self.auth:
                headers["Authorization"] = self.auth
            request = self.client.build_request("GET", url, headers=headers)
            response = await self.client.send(request, stream=stream, follow_redirects=True)
            if response.status_code != 401 or self.auth and not response.headers.get("www-authenticate"):
                return response
            challenge = response.headers.get("www-authenticate", "")
            await response.aclose()
            if not await self._authenticate(challenge):
                break
        raise FailedPrecondition(
            f"the registry {self.ref.registry} refused access to {self.ref.repository}"
            + ("" if self.credentials else " (it may need a username and password)")
        )

    async def _authenticate(self, challenge: str) -> bool:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(re.findall(r'(\w+)="([^"]*)"', params_text))
        if scheme.lower() == "basic":
            basic = self._basic()
            if basic is None or self.auth is not None:
                return False
            self.auth = basic
            return True
        if (
            scheme.lower() != "bearer"
            or "realm" not in params
            or self.auth is not None
            and self.auth.startswith("Bearer")
        ):
            return False
        query = {
            "service": params.get("service", ""),
            "scope": params.get("scope") or f"repository:{self.ref.repository}:pull",
        }
        basic = self._basic()
        response = await self.client.get(
            params["realm"], params=query, headers={"Authorization": basic} if basic else {}
        )
        if response.status_code != 200:
            raise FailedPrecondition(f"getting a token for {self.ref} failed: HTTP {response.status_code}")
        body = response.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise FailedPrecondition(f"the token service of {self.ref.registry} returned no token")
        self.auth = f"Bearer {token}"
        return True


class RegistryPuller:
    def __init__(
        self,
        layers_dir: Path,
        config: RegistryConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        platform_: tuple[str, str | None] | None = None,
    ) -> None:
        self._layers_dir = layers_dir
        self._config = config or RegistryConfig()
        self._transport = transport
        self._platform = platform_ or host_platform()
        self._locks: dict[str, asyncio.Lock] = {}

    async def pull(
        self,
        reference: str,
        credentials: Mapping[str, str] | None,
        log: Any,
        claim: Callable[[str], None] | None = None,
    ) -> PulledImage:
        ref = ImageRef.parse(reference)
        if credentials and credentials.get("type", "registry") != "registry":
            raise FailedPrecondition(
                f"{credentials.get('type')} registry credentials are not supported; use username and password"
            )
        errors = []
        async with httpx.AsyncClient(
            transport=self._transport, timeout=httpx.Timeout(60.0, connect=10.0)
        ) as client:
            for endpoint in self._config.endpoints(ref.registry):
                session = _Session(client, endpoint, ref, credentials)
                try:
                    return await self._pull(session, log, claim)
                except (httpx.HTTPError, Unavailable) as exc:  # try the next mirror
                    errors.append(f"{endpoint}: {exc}")
                    log.add(f"cannot pull from {endpoint}: {exc}", "warn", "0")
        raise Unavailable(f"cannot pull {ref}: " + "; ".join(errors))

    async def _pull(self, session: _Session, log: Any, claim: Callable[[str], None] | None) -> PulledImage:
        ref = session.ref
        arch, variant = self._platform
        manifest, digest = await self._manifest(session, ref.reference)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            chosen = _pick_platform(manifest.get("manifests") or [], arch, variant)
            if chosen is None:
                raise FailedPrecondition(f"{ref} has no image for linux/{arch}")
            manifest, digest = await self._manifest(session, chosen)
        if "layers" not in manifest or "config" not in manifest:
            raise FailedPrecondition(f"{ref}: unsupported manifest (schema {manifest.get('schemaVersion')})")
        config = json.loads(await self._blob_bytes(session, manifest["config"]["digest"]))
        image_arch = config.get("architecture")
        if image_arch and image_arch != arch:
            raise FailedPrecondition(f"{ref} is for {image_arch}, this host runs {arch}")
        log.add(f"Pulling {ref} (linux/{arch}) {digest}", "info", "0")
        layers = []
        for layer in manifest["layers"]:
            layers.append(await self._layer(session, layer, log, claim))
        env = tuple(_parse_env(config.get("config", {}).get("Env") or []))
        return PulledImage(str(ref), digest, tuple(layers), BuildContext(user="root", env=env))

    async def _manifest(self, session: _Session, reference: str) -> tuple[dict[str, Any], str]:
        response = await session.get(f"manifests/{reference}", accept=_ACCEPT)
        if response.status_code == 404:
            raise NotFound(f"image {session.ref} not found in its registry")
        if response.status_code >= 500:
            raise Unavailable(f"registry error HTTP {response.status_code}")
        if response.status_code != 200:
            raise FailedPrecondition(
                f"getting the manifest of {session.ref} failed: HTTP {response.status_code}"
            )
        body = response.content
        if len(body) > _MAX_MANIFEST:
            raise FailedPrecondition(f"the manifest of {session.ref} is too large")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = (
            reference if reference.startswith("sha256:") else response.headers.get("docker-content-digest")
        )
        if expected and expected.startswith("sha256:") and expected != digest:
            raise FailedPrecondition(f"the manifest of {session.ref} does not match its digest {expected}")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise FailedPrecondition(f"the manifest of {session.ref} is not JSON") from None
        if not isinstance(manifest, dict):
            raise FailedPrecondition(f"the manifest of {session.ref} is not an object")
        return manifest, digest

    async def _blob_bytes(self, session: _Session, digest: str) -> bytes:
        if not _DIGEST_RE.match(digest):
            raise FailedPrecondition(f"unsupported digest {digest!r}")
        response = await session.get(f"blobs/{digest}")
        if response.status_code != 200:
            raise FailedPrecondition(f"getting blob {digest} failed: HTTP {response.status_code}")
        if "sha256:" + hashlib.sha256(response.content).hexdigest() != digest:
            raise FailedPrecondition(f"blob {digest} does not match its digest")
        return response.content

    async def _layer(
        self, session: _Session, layer: Mapping[str, Any], log: Any, claim: Callable[[str], None] | None
    ) -> str:
        digest = str(layer.get("digest", ""))
        if not _DIGEST_RE.match(digest):
            raise FailedPrecondition(f"unsupported layer digest {digest!r}")
        media_type = str(layer.get("mediaType", ""))
        if "zstd" in media_type:
            raise FailedPrecondition(
                f"layer {digest[:19]} is zstd-compressed, which this server cannot unpack"
            )
        name = oci_layer_digest(digest)
        target = self._layers_dir / name
        if claim is not None:
            claim(name)  # held before it is looked for: a collection cannot take it from now on
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if target.is_dir():
                log.add(f"layer {digest[:19]} cached", "info", "0")
                return name
            self._layers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, blob = tempfile.mkstemp(dir=self._layers_dir, prefix=".tmp-blob-")
            try:
                size = 0
                sha = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    response = await session.get(f"blobs/{digest}", stream=True)
                    try:
                        if response.status_code != 200:
                            raise FailedPrecondition(
                                f"getting layer {digest} failed: HTTP {response.status_code}"
                            )
                        async for chunk in response.aiter_bytes(1 << 20):
                            out.write(chunk)
                            sha.update(chunk)
                            size += len(chunk)
                    finally:
                        await response.aclose()
                if "sha256:" + sha.hexdigest() != digest:
                    raise FailedPrecondition(f"layer {digest} does not match its digest")
                await asyncio.to_thread(unpack_layer, Path(blob), self._layers_dir, name)
            finally:
                Path(blob).unlink(missing_ok=True)
            log.add(f"layer {digest[:19]} pulled ({size / 1e6:.1f} MB)", "info", "0")
        return name


def _pick_platform(manifests: Sequence[Mapping[str, Any]], arch: str, variant: str | None) -> str | None:
    candidates = []
    for item in manifests:
        plat = item.get("platform") or {}
        if plat.get("os", "linux") != "linux" or plat.get("architecture") != arch:
            continue
        if item.get("mediaType") and item["mediaType"] not in MANIFEST_TYPES:
            continue
        exact = variant is None or plat.get("variant") in (None, variant)
        candidates.append(
            (0 if exact and plat.get("variant") == variant else 1 if exact else 2, str(item.get("digest")))
        )
    candidates.sort()
    return candidates[0][1] if candidates and candidates[0][0] < 2 else None


def _parse_env(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            out.append((key, value))
    return out


# -- unpacking -------------------------------------------------------------------------------------

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_SAFE_XATTR_PREFIXES = ("security.capability", "user.")


def _filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    name = os.path.basename(member.name.rstrip("/"))
    if name.startswith(_WHITEOUT):
        return None  # applied after extraction
    if member.ischr() or member.isblk() or member.isfifo():
        return None  # device nodes and FIFOs are not part of a layer we serve
    checked = tarfile.tar_filter(member, dest)  # refuses absolute names, `..`, writes through symlinks
    if checked is None:
        return None
    if member.islnk():  # the tar filter leaves hard links unchecked: one to a host file must not be
        linkname = member.linkname.lstrip("/")
        target = os.path.realpath(os.path.join(dest, linkname))
        if os.path.commonpath([target, os.path.realpath(dest)]) != os.path.realpath(dest):
            raise tarfile.LinkOutsideDestinationError(member, target)
        checked = checked.replace(linkname=linkname, deep=False)
    return checked.replace(mode=member.mode & 0o7777, deep=False)  # keep setuid/setgid (sudo)


def unpack_layer(blob: Path, layers_dir: Path, name: str) -> None:
    """Unpack a (gzip or plain) layer tar into `layers_dir/name`, whiteouts converted. Blocking."""
    tmp = layers_dir / f".tmp-oci-{secrets.token_hex(8)}"
    tmp.mkdir(mode=0o755)
    try:
        whiteouts: list[tuple[str, str]] = []  # (directory, name or "" for opaque)
        xattrs: list[tuple[str, str, bytes]] = []
        with tarfile.open(blob, "r:*") as archive:
            members = []
            for member in archive:
                path = member.name.lstrip("/")
                directory, base = os.path.split(path.rstrip("/"))
                if base == _OPAQUE:
                    whiteouts.append((directory, ""))
                elif base.startswith(_WHITEOUT):
                    whiteouts.append((directory, base[len(_WHITEOUT) :]))
                for header, text in member.pax_headers.items():
                    if header.startswith("SCHILY.xattr.") and header[13:].startswith(_SAFE_XATTR_PREFIXES):
                        xattrs.append((path, header[13:], text.encode("utf-8", "surrogateescape")))
                members.append(member)
            archive.extractall(tmp, members=members, numeric_owner=True, filter=_filter)
        with ConfinedRoot.open_path(str(tmp)) as root:
            for directory, entry in whiteouts:
                _apply_whiteout(root, directory, entry)
            for path, attr, value in xattrs:
                _apply_xattr(root, path, attr, value)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, layers_dir / name)
        except OSError:
            if not (layers_dir / name).is_dir():
                raise
    except (tarfile.TarError, OSError, CorralError, EOFError, KeyError, ValueError) as exc:
        raise FailedPrecondition(f"cannot unpack layer: {exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_whiteout(root: ConfinedRoot, directory: str, entry: str) -> None:
    root.makedirs("/" + directory)
    dfd = root.open_dir("/" + directory)
    try:
        if entry == "":
            os.setxattr(dfd, "trusted.overlay.opaque", b"y")
            return
        if "/" in entry or entry in ("", ".", ".."):
            return
        try:
            os.lstat(entry, dir_fd=dfd)
            return  # the layer also has the entry itself: it wins (whiteouts hide lower layers only)
        except FileNotFoundError:
            pass
        os.mknod(entry, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dfd)
    finally:
        os.close(dfd)


def _apply_xattr(root: ConfinedRoot, path: str, key: str, value: bytes) -> None:
    try:
        st = root.lstat("/" + path)
    except CorralError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return
    fd = root.open_regular("/" + path) if stat.S_ISREG(st.st_mode) else root.open_dir("/" + path)
    try:
        os.setxattr(fd, key, value)
    except OSError as exc:
        log.debug("cannot set %s on %s: %s", key, path, exc)
    finally:
        os.close(fd)
