"""`process.Process` with the official e2b SDK (sync flavour) against a real server.

Where the SDK hides a wire detail (exact bytes, keepalive events, tags, StreamInput) the test
speaks Connect itself (`raw_stream`), as the SDK would, to the same server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import CommandExitException, Sandbox
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    NotFoundException,
    TimeoutException,
)
from packaging.version import Version

pytestmark = pytest.mark.compat


# -- a raw Connect client (JSON codec, HTTP/1.1), for what the SDK does not show ------------------


def envd_headers(sbx: Any) -> dict[str, str]:
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    if sbx._envd_access_token:
        headers["X-Access-Token"] = sbx._envd_access_token
    return headers


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def raw_stream(
    sbx: Any,
    method: str,
    messages: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """POST an enveloped request to `/process.Process/<method>`; yield (flags, message) as they arrive."""
    url = f"{os.environ['E2B_SANDBOX_URL']}/process.Process/{method}"
    all_headers = {
        "content-type": "application/connect+json",
        "connect-protocol-version": "1",
        **envd_headers(sbx),
        **(headers or {}),
    }

    def body() -> Iterator[bytes]:
        for message in messages:
            yield envelope(message)

    with httpx.stream("POST", url, headers=all_headers, content=body(), timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        buffer = b""
        for chunk in response.iter_raw():
            buffer += chunk
            while len(buffer) >= 5:
                flags, size = struct.unpack(">BI", buffer[:5])
                if len(buffer) < 5 + size:
                    break
                yield flags, json.loads(buffer[5 : 5 + size])
                buffer = buffer[5 + size :]


def start_message(cmd: str, **extra: Any) -> dict[str, Any]:
    return {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}, "stdin": False, **extra}


def output_bytes(events: list[tuple[int, dict[str, Any]]], stream: str = "stdout") -> bytes:
    return b"".join(
        base64.b64decode(m["event"]["data"][stream])
        for _, m in events
        if stream in m.get("event", {}).get("data", {})
    )


# -- tests ---------------------------------------------------------------------------------------


def test_envd_version(sandbox: Sandbox) -> None:
    assert sandbox._envd_version == Version("0.6.13")


def test_output_streams_as_it_comes(sandbox: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    result = sandbox.commands.run(
        "echo first; sleep 1; echo second >&2", on_stdout=lambda s: seen.append((time.monotonic() - t0, s)),
        on_stderr=lambda s: seen.append((time.monotonic() - t0, s)),
    )  # fmt: skip
    total = time.monotonic() - t0
    assert [s for _, s in seen] == ["first\n", "second\n"]
    assert seen[0][0] < total - 0.7  # delivered a second before the end, not buffered
    assert (result.stdout, result.stderr, result.exit_code, result.error) == ("first\n", "second\n", 0, None)


def test_end_event_fields(sandbox: Sandbox) -> None:
    events = list(raw_stream(sandbox, "Start", [start_message("echo x; exit 7")]))
    assert "start" in events[0][1]["event"] and events[0][1]["event"]["start"]["pid"] > 0
    assert events[-2][1]["event"]["end"] == {
        "exitCode": 7,
        "exited": True,
        "status": "exit status 7",
        "error": "exit status 7",
    }
    assert events[-1] == (2, {})  # end-of-stream envelope, no error
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo out; echo err >&2; exit 3")
    assert (info.value.exit_code, info.value.error, info.value.stdout, info.value.stderr) == (
        3,
        "exit status 3",
        "out\n",
        "err\n",
    )


def test_keepalive_events(sandbox: Sandbox) -> None:
    events = list(
        raw_stream(sandbox, "Start", [start_message("sleep 2.3")], {"Keepalive-Ping-Interval": "1"})
    )
    kinds = [next(iter(m["event"])) for _, m in events[:-1]]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"keepalive"} and 2 <= len(kinds[1:-1]) <= 3  # one a second, idle stream


def test_exact_bytes_and_replacement_in_the_sdk(sandbox: Sandbox) -> None:
    cmd = r"printf 'a\377\376\000b\303'; printf '\200' >&2"
    events = list(raw_stream(sandbox, "Start", [start_message(cmd)]))
    assert output_bytes(events) == b"a\xff\xfe\x00b\xc3"
    assert output_bytes(events, "stderr") == b"\x80"
    result = sandbox.commands.run(cmd)
    assert (result.stdout, result.stderr) == ("a\ufffd\ufffd\x00b\ufffd", "\ufffd")


def test_background_wait_and_connect_from_another_client(sandbox: Sandbox) -> None:
    gate = "/tmp/connected-go"  # "two" comes once the second client is connected, however loaded
    handle = sandbox.commands.run(
        f"echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two", background=True
    )
    for stdout, _, _ in handle:
        if stdout == "one\n":
            break
    handle.disconnect()  # the first client goes away; the process keeps running
    other = Sandbox.connect(sandbox.sandbox_id)
    connected = other.commands.connect(handle.pid)
    other.commands.run(f"touch {gate}")
    result = connected.wait()
    assert (result.stdout, result.exit_code) == ("two\n", 0)  # output from the moment of connecting
    ended = other.commands.connect(handle.pid).wait()  # ended < 30 s ago: its end is still there
    assert (ended.stdout, ended.exit_code) == ("", 0)
    with pytest.raises(NotFoundException):
        other.commands.connect(999999)


def test_list_tags_and_ptys(sandbox: Sandbox) -> None:
    from e2b import PtySize
    from e2b.envd.process import process_pb
    from protobuf import Oneof

    stream = raw_stream(sandbox, "Start", [start_message("sleep 30", tag="web")])
    _, first = next(stream)
    tagged_pid = first["event"]["start"]["pid"]
    pty = sandbox.pty.create(PtySize(rows=24, cols=80))
    bg = sandbox.commands.run("sleep 30", background=True)
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert {tagged_pid, pty.pid, bg.pid} <= set(listed)
    assert (listed[tagged_pid].tag, listed[bg.pid].tag) == ("web", None)
    assert (listed[pty.pid].cmd, listed[pty.pid].args) == ("/bin/bash", ["-i", "-l"])
    assert listed[pty.pid].envs["TERM"] == "xterm-256color"
    assert listed[bg.pid].args == ["-l", "-c", "sleep 30"]
    # Connect by tag (the SDK only connects by pid; its generated client takes a tag).
    by_tag = sandbox.commands._rpc.connect(
        process_pb.ConnectRequest(process=process_pb.ProcessSelector(selector=Oneof("tag", "web"))),
        timeout_ms=10_000,
    )
    assert next(iter(by_tag)).event.event.value.pid == tagged_pid
    by_tag.close()  # type: ignore[attr-defined]
    for pid in (tagged_pid, pty.pid, bg.pid):
        assert sandbox.commands.kill(pid) is True
    deadline = time.monotonic() + 10
    while {tagged_pid, pty.pid, bg.pid} & {
        p.pid for p in sandbox.commands.list()
    } and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {tagged_pid, pty.pid, bg.pid} & {p.pid for p in sandbox.commands.list()}
    stream.close()


def test_stdin_echo_then_eof(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat; echo EOF", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "hello\n")
    handle.send_stdin(b"\xffbytes\n")
    handle.close_stdin()
    result = handle.wait()
    assert result.stdout == "hello\n\ufffdbytes\nEOF\n"


def test_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 100", background=True)
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert (info.value.exit_code, info.value.error) == (-1, "signal: killed")
    assert sandbox.commands.kill(handle.pid) is False
    assert sandbox.commands.kill(999999) is False


def test_killing_a_running_run(sandbox: Sandbox) -> None:
    def kill_when_listed() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for process in sandbox.commands.list():
                if process.args[-1] == "sleep 100 | cat":
                    sandbox.commands.kill(process.pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_listed)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("sleep 100 | cat")  # a pipeline: the whole group goes
    killer.join()
    assert info.value.exit_code == -1 and time.monotonic() - t0 < 10


def test_users(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("whoami; echo $HOME; pwd", user="root").stdout == "root\n/root\n/root\n"
    assert sandbox.commands.run("id -un; id -Gn").stdout == "user\nuser sudo\n"
    with pytest.raises(AuthenticationException, match="invalid username: 'nobody-here'"):
        sandbox.commands.run("true", user="nobody-here")  # type: ignore[arg-type]


def test_cwd(sandbox: Sandbox) -> None:
    sandbox.commands.run("mkdir -p work/deep")
    assert sandbox.commands.run("pwd", cwd="~").stdout == "/home/user\n"
    assert sandbox.commands.run("pwd", cwd="work/deep").stdout == "/home/user/work/deep\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    with pytest.raises(InvalidArgumentException, match="cwd '/home/user/missing' does not exist"):
        sandbox.commands.run("pwd", cwd="missing")


def test_sandbox_envs_everywhere_and_command_envs_never_leak(e2b_env: Any) -> None:
    sbx = Sandbox.create(envs={"FROM_CREATE": "one"}, timeout=60)
    try:
        out = sbx.commands.run(
            "echo $FROM_CREATE ${ONCE:-unset} $E2B_SANDBOX $USER", envs={"ONCE": "x"}
        ).stdout
        assert out == "one x true user\n"
        assert sbx.commands.run("echo $FROM_CREATE ${ONCE:-unset}").stdout == "one unset\n"
        assert sbx.commands.run("echo $FROM_CREATE", user="root").stdout == "one\n"
        override = sbx.commands.run("echo $FROM_CREATE", envs={"FROM_CREATE": "two"}).stdout
        assert override == "two\n"
        assert sbx.commands.run("echo $FROM_CREATE").stdout == "one\n"
    finally:
        sbx.kill()


def test_timeout_kills_the_process_even_when_the_client_left(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30; echo never", timeout=1.5)
    assert time.monotonic() - t0 < 5
    left = sandbox.commands.run("sleep 30", background=True, timeout=1.5)
    left.disconnect()
    other = Sandbox.connect(sandbox.sandbox_id)
    deadline = time.monotonic() + 10
    while left.pid in {p.pid for p in other.commands.list()} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left.pid not in {p.pid for p in other.commands.list()}
    with pytest.raises(CommandExitException) as info:
        other.commands.connect(left.pid).wait()  # retained end: killed
    assert info.value.error == "signal: killed"
    assert other.commands.run("pgrep -x sleep || echo none").stdout == "none\n"


def test_client_disconnect_does_not_kill(sandbox: Sandbox) -> None:
    gate = "/tmp/survived-go"  # "survived" comes once connected again, however loaded
    handle = sandbox.commands.run(
        f"while [ ! -e {gate} ]; do sleep 0.05; done; echo survived", background=True
    )
    handle.disconnect()
    again = sandbox.commands.connect(handle.pid)
    sandbox.commands.run(f"touch {gate}")
    assert again.wait().stdout == "survived\n"


def test_stream_input(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("head -n 2", background=True, stdin=True)
    start = {"start": {"process": {"pid": handle.pid}}}
    data = [{"data": {"input": {"stdin": base64.b64encode(line).decode()}}} for line in (b"one\n", b"two\n")]
    events = list(raw_stream(sandbox, "StreamInput", [start, *data]))
    assert events[-1] == (2, {})
    assert handle.wait().stdout == "one\ntwo\n"


def test_fifty_megabytes_intact_in_order_with_bounded_server_memory(
    sandbox: Sandbox, corral_server: Any
) -> None:
    prepared = sandbox.commands.run(
        "head -c 50M /dev/urandom | base64 -w 100 > /tmp/big && sha256sum < /tmp/big && stat -c %s /tmp/big"
    )
    digest, size = prepared.stdout.split()[0], int(prepared.stdout.split()[-1])
    assert size > 50 * 1024 * 1024

    def memory_kb() -> tuple[int, int]:
        text = Path(f"/proc/{corral_server.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    rss_before, hwm_before = memory_kb()
    received = hashlib.sha256()
    count = 0
    peak_rss = rss_before
    handle = sandbox.commands.run("cat /tmp/big", background=True, timeout=120)
    for stdout, _, _ in handle:
        if stdout:
            data = stdout.encode()
            received.update(data)
            count += len(data)
            if count % (8 << 20) < len(data):
                peak_rss = max(peak_rss, memory_kb()[0])
    assert handle.wait().exit_code == 0
    rss_after, hwm_after = memory_kb()
    assert (count, received.hexdigest()) == (size, digest)
    # KiB: growth (sampled, and the kernel's high-water mark) far below the 67 MB that went through.
    assert max(peak_rss, rss_after) - rss_before < 64 * 1024
    assert hwm_after - max(hwm_before, rss_before) < 64 * 1024


def test_kill_sandbox_mid_stream(e2b_env: Any) -> None:
    sbx = Sandbox.create(timeout=60)
    killer = threading.Timer(1.0, sbx.kill)
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutException, match="killed or reached its end of life"):
            sbx.commands.run("sleep 100")
    finally:
        killer.join()
    assert time.monotonic() - t0 < 10
    assert not sbx.is_running()
