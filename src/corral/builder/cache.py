"""Build cache keys and the cache store (see docs/dev/builder-cache.md).

A key names "the result of this step on top of exactly this parent": the sha256 of the canonical
JSON of `{v: KEY_VERSION, type, parent, spec, files}` where

* `parent` is the previous step's key (the first step's parent is the base key, the digest of the
  base's layer stack and context), so a change anywhere invalidates everything after it;
* `spec` is the step's normalised fields (`Step.spec()`): only what changes the result (`force`,
  `forceUpload` and upload options are left out);
* `files` is, for COPY, the client's digest of the copied sources plus the scope (team) the archive
  was uploaded by — a client-asserted digest is only trusted within its own scope.

The store maps key → `CacheEntry` (the whole layer stack after the step, and the build context
after it). It sits behind the `BuildCache` protocol: `FileBuildCache` (one JSON file per key,
written atomically) is what the server uses, `MemoryBuildCache` serves unit tests.

Lifecycle of an entry: `put` after a step ran (a forced step overwrites) → `get` on later builds (a
hit only counts while every layer it names still exists; the executor checks) and `touch` on a hit
→ `delete` when layer collection drops it (`corral.builder.retention`: least recently used first,
`usage()` tells when each entry was last used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from corral.builder.retention import CacheUse
from corral.builder.steps import BuildContext, Copy, Step

__all__ = [
    "KEY_VERSION",
    "BuildCache",
    "CacheEntry",
    "FileBuildCache",
    "MemoryBuildCache",
    "canonical_json",
    "finalize_key",
    "stack_key",
    "step_key",
]

log = logging.getLogger(__name__)

# Bump when what a key means changes in a way its fields do not show (e.g. how COPY moves files).
KEY_VERSION = 1
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(preimage: Mapping[str, Any]) -> str:
    text = canonical_json(preimage)
    key = hashlib.sha256(text.encode()).hexdigest()
    log.debug("cache key %s = sha256(%s)", key[:12], text)
    return key


def stack_key(layers: Sequence[str], context: BuildContext) -> str:
    """The key of a base: a layer stack (content-addressed digests) with its context."""
    return _digest({"v": KEY_VERSION, "type": "STACK", "layers": list(layers), "context": context.to_json()})


def step_key(parent_key: str, step: Step, *, scope: str) -> str:
    """The key of `step` run on top of the result named by `parent_key`."""
    files = {"hash": step.files_hash, "scope": scope} if isinstance(step, Copy) else None
    return _digest(
        {"v": KEY_VERSION, "type": step.kind, "parent": parent_key, "spec": step.spec(), "files": files}
    )


def finalize_key(parent_key: str, start_cmd: str | None, ready_cmd: str | None) -> str:
    """The key of the finishing phase (start command started, ready command passed)."""
    return _digest(
        {"v": KEY_VERSION, "type": "FINALIZE", "parent": parent_key, "start": start_cmd, "ready": ready_cmd}
    )


@dataclasses.dataclass(frozen=True, slots=True)
class CacheEntry:
    layers: tuple[str, ...]  # the whole stack after the step, lowest first
    context: BuildContext  # user / workdir / env after the step

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "context": self.context.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CacheEntry:
        return cls(
            layers=tuple(str(d) for d in data["layers"]), context=BuildContext.from_json(data["context"])
        )


class BuildCache(Protocol):
    """key → CacheEntry. Implementations are thread-safe; `put` replaces."""

    def get(self, key: str) -> CacheEntry | None: ...

    def put(self, key: str, entry: CacheEntry) -> None: ...

    def delete(self, key: str) -> None: ...

    def items(self) -> Iterator[tuple[str, CacheEntry]]: ...

    def touch(self, key: str) -> None:
        """Record that a build used the entry now (retention drops least recently used first)."""
        ...

    def usage(self) -> list[CacheUse]:
        """Every entry's key, layers and last use."""
        ...


class MemoryBuildCache:
    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._used_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, entry: CacheEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._used_at[key] = time.time()

    def delete(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._used_at.pop(key, None)

    def items(self) -> Iterator[tuple[str, CacheEntry]]:
        with self._lock:
            return iter(list(self._entries.items()))

    def touch(self, key: str) -> None:
        with self._lock:
            if key in self._entries:
                self._used_at[key] = time.time()

    def usage(self) -> list[CacheUse]:
        with self._lock:
            return [CacheUse(key, entry.layers, self._used_at[key]) for key, entry in self._entries.items()]


class FileBuildCache:
    """One `<key>.json` per entry under `directory`; a torn or foreign file reads as a miss."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r}")
        return self._dir / f"{key}.json"

    def get(self, key: str) -> CacheEntry | None:
        path = self._path(key)
        try:
            return CacheEntry.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable build cache entry %s: %s", key, exc)
            return None

    def put(self, key: str, entry: CacheEntry) -> None:
        target = self._path(key)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(canonical_json(entry.to_json()))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def items(self) -> Iterator[tuple[str, CacheEntry]]:
        if not self._dir.is_dir():
            return
        for path in sorted(self._dir.glob("*.json")):
            if _KEY_RE.match(path.stem):
                entry = self.get(path.stem)
                if entry is not None:
                    yield path.stem, entry

    def touch(self, key: str) -> None:
        """The file's mtime is the entry's last use."""
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            pass

    def usage(self) -> list[CacheUse]:
        uses = []
        for key, entry in self.items():
            try:
                used_at = self._path(key).stat().st_mtime
            except FileNotFoundError:
                continue
            uses.append(CacheUse(key, entry.layers, used_at))
        return uses
