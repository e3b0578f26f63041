"""Which base an image reference becomes (pure).

    resolve_image("ubuntu:22.04")  → DistroBase(recipe for jammy from Ubuntu's archive)
    resolve_image("e2bdev/base")   → TemplateBase("base")
    resolve_image("ghcr.io/x/y:1") → RegistryBase(reference)

Debian-family images are bootstrapped here with mmdebstrap rather than pulled: `debian:*`,
`ubuntu:*` (when Ubuntu's archive keyring is on the host; otherwise Ubuntu is pulled), and
`python:3[.11]*` / `node:*`, which Debian bookworm's own python3 and nodejs serve. Debian bookworm —
and the python/node images — use the exact recipe of the `base` template (a superset of those
images' tools), so they cost nothing. Everything else is pulled from an OCI registry.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from corral.builder.base import BASE_PACKAGES, BASE_SUITE, BASE_VARIANT, DistroRecipe, base_recipe

__all__ = [
    "DISTRO_PACKAGES",
    "UBUNTU_KEYRING",
    "DistroBase",
    "ImageBase",
    "RegistryBase",
    "TemplateBase",
    "resolve_image",
    "split_reference",
]

UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
UBUNTU_KEYRING = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
# Other suites get a small tree: what E2B's provisioning and our envd need (bash, sudo, the user).
DISTRO_PACKAGES: tuple[str, ...] = (
    "bash",
    "coreutils",
    "sudo",
    "ca-certificates",
    "curl",
    "procps",
    "iproute2",
    "less",
    "ncurses-bin",
    "tar",
    "gzip",
)
_DEBIAN_SUITES = {
    "bookworm": "bookworm", "12": "bookworm", "stable": "bookworm", "latest": "bookworm",
    "trixie": "trixie", "13": "trixie", "testing": "trixie",
    "bullseye": "bullseye", "11": "bullseye", "oldstable": "bullseye",
}  # fmt: skip
_UBUNTU_SUITES = {
    "20.04": "focal", "focal": "focal",
    "22.04": "jammy", "jammy": "jammy",
    "24.04": "noble", "noble": "noble", "latest": "noble", "rolling": "noble",
}  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class TemplateBase:
    template: str
    note: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DistroBase:
    recipe: DistroRecipe
    note: str | None = None  # what the user should know (e.g. a version that differs)


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryBase:
    reference: str


ImageBase = TemplateBase | DistroBase | RegistryBase


def split_reference(image: str) -> tuple[str, str, str | None]:
    """`[registry/]repo[:tag][@digest]` → (repository without docker.io/library, tag, digest)."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    name, tag = image, "latest"
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name, tag, digest


def _suite(tag: str, table: dict[str, str]) -> str | None:
    flavour = re.sub(r"-(slim|minimal|curl|scm|backports)$", "", tag)
    if flavour in table:
        return table[flavour]
    major = re.match(r"^(\d+)(\.\d+)*$", flavour)
    return table.get(major.group(1)) if major else None


def resolve_image(image: str, *, ubuntu_keyring: str = UBUNTU_KEYRING) -> ImageBase:
    name, tag, digest = split_reference(image)
    if digest is None:
        if name == "e2bdev/base":
            return TemplateBase("base")
        if name == "debian":
            suite = _suite(tag, _DEBIAN_SUITES)
            if suite == BASE_SUITE:
                return DistroBase(base_recipe())
            if suite is not None:
                return DistroBase(DistroRecipe(suite=suite, variant=BASE_VARIANT, packages=DISTRO_PACKAGES))
        if name == "ubuntu":
            suite = _suite(tag, _UBUNTU_SUITES)
            if suite is not None and Path(ubuntu_keyring).is_file():
                return DistroBase(
                    DistroRecipe(
                        suite=suite,
                        variant=BASE_VARIANT,
                        packages=DISTRO_PACKAGES,
                        mirror=UBUNTU_MIRROR,
                        keyring=ubuntu_keyring,
                        components=("main", "universe"),
                    )
                )
        if name == "python" and re.match(r"^3(\.11(\.\d+)?)?(-(slim|bookworm|slim-bookworm))?$", tag):
            return DistroBase(
                base_recipe(), note=f"{image} is served by Debian {BASE_SUITE} with its python3 (3.11)"
            )
        if name == "node":
            return DistroBase(
                base_recipe(), note=f"{image} is served by Debian {BASE_SUITE} with its nodejs (18.x)"
            )
    return RegistryBase(image)


assert "python3" in BASE_PACKAGES and "nodejs" in BASE_PACKAGES  # the python/node mapping relies on it
