"""The default `base` template: a Debian bookworm root filesystem built with mmdebstrap.

`ensure_base_template(settings)` makes sure the template named `base` exists and returns its
manifest. The first call builds the tree (about 90 s); later calls only check that the manifest and
its layer directory are there.

The layer is content-addressed by its recipe: its directory is `layers_dir/<digest>` where the digest
is the sha256 of canonical JSON holding everything that decides what the build produces (suite,
variant, packages, the customize script, the architecture). Changing any of them gives a new layer
and the `base` manifest is pointed at it; old layers stay, since sandboxes may still use them.

The build runs in `layers_dir/.tmp-base-<random>` and is published with one `os.rename`, so the
layer either exists complete or not at all. A lock file serialises builders; a temp dir left by an
interrupted build is removed (after unmounting anything still mounted inside it) by the next one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from corral.core.errors import FailedPrecondition, Internal, NotFound
from corral.core.settings import Settings
from corral.node.host import parse_mounts
from corral.node.storage.templates import TemplateManifest, TemplateStore, new_build_id, now_rfc3339

__all__ = [
    "BASE_PACKAGES",
    "BASE_SUITE",
    "BASE_TEMPLATE_ID",
    "BASE_VARIANT",
    "CUSTOMIZE_SCRIPT",
    "RECIPE_KEY_VERSION",
    "DistroRecipe",
    "base_recipe",
    "base_recipe_digest",
    "ensure_base_template",
    "ensure_recipe_layer",
    "host_base_digest",
    "mmdebstrap_argv",
    "recipe_digest",
]

BASE_TEMPLATE_ID = "base"
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"

# What agents expect to find (E2B's base image has the same tools); `python-is-python3` makes
# `python` exist.
BASE_PACKAGES: tuple[str, ...] = (
    "bash",
    "coreutils",
    "python3",
    "python3-pip",
    "python3-venv",
    "python-is-python3",
    "curl",
    "ca-certificates",
    "git",
    "sudo",
    "procps",
    "iproute2",
    "ncurses-bin",
    "less",
    "jq",
    "nodejs",
    "npm",
    "build-essential",
)

# Runs inside the new tree (chroot) after the packages are installed. The default user matches
# E2B's: `user`, uid/gid 1000, passwordless sudo, home /home/user.
CUSTOMIZE_SCRIPT = """\
set -eu
groupadd --gid 1000 user
useradd --uid 1000 --gid 1000 --groups sudo --create-home --skel /etc/skel \\
    --home-dir /home/user --shell /bin/bash user
passwd --delete user
echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user
chmod 0440 /etc/sudoers.d/user
visudo --check --file=/etc/sudoers.d/user
chmod 0777 /usr/local
mkdir -p /code
chmod 0777 /code
[ -e /usr/bin/python ] || ln -s /usr/bin/python3 /usr/local/bin/python
# Like E2B's python image: `pip install` works (as user it falls back to ~/.local).
rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
# CAs the host trusts beyond Debian's (e.g. a TLS-inspecting egress proxy), copied in by a hook, so
# pip/npm/curl inside sandboxes work wherever the host's own clients do.
if ls /usr/local/share/ca-certificates/corral-host/*.crt >/dev/null 2>&1; then
    update-ca-certificates >/dev/null
    {
        echo 'export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt'
        echo 'export REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt'
    } > /etc/profile.d/corral-ca.sh
fi
# Login shells start no programs: every command runs as `bash -l -c` (E2B's semantics), and a fork
# and exec costs 1-2 ms each. /etc/profile asks `id -u` for what bash already has in $EUID (sh,
# which has no EUID, still asks `id`); root's ~/.profile runs `mesg n` only when stdin is a
# terminal, the only case where it does anything. Same PATH, prompts and profile.d for both users.
grep -q '"$(id -u)"' /etc/profile
sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/' /etc/profile
grep -qx 'mesg n 2> /dev/null || true' /root/.profile
sed -i 's#^mesg n 2> /dev/null || true$#if [ -t 0 ]; then mesg n 2> /dev/null || true; fi#' /root/.profile
rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin
rm -rf /var/lib/apt/lists/*
# mmdebstrap leaves the build host's resolver and name here; the runtime mounts the sandbox's own.
rm -f /etc/resolv.conf /etc/hostname
: > /etc/resolv.conf
: > /etc/hostname
printf '127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n' > /etc/hosts
chmod 0644 /etc/resolv.conf /etc/hostname /etc/hosts
"""

# Bump when the meaning of a recipe changes in a way its fields do not show.
RECIPE_KEY_VERSION = 1

_TMP_PREFIX = ".tmp-base-"
_LOCK_NAME = ".base.lock"


def host_extra_ca_certs(
    certs_dir: Path = Path("/etc/ssl/certs"), local_dir: Path = Path("/usr/local/share/ca-certificates")
) -> dict[str, bytes]:
    """CA certificates this host trusts beyond Debian's bundle: regular PEM files an admin put in
    /etc/ssl/certs (Debian's own entries there are symlinks) and /usr/local/share/ca-certificates."""
    found: dict[str, bytes] = {}
    candidates = [p for p in sorted(certs_dir.glob("*")) if p.suffix in (".pem", ".crt")]
    candidates += sorted(local_dir.rglob("*.crt")) if local_dir.is_dir() else []
    for path in candidates:
        if path.is_symlink() or not path.is_file() or path.name == "ca-certificates.crt":
            continue
        data = path.read_bytes()
        if b"BEGIN CERTIFICATE" in data:
            found[f"{path.stem}.crt"] = data
    return found


def recipe_digest(
    *,
    suite: str,
    variant: str,
    packages: Iterable[str],
    customize_script: str,
    arch: str,
    extra_ca: Mapping[str, bytes] | None = None,
    source: Mapping[str, object] | None = None,
) -> str:
    """sha256 (hex) of the canonical JSON of a base recipe; package order and duplicates don't matter.

    `source` (mirror, keyring, components) is only part of the recipe when given, so recipes on
    Debian's default archive keep the digests they always had."""
    recipe: dict[str, object] = {
        "key_version": RECIPE_KEY_VERSION,
        "kind": "mmdebstrap",
        "suite": suite,
        "variant": variant,
        "packages": sorted(set(packages)),
        "customize_script": customize_script,
        "arch": arch,
        "extra_ca": {
            name: hashlib.sha256(data).hexdigest() for name, data in sorted((extra_ca or {}).items())
        },
    }
    if source:
        recipe["source"] = dict(source)
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def base_recipe_digest(arch: str, extra_ca: Mapping[str, bytes] | None = None) -> str:
    return recipe_digest(
        suite=BASE_SUITE,
        variant=BASE_VARIANT,
        packages=BASE_PACKAGES,
        customize_script=CUSTOMIZE_SCRIPT,
        arch=arch,
        extra_ca=extra_ca,
    )


def host_base_digest() -> str:
    """The digest of the `base` layer this host builds (its architecture and extra CAs included)."""
    return base_recipe_digest(_host_arch(), host_extra_ca_certs())


def mmdebstrap_argv(
    *,
    suite: str,
    variant: str,
    packages: Sequence[str],
    customize_script: str,
    target: str,
    ca_files: Sequence[str] = (),
    mirror: str | None = None,
    keyring: str | None = None,
    components: Sequence[str] = (),
) -> list[str]:
    """The mmdebstrap command that builds a recipe into the directory `target`."""
    hooks = []
    if ca_files:
        ca_dir = "/usr/local/share/ca-certificates/corral-host"
        hooks.append(f'mkdir -p "$1{ca_dir}"')
        hooks.append("copy-in " + " ".join(shlex.quote(f) for f in ca_files) + f" {ca_dir}")
    hooks.append(f'chroot "$1" /bin/sh -c {shlex.quote(customize_script)}')
    return [
        "mmdebstrap",
        "--mode=root",
        f"--variant={variant}",
        "--format=directory",
        f"--include={','.join(packages)}",
        *(f"--customize-hook={hook}" for hook in hooks),
        *([f"--keyring={keyring}"] if keyring else []),
        *([f"--components={','.join(components)}"] if components else []),
        suite,
        target,
        *([mirror] if mirror else []),
    ]


def _host_arch() -> str:
    try:
        return subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise FailedPrecondition(f"cannot tell the Debian architecture of this host: {e}") from e


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_build_dir(path: Path) -> None:
    """Delete a (partial) build tree, never following a mount out of it."""
    prefix = str(path.resolve()) + "/"  # /proc/self/mounts shows resolved paths
    mounted = [
        m.target for m in parse_mounts(Path("/proc/self/mounts").read_text()) if m.target.startswith(prefix)
    ]
    for target in sorted(mounted, key=len, reverse=True):  # deepest first
        subprocess.run(
            ["umount", "--lazy", target], check=False, capture_output=True, stdin=subprocess.DEVNULL
        )
    still = [
        m.target for m in parse_mounts(Path("/proc/self/mounts").read_text()) if m.target.startswith(prefix)
    ]
    if still:
        raise Internal(f"cannot remove {path}: still mounted inside it: {', '.join(still)}")
    shutil.rmtree(path, ignore_errors=False)


def _run_streaming(argv: list[str], log: Callable[[str], object]) -> None:
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except FileNotFoundError as e:
        raise FailedPrecondition(f"{argv[0]} not found; install it with `apt-get install {argv[0]}`") from e
    assert proc.stdout is not None
    tail: list[str] = []
    with proc:
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                log(f"  {line}")
                tail = (tail + [line])[-20:]
        except BaseException:
            # Interrupted (Ctrl-C, a failing log): stop the build; mmdebstrap unmounts on SIGTERM.
            proc.terminate()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise Internal(
            f"building the base template failed ({argv[0]} exited {proc.returncode}): "
            + " | ".join(tail[-5:])
        )


def _build_layer(
    layers_dir: Path,
    digest: str,
    extra_ca: Mapping[str, bytes],
    log: Callable[[str], object],
    recipe: DistroRecipe | None = None,
) -> None:
    recipe = recipe or base_recipe()
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=layers_dir))
    try:
        with tempfile.TemporaryDirectory(prefix="corral-ca-") as ca_dir:
            ca_files = []
            for name, data in sorted(extra_ca.items()):
                (Path(ca_dir) / name).write_bytes(data)
                ca_files.append(str(Path(ca_dir) / name))
            argv = mmdebstrap_argv(
                suite=recipe.suite,
                variant=recipe.variant,
                packages=recipe.packages,
                customize_script=recipe.customize_script,
                target=str(tmp),
                ca_files=ca_files,
                mirror=recipe.mirror,
                keyring=recipe.keyring,
                components=recipe.components,
            )
            _run_streaming(argv, log)
        passwd = (tmp / "etc/passwd").read_text()
        if not any(line.startswith("user:x:1000:1000:") for line in passwd.splitlines()):
            raise Internal("building the base template failed: the tree has no user 'user' with uid 1000")
        tmp.chmod(0o755)  # mkdtemp made it 0700; it becomes the sandbox's `/`
        os.rename(tmp, layers_dir / digest)
    except BaseException:
        _remove_build_dir(tmp)
        raise


@dataclasses.dataclass(frozen=True, slots=True)
class DistroRecipe:
    """A Debian-family root filesystem that mmdebstrap builds (the `base` template is one)."""

    suite: str
    variant: str = BASE_VARIANT
    packages: tuple[str, ...] = ()
    customize_script: str = CUSTOMIZE_SCRIPT
    mirror: str | None = None  # None: Debian's archive
    keyring: str | None = None  # None: Debian's keyring
    components: tuple[str, ...] = ()

    def source(self) -> dict[str, object] | None:
        if self.mirror is None and self.keyring is None and not self.components:
            return None
        return {"mirror": self.mirror, "keyring": self.keyring, "components": list(self.components)}

    def digest(self, arch: str, extra_ca: Mapping[str, bytes] | None = None) -> str:
        return recipe_digest(
            suite=self.suite,
            variant=self.variant,
            packages=self.packages,
            customize_script=self.customize_script,
            arch=arch,
            extra_ca=extra_ca,
            source=self.source(),
        )


def base_recipe() -> DistroRecipe:
    """The recipe of the `base` template's layer."""
    return DistroRecipe(suite=BASE_SUITE, variant=BASE_VARIANT, packages=BASE_PACKAGES)


def ensure_recipe_layer(
    settings: Settings, recipe: DistroRecipe, log: Callable[[str], object] = print
) -> str:
    """Build the layer of `recipe` unless it exists; returns its digest. Blocking (minutes on a miss)."""
    extra_ca = host_extra_ca_certs()
    digest = recipe.digest(_host_arch(), extra_ca)
    store = TemplateStore(settings)
    if store.layer_path(digest).is_dir():
        return digest
    layers_dir = settings.layers_dir
    layers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(layers_dir / _LOCK_NAME):
        for leftover in layers_dir.glob(f"{_TMP_PREFIX}*"):
            log(f"removing {leftover.name}, left by an interrupted build")
            _remove_build_dir(leftover)
        if not store.layer_path(digest).is_dir():
            log(f"bootstrapping {recipe.suite} ({recipe.variant}) with mmdebstrap; once, a minute or two")
            started = time.monotonic()
            _build_layer(layers_dir, digest, extra_ca, log, recipe)
            log(f"built layer {digest[:12]} in {time.monotonic() - started:.0f} s")
    return digest


def ensure_base_template(settings: Settings, log: Callable[[str], object] = print) -> TemplateManifest:
    """Return the `base` template's manifest, building its layer first if it is missing."""
    store = TemplateStore(settings)
    extra_ca = host_extra_ca_certs()
    digest = base_recipe_digest(_host_arch(), extra_ca)
    existing = _get_or_none(store)
    if existing is not None and existing.layers == (digest,) and store.layer_path(digest).is_dir():
        return existing

    layers_dir = settings.layers_dir
    layers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(layers_dir / _LOCK_NAME):
        for leftover in layers_dir.glob(f"{_TMP_PREFIX}*"):
            log(f"removing {leftover.name}, left by an interrupted base template build")
            _remove_build_dir(leftover)

        if not store.layer_path(digest).is_dir():
            log(f"building the base template (Debian {BASE_SUITE} via mmdebstrap; about 90 s, once)")
            started = time.monotonic()
            if extra_ca:
                log(f"adding the host's extra CA certificates to the template: {', '.join(sorted(extra_ca))}")
            _build_layer(layers_dir, digest, extra_ca, log)
            log(f"built base layer {digest[:12]} in {time.monotonic() - started:.0f} s")

        existing = _get_or_none(store)
        if existing is not None and existing.layers == (digest,):
            return existing  # another process finished the same work while we waited for the lock
        manifest = TemplateManifest(
            template_id=BASE_TEMPLATE_ID,
            names=(BASE_TEMPLATE_ID,),
            layers=(digest,),
            created_at=now_rfc3339(),
            build_id=new_build_id(),
        )
        store.save(manifest)
        log(f"template 'base' ready (layer {digest[:12]})")
        return manifest


def _get_or_none(store: TemplateStore) -> TemplateManifest | None:
    try:
        return store.get(BASE_TEMPLATE_ID)
    except NotFound:
        return None
