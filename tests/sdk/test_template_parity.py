"""`Template` (generated) and `AsyncTemplate` (the source) have the same server calls, with the
same signatures; the async ones are coroutines. Their builder methods are the one shared
`TemplateBase`, so they are equal by construction and not compared here (test_parity.py
compares the classes `corral.sdk._async` exports; the templates are exported from their modules)."""

from __future__ import annotations

import inspect

from corral import AsyncTemplate, Template, TemplateBase
from tests.sdk.test_parity import _is_async, _shape, _sync_shape


def _own(cls: type) -> dict[str, object]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def test_template_twins_match() -> None:
    async_members, sync_members = _own(AsyncTemplate), _own(Template)
    assert sorted(async_members) == sorted(sync_members)
    assert {
        "build",
        "build_in_background",
        "get_build_status",
        "exists",
        "assign_tags",
        "remove_tags",
    } <= set(async_members)
    for name, member in async_members.items():
        assert isinstance(member, classmethod), name
        async_fn, sync_fn = member.__func__, sync_members[name].__func__  # type: ignore[attr-defined]
        assert _shape(async_fn) == _sync_shape(sync_fn), name
        assert _is_async(async_fn) and not _is_async(sync_fn), name


def test_both_share_the_builder() -> None:
    assert AsyncTemplate.__mro__[1] is TemplateBase and Template.__mro__[1] is TemplateBase
    builder = inspect.signature(AsyncTemplate().from_template)
    assert builder == inspect.signature(Template().from_template)
