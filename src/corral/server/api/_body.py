"""Reading a JSON request body into a pydantic model, with a size limit and 400s that say what is wrong."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from corral.core.errors import InvalidArgument

__all__ = ["MAX_JSON_BODY", "describe_validation_error", "read_model"]

MAX_JSON_BODY = 1 << 20  # 1 MiB: far above any control-plane request, far below harm

_ModelT = TypeVar("_ModelT", bound=BaseModel)


def _too_large() -> HTTPException:
    return HTTPException(
        413, f"request body is larger than {MAX_JSON_BODY} bytes (1 MiB), the limit for JSON"
    )


def describe_validation_error(error: ValidationError) -> str:
    """`timeout: Input should be greater than or equal to 0; metadata.k: Input should be a valid string`."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "invalid request body: " + "; ".join(parts)


async def read_model(request: Request, model: type[_ModelT]) -> _ModelT:
    """Parse the body as a JSON object into `model`. An empty body counts as `{}`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BODY:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise _too_large()
    if not body.strip():
        data: object = {}
    else:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # `[[[[…]]]]` nested deeper than the parser's stack
            raise InvalidArgument("request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc)) from None
