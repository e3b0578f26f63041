"""The sync SDK and its tests are exactly what scripts/unasync.py makes of the async source."""

from __future__ import annotations

import subprocess
import sys

from tests.sdk._helpers import ROOT, load_unasync


def test_generated_sync_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/unasync.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_rules_rewrite_async_names() -> None:
    unasync = load_unasync()
    line = "    async def f(self) -> AsyncIterator[int]:  async with x: await y.aclose(); r.aiter_bytes()"
    assert (
        unasync.unasync_line(line) == "    def f(self) -> Iterator[int]:  with x: y.close(); r.iter_bytes()"
    )
    assert (
        unasync.unasync_line("from corral.sdk._async.sandbox import AsyncSandbox")
        == "from corral.sdk._sync.sandbox import Sandbox"
    )
    assert unasync.unasync_line("raise StopAsyncIteration") == "raise StopIteration"


def test_check_fails_on_drift_and_unused_rules(tmp_path, monkeypatch) -> None:
    unasync = load_unasync()
    source, target = tmp_path / "_async", tmp_path / "_sync"
    source.mkdir()
    (source / "m.py").write_text("async def f():\n    await g()\n")
    monkeypatch.setattr(unasync, "DIRS", [(source, target)])
    monkeypatch.setattr(unasync, "ROOT", tmp_path)
    assert unasync.main(["--check"]) == 1  # nothing generated yet, and most rules unused
    monkeypatch.setattr(unasync, "_COMPILED", unasync._COMPILED[1:5])  # only the syntax rules
    monkeypatch.setattr(unasync, "RULES", unasync.RULES[1:5])
    (source / "m.py").write_text(
        "async def f():\n    async with a:\n        async for b in c:\n            await g()\n"
    )
    assert unasync.main([]) == 0
    assert (
        (target / "m.py")
        .read_text()
        .endswith("def f():\n    with a:\n        for b in c:\n            g()\n")
    )
    assert unasync.main(["--check"]) == 0
    (target / "m.py").write_text("# edited by hand\n")
    assert unasync.main(["--check"]) == 1
    (target / "stale.py").write_text("")
    unasync.main([])
    assert not (target / "stale.py").exists()
