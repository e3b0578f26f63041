"""The generated sync SDK has the same public surface as the async source: the same classes,
members, parameter names, kinds, defaults and (rewritten) annotations; async methods are
coroutines (or async generators) and their sync twins are plain functions."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import corral.sdk._async as async_sdk
import corral.sdk._sync as sync_sdk
from corral.sdk._dual import dual_method
from tests.sdk._helpers import load_unasync

unasync = load_unasync()

PAIRS = [
    (getattr(async_sdk, name), getattr(sync_sdk, unasync.unasync_line(name))) for name in async_sdk.__all__
]


def test_the_sync_package_exports_every_twin() -> None:
    assert sorted(unasync.unasync_line(name) for name in async_sdk.__all__) == sorted(sync_sdk.__all__)
    assert len(PAIRS) >= 9


def _public_members(cls: type) -> dict[str, Any]:
    """Own members that are public, plus the async/sync protocol dunders."""
    protocol = {
        "__aiter__",
        "__iter__",
        "__aenter__",
        "__enter__",
        "__aexit__",
        "__exit__",
        "__anext__",
        "__next__",
        "__init__",
    }
    members = {}
    for klass in reversed(cls.__mro__[:-1]):
        for name, value in vars(klass).items():
            if not name.startswith("_") or name in protocol:
                members[name] = value
    return members


def _shape(function: Any) -> list[tuple[str, Any, Any, str]]:
    signature = inspect.signature(function)
    return [
        (name, param.kind, param.default, unasync.unasync_line(str(param.annotation)))
        for name, param in signature.parameters.items()
    ] + [("return", None, None, unasync.unasync_line(str(signature.return_annotation)))]


def _sync_shape(function: Any) -> list[tuple[str, Any, Any, str]]:
    signature = inspect.signature(function)
    return [
        (name, param.kind, param.default, str(param.annotation))
        for name, param in signature.parameters.items()
    ] + [("return", None, None, str(signature.return_annotation))]


def _is_async(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


@pytest.mark.parametrize(("async_cls", "sync_cls"), PAIRS, ids=[pair[1].__name__ for pair in PAIRS])
def test_members_and_signatures_match(async_cls: type, sync_cls: type) -> None:
    async_members = _public_members(async_cls)
    sync_members = _public_members(sync_cls)
    assert sorted(unasync.unasync_line(name) for name in async_members) == sorted(sync_members)
    for name, async_member in async_members.items():
        sync_member = sync_members[unasync.unasync_line(name)]
        assert type(async_member) is type(sync_member), name
        if isinstance(async_member, property):
            assert _shape(async_member.fget) == _sync_shape(sync_member.fget), name
            continue
        if isinstance(async_member, dual_method):
            forms = [
                (async_member.on_class, sync_member.on_class),
                (async_member.on_instance, sync_member.on_instance),
            ]
        elif isinstance(async_member, classmethod | staticmethod):
            forms = [(async_member.__func__, sync_member.__func__)]
        elif callable(async_member):
            forms = [(async_member, sync_member)]
        else:
            assert async_member == sync_member, name
            continue
        for async_fn, sync_fn in forms:
            assert _shape(async_fn) == _sync_shape(sync_fn), f"{async_cls.__name__}.{name}"
            if name in ("__init__", "list") and not _is_async(async_fn):
                assert not _is_async(sync_fn)
                continue
            assert (
                _is_async(async_fn)
                or name in ("get_host", "download_url", "upload_url")
                or not callable(async_fn)
            ), name
            assert not _is_async(sync_fn), f"{sync_cls.__name__}.{name} must not be async"


def test_by_id_and_instance_forms_are_both_reachable() -> None:
    for cls in (async_sdk.AsyncSandbox, sync_sdk.Sandbox):
        for name in ("kill", "set_timeout", "get_info", "get_metrics", "pause"):
            on_class, on_instance = getattr(cls, name), vars(cls)[name].on_instance
            assert next(iter(inspect.signature(on_class).parameters)) == "sandbox_id", name
            assert next(iter(inspect.signature(on_instance).parameters)) == "self", name
