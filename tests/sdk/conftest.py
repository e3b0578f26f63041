"""SDK tests against a real server: `sdk_env` points the SDK at the session's `corral server`
through the environment (`CORRAL_*`), as a user would."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_API_KEY, ServerProcess

_VARS = ("CORRAL_API_URL", "CORRAL_API_KEY", "CORRAL_SANDBOX_URL", "CORRAL_DOMAIN", "CORRAL_REQUEST_TIMEOUT")


@pytest.fixture(scope="session")
def sdk_env(corral_server: ServerProcess) -> Iterator[ServerProcess]:
    """CORRAL_API_URL / CORRAL_API_KEY / CORRAL_SANDBOX_URL for the test server."""
    saved = {name: os.environ.get(name) for name in _VARS}
    os.environ.update(
        CORRAL_API_URL=corral_server.url, CORRAL_SANDBOX_URL=corral_server.url, CORRAL_API_KEY=TEST_API_KEY
    )
    os.environ.pop("CORRAL_DOMAIN", None)
    os.environ.pop("CORRAL_REQUEST_TIMEOUT", None)
    try:
        yield corral_server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
