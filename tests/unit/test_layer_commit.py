"""corral.node.storage.commit: a sandbox's upper dir becomes a content-addressed read-only layer,
whiteouts and opaque directories included; plus the disk image's command lines."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from corral.node.storage.commit import commit_layer, remove_layer, tree_digest
from corral.node.storage.disk import disk_plan, mkfs_argv, mount_argv

ROOT = os.geteuid() == 0


def _upper(root: Path) -> Path:
    (root / "home" / "user").mkdir(parents=True)
    (root / "home" / "user" / "a.txt").write_text("hello")
    (root / "link").symlink_to("/etc/passwd")  # never followed
    return root


def test_digest_is_stable_and_sees_content_modes_links_and_xattrs(tmp_path: Path) -> None:
    upper = _upper(tmp_path / "u")
    first = tree_digest(upper)
    assert first == tree_digest(upper) and len(first) == 64
    (upper / "home" / "user" / "a.txt").write_text("hellO")
    changed = tree_digest(upper)
    assert changed != first
    os.chmod(upper / "home" / "user" / "a.txt", 0o600)
    assert tree_digest(upper) != changed
    mode_changed = tree_digest(upper)
    (upper / "link").unlink()
    (upper / "link").symlink_to("/etc/shadow")
    assert tree_digest(upper) != mode_changed


@pytest.mark.skipif(not ROOT, reason="trusted.* xattrs and whiteouts need root")
def test_digest_ignores_volatile_overlay_xattrs_but_not_opaque(tmp_path: Path) -> None:
    upper = _upper(tmp_path / "u")
    base = tree_digest(upper)
    os.setxattr(upper, "trusted.overlay.uuid", b"0123456789abcdef")
    assert tree_digest(upper) == base
    os.setxattr(upper / "home", "trusted.overlay.opaque", b"y")
    assert tree_digest(upper) != base


@pytest.mark.skipif(not ROOT, reason="whiteouts are character devices 0/0: mknod needs root")
async def test_commit_copies_whiteouts_and_opaque_dirs_and_dedupes(tmp_path: Path) -> None:
    upper = _upper(tmp_path / "u")
    os.mknod(upper / "deleted", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (upper / "replaced").mkdir()
    os.setxattr(upper / "replaced", "trusted.overlay.opaque", b"y")
    layers = tmp_path / "layers"
    digest = await commit_layer(upper, layers)
    layer = layers / digest
    assert digest == tree_digest(layer) == tree_digest(upper)
    st = os.lstat(layer / "deleted")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(layer / "replaced", "trusted.overlay.opaque") == b"y"
    assert os.readlink(layer / "link") == "/etc/passwd"
    assert (layer / "home" / "user" / "a.txt").read_text() == "hello"
    assert await commit_layer(upper, layers) == digest  # same content: the same layer
    assert [p.name for p in layers.iterdir()] == [digest]  # no temporary copy left
    remove_layer(layers, digest)
    assert list(layers.iterdir()) == []
    remove_layer(layers, digest)  # idempotent


def test_disk_plan_and_commands(tmp_path: Path) -> None:
    plan = disk_plan(tmp_path / "sbx", 64)
    assert plan.image == tmp_path / "sbx" / "disk.img"
    assert (
        plan.upper == tmp_path / "sbx" / "disk" / "upper" and plan.work == tmp_path / "sbx" / "disk" / "work"
    )
    argv = mkfs_argv(plan)
    assert argv[0] == "mkfs.ext4" and argv[-1] == str(plan.image) and "-m" in argv
    assert any("lazy_itable_init=1" in a for a in argv)
    mount = mount_argv(plan)
    assert mount[:3] == ["mount", "-t", "ext4"] and "loop" in mount[4] and "nodev" in mount[4]
    assert mount[-2:] == [str(plan.image), str(plan.mountpoint)]
