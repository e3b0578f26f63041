"""API-key authentication: the `X-API-Key` header (any case) names the team of a request."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Protocol

import anyio.to_thread
from starlette.requests import Request

from corral.core.errors import Unauthenticated

__all__ = ["API_KEY_HEADER", "KNOWN_KEY_TTL_S", "ApiKeyAuth", "ApiKeyLookup"]

API_KEY_HEADER = "x-api-key"
# A key the database accepted is trusted this long without asking again: every API call paid a
# thread hop and a query (~1-2 ms) for it. Keys are never revoked while a server runs today; a
# revocation would have to clear this cache (or wait this long).
KNOWN_KEY_TTL_S = 2.0
_KNOWN_KEYS_MAX = 1024


class ApiKeyLookup(Protocol):
    """The part of `corral.server.store.Store` that authentication needs."""

    def team_for_api_key(self, key: str) -> str | None: ...


class ApiKeyAuth:
    def __init__(self, lookup: ApiKeyLookup, key_file: Path) -> None:
        self._lookup = lookup
        self._known: dict[str, tuple[float, str]] = {}  # sha256 of a key -> (trusted until, team)
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
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        known = self._known.get(digest)
        now = time.monotonic()
        if known is not None and known[0] > now:
            return known[1]
        team_id = await anyio.to_thread.run_sync(self._lookup.team_for_api_key, key)
        if team_id is None:
            raise Unauthenticated(f"Invalid API key, this key is not known to this server: {self._hint}")
        if len(self._known) >= _KNOWN_KEYS_MAX:
            self._known.clear()
        self._known[digest] = (now + KNOWN_KEY_TTL_S, team_id)
        return team_id
