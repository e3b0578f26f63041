"""Sandbox users from the sandbox's own /etc/passwd and /etc/group, read through the confined root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.core.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.users import MAX_DB_BYTES, lookup_user, owner_names, parse_group, parse_passwd
from corral.node.runtime.base import UserIds

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
+nis-compat
broken:x:notanumber:1::/x:/bin/sh
user:x:1000:1000::/home/user:/bin/bash
user:x:2000:2000::/home/second:/bin/sh
noshell:x:1001:1001::/home/noshell:
"""
GROUP = """\
root:x:0:
sudo:x:27:user,other
user:x:1000:
docker:x:999:other,user
bad:x:x:user
"""


@pytest.fixture
def root(tmp_path: Path) -> ConfinedRoot:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    with ConfinedRoot.open_path(str(tmp_path)) as r:
        yield r


def test_parse_passwd_first_line_wins_and_skips_junk() -> None:
    users = parse_passwd(PASSWD)
    assert sorted(users) == ["daemon", "noshell", "root", "user"]
    assert users["user"] == UserIds(name="user", uid=1000, gid=1000, home="/home/user", shell="/bin/bash")
    assert users["noshell"].shell == "/bin/sh"


def test_parse_group() -> None:
    groups = parse_group(GROUP)
    assert [(g.name, g.gid, g.members) for g in groups] == [
        ("root", 0, ()),
        ("sudo", 27, ("user", "other")),
        ("user", 1000, ()),
        ("docker", 999, ("other", "user")),
    ]


def test_lookup_user_with_supplementary_groups(root: ConfinedRoot) -> None:
    user = lookup_user(root, "user")
    assert (user.uid, user.gid, user.home, user.groups) == (1000, 1000, "/home/user", (1000, 27, 999))
    assert lookup_user(root, "root").groups == (0,)


def test_unknown_user_is_unauthenticated_with_envd_text(root: ConfinedRoot) -> None:
    with pytest.raises(Unauthenticated) as info:
        lookup_user(root, "nobody")
    assert info.value.message == "invalid username: 'nobody'"


def test_cache_follows_file_changes(root: ConfinedRoot, tmp_path: Path) -> None:
    assert lookup_user(root, "user").uid == 1000
    os.unlink(tmp_path / "etc" / "passwd")  # a new inode, as useradd does (rename over)
    (tmp_path / "etc" / "passwd").write_text("user:x:1234:1234::/home/u:/bin/sh\n")
    assert lookup_user(root, "user").uid == 1234


def test_owner_names(root: ConfinedRoot) -> None:
    uids, gids = owner_names(root)
    assert uids[1000] == "user" and uids[0] == "root"
    assert gids[27] == "sudo" and gids[999] == "docker"


def test_passwd_symlinked_to_a_host_file_is_read_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "inside").write_text("user:x:4242:4242::/home/user:/bin/sh\n")
    os.symlink("/inside", tmp_path / "etc" / "passwd")  # the host has no /inside
    os.symlink("/etc/shadow", tmp_path / "etc" / "group")  # host /etc/shadow must not be read
    with ConfinedRoot.open_path(str(tmp_path)) as r:
        assert lookup_user(r, "user").uid == 4242
        assert lookup_user(r, "user").groups == (4242,)


def test_oversized_or_special_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_bytes(b"#" * (MAX_DB_BYTES + 1))
    with ConfinedRoot.open_path(str(tmp_path)) as r, pytest.raises(FailedPrecondition):
        lookup_user(r, "user")
    os.unlink(tmp_path / "etc" / "passwd")
    os.mkfifo(tmp_path / "etc" / "passwd")  # must not block
    with (
        ConfinedRoot.open_path(str(tmp_path)) as r,
        pytest.raises(InvalidArgument, match="not a regular file"),
    ):
        lookup_user(r, "user")


def test_missing_files_mean_no_users(tmp_path: Path) -> None:
    with ConfinedRoot.open_path(str(tmp_path)) as r, pytest.raises(Unauthenticated):
        lookup_user(r, "user")


def test_cache_follows_changes_behind_symlinks(tmp_path: Path) -> None:
    """The stamps are taken from /etc's entries; a symlinked file or /etc is followed (confined)."""
    (tmp_path / "real-etc").mkdir()
    (tmp_path / "data").write_text("user:x:1:1::/home/user:/bin/sh\n")
    os.symlink("/real-etc", tmp_path / "etc")
    os.symlink("/data", tmp_path / "real-etc" / "passwd")
    with ConfinedRoot.open_path(str(tmp_path)) as r:
        assert lookup_user(r, "user").uid == 1
        (tmp_path / "data").write_text("user:x:22:22::/home/user:/bin/sh\n")  # in place, new size
        assert lookup_user(r, "user").uid == 22
        (tmp_path / "real-etc" / "group").write_text("extra:x:5:user\n")
        assert lookup_user(r, "user").groups == (22, 5)
