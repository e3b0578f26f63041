"""Adopting layers older Corral versions left unowned, so the one layer collector can remove them.

Only owned layers are ever collected (`SandboxService.collect_layers`). Versions before layer
ownership made step layers, pulled registry layers and layers of failed builds without recording
them, and a crash between a commit and its record leaves one too: nothing would ever remove them.
At start the server records such a directory as owned (kind "adopted") when all of these hold:

* its name is a layer digest and it is a directory (not a `.tmp-*` leftover, a lock or a file);
* it is not owned already and nothing refers to it: no template build (latest or tagged), live
  sandbox (store or node), snapshot, pinned commit, in-flight build or kept build-cache entry;
* it was last modified at least `min_age_s` ago (default an hour), so a layer another server
  process is making or is about to use right now is not raced;
* it does not hold a whole Debian-family root file system. Those are what base recipes make
  (`corral.builder.base`: `base`, the Debian/Ubuntu images) — one per recipe, slow to make again,
  never collected — including the layers of recipes an older version used. (A pulled Debian image's
  bottom layer from an older version looks the same and stays too: the safe side.)

The collector then removes the adopted layers like any other owned layer. `plan_adoption` decides
(pure); `scan_layer_dirs` looks at the disk.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path

__all__ = ["ADOPTED_KIND", "ADOPTION_MIN_AGE_S", "LayerDir", "plan_adoption", "scan_layer_dirs"]

ADOPTED_KIND = "adopted"
ADOPTION_MIN_AGE_S = 3600.0
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# A Debian-family root: what mmdebstrap always makes. A step layer (an overlay upper dir) holds
# only what the step changed, which seldom is all of these (one that is stays: the safe side).
_ROOT_MARKERS = ("var/lib/dpkg/status", "usr/bin/dpkg", "etc/passwd")


@dataclasses.dataclass(frozen=True, slots=True)
class LayerDir:
    """A directory in the layers dir, as adoption sees it."""

    digest: str
    modified_at: float  # seconds since the epoch (the directory's mtime)
    whole_root: bool  # holds a whole Debian-family root file system (a recipe's layer)


def plan_adoption(
    dirs: Iterable[LayerDir],
    owned: Collection[str],
    referenced: Collection[str],
    now: float,
    min_age_s: float = ADOPTION_MIN_AGE_S,
) -> list[str]:
    """The digests to record as owned (see the module docstring), in name order."""
    return sorted(
        d.digest
        for d in dirs
        if _DIGEST_RE.match(d.digest)
        and d.digest not in owned
        and d.digest not in referenced
        and not d.whole_root
        and now - d.modified_at >= min_age_s
    )


def _is_whole_root(path: Path) -> bool:
    return all(os.path.lexists(path / marker) for marker in _ROOT_MARKERS)


def scan_layer_dirs(layers_dir: Path) -> list[LayerDir]:
    """Every layer directory (digest-named, not a symlink) in `layers_dir`. Blocking."""
    found = []
    try:
        entries = list(os.scandir(layers_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not _DIGEST_RE.match(entry.name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        path = Path(entry.path)
        found.append(LayerDir(entry.name, st.st_mtime, _is_whole_root(path)))
    return found
