"""Template builds driven by the official e2b SDK (`Template.build`) against a real server.

The SDK's flow: POST /v3/templates → GET /templates/{id}/files/{hash} + PUT to the signed URL for
each COPY → POST /v2/templates/{id}/builds/{buildID} → poll /status with logsOffset. Builds are
small steps on `base`, so each takes a second or two (a rebuild with nothing changed: no work).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox, Template, wait_for_port
from e2b.exceptions import BuildException, TemplateException

from tests import gvisor
from tests.conftest import TEST_HOME

pytestmark = pytest.mark.compat


def _name(prefix: str = "corral-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Logs:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, entry) -> None:
        self.messages.append(entry.message)

    def steps(self) -> list[str]:
        """The step header lines (`[builder i/N] ...` and `CACHED [builder i/N] ...`)."""
        return [m for m in self.messages if "[builder " in m and "]: " not in m]


@pytest.fixture
def created() -> Iterator[list[Sandbox]]:
    sandboxes: list[Sandbox] = []
    yield sandboxes
    for sandbox in sandboxes:
        sandbox.kill()


def test_base_exists_and_unknown_names_do_not(e2b_env) -> None:
    assert Template.exists("base") is True
    assert Template.exists(f"nonexistent-{uuid.uuid4()}") is False


def test_build_then_create_sees_the_files_and_a_rebuild_is_all_cache(e2b_env, created) -> None:
    name = _name()
    run = uuid.uuid4().hex  # steps nobody built before: the first build does real work
    template = (
        Template()
        .from_template("base")
        .run_cmd(f"echo hi > /hello; echo {run} > /run-id", user="root")
        .set_envs({"GREETING": "hello", "WHERE": "$HOME/x"})
        .run_cmd('echo "$GREETING from $(whoami) in $(pwd)" > greeting.txt')
    )
    logs = Logs()
    info = Template.build(template, name, on_build_logs=logs)
    assert info.name == name and info.template_id and info.build_id
    assert not any(line.startswith("CACHED") for line in logs.steps()), logs.steps()
    assert Template.exists(name) is True

    sandbox = Sandbox.create(name, timeout=60)
    created.append(sandbox)
    assert sandbox.files.read("/hello") == "hi\n"
    assert sandbox.files.read("/home/user/greeting.txt") == "hello from user in /home/user\n"
    assert sandbox.commands.run("stat -c %U /hello").stdout == "root\n"

    again = Logs()
    Template.build(template, name, on_build_logs=again)
    assert len(again.steps()) == 3 and all(line.startswith("CACHED") for line in again.steps()), again.steps()
    assert any(m.startswith("CACHED [finalize]") for m in again.messages)

    changed = Logs()
    template2 = (
        Template()
        .from_template("base")
        .run_cmd(f"echo hi > /hello; echo {run} > /run-id", user="root")
        .set_envs({"GREETING": "hello", "WHERE": "$HOME/x"})
        .run_cmd('echo "$GREETING again, $WHERE" > greeting.txt')
    )
    Template.build(template2, name, on_build_logs=changed)
    assert [line.startswith("CACHED") for line in changed.steps()] == [True, True, False], changed.steps()
    sandbox = Sandbox.create(name, timeout=60)
    created.append(sandbox)
    assert sandbox.files.read("/home/user/greeting.txt") == "hello again, /root/x\n"  # ENV evaluated as root


def test_copy_uploads_files_with_owner_mode_and_dockerignore(e2b_env, created, tmp_path: Path) -> None:
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "test.txt").write_text("This is a test file.")
    (tmp_path / "folder" / "sub" / "deep.txt").write_text("deep")
    (tmp_path / "folder" / "ignored.log").write_text("no")
    os.symlink("test.txt", tmp_path / "folder" / "link.txt")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (tmp_path / ".dockerignore").write_text("**/*.log\n")
    (tmp_path / "folder" / "run-id").write_text(uuid.uuid4().hex)  # new content: a real upload
    name = _name()
    template = (
        Template(file_context_path=str(tmp_path))
        .from_template("base")
        .copy("folder/*", "folder")
        .copy("tool.sh", "/usr/local/bin/tool", user="root", mode=0o755)
        .run_cmd("cat folder/test.txt folder/sub/deep.txt && tool")
    )
    logs = Logs()
    Template.build(template, name, on_build_logs=logs)
    assert any("Uploaded 'folder/*'" in m for m in logs.messages)
    assert any("[stdout]: This is a test file.deep" in m for m in logs.messages), logs.messages

    sandbox = Sandbox.create(name, timeout=60)
    created.append(sandbox)
    out = sandbox.commands.run(
        "stat -c '%n %U %a' folder/test.txt /usr/local/bin/tool; readlink folder/link.txt; ls folder"
    ).stdout
    assert out == (
        "folder/test.txt user 644\n/usr/local/bin/tool root 755\ntest.txt\nlink.txt\nrun-id\nsub\ntest.txt\n"
    )

    again = Logs()
    Template.build(template, name, on_build_logs=again)
    assert any("Skipping upload of 'folder/*', already cached" in m for m in again.messages)
    assert all(line.startswith("CACHED") for line in again.steps()), again.steps()


def test_a_failing_run_reports_the_step_and_leaves_no_template(e2b_env) -> None:
    name = _name()
    template = Template().from_template("base").run_cmd("echo ok").run_cmd("echo oops >&2; exit 3")
    logs = Logs()
    with pytest.raises(BuildException) as info:
        Template.build(template, name, on_build_logs=logs)
    assert str(info.value) == "failed to run command 'echo oops >&2; exit 3': exit status 3"
    assert any("[builder 2/2] [stderr]: oops" in m for m in logs.messages), logs.messages
    assert Template.exists(name) is False


def test_unknown_user_fails_with_e2b_message(e2b_env) -> None:
    template = Template().from_template("base").skip_cache().run_cmd("whoami", user="root123")
    with pytest.raises(BuildException) as info:
        Template.build(template, _name())
    assert (
        "failed to run command 'whoami': command failed: unauthenticated: invalid username: 'root123'"
        in str(info.value)
    )


def test_missing_copy_source_is_refused_by_the_client(e2b_env, tmp_path: Path) -> None:
    template = Template(file_context_path=str(tmp_path)).from_template("base").copy("nope.txt", "/x")
    with pytest.raises(ValueError, match="No files found"):
        Template.build(template, _name())


def test_workdir_user_and_start_command_become_template_defaults(e2b_env, created) -> None:
    name = _name()
    template = (
        Template()
        .skip_cache()
        .from_template("base")
        .set_envs({"APP_MODE": "test"})
        .set_user("root")
        .run_cmd("mkdir -p /srv && echo served > /srv/index.html")
        .set_workdir("/srv")
        .set_user("user")
        .run_cmd("pwd > /tmp/where && whoami >> /tmp/where")
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    )
    logs = Logs()
    info = Template.build(template, name, on_build_logs=logs)
    assert "Template is ready" in logs.messages
    assert any(m.startswith("Running start command: python3 -m http.server 8000") for m in logs.messages)
    # What sandboxes of the template start with (read by the node at create).
    manifest = json.loads((TEST_HOME / "templates" / f"{info.template_id}.json").read_text())
    assert (manifest["default_user"], manifest["default_workdir"]) == ("user", "/srv")
    assert manifest["env_vars"] == {"APP_MODE": "test"}
    assert (manifest["start_cmd"], manifest["ready_cmd"]) == (
        "python3 -m http.server 8000",
        '[ -n "$(ss -Htuln sport = :8000)" ]',
    )
    sandbox = Sandbox.create(name, timeout=60)
    created.append(sandbox)
    assert sandbox.files.read("/tmp/where") == "/srv\nuser\n"
    assert sandbox.files.read("/srv/index.html") == "served\n"
    # The start command runs in the new sandbox, and create returned once it was ready.
    assert sandbox.commands.run("curl -fsS http://localhost:8000/index.html").stdout == "served\n"
    assert any(p.tag == "start" for p in sandbox.commands.list())


def test_a_start_command_that_fails_fails_the_build(e2b_env) -> None:
    template = Template().from_template("base").set_start_cmd("exit 5", "test -f /never")
    with pytest.raises(BuildException, match="start command failed: exit status 5"):
        Template.build(template, _name())


def test_tags_assign_list_remove(e2b_env) -> None:
    base_name = _name("corral-tags")
    info = Template.build(Template().from_template("base").run_cmd("true"), f"{base_name}:v1")
    assert info.tags == ["v1"]
    tagged = Template.assign_tags(f"{base_name}:v1", ["production", "latest"])
    assert sorted(tagged.tags) == ["latest", "production"]
    assert uuid.UUID(tagged.build_id) == uuid.UUID(info.build_id)
    tags = {t.tag: t.build_id for t in Template.get_tags(base_name)}
    assert tags == {"v1": info.build_id, "production": info.build_id, "latest": info.build_id}
    Template.remove_tags(base_name, ["latest"])
    assert {t.tag for t in Template.get_tags(base_name)} == {"v1", "production"}
    with pytest.raises(TemplateException, match="400"):
        Template.assign_tags(f"{base_name}:v1", ":invalid-tag")
    with pytest.raises(TemplateException, match="400"):
        Template.assign_tags(f"{base_name}:v1", f"{base_name}:")
    with pytest.raises(TemplateException):
        Template.get_tags(f"nonexistent-{uuid.uuid4().hex}")


def test_build_in_background_and_status(e2b_env) -> None:
    template = Template().from_template("base").skip_cache().run_cmd("sleep 2")
    info = Template.build_in_background(template, _name())
    status = Template.get_build_status(info)
    assert status.status.value == "building"
    logs_offset = len(status.log_entries)
    import time

    deadline = time.monotonic() + 60
    while status.status.value == "building" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = Template.get_build_status(info, logs_offset=logs_offset)
        logs_offset += len(status.log_entries)
    assert status.status.value == "ready"


@gvisor.NO_SUDO
def test_debian_image_gets_the_default_user_and_runs_steps(e2b_env, created) -> None:
    name = _name()
    template = Template().from_debian_image("bookworm").run_cmd("whoami > /tmp/me && cat /etc/debian_version")
    logs = Logs()
    Template.build(template, name, on_build_logs=logs)
    assert any(m.startswith("[base] FROM debian:bookworm") for m in logs.messages), logs.messages
    sandbox = Sandbox.create(name, timeout=60)
    created.append(sandbox)
    assert sandbox.files.read("/tmp/me") == "user\n"
    assert sandbox.commands.run("sudo -n true && echo sudo-ok").stdout == "sudo-ok\n"


def test_sandboxes_start_in_the_template_workdir_as_its_user(e2b_env, created) -> None:
    """A template's WORKDIR and USER are the defaults of its sandboxes' processes and files."""
    template = Template().from_template("base").run_cmd("mkdir -p /opt/work && chmod 777 /opt/work", user="root")
    template = template.set_workdir("/opt/work").set_user("root")
    name = _name()
    Template.build(template, name)
    sandbox = Sandbox.create(name)
    created.append(sandbox)
    assert sandbox.commands.run("whoami; pwd").stdout == "root\n/opt/work\n"
    assert sandbox.commands.run("pwd", user="user").stdout == "/opt/work\n"
    sandbox.files.write("/tmp/owned", "x")
    assert sandbox.commands.run("stat -c %U /tmp/owned").stdout == "root\n"
