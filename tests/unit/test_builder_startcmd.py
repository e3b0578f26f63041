"""Start and ready commands: `wait_until_ready` and the create-time hook `start_template_processes`,
with a fake spawner (no sandbox): the start command becomes an envd process of the sandbox run as
the template's user in its workdir with its env, and the hook returns once the ready command passes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from corral.builder.startcmd import TemplateNotReady, start_template_processes, wait_until_ready
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.process import ProcessTable
from corral.node.runtime.base import ExitStatus, SpawnRequest
from corral.node.storage.templates import TemplateManifest


class FakeProcess:
    def __init__(self, pid: int, status: ExitStatus | None) -> None:
        self.pid = pid
        self._status = status
        self._exited = asyncio.Event()
        if status is not None:
            self._exited.set()
        r, w = os.pipe()
        os.close(w)  # no output: EOF at once
        os.set_blocking(r, False)
        self._fd: int | None = r
        self.signals: list[int] = []

    def output_fds(self) -> list[tuple[str, int]]:
        return [("stdout", self._fd)] if self._fd is not None else []

    async def wait(self) -> ExitStatus:
        await self._exited.wait()
        assert self._status is not None
        return self._status

    def exit(self, code: int) -> None:
        self._status = ExitStatus(exit_code=code)
        self._exited.set()

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.exit(-1)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FakeSpawner:
    """`start` (the first spawn) keeps running unless `start_exit` is set; ready probes fail
    `ready_failures` times, then pass."""

    def __init__(self, ready_failures: int = 2, start_exit: int | None = None) -> None:
        self.requests: list[SpawnRequest] = []
        self.ready_failures = ready_failures
        self.start_exit = start_exit
        self.start: FakeProcess | None = None

    async def spawn(self, request: SpawnRequest) -> FakeProcess:
        self.requests.append(request)
        if self.start is None and request.argv[-1] == "serve":
            self.start = FakeProcess(
                100, ExitStatus(self.start_exit) if self.start_exit is not None else None
            )
            return self.start
        ok = len(self.requests) - 1 > self.ready_failures
        return FakeProcess(200 + len(self.requests), ExitStatus(0 if ok else 1))


@dataclasses.dataclass
class FakeEnvd:
    root: ConfinedRoot
    spawner: FakeSpawner
    processes: ProcessTable

    def default_env(self) -> dict[str, str]:
        return {"E2B_SANDBOX": "true", "FROM_CREATE": "yes"}


@dataclasses.dataclass
class FakeHandle:
    envd: FakeEnvd


@pytest.fixture
def root(tmp_path: Path) -> ConfinedRoot:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\napp:x:1001:1001::/home/app:/bin/bash\n"
    )
    (tmp_path / "etc/group").write_text("root:x:0:\napp:x:1001:\n")
    return ConfinedRoot.open_path(str(tmp_path))


def _manifest(**kw: Any) -> TemplateManifest:
    values: dict[str, Any] = {
        "template_id": "tpl",
        "names": ("tpl",),
        "layers": (),
        "default_user": "app",
        "default_workdir": "/srv",
        "env_vars": {"APP": "1"},
        "start_cmd": "serve",
        "ready_cmd": "probe",
    }
    values.update(kw)
    return TemplateManifest(**values)


async def test_start_command_runs_as_the_template_user_and_ready_is_polled(root: ConfinedRoot) -> None:
    spawner = FakeSpawner(ready_failures=2)
    table = ProcessTable()
    handle = FakeHandle(FakeEnvd(root, spawner, table))
    await start_template_processes(handle, _manifest(), ready_timeout_s=5)
    start, *probes = spawner.requests
    assert start.argv == ["/bin/bash", "-l", "-c", "serve"] and [p.argv[-1] for p in probes] == ["probe"] * 3
    assert (start.user.name, start.user.uid, start.cwd) == ("app", 1001, "/srv")
    assert start.env["APP"] == "1" and start.env["FROM_CREATE"] == "yes" and start.env["HOME"] == "/home/app"
    assert [mp.pid for mp in table.running()] == [100]  # an envd process: listed, killable
    assert table.running()[0].tag == "start"
    table.close()


async def test_a_failing_start_command_fails_create(root: ConfinedRoot) -> None:
    spawner = FakeSpawner(ready_failures=100, start_exit=3)
    handle = FakeHandle(FakeEnvd(root, spawner, ProcessTable()))
    with pytest.raises(TemplateNotReady, match="start command failed: exit status 3"):
        await start_template_processes(handle, _manifest(), ready_timeout_s=5)


async def test_nothing_to_do_without_start_and_ready(root: ConfinedRoot) -> None:
    spawner = FakeSpawner()
    await start_template_processes(
        FakeHandle(FakeEnvd(root, spawner, ProcessTable())), _manifest(start_cmd=None, ready_cmd=None)
    )
    assert spawner.requests == []


async def test_ready_timeout_cuts_a_hanging_probe() -> None:
    async def hangs() -> bool:
        await asyncio.sleep(10)
        return True

    with pytest.raises(TemplateNotReady, match="ready command timed out"):
        await wait_until_ready(hangs, lambda: None, timeout_s=0.1)


async def test_a_start_command_that_exits_zero_is_fine() -> None:
    calls = []

    async def ready() -> bool:
        calls.append(1)
        return len(calls) >= 3

    await wait_until_ready(ready, lambda: ExitStatus(0), timeout_s=5, retry_s=0.01)
    assert len(calls) == 3
