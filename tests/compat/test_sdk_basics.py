"""The walk-through of the README, driven by the official e2b SDK against a real server."""

from __future__ import annotations

import time
import uuid

import pytest
from e2b import CommandExitException, Sandbox, SandboxQuery
from e2b.exceptions import NotFoundException

pytestmark = pytest.mark.compat


def test_whoami_and_pwd(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("whoami; pwd")
    assert result.stdout == "user\n/home/user\n"
    assert result.exit_code == 0


def test_stdout_stderr_and_exit_codes(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"


def test_root_user_and_env(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"
    out = sandbox.commands.run("echo $E2B_SANDBOX $E2B_SANDBOX_ID $FOO", envs={"FOO": "bar"}).stdout
    assert out == f"true {sandbox.sandbox_id} bar\n"
    assert sandbox.commands.run("echo ${FOO:-unset}").stdout == "unset\n"


def test_files_write_read(sandbox: Sandbox) -> None:
    sandbox.files.write("notes/hello.txt", "hello corral")
    assert sandbox.files.read("notes/hello.txt") == "hello corral"
    assert sandbox.files.read("/home/user/notes/hello.txt") == "hello corral"
    owner = sandbox.commands.run("stat -c '%U %a' /home/user/notes/hello.txt").stdout
    assert owner == "user 644\n"
    payload = bytes(range(256)) * 1000
    sandbox.files.write("/tmp/blob.bin", payload)
    assert sandbox.files.read("/tmp/blob.bin", format="bytes") == payload


def test_list_with_metadata_filter(e2b_env) -> None:
    tag = uuid.uuid4().hex
    a = Sandbox.create(metadata={"suite": tag, "role": "a"}, timeout=60)
    b = Sandbox.create(metadata={"suite": tag, "role": "b"}, timeout=60)
    try:
        found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag, "role": "b"})).next_items()
        assert [s.sandbox_id for s in found] == [b.sandbox_id]
        both = Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
        assert {s.sandbox_id for s in both} == {a.sandbox_id, b.sandbox_id}
    finally:
        a.kill()
        b.kill()


def test_set_timeout_then_expiry(e2b_env) -> None:
    sbx = Sandbox.create(timeout=60)
    sbx.set_timeout(2)
    deadline = time.monotonic() + 15
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_kill_then_not_running(e2b_env) -> None:
    sbx = Sandbox.create(timeout=60)
    assert sbx.is_running()
    assert sbx.kill() is True
    assert not sbx.is_running()
    assert Sandbox.kill(sbx.sandbox_id) is False
