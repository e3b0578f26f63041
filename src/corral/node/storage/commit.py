"""Turn a sandbox's writable overlay layer into a new read-only template layer (snapshots, forks).

The copy keeps what makes an upper dir an overlay layer: whiteouts (character devices 0/0 that
hide a lower file), `trusted.overlay.opaque` on directories that replace a lower one, owners,
modes, times, hard links and other xattrs. `cp -a` as root does all of that. The copy is then
named by `tree_digest`, a sha256 over every entry's path, type, mode, owner, times, device
number, symlink target, xattrs and content, so identical trees share one directory
(content-addressed, like the builder's layers).

The caller freezes the sandbox first: nothing inside changes the upper dir while it is copied.

A sandbox in a user namespace stores its files under shifted host ids (base+N, see
`corral.node.runtime.idmap`); given its `IdMap`, the copy is shifted back (`unshift_tree`) before
it is named, so a layer is owned as its files are inside, whichever sandbox it came from.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from corral.node import spawn
from corral.node.runtime.idmap import IdMap, unshift_tree

__all__ = ["VOLATILE_XATTRS", "commit_layer", "remove_layer", "retire_layer", "tree_digest"]

# Overlay bookkeeping that differs between two copies of the same content; not part of the digest.
VOLATILE_XATTRS = frozenset({"trusted.overlay.uuid", "trusted.overlay.origin", "trusted.overlay.impure"})
_CHUNK = 1 << 20


def _entry_record(path: str, rel: str, st: os.stat_result) -> bytes:
    parts = [
        rel,
        oct(st.st_mode),
        str(st.st_uid),
        str(st.st_gid),
        str(st.st_mtime_ns),
    ]
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        parts.append(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    elif stat.S_ISLNK(st.st_mode):
        parts.append(os.readlink(path))
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        names = []
    for name in names:
        if name in VOLATILE_XATTRS:
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        parts.append(f"{name}={value.hex()}")
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, _CHUNK):
                digest.update(chunk)
        finally:
            os.close(fd)
        parts.append(digest.hexdigest())
    return "\0".join(parts).encode("utf-8", "surrogateescape") + b"\n"


def tree_digest(root: Path) -> str:
    """sha256 hex of a directory tree's content and metadata (the root's own metadata included).

    Never follows a symlink; entries are visited in byte order of their names.
    """
    digest = hashlib.sha256(b"corral-layer-v1\n")
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else str(root)
        st = os.lstat(path)
        digest.update(_entry_record(path, rel or ".", st))
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path), key=os.fsencode, reverse=True)
            stack.extend(os.path.join(rel, name) if rel else name for name in names)
    return digest.hexdigest()


async def commit_layer(
    upper: Path, layers_dir: Path, id_map: IdMap | None = None, pin: Callable[[str], None] | None = None
) -> str:
    """Copy `upper` into `layers_dir/<digest>` and return the digest (an existing equal layer is reused).
    `id_map`: the sandbox's user namespace, whose host ids the copy is shifted back from.

    `pin(digest)` is called on the event loop once the digest is known, in the same step as the
    layer appears under its name or an existing equal one is chosen: a layer collector that keeps
    pinned layers (and decides without awaiting) can never remove the layer the caller gets, even
    when an equal layer was unused until now. If this raises after `pin`, the caller unpins."""
    layers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = layers_dir / f".tmp-commit-{secrets.token_hex(8)}"
    try:
        (await spawn.run(["cp", "-a", "--no-target-directory", str(upper), str(tmp)])).check(
            "copying the sandbox's files"
        )
        if id_map is not None:
            await asyncio.to_thread(unshift_tree, tmp, id_map)
        digest = await asyncio.to_thread(tree_digest, tmp)
        if pin is not None:
            pin(digest)  # no await from here to the rename: see the docstring
        target = layers_dir / digest
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            # The same content is already a layer: keep that one.
        return digest
    finally:
        if tmp.exists():
            await asyncio.to_thread(shutil.rmtree, tmp, True)


def retire_layer(layers_dir: Path, digest: str) -> Path | None:
    """Rename a layer directory out of sight (`.tmp-remove-*`); the path to delete, None if absent.

    Fast (one rename), so a collector can decide and retire in one step of the event loop, with
    nothing able to start using the layer in between; the slow `shutil.rmtree` comes after.
    """
    target = layers_dir / digest
    if not target.is_dir():
        return None
    doomed = layers_dir / f".tmp-remove-{digest}-{secrets.token_hex(4)}"
    os.rename(target, doomed)
    return doomed


def remove_layer(layers_dir: Path, digest: str) -> None:
    """Delete a layer directory (renamed away first, so a half-deleted layer is never visible)."""
    doomed = retire_layer(layers_dir, digest)
    if doomed is not None:
        shutil.rmtree(doomed, ignore_errors=True)
