"""AsyncTemplate against the real server: builds on `base` (a second or two each), COPY uploads
with `.dockerignore`, the cache, failures naming their step, background builds, tags, list, delete."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from corral import (
    AsyncSandbox,
    AsyncTemplate,
    BuildException,
    FileUploadException,
    LogEntry,
    LogEntryEnd,
    LogEntryStart,
    TemplateBuildStatus,
)
from corral.sdk._handlers import asleep
from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration


def _name() -> str:
    return f"corral-sdk-{uuid.uuid4().hex[:10]}"


class Logs:
    def __init__(self) -> None:
        self.entries: list[LogEntry] = []

    async def __call__(self, entry: LogEntry) -> None:
        self.entries.append(entry)

    @property
    def messages(self) -> list[str]:
        return [entry.message for entry in self.entries]

    def step_headers(self) -> list[str]:
        """The server's `[builder i/N] ...` lines (and their `CACHED` form), not their output."""
        return [m for m in self.messages if "[builder " in m and "]: " not in m]


async def test_build_copy_cache_and_a_sandbox_of_it(sdk_env: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "app" / "sub").mkdir(parents=True)
    (tmp_path / "app" / "main.txt").write_text(uuid.uuid4().hex)  # new content: a real upload
    (tmp_path / "app" / "sub" / "deep.txt").write_text("deep")
    (tmp_path / "app" / "debug.log").write_text("ignored")
    (tmp_path / ".dockerignore").write_text("**/*.log\n")
    name = _name()
    template = (
        AsyncTemplate(file_context_path=tmp_path)
        .from_template("base")
        .copy("app", "/srv/app/", user="root", mode=0o750)
        .set_envs({"GREETING": "hello"})
        .set_workdir("/srv/app")
        .run_cmd('echo "$GREETING from $(whoami) in $(pwd)" > /tmp/greeting.txt')
    )
    logs = Logs()
    info = await AsyncTemplate.build(template, name, on_build_logs=logs)
    assert info.name == name and info.template_id and info.build_id and info.tags == ["default"]
    assert isinstance(logs.entries[0], LogEntryStart) and isinstance(logs.entries[-1], LogEntryEnd)
    assert "Uploaded 'app'" in logs.messages
    assert not any(line.startswith("CACHED") for line in logs.step_headers()), logs.step_headers()
    assert {entry.step for entry in logs.entries if entry.step} >= {"1", "2", "3", "4", "finalize"}
    assert await AsyncTemplate.exists(name) is True

    sandbox = await AsyncSandbox.create(name, timeout=60)
    try:
        listing = await sandbox.commands.run(
            "stat -c '%n %U %a' main.txt sub/deep.txt; ls; cat /tmp/greeting.txt", user="root", cwd="/srv/app"
        )
        assert listing.stdout == (
            "main.txt root 750\nsub/deep.txt root 750\nmain.txt\nsub\n"  # no debug.log: .dockerignore
            "hello from user in /srv/app\n"
        )
    finally:
        await sandbox.kill()
        await sandbox.aclose()

    again = Logs()
    await AsyncTemplate.build(template, name, on_build_logs=again)
    assert "Skipping upload of 'app', already cached" in again.messages
    headers = again.step_headers()
    assert len(headers) == 4 and all(line.startswith("CACHED") for line in headers), headers


async def test_a_failing_step_is_named_and_leaves_no_template(sdk_env: ServerProcess) -> None:
    name = _name()
    template = AsyncTemplate().from_template("base").run_cmd("echo ok").run_cmd("echo oops >&2; exit 3")
    logs = Logs()
    with pytest.raises(BuildException) as info:
        await AsyncTemplate.build(template, name, on_build_logs=logs)
    error = info.value
    assert (error.step, error.instruction) == ("2", "RUN echo oops >&2; exit 3")
    assert error.origin is not None and "test_template.py:" in error.origin
    assert str(error) == (
        "failed to run command 'echo oops >&2; exit 3': exit status 3 "
        f"[step 2/2: RUN echo oops >&2; exit 3, added at {error.origin}]"
    )
    assert any(m.endswith("[stderr]: oops") for m in logs.messages), logs.messages
    assert isinstance(logs.entries[-1], LogEntryEnd)
    assert await AsyncTemplate.exists(name) is False


async def test_a_missing_copy_source_fails_before_the_server_is_asked(
    sdk_env: ServerProcess, tmp_path: Path
) -> None:
    name = _name()
    template = AsyncTemplate(file_context_path=tmp_path).from_template("base").copy("nope.txt", "/x")
    with pytest.raises(FileUploadException, match=r"no files match 'nope.txt'.*\[step 1/1: COPY nope.txt /x"):
        await AsyncTemplate.build(template, name)
    with pytest.raises(BuildException, match="unknown-template-"):
        await AsyncTemplate.build(AsyncTemplate().from_template(f"unknown-template-{uuid.uuid4().hex}"), name)
    assert await AsyncTemplate.exists(name) is False


async def test_background_build_tags_list_and_delete(sdk_env: ServerProcess) -> None:
    name = _name()
    template = (
        AsyncTemplate().from_template("base").run_cmd(f"echo {uuid.uuid4().hex} > /run-id", user="root")
    )
    info = await AsyncTemplate.build_in_background(
        template, f"{name}:v1", tags=["stable"], cpu_count=1, memory_mb=512
    )
    assert sorted(info.tags) == ["stable", "v1"]
    offset, seen = 0, []
    status = await AsyncTemplate.get_build_status(info)
    for _ in range(300):  # 60 s at most
        seen += status.log_entries
        offset += len(status.log_entries)
        if status.status not in (TemplateBuildStatus.BUILDING, TemplateBuildStatus.WAITING):
            break
        await asleep(0.2)
        status = await AsyncTemplate.get_build_status(info, logs_offset=offset)
    assert status.status is TemplateBuildStatus.READY, [e.message for e in seen]
    assert any(entry.message.startswith("[builder 1/1] RUN echo") for entry in seen)

    assigned = await AsyncTemplate.assign_tags(f"{name}:v1", ["production"])
    assert assigned.tags == ["production"] and assigned.build_id == info.build_id
    tags = {tag.tag: tag.build_id for tag in await AsyncTemplate.get_tags(name)}
    assert tags == {"v1": info.build_id, "stable": info.build_id, "production": info.build_id}
    await AsyncTemplate.remove_tags(name, "stable")
    assert {tag.tag for tag in await AsyncTemplate.get_tags(name)} == {"v1", "production"}

    listed = {t.template_id: t for t in await AsyncTemplate.list()}
    assert listed[info.template_id].names == [name]
    assert (listed[info.template_id].cpu_count, listed[info.template_id].memory_mb) == (1, 512)

    assert await AsyncTemplate.delete(name) is True
    assert await AsyncTemplate.exists(name) is False
    assert await AsyncTemplate.delete(name) is False
