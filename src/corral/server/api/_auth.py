"""API-key authentication: the `X-API-Key` header (any case) names the team of a request."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import anyio.to_thread
from starlette.requests import Request

from corral.core.errors import Unauthenticated

__all__ = ["API_KEY_HEADER", "ApiKeyAuth", "ApiKeyLookup"]

API_KEY_HEADER = "x-api-key"


class ApiKeyLookup(Protocol):
    """The part of `corral.server.store.Store` that authentication needs."""

    def team_for_api_key(self, key: str) -> str | None: ...


class ApiKeyAuth:
    def __init__(self, lookup: ApiKeyLookup, key_file: Path) -> None:
        self._lookup = lookup
        self._hint = (
            "send the key in the X-API-Key header (E2B_API_KEY for the e2b SDKs). "
            f"`corral server` prints the key when it starts and keeps it in {key_file} "
            "($CORRAL_HOME/api_key) unless CORRAL_API_KEY sets it"
        )

    async def team_id(self, request: Request) -> str:
        """The team the request's API key belongs to; `Unauthenticated` (401) otherwise."""
        key = request.headers.get(API_KEY_HEADER, "").strip()
        if not key:
            raise Unauthenticated(f"Invalid API key, the X-API-Key header is missing: {self._hint}")
        team_id = await anyio.to_thread.run_sync(self._lookup.team_for_api_key, key)
        if team_id is None:
            raise Unauthenticated(f"Invalid API key, this key is not known to this server: {self._hint}")
        return team_id
