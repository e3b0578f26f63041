"""ConfinedRoot against a hostile sandbox tree: nothing may read or write outside the root.

The canary lives in a separate temporary directory. Inside the root, a *decoy* replica sits at
the canary's host path, so a symlink naming the canary's absolute host path must resolve to the
decoy (the root is `/`), proving the kernel reinterpreted it instead of refusing by luck.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from corral.core.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from corral.node.envd.confined import MAX_PATH, ConfinedRoot, DiskFull, error_from_oserror, normalize

CANARY = b"CANARY: host secret\n"
DECOY = b"decoy inside the sandbox\n"


class Tree:
    def __init__(self, root_dir: Path, outside: Path) -> None:
        self.dir = root_dir
        self.outside = outside
        self.canary = outside / "canary"
        self.root = ConfinedRoot.open_path(str(root_dir))

    def host(self, sandbox_path: str) -> Path:
        return self.dir / sandbox_path.lstrip("/")

    def read(self, sandbox_path: str) -> bytes:
        fd = self.root.open_regular(sandbox_path)
        try:
            return os.read(fd, 1 << 16)
        finally:
            os.close(fd)

    def assert_outside_untouched(self) -> None:
        assert self.canary.read_bytes() == CANARY
        assert sorted(p.name for p in self.outside.iterdir()) == ["canary", "dir"]
        assert list((self.outside / "dir").iterdir()) == []


@pytest.fixture
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "canary").write_bytes(CANARY)
    (outside / "dir").mkdir()
    root_dir = tmp_path_factory.mktemp("sandbox-root")
    t = Tree(root_dir, outside)
    decoy = t.host(str(outside))  # the canary's host path, replicated inside the root
    decoy.mkdir(parents=True)
    (decoy / "canary").write_bytes(DECOY)
    (decoy / "dir").mkdir()
    (root_dir / "etc").mkdir()
    (root_dir / "etc" / "hostname").write_text("sandbox\n")
    (root_dir / "home" / "user").mkdir(parents=True)
    os.symlink(str(t.canary), root_dir / "abs_canary")
    os.symlink("../" * 20 + str(t.canary).lstrip("/"), root_dir / "home" / "user" / "rel_canary")
    os.symlink(str(outside / "dir"), root_dir / "home" / "user" / "outdir")
    os.symlink("/etc/hostname", root_dir / "home" / "user" / "hostname")
    os.symlink("loop2", root_dir / "loop1")
    os.symlink("loop1", root_dir / "loop2")
    os.symlink("/does/not/exist", root_dir / "dangling")
    yield t
    t.root.close()


# -- reading never escapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/abs_canary",
        "/home/user/rel_canary",
        "/home/user/../../../../../../abs_canary",
    ],
)
def test_symlinks_to_host_paths_resolve_inside_the_root(tree: Tree, path: str) -> None:
    assert tree.read(path) == DECOY


def test_dotdot_in_the_path_string_stays_inside(tree: Tree) -> None:
    assert tree.read("/../../../../" + str(tree.canary)) == DECOY
    assert tree.read("../" * 30 + str(tree.canary).lstrip("/")) == DECOY


def test_absolute_symlink_resolves_against_the_sandbox_root(tree: Tree) -> None:
    assert tree.read("/home/user/hostname") == b"sandbox\n"


def test_magic_links_are_refused() -> None:
    # The node opens /proc/<pid>/root; a sandbox procfs path like /proc/self/root would name
    # the *reader's* root (ours). RESOLVE_NO_MAGICLINKS must refuse it.
    with ConfinedRoot.open_path(f"/proc/{os.getpid()}/root") as root:
        for path in (
            "/proc/self/root/etc/hostname",
            f"/proc/{os.getpid()}/root/etc/hostname",
            "/proc/self/fd/0",
        ):
            with pytest.raises(InvalidArgument, match="symbolic links"):
                root.open_regular(path)
            with pytest.raises(InvalidArgument):
                root.stat(path)


def test_symlink_loop(tree: Tree) -> None:
    with pytest.raises(InvalidArgument, match="too many levels of symbolic links"):
        tree.read("/loop1")
    with pytest.raises(InvalidArgument, match="too many levels of symbolic links"):
        tree.root.realpath("/loop1")


def test_dangling_symlink_is_not_found(tree: Tree) -> None:
    with pytest.raises(NotFound):
        tree.read("/dangling")
    assert stat.S_ISLNK(tree.root.lstat("/dangling").st_mode)


def test_listing_a_symlink_to_an_outside_dir_lists_the_inside_replica(tree: Tree) -> None:
    (tree.host(str(tree.outside)) / "dir" / "inside-only").write_text("x")
    assert tree.root.listdir("/home/user/outdir") == ["inside-only"]


def test_fifo_and_device_nodes_are_refused_without_opening(tree: Tree) -> None:
    os.mkfifo(tree.dir / "fifo")  # opening it for reading would block forever
    os.mknod(tree.dir / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for path in ("/fifo", "/null"):
        with pytest.raises(InvalidArgument, match="not a regular file"):
            tree.root.open_regular(path)
    with pytest.raises(InvalidArgument, match="is a directory"):
        tree.root.open_regular("/etc")
    for path in ("/fifo", "/null"):
        with pytest.raises(InvalidArgument):
            tree.root.open_for_write(path, uid=0, gid=0)


# -- writing never escapes -------------------------------------------------------------------


def test_write_through_symlinks_lands_inside(tree: Tree) -> None:
    for path in ("/abs_canary", "/home/user/rel_canary"):
        fd, created = tree.root.open_for_write(path, uid=1000, gid=1000)
        os.write(fd, b"overwritten")
        os.close(fd)
        assert not created
    assert (tree.host(str(tree.outside)) / "canary").read_bytes() == b"overwritten"
    tree.assert_outside_untouched()


def test_create_through_dangling_symlink_creates_inside(tree: Tree) -> None:
    os.symlink(str(tree.outside / "dir" / "new"), tree.dir / "dangling_out")
    fd, created = tree.root.open_for_write("/dangling_out", uid=1000, gid=1000)
    os.write(fd, b"x")
    os.close(fd)
    assert created
    assert (tree.host(str(tree.outside)) / "dir" / "new").read_bytes() == b"x"
    tree.assert_outside_untouched()


def test_makedirs_and_mkdir_through_symlinked_dir(tree: Tree) -> None:
    created = tree.root.makedirs("/home/user/outdir/a/b", 0o755, uid=1000, gid=1000)
    assert created == ["/home/user/outdir/a", "/home/user/outdir/a/b"]
    tree.root.mkdir("/home/user/outdir/c", 0o700, uid=1000, gid=1000)
    replica = tree.host(str(tree.outside)) / "dir"
    assert (replica / "a" / "b").is_dir()
    st = (replica / "c").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 1000, 1000)
    st = (replica / "a").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 1000, 1000)
    tree.assert_outside_untouched()


def test_rename_into_symlinked_dir(tree: Tree) -> None:
    (tree.dir / "home" / "user" / "f").write_text("moved")
    tree.root.rename("/home/user/f", "/home/user/outdir/f")
    assert (tree.host(str(tree.outside)) / "dir" / "f").read_text() == "moved"
    tree.assert_outside_untouched()


def test_remove_tree_never_follows_symlinks(tree: Tree) -> None:
    work = tree.dir / "home" / "user" / "tree"
    (work / "sub" / "deeper").mkdir(parents=True)
    (work / "sub" / "file").write_text("x")
    os.symlink(str(tree.outside), work / "abs_out")
    os.symlink("../" * 20 + str(tree.outside).lstrip("/"), work / "sub" / "rel_out")
    os.symlink("/", work / "root_link")
    tree.root.remove("/home/user/tree")
    assert not work.exists()
    tree.assert_outside_untouched()
    assert (tree.host(str(tree.outside)) / "canary").read_bytes() == DECOY  # links removed, not targets
    assert (tree.dir / "etc" / "hostname").exists()


def test_remove_symlink_removes_only_the_link(tree: Tree) -> None:
    tree.root.remove("/home/user/outdir")
    assert not os.path.lexists(tree.dir / "home" / "user" / "outdir")
    assert (tree.host(str(tree.outside)) / "dir").is_dir()
    tree.assert_outside_untouched()


def test_remove_missing_and_root(tree: Tree) -> None:
    with pytest.raises(NotFound):
        tree.root.remove("/nope")
    tree.root.remove("/nope", missing_ok=True)
    tree.root.remove("/nope/deeper", missing_ok=True)
    with pytest.raises(InvalidArgument):
        tree.root.remove("/")
    with pytest.raises(InvalidArgument):
        tree.root.remove("/../..")


def test_remove_deep_tree_iteratively(tree: Tree) -> None:
    deep = tree.dir / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):  # deeper than Python's recursion limit and PATH_MAX
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    tree.root.remove("/deep")
    assert not deep.exists()


def test_dir_swapped_for_symlink_mid_operation(tree: Tree) -> None:
    """A sandbox process flips /race between a directory and a symlink to the outside dir."""
    race = tree.dir / "race"
    stop = threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            for target in (str(tree.outside / "dir"), "../" * 10 + str(tree.outside / "dir").lstrip("/")):
                try:
                    os.mkdir(race)
                except FileExistsError:
                    pass
                time.sleep(0)
                try:
                    for child in os.listdir(race):
                        os.unlink(race / child)
                    os.rmdir(race)
                    os.symlink(target, race)
                    time.sleep(0)
                    os.unlink(race)
                except OSError:
                    pass

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for op in (
                lambda: os.close(tree.root.open_for_write("/race/f", uid=0, gid=0)[0]),
                lambda: tree.root.makedirs("/race/d/e"),
                lambda: tree.root.listdir("/race"),
                lambda: tree.root.remove("/race/f", missing_ok=True),
                lambda: tree.root.remove("/race", missing_ok=True),
                lambda: tree.root.rename("/race/f", "/race/g"),
            ):
                try:
                    op()
                except (NotFound, InvalidArgument, AlreadyExists):
                    pass
                except Exception as exc:  # noqa: BLE001 - other CorralErrors are fine, escapes are not
                    assert "outside" not in str(exc)
    finally:
        stop.set()
        thread.join()
    tree.assert_outside_untouched()


# -- metadata, realpath, paths, errors -------------------------------------------------------


def test_realpath_resolves_within_the_root(tree: Tree) -> None:
    assert tree.root.realpath("/abs_canary") == str(tree.canary)  # a sandbox path (the decoy)
    assert tree.root.realpath("/home/user/rel_canary") == str(tree.canary)
    assert tree.root.realpath("/home/user/hostname") == "/etc/hostname"
    assert tree.root.realpath("/home/user/./../user/hostname") == "/etc/hostname"
    os.symlink("outdir/../canary", tree.dir / "home" / "user" / "chain")
    # outdir is a link: `..` applies after resolving it (POSIX), like Go's EvalSymlinks
    assert tree.root.realpath("/home/user/chain") == str(tree.canary)
    with pytest.raises(NotFound):
        tree.root.realpath("/dangling")


def test_lstat_and_stat(tree: Tree) -> None:
    assert stat.S_ISLNK(tree.root.lstat("/abs_canary").st_mode)
    assert stat.S_ISREG(tree.root.stat("/abs_canary").st_mode)
    assert tree.root.stat("/abs_canary").st_size == len(DECOY)
    assert tree.root.readlink("/abs_canary") == str(tree.canary)
    with pytest.raises(InvalidArgument, match="not a symbolic link"):
        tree.root.readlink("/etc/hostname")


def test_xattrs_on_fds_and_refused_on_symlinks(tree: Tree) -> None:
    fd = tree.root.open_handle("/etc/hostname")
    try:
        ConfinedRoot.setxattr(fd, "user.e2b.k", b"v")
        assert ConfinedRoot.listxattr(fd) == ["user.e2b.k"]
        assert ConfinedRoot.getxattr(fd, "user.e2b.k") == b"v"
        ConfinedRoot.removexattr(fd, "user.e2b.k")
        assert ConfinedRoot.listxattr(fd) == []
    finally:
        os.close(fd)
    link = tree.root.open_handle("/abs_canary", follow=False)
    try:
        assert ConfinedRoot.listxattr(link) == []
        with pytest.raises(OSError):
            ConfinedRoot.setxattr(link, "user.e2b.k", b"v")
    finally:
        os.close(link)


def test_open_for_write_creates_0644_owned_and_keeps_mode_on_overwrite(tree: Tree) -> None:
    old_umask = os.umask(0o077)  # a stricter umask must not change the result
    try:
        fd, created = tree.root.open_for_write("/home/user/new.txt", uid=1000, gid=1000)
    finally:
        os.umask(old_umask)
    os.write(fd, b"hello")
    os.close(fd)
    st = (tree.dir / "home" / "user" / "new.txt").stat()
    assert created and (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, 1000, 1000)
    os.chmod(tree.dir / "home" / "user" / "new.txt", 0o600)
    fd, created = tree.root.open_for_write("/home/user/new.txt", uid=1000, gid=1000)
    os.write(fd, b"hi")
    os.close(fd)
    st = (tree.dir / "home" / "user" / "new.txt").stat()
    assert not created and stat.S_IMODE(st.st_mode) == 0o600
    assert (tree.dir / "home" / "user" / "new.txt").read_bytes() == b"hi"


def test_mkdir_and_makedirs_errors(tree: Tree) -> None:
    with pytest.raises(AlreadyExists):
        tree.root.mkdir("/etc")
    with pytest.raises(InvalidArgument, match="'/etc/hostname' exists but is not a directory"):
        tree.root.makedirs("/etc/hostname/x")
    assert tree.root.makedirs("/etc") == []
    with pytest.raises(NotFound):
        tree.root.mkdir("/no/parent")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("/", "/"), ("", "/"), ("a/b", "/a/b"), ("//a//b/", "/a/b"), ("/a/../../b", "/b"), ("/a/./b/..", "/a")],
)
def test_normalize(raw: str, clean: str) -> None:
    assert normalize(raw) == clean


def test_invalid_paths(tree: Tree) -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        tree.root.stat("/etc\x00/passwd")
    with pytest.raises(InvalidArgument, match="longer than"):
        tree.root.stat("/" + "a" * MAX_PATH)
    with pytest.raises(InvalidArgument):
        tree.root.stat("/\ud800")


def test_error_messages_name_sandbox_paths_only(tree: Tree) -> None:
    with pytest.raises(NotFound) as info:
        tree.read("/home/user/missing")
    assert info.value.message == "path '/home/user/missing' does not exist"
    assert str(tree.dir) not in info.value.message
    assert isinstance(error_from_oserror(OSError(errno.ENOSPC, "x"), "/a"), DiskFull)


def test_closed_root_refuses_new_operations(tmp_path: Path) -> None:
    root = ConfinedRoot.open_path(str(tmp_path))
    fd = root.fileno()
    root.close()
    with pytest.raises(Unavailable):
        root.stat("/")
    with pytest.raises(OSError):
        os.fstat(fd)  # the owned fd was closed
    root.close()  # idempotent
