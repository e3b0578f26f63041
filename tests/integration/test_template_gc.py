"""Layers of templates are collected when nothing refers to them, and build records survive a
restart — against a real server (`gc_server`: no spare build cache, so its layers directory holds
exactly what templates, sandboxes and in-flight builds refer to). Builds use the official SDK.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

from corral.builder.service import INTERRUPTED_MESSAGE
from tests.conftest import TEST_API_KEY, ServerProcess

pytestmark = pytest.mark.integration

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _opts(server: ServerProcess) -> dict[str, str]:
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": TEST_API_KEY}


def _layers(server: ServerProcess) -> set[str]:
    return {p.name for p in (server.home / "layers").iterdir() if _DIGEST.match(p.name)}


def _cache_entries(server: ServerProcess) -> set[str]:
    cache = server.home / "build-cache"
    return {p.stem for p in cache.glob("*.json")} if cache.is_dir() else set()


def _eventually(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def _delete(server: ServerProcess, name: str) -> None:
    with server.api() as api:
        assert api.delete(f"/templates/{name}").status_code == 204


def _template(run: str, second: str) -> Template:
    return (
        Template()
        .from_template("base")
        .run_cmd(f"echo {run} > /first", user="root")
        .run_cmd(f"echo {second} > /second", user="root")
    )


def test_build_rebuild_delete_leaves_only_what_is_referenced(gc_server: ServerProcess) -> None:
    before, cache_before = _layers(gc_server), _cache_entries(gc_server)
    name, run = f"gc-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    Template.build(_template(run, "one"), name, **_opts(gc_server))
    first = _layers(gc_server) - before
    assert len(first) == 2  # one layer per RUN

    Template.build(_template(run, "two"), name, **_opts(gc_server))  # step 2 changed
    _eventually(lambda: len(_layers(gc_server) - before) == 2, "the replaced step's layer is collected")
    second = _layers(gc_server) - before
    assert len(first & second) == 1  # step 1 was a cache hit and is still used

    _delete(gc_server, name)
    _eventually(lambda: _layers(gc_server) == before, "the deleted template's layers are collected")
    assert _cache_entries(gc_server) == cache_before  # entries of the dead layers went with them
    assert not list((gc_server.home / "layers").glob(".tmp-*"))


def test_a_sandbox_keeps_its_layers_after_its_template_is_deleted(gc_server: ServerProcess) -> None:
    before = _layers(gc_server)
    name, run = f"gc-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    Template.build(_template(run, "kept"), name, **_opts(gc_server))
    sandbox = Sandbox.create(name, timeout=120, **_opts(gc_server))
    try:
        _delete(gc_server, name)
        time.sleep(0.5)  # the collection after the delete has run
        assert len(_layers(gc_server) - before) == 2
        assert sandbox.files.read("/second") == "kept\n"
        assert sandbox.commands.run("cat /first", user="root").stdout == f"{run}\n"
    finally:
        sandbox.kill()
    _eventually(lambda: _layers(gc_server) == before, "the killed sandbox's layers are collected")


def test_a_failed_build_leaves_no_layer(gc_server: ServerProcess) -> None:
    before = _layers(gc_server)
    name, run = f"gc-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    failing = Template().from_template("base").run_cmd(f"echo {run} > /ok", user="root").run_cmd("false")
    with pytest.raises(BuildException):
        Template.build(failing, name, **_opts(gc_server))
    _eventually(lambda: _layers(gc_server) == before, "the failed build's layers are collected")
    assert not Template.exists(name, **_opts(gc_server))


def test_build_records_survive_a_restart_and_a_running_build_ends_as_error(gc_server: ServerProcess) -> None:
    opts = _opts(gc_server)
    name = f"gc-{uuid.uuid4().hex[:8]}"
    done = Template.build(Template().from_template("base").run_cmd(f"echo {uuid.uuid4().hex}"), name, **opts)
    finished = Template.get_build_status(done, **opts)
    assert finished.status.value == "ready"

    marker = uuid.uuid4().hex
    slow = Template().from_template("base").run_cmd(f"echo {marker}; sleep 600")
    running = Template.build_in_background(slow, f"{name}-slow", **opts)
    _eventually(
        lambda: any(marker in e.message for e in Template.get_build_status(running, **opts).log_entries),
        "the slow step runs",
        timeout_s=60,
    )
    gc_server.restart(signal.SIGKILL)

    after = Template.get_build_status(running, **opts)
    assert after.status.value == "error"
    assert after.reason is not None and after.reason.message == INTERRUPTED_MESSAGE
    messages = [e.message for e in after.log_entries]
    assert any(marker in m for m in messages), messages  # the log written before the kill is kept
    assert messages[-1] == f"Build failed: {INTERRUPTED_MESSAGE}"
    assert not Template.exists(f"{name}-slow", **opts)

    again = Template.get_build_status(done, **opts)
    assert again.status.value == "ready"
    assert [e.message for e in again.log_entries] == [e.message for e in finished.log_entries]
    _eventually(lambda: not _processes_with(marker), "the killed build's sandbox is removed")
    _delete(gc_server, name)


def _processes_with(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found
