"""A fresh sandbox per test (creating one takes well under a second)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from corral import AsyncSandbox
from tests.conftest import ServerProcess


@pytest.fixture
async def sandbox(sdk_env: ServerProcess) -> AsyncIterator[AsyncSandbox]:
    sbx = await AsyncSandbox.create(timeout=120, metadata={"suite": "sdk"})
    try:
        yield sbx
    finally:
        await sbx.kill()
        await sbx.aclose()


@pytest.fixture
def tag() -> str:
    """A value unique to this test, for metadata filters and paths."""
    return uuid.uuid4().hex[:12]
