"""Validate control-plane requests and responses against ``spec/openapi.yml`` (OpenAPI 3.1).

Used by the API tests: every response the server gives should pass ``validate_response``.
The spec's schemas are JSON Schema 2020-12, so ``jsonschema`` validates them as they are; refs
are resolved against the whole document. ``pyyaml`` and ``jsonschema`` are imported lazily
(both are test/dev dependencies), and the spec is read from the source tree, so this module
works from a checkout (editable install), not from a wheel.

    validate_response("/sandboxes/{sandboxID}", "GET", 200, response.json())
    validate_response("/sandboxes/abc123", "DELETE", 204, response.content)  # concrete paths too
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "OpenAPIViolation",
    "find_operation",
    "load_openapi",
    "openapi_path",
    "validate_request",
    "validate_response",
]

_SPEC_URI = "urn:corral:openapi"
_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


class OpenAPIViolation(AssertionError):
    """A request or response does not match spec/openapi.yml (an AssertionError, for pytest)."""


def openapi_path() -> Path:
    """Where spec/openapi.yml is: the first ancestor of this file that has it."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "spec" / "openapi.yml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("spec/openapi.yml not found above corral.spec; run from a source checkout")


@functools.cache
def load_openapi(path: Path | None = None) -> dict[str, Any]:
    """The parsed spec (cached per path). Treat it as read-only."""
    import yaml

    with open(path or openapi_path(), encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or "paths" not in spec:
        raise OpenAPIViolation(f"{path or openapi_path()} is not an OpenAPI document")
    return spec


def find_operation(
    path: str, method: str, spec: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """``(path_template, operation)`` for a template (``/sandboxes/{sandboxID}``) or concrete path.

    Literal templates win over parameterised ones, as in OpenAPI path matching.
    """
    spec = spec if spec is not None else load_openapi()
    paths: Mapping[str, Any] = spec["paths"]
    template = path if path in paths else _match_template(path, paths)
    if template is None:
        raise OpenAPIViolation(f"no path in the spec matches {path!r}")
    operation = paths[template].get(method.lower())
    if method.lower() not in _METHODS or operation is None:
        raise OpenAPIViolation(f"{method.upper()} {template} is not in the spec")
    return template, operation


def validate_response(
    path_template: str,
    method: str,
    status: int,
    body: Any = None,
    *,
    content_type: str = "application/json",
) -> None:
    """Raise OpenAPIViolation unless ``status`` is documented for the operation and ``body`` fits.

    ``body`` is the decoded JSON (dict/list/...) or the raw ``bytes``/``str`` (decoded here as
    JSON for JSON content types). A response documented without content must have an empty body.
    """
    spec = load_openapi()
    template, operation = find_operation(path_template, method, spec)
    responses: Mapping[str, Any] = operation.get("responses", {})
    key = next((k for k in (str(status), f"{status // 100}XX", "default") if k in responses), None)
    if key is None:
        raise OpenAPIViolation(
            f"{method.upper()} {template}: status {status} not documented (has {sorted(responses)})"
        )
    response = _deref(spec, responses[key])
    where = f"{method.upper()} {template} -> {status}"
    content: Mapping[str, Any] = response.get("content") or {}
    if not content:
        if body not in (None, b"", ""):
            raise OpenAPIViolation(f"{where}: documented without a body, got {body!r:.200}")
        return
    media_key = _media_key(content, content_type)
    if media_key is None:
        raise OpenAPIViolation(
            f"{where}: content type {content_type!r} not documented (has {sorted(content)})"
        )
    if "schema" in content[media_key]:
        base = responses[key].get("$ref") or f"#/paths/{_escape(template)}/{method.lower()}/responses/{key}"
        pointer = f"{base}/content/{_escape(media_key)}/schema"
        _validate(pointer, _decode(body, content_type, where), where)


def validate_request(
    path_template: str, method: str, body: Any, *, content_type: str = "application/json"
) -> None:
    """Raise OpenAPIViolation unless ``body`` fits the operation's requestBody schema."""
    spec = load_openapi()
    template, operation = find_operation(path_template, method, spec)
    where = f"{method.upper()} {template} request"
    request_body = operation.get("requestBody")
    if request_body is None:
        if body not in (None, b"", ""):
            raise OpenAPIViolation(f"{where}: documented without a body")
        return
    content: Mapping[str, Any] = _deref(spec, request_body).get("content") or {}
    key = _media_key(content, content_type)
    if key is None:
        raise OpenAPIViolation(f"{where}: content type {content_type!r} not documented")
    pointer = f"#/paths/{_escape(template)}/{method.lower()}/requestBody/content/{_escape(key)}/schema"
    _validate(pointer, _decode(body, content_type, where), where)


def _validate(pointer: str, instance: Any, where: str) -> None:
    validator = _validator_for(pointer)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]
        )
        raise OpenAPIViolation(f"{where}: {details}")


@functools.cache
def _validator_for(pointer: str) -> Any:
    """A validator for the schema at ``pointer`` in the (cached) default spec."""
    from jsonschema import Draft202012Validator, FormatChecker
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = load_openapi()
    registry = Registry().with_resource(
        _SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    ref = pointer if pointer.startswith(_SPEC_URI) else _SPEC_URI + pointer
    checker = FormatChecker()
    checker.checks("date-time", raises=ValueError)(_is_rfc3339)
    return Draft202012Validator({"$ref": ref}, registry=registry, format_checker=checker)


def _is_rfc3339(value: object) -> bool:
    """RFC 3339 date-time: the SDK parses with dateutil.isoparse and needs an offset."""
    if not isinstance(value, str):
        return True
    if "T" not in value.upper():
        return False
    return datetime.fromisoformat(value).tzinfo is not None


def _decode(body: Any, content_type: str, where: str) -> Any:
    if not isinstance(body, (bytes, bytearray, str)) or not _is_json(content_type):
        return body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
    try:
        return json.loads(body)
    except ValueError as e:
        raise OpenAPIViolation(f"{where}: body is not JSON: {e}") from e


def _is_json(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base == "application/json" or base.endswith("+json")


def _media_key(content: Mapping[str, Any], content_type: str) -> str | None:
    base = content_type.split(";", 1)[0].strip().lower()
    if base in content:
        return base
    major = base.split("/", 1)[0]
    return next((k for k in (f"{major}/*", "*/*") if k in content), None)


def _deref(spec: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in node:
        node = _resolve_pointer(spec, node["$ref"])
    return node


def _resolve_pointer(spec: Mapping[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        raise OpenAPIViolation(f"only local refs are supported, got {ref!r}")
    node: Any = spec
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise OpenAPIViolation(f"unresolvable ref {ref!r}")
        node = node[part]
    return node


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _match_template(path: str, paths: Mapping[str, Any]) -> str | None:
    path = path.split("?", 1)[0]
    matches = [t for t in paths if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t)), path)]
    # Prefer the template with the most literal characters (OpenAPI: concrete beats templated).
    return max(matches, key=lambda t: len(re.sub(r"\{[^}]*\}", "", t)), default=None)
