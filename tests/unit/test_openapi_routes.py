"""spec/openapi.yml documents exactly the routes the REST API app serves: every (method, path) of
the Starlette app is in the spec, and every operation of the spec is served."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.routing import Mount, Route

from corral.core.settings import load_settings
from corral.server.api import build_api
from corral.spec.openapi import load_openapi

METHODS = {"get", "put", "post", "delete", "patch"}


def _served(routes: list[Any], prefix: str = "") -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount):
            found |= _served(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)  # `{id:path}` → `{id}`
            found |= {(m.lower(), path) for m in route.methods or () if m.lower() in METHODS}
    return found


def _app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    settings = load_settings({"home": tmp_path}, env={})
    app = build_api(object(), object(), settings, templates=object())  # type: ignore[arg-type]
    return _served(list(app.routes))  # type: ignore[attr-defined]


def _documented() -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in load_openapi()["paths"].items()
        for method in item
        if method in METHODS
    }


def test_every_served_route_is_documented(tmp_path: Path) -> None:
    missing = _app_routes(tmp_path) - _documented()
    assert not missing, f"served but not in spec/openapi.yml: {sorted(missing)}"


def test_every_documented_operation_is_served(tmp_path: Path) -> None:
    extra = _documented() - _app_routes(tmp_path)
    assert not extra, f"in spec/openapi.yml but not served: {sorted(extra)}"


def test_the_route_walk_sees_the_api() -> None:
    """Guards the two tests above against passing on an empty walk."""
    routes = _served([Route("/a/{id:path}/b", lambda r: None, methods=["PUT"])])
    assert routes == {("put", "/a/{id}/b")}
