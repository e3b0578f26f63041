from __future__ import annotations

import pytest

pytestmark = pytest.mark.compat


@pytest.fixture
def sandbox(e2b_env):
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=120)
    try:
        yield sbx
    finally:
        sbx.kill()
