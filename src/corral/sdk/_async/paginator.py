"""`AsyncSandbox.list()`: sandboxes page by page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import httpx

from corral.sdk._api import list_request
from corral.sdk._async._client import AsyncApiClient, open_http
from corral.sdk._config import ConnectionConfig
from corral.sdk._errors import InvalidArgumentException, error_from_body
from corral.sdk._models import SandboxInfo, SandboxQuery, sandbox_info_from_json

__all__ = ["AsyncSandboxPaginator"]


class AsyncSandboxPaginator:
    """Pages of sandboxes, newest first by default.

        paginator = AsyncSandbox.list(limit=50)
        while paginator.has_next:
            for info in await paginator.next_items(): ...

    or `async for info in paginator` for every sandbox of every page.
    """

    def __init__(
        self,
        config: ConnectionConfig,
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        order: Literal["asc", "desc"] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config = config
        self._transport = transport
        self.query = query
        self.limit = limit
        self.order = order
        self._next_token = next_token
        self._has_next = True

    @property
    def has_next(self) -> bool:
        """Whether another page may follow."""
        return self._has_next

    @property
    def next_token(self) -> str | None:
        """The cursor of the next page (None before the first page and after the last)."""
        return self._next_token

    async def next_items(self) -> list[SandboxInfo]:
        """The next page."""
        if not self._has_next:
            raise InvalidArgumentException("there are no more sandboxes to list (has_next is False)")
        request = list_request(self.query, self.limit, self._next_token, self.order)
        async with open_http(self._transport) as http:
            response = await AsyncApiClient(self._config, http).send(request, what="list sandboxes")
        if response.status_code != 200:
            raise error_from_body(response.status_code, response.content, context="list sandboxes")
        self._next_token = response.headers.get("x-next-token") or None
        self._has_next = self._next_token is not None
        return [sandbox_info_from_json(item) for item in response.json()]

    async def __aiter__(self) -> AsyncIterator[SandboxInfo]:
        """Every sandbox on every remaining page."""
        while self._has_next:
            for info in await self.next_items():
                yield info
