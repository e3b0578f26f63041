"""What the builder keeps alive when unused layers are collected (docs/templates.md, "Disk").

There is one collector, `SandboxService.collect_layers`: a layer made to be disposable is *owned*
(the store's owned-layers table: snapshot, fork, `build` step, registry `pull`), and an owned layer
is deleted once nothing refers to it. Base layers made from a recipe (`base`, the Debian/Ubuntu
images) are not owned: one per recipe, expensive to make again, never collected. The builder adds
two kinds of references to the collector's set (`TemplateBuildService.layers_to_keep`):

* holds (`LayerHolds`): every layer an in-flight build looked at or made — its base, its cache
  hits, the layers it committed or pulled. A layer is held *before* the build checks that it
  exists and stays held until the build has ended (published or failed), so the collector, which
  decides and renames in one step of the event loop, can never take a layer a build is about to
  mount;
* kept cache entries (`plan_cache_retention`): an entry whose layers are all referenced anyway (by
  a template build, a sandbox, a snapshot or a hold) costs no disk and is always kept, so a rebuild
  of a live template stays all-cache. The other entries are kept while they were used within
  `max_age_s`, the `max_entries` most recently used of them; the rest are deleted, least recently
  used first, and their layers go with them unless something else refers to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

__all__ = [
    "DEFAULT_MAX_AGE_HOURS",
    "DEFAULT_MAX_ENTRIES",
    "CacheBudget",
    "CacheUse",
    "LayerHolds",
    "RetentionPlan",
    "plan_cache_retention",
]

DEFAULT_MAX_AGE_HOURS = 7 * 24.0
DEFAULT_MAX_ENTRIES = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class CacheBudget:
    """How much of the build cache is kept beyond what live templates and sandboxes use."""

    max_age_s: float = DEFAULT_MAX_AGE_HOURS * 3600
    max_entries: int = DEFAULT_MAX_ENTRIES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CacheBudget:
        """CORRAL_BUILD_CACHE_MAX_AGE_HOURS (default 168) and CORRAL_BUILD_CACHE_MAX_ENTRIES (1000);
        0 in either keeps only entries that cost no disk."""
        env = os.environ if env is None else env
        hours = float(env.get("CORRAL_BUILD_CACHE_MAX_AGE_HOURS") or DEFAULT_MAX_AGE_HOURS)
        entries = int(env.get("CORRAL_BUILD_CACHE_MAX_ENTRIES") or DEFAULT_MAX_ENTRIES)
        if hours < 0 or entries < 0:
            raise ValueError("CORRAL_BUILD_CACHE_MAX_AGE_HOURS and _MAX_ENTRIES must not be negative")
        return cls(max_age_s=hours * 3600, max_entries=entries)


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
    entries: Iterable[CacheUse], referenced: set[str] | frozenset[str], budget: CacheBudget, now: float
) -> RetentionPlan:
    """Which cache entries stay (see the module docstring). Pure: the caller deletes."""
    free: list[CacheUse] = []
    costly: list[CacheUse] = []
    for use in entries:
        (free if all(d in referenced for d in use.layers) else costly).append(use)
    costly.sort(key=lambda u: (u.used_at, u.key), reverse=True)  # most recently used first
    kept: list[CacheUse] = []
    dropped: list[CacheUse] = []
    for use in costly:
        fresh = now - use.used_at < budget.max_age_s
        (kept if fresh and len(kept) < budget.max_entries else dropped).append(use)
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
