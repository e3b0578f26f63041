"""Routing of header-less signed `/files` URLs to the sandbox that signed them.

`download_url()` / `upload_url()` of the E2B SDK return `{E2B_SANDBOX_URL}/files?path=…&username=…
&signature=v1_…[&signature_expiration=…]`, and clients fetch them without any `E2b-Sandbox-*` or
`X-Access-Token` header (e2b-protocol.md §1.6). The signature is
`sha256("{path}:{op}:{username}:{token}[:{exp}]")` over the sandbox's access token, so exactly the
sandbox whose token reproduces it is the one the URL was made for: `find_sandbox_for_signature`
(pure) finds it, and the request then goes through the proxy to that sandbox's envd, which checks
the signature again (operation and expiry) and answers like envd does — an expired URL gets
exactly `{"code":401,"message":"signature is already expired"}`.

A signed `/files` request that matches no running sandbox answers 401 `invalid signature` (what
envd says to a forged signature) rather than 502: nothing tells us which sandbox was meant, and
the answer must not depend on which sandboxes exist. Unsecured sandboxes sign nothing, so their
URLs carry no signature and cannot be routed without headers (the SDK then needs the
`49983-{id}.{domain}` host).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from corral.core.sandbox import ENVD_PORT
from corral.node.envd.files_http import READ, WRITE, sign
from corral.server.proxy import send_json

__all__ = [
    "FILES_PATH",
    "find_sandbox_for_signature",
    "is_signed_files_request",
    "serve_signed_files",
    "signed_files_query",
]

FILES_PATH = "/files"
_OPERATIONS = {"GET": READ, "HEAD": READ, "POST": WRITE}


def signed_files_query(scope: Scope) -> dict[str, str] | None:
    """The query of a `/files` request that carries a signature, else None (first value wins)."""
    if scope.get("type") != "http" or scope.get("path") != FILES_PATH:
        return None
    query: dict[str, str] = {}
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        query.setdefault(key, value)
    return query if query.get("signature") else None


def is_signed_files_request(scope: Scope) -> bool:
    return signed_files_query(scope) is not None


def find_sandbox_for_signature(
    query: Mapping[str, str], sandboxes: Iterable[tuple[str, str | None]], operation: str | None = None
) -> str | None:
    """The id of the first sandbox `(id, access token)` whose token produced `query["signature"]`.

    `operation` ("read"/"write") narrows the check to what the HTTP method asks for; None tries
    both. Sandboxes without a token never match. Pure.
    """
    signature = query.get("signature")
    if not signature:
        return None
    raw_expiration = query.get("signature_expiration")
    expiration: int | None = None
    if raw_expiration is not None:
        try:
            expiration = int(raw_expiration)
        except ValueError:
            return None
    path = query.get("path", "")
    username = query.get("username", "")
    operations = (operation,) if operation else (READ, WRITE)
    given = signature.encode("utf-8", "surrogateescape")
    for sandbox_id, token in sandboxes:
        if not token:
            continue
        for op in operations:
            if hmac.compare_digest(sign(path, op, username, token, expiration).encode(), given):
                return sandbox_id
    return None


def _running_tokens(node: Any) -> list[tuple[str, str | None]]:
    tokens = []
    for sandbox_id in node.running_ids():
        handle = node.lookup(sandbox_id)
        if handle is not None and handle.envd is not None:
            tokens.append((sandbox_id, handle.envd.access_token))
    return tokens


async def serve_signed_files(scope: Scope, receive: Receive, send: Send, node: Any, proxy: Any) -> None:
    """Send a header-less signed `/files` request to the envd of the running sandbox of `node`
    that signed it, through `proxy`; 401 when none did."""
    query = signed_files_query(scope) or {}
    tokens = _running_tokens(node)
    sandbox_id = find_sandbox_for_signature(query, tokens, _OPERATIONS.get(scope.get("method", "")))
    if sandbox_id is None:
        await send_json(send, 401, {"code": 401, "message": "invalid signature"})
        return
    await proxy(scope, receive, send, (sandbox_id, ENVD_PORT))
