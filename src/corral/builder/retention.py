"""What the builder keeps alive when unused layers are collected (docs/templates.md, "Disk").

There is one collector, `SandboxService.collect_layers`: a layer made to be disposable is *owned*
(the store's owned-layers table: snapshot, fork, `build` step, registry `pull`; an older version's
unowned layer nothing refers to is `adopted` at start, `corral.server.layer_adoption`), and an
owned layer is deleted once nothing refers to it. Base layers made from a recipe (`base`, the
Debian/Ubuntu images) are not owned: one per recipe, expensive to make again, never collected. The builder adds
two kinds of references to the collector's set (`TemplateBuildService.layers_to_keep`):

* holds (`LayerHolds`): every layer an in-flight build looked at or made — its base, its cache
  hits, the layers it committed or pulled. A layer is held *before* the build checks that it
  exists and stays held until the build has ended (published or failed), so the collector, which
  decides and renames in one step of the event loop, can never take a layer a build is about to
  mount;
* kept cache entries (`plan_cache_retention`): an entry whose layers are all referenced anyway (by
  a template build, a sandbox, a snapshot or a hold) costs no disk and is always kept, so a rebuild
  of a live template stays all-cache. The other entries are kept while they were used within
  `max_age_s`, the `max_entries` most recently used of them, as long as the layers only kept
  entries keep fit in `max_bytes`; the rest are deleted, least recently used first, and their
  layers go with them unless something else refers to them.

The byte budget counts each layer once, for the most recently used entry that needs it, and only
layers nothing else refers to (a layer a live template, snapshot, sandbox or build uses is not
given back by dropping an entry). Sizes are measured once per layer (`corral.builder.layer_sizes`);
a layer not measured yet, or not owned (never collected), counts as 0 bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

__all__ = [
    "DEFAULT_MAX_AGE_HOURS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "CacheBudget",
    "CacheUse",
    "LayerHolds",
    "RetentionPlan",
    "parse_bytes",
    "plan_cache_retention",
]

DEFAULT_MAX_AGE_HOURS = 7 * 24.0
DEFAULT_MAX_ENTRIES = 1000
DEFAULT_MAX_BYTES = 10 * 1024**3
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_BYTES_RE = re.compile(r"^(\d+)\s*([KMGT]?)(?:I?B)?$")


def parse_bytes(text: str) -> int:
    """`10737418240`, `10G`, `10GiB`, `512M`, `512MB` → bytes (units are powers of 1024)."""
    match = _BYTES_RE.match(text.strip().upper())
    if match is None:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 10G, 512M, 1073741824)")
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclasses.dataclass(frozen=True, slots=True)
class CacheBudget:
    """How much of the build cache is kept beyond what live templates and sandboxes use."""

    max_age_s: float = DEFAULT_MAX_AGE_HOURS * 3600
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CacheBudget:
        """CORRAL_BUILD_CACHE_MAX_AGE_HOURS (default 168), CORRAL_BUILD_CACHE_MAX_ENTRIES (1000) and
        CORRAL_BUILD_CACHE_MAX_BYTES (10G); 0 in any of them keeps only entries that cost no disk."""
        env = os.environ if env is None else env
        hours = float(env.get("CORRAL_BUILD_CACHE_MAX_AGE_HOURS") or DEFAULT_MAX_AGE_HOURS)
        entries = int(env.get("CORRAL_BUILD_CACHE_MAX_ENTRIES") or DEFAULT_MAX_ENTRIES)
        raw_bytes = (env.get("CORRAL_BUILD_CACHE_MAX_BYTES") or "").strip()
        max_bytes = parse_bytes(raw_bytes) if raw_bytes else DEFAULT_MAX_BYTES
        if hours < 0 or entries < 0:
            raise ValueError("CORRAL_BUILD_CACHE_MAX_AGE_HOURS and _MAX_ENTRIES must not be negative")
        return cls(max_age_s=hours * 3600, max_entries=entries, max_bytes=max_bytes)


@dataclasses.dataclass(frozen=True, slots=True)
class CacheUse:
    """One cache entry as retention sees it: its key, its layers and when a build last used it."""

    key: str
    layers: tuple[str, ...]
    used_at: float  # seconds since the epoch


@dataclasses.dataclass(frozen=True, slots=True)
class RetentionPlan:
    keep_layers: frozenset[str]  # layers the kept entries need
    drop_keys: tuple[str, ...]  # entries to delete, least recently used first


def plan_cache_retention(
    entries: Iterable[CacheUse],
    referenced: set[str] | frozenset[str],
    budget: CacheBudget,
    now: float,
    sizes: Mapping[str, int] | None = None,
) -> RetentionPlan:
    """Which cache entries stay (see the module docstring); `sizes`: bytes of the layers that can be
    collected (missing: 0). Pure: the caller deletes.

    Costly entries are visited most recently used first. One is kept when it is fresh, within the
    count, and the layers it adds to what is kept fit in the bytes left; once one does not fit,
    every older entry that would add a layer is dropped too (least recently used goes first; a
    smaller old entry does not outlive a newer one). An entry that adds no layer costs nothing."""
    sizes = sizes or {}
    free: list[CacheUse] = []
    costly: list[CacheUse] = []
    for use in entries:
        (free if all(d in referenced for d in use.layers) else costly).append(use)
    costly.sort(key=lambda u: (u.used_at, u.key), reverse=True)  # most recently used first
    kept: list[CacheUse] = []
    dropped: list[CacheUse] = []
    kept_layers: set[str] = set()
    kept_bytes = 0
    full = budget.max_bytes <= 0
    for use in costly:
        fresh = now - use.used_at < budget.max_age_s
        if not fresh or len(kept) >= budget.max_entries:
            dropped.append(use)
            continue
        added = {d for d in use.layers if d not in referenced and d not in kept_layers}
        cost = sum(sizes.get(d, 0) for d in added)
        if added and (full or kept_bytes + cost > budget.max_bytes):
            full = True
            dropped.append(use)
            continue
        kept.append(use)
        kept_layers |= added
        kept_bytes += cost
    keep_layers = frozenset(d for use in (*free, *kept) for d in use.layers)
    return RetentionPlan(keep_layers, tuple(u.key for u in reversed(dropped)))


class LayerHolds:
    """Layers each in-flight build holds (build id → digests). Event-loop only, like the collector.

    While a commit runs, its digest is not known yet and it may be reusing an existing equal layer:
    `committing` is then true and the collector must keep every layer.
    """

    def __init__(self) -> None:
        self._by_build: dict[str, set[str]] = {}
        self._commits = 0

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        self._commits += 1
        try:
            yield
        finally:
            self._commits -= 1

    @property
    def committing(self) -> bool:
        return self._commits > 0

    def hold(self, build_id: str, digests: Sequence[str] | set[str]) -> None:
        self._by_build.setdefault(build_id, set()).update(digests)

    def release(self, build_id: str) -> None:
        self._by_build.pop(build_id, None)

    def held(self) -> set[str]:
        return {digest for digests in self._by_build.values() for digest in digests}
