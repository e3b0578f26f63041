"""How much disk a layer takes, measured once (layers never change) and remembered with its owner record.

The build cache's byte budget (`corral.builder.retention`, CORRAL_BUILD_CACHE_MAX_BYTES) needs the
size of every layer a cache entry keeps, at every collection. Walking the trees then would cost a
collection seconds per gigabyte, so a layer is measured once after the build that made (or pulled)
it ends, in a thread, and its size is stored in the server's owned-layers table (`LayerSizeBook`:
the store, given by the composition root). A layer that is not owned is never collected, so its
size never matters to the budget.

The size is the disk usage (`du`): allocated blocks of every entry, a hard-linked inode counted
once. The walk never follows a symlink and never leaves the layer's file system.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

__all__ = ["LayerSizeBook", "layer_disk_bytes", "unmeasured"]


class LayerSizeBook(Protocol):
    """Where owned layers' sizes are kept (`corral.server.store.Store`)."""

    def owned_layer_sizes(self) -> Mapping[str, int | None]:
        """Every owned layer's size in bytes; None for one not measured yet."""
        ...

    def set_owned_layer_size(self, digest: str, size_bytes: int) -> None: ...


def layer_disk_bytes(path: Path) -> int | None:
    """Disk usage of the tree at `path` in bytes; None when it is not a directory or vanished while
    it was measured (collected meanwhile: a partial sum must not be remembered). Blocking."""
    try:
        root = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(root.st_mode):
        return None
    seen: set[int] = set()
    total = root.st_blocks * 512
    stack = [os.fspath(path)]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    if st.st_dev != root.st_dev:
                        continue  # a mount inside (never in a layer): not the layer's disk
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
                    elif st.st_nlink > 1:
                        if st.st_ino in seen:
                            continue
                        seen.add(st.st_ino)
                    total += st.st_blocks * 512
        except FileNotFoundError:
            return None
    return total


def unmeasured(sizes: Mapping[str, int | None], wanted: Iterable[str]) -> list[str]:
    """The owned layers among `wanted` whose size is not known yet, in a stable order."""
    return sorted({digest for digest in wanted if digest in sizes and sizes[digest] is None})
