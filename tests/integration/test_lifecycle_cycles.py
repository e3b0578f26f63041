"""1000 pause/resume cycles with a write and a read-back between each lose nothing (E2B's upstream
issue #884 is the failure this guards against). Every 50th pause is filesystem-only (a cold boot).

Driven with raw httpx against the API and envd's /files for speed; the per-cycle time is printed
(run with -s to see it)."""

from __future__ import annotations

import hashlib
import time
import uuid

import httpx
import pytest
from e2b import Sandbox

from tests.conftest import TEST_API_KEY, ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CYCLES = 1000
COLD_EVERY = 50


def test_thousand_pause_resume_cycles_lose_nothing(e2b_env: ServerProcess) -> None:
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": TEST_API_KEY}, timeout=30) as api:
        created = api.post("/sandboxes", json={"templateID": "base", "timeout": 600})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["sandboxID"]
        envd_headers = {
            "E2b-Sandbox-Id": sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": created.json()["envdAccessToken"],
        }
        expected = hashlib.sha256()
        try:
            with httpx.Client(base_url=e2b_env.url, headers=envd_headers, timeout=30) as envd:
                started = time.monotonic()
                for i in range(CYCLES):
                    memory = (i + 1) % COLD_EVERY != 0
                    r = api.post(f"/sandboxes/{sandbox_id}/pause", json={"memory": memory})
                    assert r.status_code == 204, (i, r.status_code, r.text)
                    r = api.post(f"/sandboxes/{sandbox_id}/connect", json={"timeout": 600})
                    assert r.status_code == 201, (i, r.status_code, r.text)
                    content = f"cycle {i} {uuid.uuid4().hex}\n".encode()
                    expected.update(content)
                    path = f"/home/user/cycles/{i}"
                    r = envd.post(
                        "/files",
                        params={"path": path, "username": "user"},
                        content=content,
                        headers={"Content-Type": "application/octet-stream"},
                    )
                    assert r.status_code == 200, (i, r.status_code, r.text)
                    r = envd.get("/files", params={"path": path, "username": "user"})
                    assert r.status_code == 200 and r.content == content, (i, r.status_code, r.content)
                elapsed = time.monotonic() - started
            print(
                f"\n{CYCLES} pause/resume cycles: {elapsed:.1f} s, {elapsed / CYCLES * 1000:.1f} ms per cycle"
            )

            # Everything written is still there, as the sandbox's own processes see it.
            sbx = Sandbox.connect(sandbox_id)
            digest = sbx.commands.run(
                f"for i in $(seq 0 {CYCLES - 1}); do cat /home/user/cycles/$i; done | sha256sum", timeout=120
            ).stdout.split()[0]
            assert digest == expected.hexdigest()
        finally:
            api.delete(f"/sandboxes/{sandbox_id}")
