"""The real `base` template, built by mmdebstrap into the test home (once: ~90 s, then reused).

The test home is `CORRAL_TEST_HOME` (default /var/lib/corral-test), shared with the other
integration tests so the tree is built only once per machine.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from corral.builder.base import ensure_base_template, host_base_digest
from corral.core.settings import Settings, load_settings
from corral.node.storage.templates import TemplateManifest, TemplateStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="building a Debian tree needs root"),
    pytest.mark.timeout(900),  # whichever test runs first may build the tree
]


@pytest.fixture(scope="module")
def settings() -> Settings:
    home = Path(os.environ.get("CORRAL_TEST_HOME", "/var/lib/corral-test"))
    return load_settings({"home": home})


@pytest.fixture(scope="module")
def base(settings: Settings) -> TemplateManifest:
    return ensure_base_template(settings, log=print)


@pytest.fixture(scope="module")
def root(settings: Settings, base: TemplateManifest) -> Path:
    (digest,) = base.layers
    return TemplateStore(settings).layer_path(digest)


def resolve_in(root: Path, path: str) -> Path | None:
    """Follow symlinks the way the sandbox would see them, never leaving `root`; None if missing."""
    current = path
    for _ in range(10):
        candidate = root / current.lstrip("/")
        if not os.path.lexists(candidate):
            return None
        if not candidate.is_symlink():
            return candidate
        target = os.readlink(candidate)
        current = target if target.startswith("/") else os.path.join(os.path.dirname(current), target)
        current = os.path.normpath(current)
    return None


def test_manifest_points_at_the_recipe_layer(settings: Settings, base: TemplateManifest, root: Path) -> None:
    assert base.template_id == "base" and base.names == ("base",)
    assert base.layers == (host_base_digest(),)
    assert root.is_dir() and stat.S_IMODE(root.stat().st_mode) == 0o755
    assert TemplateStore(settings).get("base:default") == base
    assert not list(settings.layers_dir.glob(".tmp-*")), "a build temp dir was left behind"


def test_default_user(root: Path) -> None:
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["user"][2:4] == ["1000", "1000"]
    assert passwd["user"][5:7] == ["/home/user", "/bin/bash"]
    group = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    assert group["user"][2] == "1000"
    assert "user" in group["sudo"][3].split(",")
    shadow = {line.split(":")[0]: line.split(":") for line in (root / "etc/shadow").read_text().splitlines()}
    assert shadow["user"][1] == "", "user should have an empty password (passwd -d)"

    home = os.lstat(root / "home/user")
    assert stat.S_ISDIR(home.st_mode) and (home.st_uid, home.st_gid) == (1000, 1000)
    assert (root / "home/user/.bashrc").is_file()  # copied from /etc/skel


def test_passwordless_sudo(root: Path) -> None:
    sudoers = root / "etc/sudoers.d/user"
    assert sudoers.read_text().strip() == "user ALL=(ALL:ALL) NOPASSWD: ALL"
    assert stat.S_IMODE(os.lstat(sudoers).st_mode) == 0o440


def test_writable_dirs(root: Path) -> None:
    assert stat.S_IMODE(os.lstat(root / "usr/local").st_mode) == 0o777
    assert stat.S_IMODE(os.lstat(root / "code").st_mode) == 0o777


@pytest.mark.parametrize(
    "binary",
    [
        "/bin/bash",
        "/usr/bin/python3",
        "/usr/bin/python",
        "/usr/bin/pip3",
        "/usr/bin/node",
        "/usr/bin/npm",
        "/usr/bin/git",
        "/usr/bin/curl",
        "/usr/bin/tput",
        "/usr/bin/jq",
        "/usr/bin/sudo",
        "/usr/bin/ps",
        "/usr/bin/less",
        "/usr/bin/gcc",
        "/usr/bin/make",
        "/usr/sbin/ip",
    ],
)
def test_tools_exist(root: Path, binary: str) -> None:
    found = resolve_in(root, binary)
    assert found is not None and found.is_file() and os.access(found, os.X_OK), (
        f"{binary} missing in the base layer"
    )


def test_apt_caches_removed(root: Path) -> None:
    assert not list((root / "var/cache/apt/archives").glob("*.deb"))
    assert not [p for p in (root / "var/lib/apt/lists").glob("*") if p.is_file() and p.name != "lock"]


def test_second_call_is_quick_and_does_not_rebuild(settings: Settings, base: TemplateManifest) -> None:
    logged: list[str] = []
    started = time.monotonic()
    again = ensure_base_template(settings, log=logged.append)
    elapsed = time.monotonic() - started
    assert again == base  # same build_id: nothing was rebuilt or rewritten
    assert logged == []
    assert elapsed < 10, f"ensure_base_template took {elapsed:.1f} s with nothing to do"
