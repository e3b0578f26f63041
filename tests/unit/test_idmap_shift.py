"""Sandbox ids vs host ids: committed layers are shifted back (`unshift_tree`, file capabilities
and ACLs included) and envd's `ConfinedRoot` chowns to host ids and reports sandbox ids."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from corral.core.errors import InvalidArgument
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.entry import read_entry
from corral.node.runtime.idmap import (
    FIRST_BASE,
    OVERFLOW_ID,
    SANDBOX_IDS,
    IdMap,
    unshift_acl,
    unshift_fscap,
    unshift_tree,
)
from corral.node.storage.commit import commit_layer, tree_digest

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chown to other ids needs root")
IDS = IdMap(FIRST_BASE + 3 * SANDBOX_IDS)
B = IDS.base


def _fscap_v3(rootid: int, effective: bool = True) -> bytes:
    magic = 0x03000000 | (1 if effective else 0)
    return struct.pack("<IIIIII", magic, 1 << 13, 0, 0, 0, rootid)  # cap_net_raw permitted


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_fscap_root_of_the_sandbox_becomes_host_root_v2() -> None:
    v2 = unshift_fscap(_fscap_v3(B), IDS)
    assert v2 is not None and len(v2) == 20
    assert struct.unpack_from("<I", v2)[0] == 0x02000001  # revision 2, effective flag kept
    assert v2[4:] == _fscap_v3(B)[4:20]
    other = unshift_fscap(_fscap_v3(B + 1000), IDS)
    assert other is not None and struct.unpack_from("<I", other, 20)[0] == 1000
    assert unshift_fscap(_fscap_v3(5), IDS) is None  # not the sandbox's: left alone
    assert unshift_fscap(_fscap_v3(B)[:20], IDS) is None  # a v2 value: nothing to shift
    assert unshift_fscap(b"junk", IDS) is None


def test_acl_named_entries_are_shifted_others_kept() -> None:
    acl = _acl(
        (0x01, 7, 0xFFFFFFFF), (0x02, 6, B + 1000), (0x08, 4, B + 54321), (0x02, 4, 7), (0x20, 0, 0xFFFFFFFF)
    )
    out = unshift_acl(acl, IDS)
    assert out == _acl(
        (0x01, 7, 0xFFFFFFFF), (0x02, 6, 1000), (0x08, 4, 54321), (0x02, 4, 7), (0x20, 0, 0xFFFFFFFF)
    )
    assert unshift_acl(_acl((0x02, 6, 7)), IDS) is None
    assert unshift_acl(b"\x02\x00\x00\x00abc", IDS) is None  # not a whole number of entries


def test_ids_as_seen_inside() -> None:
    assert IDS.as_seen_inside(B + 12345) == 12345
    assert IDS.as_seen_inside(0) == OVERFLOW_ID and IDS.as_seen_inside(B + SANDBOX_IDS) == OVERFLOW_ID


def _shifted_tree(root: Path, base: int = B) -> dict[str, os.stat_result]:
    """A writable layer as a userns sandbox leaves it: host ids base+N, plus an overlay whiteout
    made by the (host root) mounter. Times are fixed, so two such trees have equal digests."""
    (root / "home" / "user").mkdir(parents=True)
    files = {
        "home/user/a.txt": (1000, 1000, 0o644),
        "home/user/odd": (12345, 54321, 0o640),
        "usr-bin-tool": (0, 0, 0o4755),
        "sgid": (0, 50, 0o2755),
    }
    for name, (uid, gid, mode) in files.items():
        (root / name).write_text(name)
        os.chown(root / name, base + uid, base + gid)
        os.chmod(root / name, mode)
    os.link(root / "home/user/a.txt", root / "hardlink")
    (root / "link").symlink_to("/etc/passwd")
    os.chown(root / "link", base + 1000, base + 1000, follow_symlinks=False)
    os.mknod(root / "whiteout", stat.S_IFCHR, os.makedev(0, 0))  # owned by host root: kept
    for d in (root, root / "home"):
        os.chown(d, base, base)
    os.chown(root / "home" / "user", base + 1000, base + 1000)
    names = [*files, "link", "whiteout", "hardlink", "home/user", "home", "."]
    for when, name in enumerate(names):
        os.utime(root / name, ns=(1_000_000_000, 2_000_000_000 + when), follow_symlinks=False)
    return {name: os.lstat(root / name) for name in names}


@needs_root
def test_unshift_tree_restores_owners_modes_and_times(tmp_path: Path) -> None:
    root = tmp_path / "layer"
    before = _shifted_tree(root)
    unshift_tree(root, IDS)
    owners = {name: (os.lstat(root / name).st_uid, os.lstat(root / name).st_gid) for name in before}
    assert owners == {
        "home/user/a.txt": (1000, 1000), "home/user/odd": (12345, 54321), "usr-bin-tool": (0, 0),
        "sgid": (0, 50), "link": (1000, 1000), "whiteout": (0, 0), "hardlink": (1000, 1000),
        "home/user": (1000, 1000), "home": (0, 0), ".": (0, 0),
    }  # fmt: skip
    assert stat.S_IMODE(os.lstat(root / "usr-bin-tool").st_mode) == 0o4755  # chown cleared it: restored
    assert stat.S_IMODE(os.lstat(root / "sgid").st_mode) == 0o2755
    assert os.lstat(root / "home/user/odd").st_mtime_ns == before["home/user/odd"].st_mtime_ns
    assert unshift_tree(root, IDS) == 0  # idempotent


@needs_root
def test_unshift_tree_keeps_file_capabilities_and_acls(tmp_path: Path) -> None:
    root = tmp_path / "layer"
    root.mkdir()
    tool = root / "ping"
    tool.write_text("x")
    os.chown(tool, B, B)
    os.chmod(tool, 0o755)
    os.setxattr(tool, "security.capability", _fscap_v3(B))
    try:
        os.setxattr(
            tool,
            "system.posix_acl_access",
            _acl(
                (1, 7, 0xFFFFFFFF),
                (2, 6, B + 1000),
                (4, 5, 0xFFFFFFFF),
                (0x10, 7, 0xFFFFFFFF),
                (0x20, 5, 0xFFFFFFFF),
            ),
        )
    except OSError:
        pytest.skip("no ACL support on this file system")
    unshift_tree(root, IDS)
    assert os.lstat(tool).st_uid == 0
    cap = os.getxattr(tool, "security.capability")
    assert struct.unpack_from("<I", cap)[0] & 0xFF000000 == 0x02000000 and cap[4:8] == struct.pack(
        "<I", 1 << 13
    )
    acl = os.getxattr(tool, "system.posix_acl_access")
    assert struct.pack("<HHI", 2, 6, 1000) in acl


@needs_root
async def test_commit_with_an_id_map_gives_the_layer_of_the_unshifted_tree(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    _shifted_tree(upper)
    digest = await commit_layer(upper, tmp_path / "layers", IDS)
    layer = tmp_path / "layers" / digest
    assert os.lstat(layer / "home/user/odd").st_uid == 12345
    assert os.lstat(upper / "home/user/odd").st_uid == B + 12345  # the sandbox's own files untouched
    assert stat.S_IMODE(os.lstat(layer / "usr-bin-tool").st_mode) == 0o4755
    other = IdMap(FIRST_BASE)  # the same files from another sandbox's range: the same layer
    upper2 = tmp_path / "upper2"
    _shifted_tree(upper2, other.base)
    assert await commit_layer(upper2, tmp_path / "layers", other) == digest == tree_digest(layer)


@needs_root
def test_confined_root_chowns_to_host_ids_and_reports_sandbox_ids(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )
    (tmp_path / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    with ConfinedRoot.open_path(str(tmp_path), id_map=IDS) as root:
        created_dirs = root.makedirs("/home/user/deep", 0o755, uid=1000, gid=1000)
        assert created_dirs == ["/home", "/home/user", "/home/user/deep"]
        assert os.lstat(tmp_path / "home" / "user").st_uid == B + 1000
        fd, created = root.open_for_write("/home/user/new.txt", uid=1000, gid=1000)
        os.close(fd)
        assert created and (
            os.lstat(tmp_path / "home/user/new.txt").st_uid,
            os.lstat(tmp_path / "home/user/new.txt").st_gid,
        ) == (B + 1000, B + 1000)
        root.mkdir("/home/user/rootdir", uid=0, gid=0)
        assert os.lstat(tmp_path / "home/user/rootdir").st_uid == B
        entry = read_entry(root, "/home/user/new.txt")
        assert (entry.owner, entry.group) == ("user", "user")
        assert root.owner(os.lstat(tmp_path / "etc" / "passwd")) == (
            OVERFLOW_ID,
            OVERFLOW_ID,
        )  # host root: unmapped
        assert read_entry(root, "/etc/passwd").owner == str(OVERFLOW_ID)
        with pytest.raises(InvalidArgument):
            root.mkdir("/toobig", uid=SANDBOX_IDS)
    with ConfinedRoot.open_path(str(tmp_path)) as plain:  # no user namespace: ids as they are
        fd, _ = plain.open_for_write("/plain.txt", uid=1000, gid=1000)
        os.close(fd)
        assert os.lstat(tmp_path / "plain.txt").st_uid == 1000
        assert read_entry(plain, "/plain.txt").owner == "user"


def test_user_namespaces_are_on_by_default_with_an_off_switch() -> None:
    from corral.core.settings import load_settings

    assert load_settings(env={}).userns is True
    assert load_settings(env={"CORRAL_USERNS": "0"}).userns is False
    assert load_settings(env={"CORRAL_USERNS": "off"}).userns is False
    assert load_settings({"userns": False}, env={}).userns is False


def test_runsc_sandboxes_get_no_host_user_namespace() -> None:
    from corral.node.runtime.runtimes import traits_for

    assert traits_for("crun").user_namespace and not traits_for("/usr/sbin/runsc").user_namespace


@needs_root
def test_unshift_tree_never_follows_a_symlink_out(tmp_path: Path) -> None:
    """Escape via a hostile tree: symlinks to a directory and to a file outside the copy, whose
    owners are in the sandbox's range, leave those targets as they were."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("host")
    for path in (outside, outside / "victim"):
        os.chown(path, B + 5, B + 5)
    root = tmp_path / "layer"
    root.mkdir()
    (root / "dir-link").symlink_to(outside)
    (root / "file-link").symlink_to(outside / "victim")
    (root / "dotdot").symlink_to("../outside")
    unshift_tree(root, IDS)
    assert {os.lstat(p).st_uid for p in (outside, outside / "victim")} == {B + 5}
    assert os.lstat(root / "dir-link").st_uid == 0


@needs_root
def test_namespaces_for_idmapped_mounts_are_reused_by_slot() -> None:
    from corral.node.runtime.idmap import _NamespaceCache

    cache = _NamespaceCache(2)
    fds = [cache.acquire(IDS), cache.acquire(IDS), cache.acquire(IdMap(FIRST_BASE))]
    try:
        first, again, other = (os.fstat(fd).st_ino for fd in fds)
        assert first == again != other  # the same slot: the same namespace; another slot: its own
        fds.append(cache.acquire(IdMap(FIRST_BASE + SANDBOX_IDS)))  # a third slot evicts the oldest
        assert list(cache._fds) == [IdMap(FIRST_BASE), IdMap(FIRST_BASE + SANDBOX_IDS)]
        fds.append(cache.acquire(IDS))
        assert os.fstat(fds[-1]).st_ino != first  # made again (the old one lives while we hold it)
    finally:
        for fd in fds:
            os.close(fd)
