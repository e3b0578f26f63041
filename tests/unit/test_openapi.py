"""spec/openapi.yml is structurally sound, agrees with what the e2b SDK parses, and the
validate_response helper accepts what it should and rejects what it should not."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from e2b.api.client.models.error import Error as SdkError
from e2b.api.client.models.listed_sandbox import ListedSandbox as SdkListedSandbox
from e2b.api.client.models.sandbox import Sandbox as SdkSandbox
from e2b.api.client.models.sandbox_detail import SandboxDetail as SdkSandboxDetail
from jsonschema import Draft202012Validator

from corral.spec.openapi import (
    OpenAPIViolation,
    find_operation,
    load_openapi,
    validate_request,
    validate_response,
)

SPEC = load_openapi()
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}

SANDBOX = {"templateID": "base", "sandboxID": "abc123", "clientID": "corral", "envdVersion": "0.6.13"}
LISTED = {
    "templateID": "base",
    "sandboxID": "abc123",
    "clientID": "corral",
    "startedAt": "2025-01-02T03:04:05.123456Z",
    "endAt": "2025-01-02T03:09:05+00:00",
    "cpuCount": 2,
    "memoryMB": 512,
    "diskSizeMB": 1024,
    "state": "running",
    "envdVersion": "0.6.13",
}


def _walk(node: Any, where: str = "#") -> Iterator[tuple[str, Any]]:
    yield where, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{where}/{i}")


def _resolve(ref: str) -> Any:
    node: Any = SPEC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_is_openapi_31_with_the_sdk_paths() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    present = {(path, method) for path, method, _ in _operations()}
    assert present >= {
        ("/sandboxes", "post"),
        ("/sandboxes/{sandboxID}", "get"),
        ("/sandboxes/{sandboxID}", "delete"),
        ("/v2/sandboxes", "get"),
        ("/sandboxes/{sandboxID}/timeout", "post"),
        ("/sandboxes/{sandboxID}/connect", "post"),
        ("/health", "get"),
    }
    schemas = SPEC["components"]["schemas"]
    assert {"NewSandbox", "Sandbox", "SandboxDetail", "ListedSandbox", "Error", "SandboxState"} <= set(
        schemas
    )


def test_every_ref_resolves() -> None:
    refs = [(where, node["$ref"]) for where, node in _walk(SPEC) if isinstance(node, dict) and "$ref" in node]
    assert refs
    for where, ref in refs:
        assert ref.startswith("#/"), f"{where}: non-local ref {ref}"
        try:
            _resolve(ref)
        except (KeyError, IndexError, TypeError):
            pytest.fail(f"{where}: unresolvable {ref}")


def test_every_operation_has_responses_a_success_and_unique_id() -> None:
    ids = []
    for path, method, operation in _operations():
        responses = operation.get("responses")
        assert responses, f"{method.upper()} {path} has no responses"
        assert any(str(code).startswith("2") for code in responses), f"{method.upper()} {path}: no 2xx"
        for code, response in responses.items():
            response = _resolve(response["$ref"]) if "$ref" in response else response
            assert response.get("description"), f"{method.upper()} {path} {code}: no description"
        ids.append(operation["operationId"])
    assert len(ids) == len(set(ids))


def test_path_parameters_are_declared() -> None:
    for path, item in SPEC["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        for method, operation in item.items():
            if method not in METHODS:
                continue
            declared = {
                (_resolve(p["$ref"]) if "$ref" in p else p)["name"]
                for p in item.get("parameters", []) + operation.get("parameters", [])
                if (_resolve(p["$ref"]) if "$ref" in p else p)["in"] == "path"
            }
            assert declared == names, f"{method.upper()} {path}"


@pytest.mark.parametrize("name", sorted(load_openapi()["components"]["schemas"]))
def test_component_schemas_are_valid_json_schema(name: str) -> None:
    Draft202012Validator.check_schema(SPEC["components"]["schemas"][name])


def test_required_fields_follow_the_protocol_facts() -> None:
    schemas = SPEC["components"]["schemas"]
    assert set(schemas["Sandbox"]["required"]) == set(SANDBOX)
    assert set(schemas["ListedSandbox"]["required"]) == set(LISTED)
    assert set(schemas["Error"]["required"]) == {"code", "message"}
    assert set(schemas["NewSandbox"]["required"]) == {"templateID"}
    assert schemas["SandboxState"]["enum"] == ["running", "paused"]


@pytest.mark.parametrize(
    ("model", "minimal"),
    [
        (SdkSandbox, SANDBOX),
        (SdkListedSandbox, LISTED),
        (SdkSandboxDetail, LISTED),
        (SdkError, {"code": 404, "message": "sandbox not found"}),
    ],
    ids=["Sandbox", "ListedSandbox", "SandboxDetail", "Error"],
)
def test_required_is_enough_for_the_sdk_client(model: Any, minimal: dict[str, Any]) -> None:
    """A body with only our required fields parses in the SDK, and each of them is needed by the spec."""
    model.from_dict(dict(minimal))
    path, method, status = {
        SdkSandbox: ("/sandboxes", "POST", 201),
        SdkListedSandbox: ("/sandboxes/{sandboxID}", "GET", 200),
        SdkSandboxDetail: ("/sandboxes/{sandboxID}", "GET", 200),
        SdkError: ("/sandboxes/{sandboxID}", "GET", 404),
    }[model]
    validate_response(path, method, status, minimal)
    for key in minimal:
        with pytest.raises(OpenAPIViolation, match=key):
            validate_response(path, method, status, {k: v for k, v in minimal.items() if k != key})


def test_validate_response_accepts_documented_bodies() -> None:
    validate_response(
        "/sandboxes",
        "POST",
        201,
        {**SANDBOX, "envdAccessToken": "tok", "trafficAccessToken": None, "domain": None, "extra": 1},
    )
    validate_response("/sandboxes/abc123/connect", "POST", 200, SANDBOX)
    validate_response("/sandboxes/abc123/connect", "POST", 201, SANDBOX)
    validate_response(
        "/v2/sandboxes", "GET", 200, [LISTED, {**LISTED, "state": "paused", "metadata": {"k": "v"}}]
    )
    validate_response("/v2/sandboxes", "GET", 200, [])
    detail = {
        **LISTED,
        "envdAccessToken": "tok",
        "allowInternetAccess": None,
        "network": {"allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"], "egressProxy": None},
        "lifecycle": {"autoResume": False, "onTimeout": "pause"},
    }
    validate_response("/sandboxes/{sandboxID}", "GET", 200, detail)
    validate_response("/sandboxes/abc123", "DELETE", 204, b"")
    validate_response("/sandboxes/abc123/timeout", "POST", 204, None)
    validate_response("/sandboxes/abc123", "DELETE", 404, b'{"code":404,"message":"sandbox not found"}')
    validate_response("/health", "GET", 200, "ok", content_type="text/plain; charset=utf-8")


@pytest.mark.parametrize(
    ("path", "method", "status", "body", "match"),
    [
        ("/sandboxes", "POST", 201, {**SANDBOX, "sandboxID": "abc-123"}, "does not match"),
        ("/sandboxes", "POST", 200, SANDBOX, "status 200 not documented"),
        ("/sandboxes/abc123", "DELETE", 204, b'{"x":1}', "without a body"),
        ("/v2/sandboxes", "GET", 200, [{**LISTED, "startedAt": "2025-01-02T03:04:05"}], "date-time"),
        ("/v2/sandboxes", "GET", 200, [{**LISTED, "state": "killed"}], "killed"),
        ("/v2/sandboxes", "GET", 200, [{**LISTED, "cpuCount": "2"}], "cpuCount"),
        ("/v2/sandboxes", "GET", 200, LISTED, "not of type 'array'"),
        ("/sandboxes/{sandboxID}", "GET", 200, {**LISTED, "lifecycle": {"autoResume": True}}, "onTimeout"),
        ("/sandboxes/abc123", "GET", 404, {"message": "gone"}, "code"),
        ("/sandboxes/abc123", "GET", 200, b"not json", "not JSON"),
        ("/nope", "GET", 200, None, "no path"),
        ("/sandboxes", "GET", 200, None, "not in the spec"),
    ],
)
def test_validate_response_rejects(path: str, method: str, status: int, body: Any, match: str) -> None:
    with pytest.raises(OpenAPIViolation, match=match):
        validate_response(path, method, status, body)


def test_find_operation_prefers_literal_paths() -> None:
    assert find_operation("/sandboxes/abc123/connect", "post")[0] == "/sandboxes/{sandboxID}/connect"
    assert find_operation("/v2/sandboxes?state=running", "GET")[0] == "/v2/sandboxes"


def test_validate_request_checks_sdk_bodies() -> None:
    sdk_create = {
        "templateID": "base",
        "timeout": 300,
        "secure": True,
        "allow_internet_access": True,
        "metadata": {"k": "v"},
        "envVars": {"A": "1"},
        "autoPause": True,
        "autoResume": {"enabled": True},
        "network": {"allowPublicTraffic": False, "rules": {"h": [{"transform": {"headers": {"X": "v"}}}]}},
        "volumeMounts": [{"name": "vol", "path": "/mnt/vol"}],
    }
    validate_request("/sandboxes", "POST", sdk_create)
    validate_request("/sandboxes/abc123/connect", "POST", {"timeout": 300})
    with pytest.raises(OpenAPIViolation, match="templateID"):
        validate_request("/sandboxes", "POST", {"timeout": 300})
    with pytest.raises(OpenAPIViolation, match="timeout"):
        validate_request("/sandboxes/abc123/timeout", "POST", {"timeout": -1})
