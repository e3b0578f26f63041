"""CLI tests: `corral` through typer's runner, pointed at the session's real server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from typer.testing import CliRunner, Result

from corral.cli.main import app
from tests.conftest import TEST_API_KEY, ServerProcess

Invoke = Callable[..., Result]


@pytest.fixture
def corral_cli(corral_server: ServerProcess) -> Invoke:
    """`corral_cli("sandbox", "list")` runs the CLI against the test server."""
    env = {
        "CORRAL_API_URL": corral_server.url,
        "CORRAL_API_KEY": TEST_API_KEY,
        "CORRAL_SANDBOX_URL": corral_server.url,
    }

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=env)

    return invoke
