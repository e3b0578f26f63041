"""Directory watches (`watch.py`) on a real inotify instance over a temporary sandbox root."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from corral.node.envd import watch
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.watch import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE_SELF,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    EventKind,
    InotifyHub,
    RawEvent,
    WatcherRegistry,
    event_kinds,
    parse_events,
)

C, W, R, RN, CH = EventKind.CREATE, EventKind.WRITE, EventKind.REMOVE, EventKind.RENAME, EventKind.CHMOD


# -- pure ------------------------------------------------------------------------------------------


def test_parse_events_splits_and_strips_padding() -> None:
    buf = struct.pack("iIII", 1, IN_CREATE, 0, 8) + b"abc\0\0\0\0\0" + struct.pack("iIII", 2, IN_ATTRIB, 7, 0)
    assert parse_events(buf) == [RawEvent(1, IN_CREATE, 0, b"abc"), RawEvent(2, IN_ATTRIB, 7, b"")]
    assert parse_events(b"") == []


@pytest.mark.parametrize(
    ("mask", "kinds"),
    [
        (IN_CREATE, (C,)),
        (IN_MOVED_TO | IN_ISDIR, (C,)),
        (IN_MOVED_FROM, (RN,)),
        (IN_ATTRIB, (CH,)),
        (IN_MODIFY, (W,)),
        (IN_DELETE_SELF, (R,)),
        (IN_CREATE | IN_ATTRIB | IN_MODIFY, (C, CH, W)),  # envd's order
        (0, ()),
    ],
)
def test_event_kinds(mask: int, kinds: tuple[EventKind, ...]) -> None:
    assert event_kinds(mask) == kinds


# -- real inotify ----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "home/user/dir/nested").mkdir(parents=True)
    (root / "home/user/dir/old.txt").write_text("old")
    return root


@pytest.fixture
def root(tree: Path) -> Iterator[ConfinedRoot]:
    with ConfinedRoot.open_path(str(tree)) as r:
        yield r


@pytest.fixture
def hub() -> Iterator[InotifyHub]:
    h = InotifyHub()
    yield h
    h.close()


def _events(watcher: watch.Watcher, hub: InotifyHub) -> list[tuple[str, EventKind]]:
    hub.sync()
    return [(e.name, e.kind) for e in watcher.take()]


def _upload(root: ConfinedRoot, path: str, data: bytes) -> None:
    """What POST /files does for one file."""
    fd, _ = root.open_for_write(path, uid=os.getuid(), gid=os.getgid())
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_new_file_gives_create_chmod_write_and_overwrite_gives_chmod_write(
    root: ConfinedRoot, hub: InotifyHub
) -> None:
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user/dir")
    _upload(root, "/home/user/dir/new.txt", b"hello")
    assert _events(w, hub) == [("new.txt", C), ("new.txt", CH), ("new.txt", W)]
    _upload(root, "/home/user/dir/new.txt", b"again")
    assert [k for _, k in _events(w, hub)] in ([CH, W, W], [CH, W])  # truncate + write may merge
    root.remove("/home/user/dir/new.txt")
    assert _events(w, hub) == [("new.txt", R)]
    assert _events(w, hub) == []


def test_not_recursive_ignores_nested_and_recursive_sees_it(root: ConfinedRoot, hub: InotifyHub) -> None:
    reg = WatcherRegistry()
    flat = reg.create(hub, root, "/home/user/dir")
    deep = reg.create(hub, root, "/home/user/dir", recursive=True)
    _upload(root, "/home/user/dir/nested/f", b"x")
    assert _events(flat, hub) == []
    assert _events(deep, hub) == [("nested/f", C), ("nested/f", CH), ("nested/f", W)]


def test_recursive_watches_new_directories_and_reports_what_they_already_hold(
    root: ConfinedRoot, hub: InotifyHub, tree: Path
) -> None:
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user/dir", recursive=True)
    # mkdir -p a/b/c + a file, all before the hub saw anything: the walk reports them
    (tree / "home/user/dir/a/b/c").mkdir(parents=True)
    (tree / "home/user/dir/a/b/file").write_text("x")
    events = _events(w, hub)
    assert events[0] == ("a", C)
    assert {("a/b", C), ("a/b/c", C), ("a/b/file", C)} <= set(events)
    # now a/b/c is watched itself
    _upload(root, "/home/user/dir/a/b/c/deep", b"y")
    assert ("a/b/c/deep", W) in _events(w, hub)
    # a directory moved away stops being watched; moved back in, it is watched again
    os.rename(tree / "home/user/dir/a", tree / "home/user/away")
    assert _events(w, hub) == [("a", RN)]
    (tree / "home/user/away/b/c/ignored").write_text("z")
    assert _events(w, hub) == []
    os.rename(tree / "home/user/away", tree / "home/user/dir/back")
    assert ("back", C) in _events(w, hub)
    (tree / "home/user/dir/back/b/c/seen").write_text("z")
    assert ("back/b/c/seen", C) in _events(w, hub)


def test_recursive_never_follows_symlinks(
    root: ConfinedRoot, hub: InotifyHub, tree: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tree / "home/user/dir/link").symlink_to(outside)
    (tree / "home/user/dir/abs").symlink_to("/")
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user/dir", recursive=True)
    (outside / "host-file").write_text("x")
    assert _events(w, hub) == []
    # a symlinked directory appearing later is reported but not descended into
    (tree / "home/user/dir/later").symlink_to(outside)
    assert _events(w, hub) == [("later", C)]
    (outside / "host-file-2").write_text("x")
    assert _events(w, hub) == []


def test_watched_path_resolves_in_the_root(
    root: ConfinedRoot, hub: InotifyHub, tree: Path, tmp_path: Path
) -> None:
    # an absolute symlink to "/" means the sandbox's root, never the host's
    (tree / "home/user/toroot").symlink_to("/")
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user/toroot/home/user/dir")
    (tree / "home/user/dir/via-link").write_text("x")
    assert ("via-link", C) in _events(w, hub)
    with pytest.raises(NotFound):
        reg.create(hub, root, "/home/user/toroot/../../../../" + str(tmp_path).lstrip("/"))


def test_errors_and_limits(root: ConfinedRoot, hub: InotifyHub, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = WatcherRegistry()
    with pytest.raises(NotFound, match="not found"):
        reg.create(hub, root, "/home/user/missing")
    with pytest.raises(InvalidArgument, match="not a directory"):
        reg.create(hub, root, "/home/user/dir/old.txt")
    monkeypatch.setattr(watch, "MAX_WATCHERS", 2)
    a = reg.create(hub, root, "/home/user")
    reg.create(hub, root, "/home/user/dir")
    with pytest.raises(ResourceExhausted, match="at most 2"):
        reg.create(hub, root, "/home/user/dir")
    reg.remove(a.id)
    with pytest.raises(NotFound, match=a.id):
        reg.remove(a.id)
    assert len(reg) == 1
    monkeypatch.setattr(watch, "MAX_WATCHED_DIRS", 1)
    with pytest.raises(ResourceExhausted, match="watched directories"):
        reg.create(hub, root, "/home/user", recursive=True)
    assert len(reg) == 1 and reg.watched_dirs == 1


def test_queue_bound_stops_the_watcher_with_a_clear_error(
    root: ConfinedRoot, hub: InotifyHub, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "MAX_QUEUED_EVENTS", 5)
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user/dir")
    for i in range(5):
        (tree / f"home/user/dir/f{i}").write_text("x")
    hub.sync()
    with pytest.raises(ResourceExhausted, match="more than 5 events"):
        w.take()
    assert reg.queued_events == 0 and reg.watched_dirs == 0  # its queue and kernel watch are gone
    other = reg.create(hub, root, "/home/user/dir")
    (tree / "home/user/dir/g").write_text("x")
    assert ("g", C) in _events(other, hub)


def test_close_releases_everything(root: ConfinedRoot, hub: InotifyHub, tree: Path) -> None:
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user", recursive=True)
    same = reg.create(hub, root, "/home/user/dir")  # shares kernel watches with `w`
    assert hub.watch_count() == 3
    reg.discard(same)
    assert hub.watch_count() == 3
    (tree / "home/user/x").write_text("x")
    reg.close()
    assert w.closed and hub.watch_count() == 0 and reg.watched_dirs == 0 and reg.queued_events == 0
    with pytest.raises(Unavailable):
        reg.create(hub, root, "/home/user")


def test_reader_thread_delivers_without_sync(root: ConfinedRoot, hub: InotifyHub, tree: Path) -> None:
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user/dir")
    (tree / "home/user/dir/bg").write_text("x")
    deadline = time.monotonic() + 5
    events: list[tuple[str, EventKind]] = []
    while time.monotonic() < deadline and ("bg", W) not in events:
        events += [(e.name, e.kind) for e in w.take()]
        time.sleep(0.01)
    assert events[:2] == [("bg", C), ("bg", W)]


def test_deleting_the_watched_directory(root: ConfinedRoot, hub: InotifyHub, tree: Path) -> None:
    reg = WatcherRegistry()
    w = reg.create(hub, root, "/home/user/dir/nested")
    root.remove("/home/user/dir/nested")
    assert _events(w, hub) == [(".", R)]
    assert reg.watched_dirs == 0 and hub.watch_count() == 0


def test_huge_directories_are_refused_by_recursive_watches(
    root: ConfinedRoot, hub: InotifyHub, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "MAX_DIR_ENTRIES", 2)
    reg = WatcherRegistry()
    reg.discard(reg.create(hub, root, "/home/user/dir", recursive=True))  # exactly 2 entries: fine
    (tree / "home/user/dir/third").write_text("x")
    with pytest.raises(ResourceExhausted, match="more than 2 entries"):
        reg.create(hub, root, "/home/user/dir", recursive=True)
    assert reg.create(hub, root, "/home/user/dir")  # not recursive: nothing is listed
    assert reg.watched_dirs == 1
