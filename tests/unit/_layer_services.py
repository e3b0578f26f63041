"""The sandbox service and the template builder wired as the server wires them for layer
collection (real store, template store and collector; a fake node and no build executor), for the
unit tests of retention, the cache's byte budget and layer adoption."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from corral.builder.cache import MemoryBuildCache
from corral.builder.retention import CacheBudget
from corral.builder.service import TemplateBuildService
from corral.core.settings import Settings
from corral.node.storage.templates import TemplateStore
from corral.server.service import SandboxService
from corral.server.store import SandboxRow, Store
from tests.unit.test_lifecycle_service import FakeNode

__all__ = ["layer_services"]


@contextlib.contextmanager
def layer_services(
    settings: Settings, budget: CacheBudget
) -> Iterator[tuple[SandboxService, TemplateBuildService]]:
    store = Store.open(settings)
    store.ensure_default_team("e2b_" + "3" * 40)
    templates = TemplateStore(settings)
    sandboxes = SandboxService(settings, store, FakeNode(settings.layers_dir), templates, SandboxRow)
    builder = TemplateBuildService(
        settings,
        None,
        templates,
        cache=MemoryBuildCache(),
        executor=object(),
        cache_budget=budget,
        own_layer=store.add_owned_layer,
        collect_layers=sandboxes.collect_layers,
        layer_sizes=store,
    )
    sandboxes.layer_holders.append(builder.layers_to_keep)
    try:
        yield sandboxes, builder
    finally:
        store.close()
