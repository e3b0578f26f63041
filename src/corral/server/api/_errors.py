"""Errors → HTTP responses with E2B's error body `{"code": <status>, "message": "<text>"}`.

Handlers are looked up by the exception's MRO (Starlette's ExceptionMiddleware does this), so one
entry covers the whole `CorralError` tree, whose status comes from `corral.core.errors.CODES`:

    CorralError        → its http_status (InvalidArgument 400, NotFound 404, Unimplemented 501, ...)
    HTTPException      → its status (unknown route 404, wrong method 405, body too large 413)
    any other          → 500 "internal server error" (re-raised afterwards, so the server logs it)
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from corral.core.errors import CorralError

__all__ = ["EXCEPTION_HANDLERS", "error_response"]


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


async def _corral_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CorralError)
    return error_response(exc.http_status, exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404 and message == "Not Found":
        message = f"{request.method} {request.url.path} is not an endpoint of this API"
    elif exc.status_code == 405 and message == "Method Not Allowed":
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, message, exc.headers)


async def _internal_error(_request: Request, _exc: Exception) -> Response:
    return error_response(500, "internal server error")


EXCEPTION_HANDLERS = {
    CorralError: _corral_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}
