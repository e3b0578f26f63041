"""`sandbox.files` against a real sandbox."""

from __future__ import annotations

import io

import pytest

from corral import (
    AsyncSandbox,
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    WriteEntry,
)

pytestmark = pytest.mark.integration


async def test_write_and_read_in_every_format(sandbox: AsyncSandbox) -> None:
    info = await sandbox.files.write("notes/hello.txt", "hello ✓")
    assert (info.name, info.path, info.type, info.metadata) == (
        "hello.txt",
        "/home/user/notes/hello.txt",
        FileType.FILE,
        None,
    )
    assert await sandbox.files.read("notes/hello.txt") == "hello ✓"
    await sandbox.files.write("/tmp/blob", bytes(range(256)) * 1000)
    assert await sandbox.files.read("/tmp/blob", format="bytes") == bytearray(bytes(range(256)) * 1000)
    stream = await sandbox.files.read("/tmp/blob", format="stream")
    chunks = [chunk async for chunk in stream]
    assert b"".join(chunks) == bytes(range(256)) * 1000
    await sandbox.files.write("/tmp/from-file", io.BytesIO(b"file-like"))
    assert await sandbox.files.read("/tmp/from-file") == "file-like"
    with pytest.raises(FileNotFoundException):
        await sandbox.files.read("/tmp/does-not-exist")


async def test_write_many_with_metadata(sandbox: AsyncSandbox) -> None:
    written = await sandbox.files.write_files(
        [WriteEntry(path="/tmp/many/a.txt", data="A"), WriteEntry(path="/tmp/many/b.txt", data=b"B")],
        metadata={"Owner": "tests"},
    )
    assert sorted(item.path for item in written) == ["/tmp/many/a.txt", "/tmp/many/b.txt"]
    assert (await sandbox.files.get_info("/tmp/many/a.txt")).metadata == {"owner": "tests"}
    assert await sandbox.files.read("/tmp/many/b.txt") == "B"


async def test_list_info_exists_make_dir_rename_remove(sandbox: AsyncSandbox) -> None:
    assert await sandbox.files.make_dir("/tmp/tree/sub") is True
    assert await sandbox.files.make_dir("/tmp/tree/sub") is False
    await sandbox.files.write("/tmp/tree/sub/deep.txt", "x")
    await sandbox.files.write("/tmp/tree/top.txt", "xyz")
    top = await sandbox.files.list("/tmp/tree")
    assert [(entry.name, entry.type) for entry in top] == [("sub", FileType.DIR), ("top.txt", FileType.FILE)]
    deep = await sandbox.files.list("/tmp/tree", depth=2)
    assert [entry.path for entry in deep] == ["/tmp/tree/sub", "/tmp/tree/sub/deep.txt", "/tmp/tree/top.txt"]
    with pytest.raises(InvalidArgumentException):
        await sandbox.files.list("/tmp/tree", depth=0)
    info = await sandbox.files.get_info("/tmp/tree/top.txt")
    assert (info.size, info.mode, info.permissions, info.owner) == (3, 0o644, "-rw-r--r--", "user")
    assert (await sandbox.files.get_info("/tmp/tree/top.txt")).modified_time.tzinfo is not None
    moved = await sandbox.files.rename("/tmp/tree/top.txt", "/tmp/tree/moved.txt")
    assert moved.path == "/tmp/tree/moved.txt"
    assert await sandbox.files.exists("/tmp/tree/moved.txt") and not await sandbox.files.exists(
        "/tmp/tree/top.txt"
    )
    await sandbox.files.remove("/tmp/tree")
    assert not await sandbox.files.exists("/tmp/tree")
    with pytest.raises(FileNotFoundException):
        await sandbox.files.get_info("/tmp/tree")
    await sandbox.files.write("/tmp/root-owned", "r", user="root")
    assert (await sandbox.files.get_info("/tmp/root-owned")).owner == "root"


async def test_watch_dir_iterator_and_callback(sandbox: AsyncSandbox) -> None:
    await sandbox.files.make_dir("/tmp/watched")
    seen: list[FilesystemEvent] = []
    exits: list[Exception | None] = []
    watcher = await sandbox.files.watch_dir(
        "/tmp/watched", on_event=seen.append, on_exit=exits.append, timeout=20
    )
    await sandbox.files.write("/tmp/watched/new.txt", "x")
    events = []
    async for event in watcher:
        events.append(event)
        if len(events) == 3:
            break
    await watcher.stop()
    assert [(event.name, event.type) for event in events] == [
        ("new.txt", FilesystemEventType.CREATE),
        ("new.txt", FilesystemEventType.CHMOD),
        ("new.txt", FilesystemEventType.WRITE),
    ]
    assert seen == events
    assert exits == [None]

    collected: list[FilesystemEvent] = []
    recursive = await sandbox.files.watch_dir(
        "/tmp/watched", on_event=collected.append, timeout=2, recursive=True
    )
    await sandbox.files.write("/tmp/watched/nested/file.txt", "y")
    await recursive.wait()  # delivers events to on_event until the watch's 2 s run out
    assert ("nested/file.txt", FilesystemEventType.WRITE) in [(event.name, event.type) for event in collected]
    with pytest.raises(FileNotFoundException):
        await sandbox.files.watch_dir("/tmp/not-there")
