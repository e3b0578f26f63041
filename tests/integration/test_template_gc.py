"""Layers of templates are collected when nothing refers to them, and build records survive a
restart — against a real server (`gc_server`: no spare build cache, so its layers directory holds
exactly what templates, sandboxes and in-flight builds refer to). Builds use the official SDK.
Two tests restart it: with a build-cache byte budget instead, and over layers an older version
left unowned (adopted and collected at start).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

from corral.builder.service import INTERRUPTED_MESSAGE
from corral.node.storage.templates import TemplateManifest
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


@contextlib.contextmanager
def _restarted_with(server: ServerProcess, env: Mapping[str, str | None]) -> Iterator[ServerProcess]:
    """The server restarted with `env` changed (None: unset), and restarted as it was afterwards."""
    saved = dict(server.env)
    for key, value in env.items():
        if value is None:
            server.env.pop(key, None)
        else:
            server.env[key] = value
    server.restart()
    try:
        yield server
    finally:
        server.env.clear()
        server.env.update(saved)
        server.restart()


def _sized(mark: str) -> Template:
    """Two steps of 1 MiB each (random: no two builds share a layer)."""
    return (
        Template()
        .from_template("base")
        .run_cmd(f"echo {mark} > /m1; head -c 1048576 /dev/urandom > /first", user="root")
        .run_cmd(f"echo {mark} > /m2; head -c 1048576 /dev/urandom > /second", user="root")
    )


def test_a_byte_budget_drops_the_least_recently_used_entries_and_keeps_the_newest(
    gc_server: ServerProcess,
) -> None:
    budget = {"CORRAL_BUILD_CACHE_MAX_AGE_HOURS": None, "CORRAL_BUILD_CACHE_MAX_BYTES": "3M"}
    with _restarted_with(gc_server, budget):
        opts = _opts(gc_server)
        before = _layers(gc_server)
        name, one, two = f"gc-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, uuid.uuid4().hex
        Template.build(_sized(one), name, **opts)
        first = _layers(gc_server) - before
        assert len(first) == 2
        Template.build(_sized(two), name, **opts)  # replaces the first build: its entries cost 2 MiB
        second = _layers(gc_server) - before - first
        assert len(second) == 2
        time.sleep(0.5)  # the collection after the build has run
        assert first <= _layers(gc_server)  # 2 MiB fit in 3 MiB: kept

        _delete(gc_server, name)  # now both builds' entries cost: 4 MiB do not fit, the older go
        _eventually(lambda: _layers(gc_server) - before == second, "the older build's layers are collected")

        logs: list[str] = []
        Template.build(_sized(two), name, on_build_logs=lambda entry: logs.append(entry.message), **opts)
        cached = [m for m in logs if m.startswith("CACHED [")]
        assert len(cached) == 3, logs  # both steps and the finalizing hit the cache
        assert _layers(gc_server) - before == second  # and nothing was built again
        _delete(gc_server, name)


def _fake_layer(layers_dir: Path, age_s: float, *, whole_root: bool = False) -> str:
    digest = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    layer = layers_dir / digest
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "legacy").write_text("made by an older Corral\n")
    if whole_root:  # what a base recipe makes (an older recipe's layer, say)
        for marker in ("var/lib/dpkg/status", "usr/bin/dpkg", "etc/passwd"):
            (layer / marker).parent.mkdir(parents=True, exist_ok=True)
            (layer / marker).write_text("")
    then = time.time() - age_s
    os.utime(layer, (then, then))
    return digest


def _owned(server: ServerProcess) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{server.home / 'corral.db'}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT digest FROM owned_layers")}


def test_layers_an_older_version_left_unowned_are_collected_at_start(gc_server: ServerProcess) -> None:
    layers_dir = gc_server.home / "layers"
    legacy, referenced, recipe = (
        _fake_layer(layers_dir, 2 * 3600, whole_root=w) for w in (False, False, True)
    )
    fresh = _fake_layer(layers_dir, 60)  # as if another server process were making it now
    base_layers = set(json.loads((gc_server.home / "templates" / "base.json").read_text())["layers"])
    manifest = gc_server.home / "templates" / f"legacy{uuid.uuid4().hex[:8]}.json"
    manifest.write_text(
        TemplateManifest(
            template_id=manifest.stem, names=(manifest.stem,), layers=(referenced,), team_id="legacy-team"
        ).to_json()
    )
    try:
        assert not {legacy, referenced, recipe, fresh} & _owned(gc_server)
        gc_server.restart()
        present = _layers(gc_server)
        assert legacy not in present
        assert {referenced, recipe, fresh} <= present
        assert base_layers <= present  # the base template's layer: never adopted
        assert not {legacy, referenced, recipe, fresh} & _owned(gc_server)  # collected, or never adopted
    finally:
        manifest.unlink(missing_ok=True)
        for digest in (legacy, referenced, recipe, fresh):
            shutil.rmtree(layers_dir / digest, ignore_errors=True)
