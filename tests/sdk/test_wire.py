"""The SDK's pure parts: Connect framing, the error table, settings precedence, request bodies,
URL signatures (checked against the official SDK) and the git parsers."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from corral.core.errors import CODES
from corral.sdk import (
    AuthenticationException,
    CommandExitException,
    ConnectionConfig,
    FileNotFoundException,
    GitAuthException,
    GitUpstreamException,
    InvalidArgumentException,
    NotFoundException,
    NotSupportedException,
    RateLimitException,
    SandboxException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from corral.sdk._api import create_request, file_url, get_signature, list_request
from corral.sdk._connect import (
    FLAG_END_STREAM,
    EnvelopeReader,
    encode_envelope,
    parse_stream_frame,
    parse_unary_response,
    stream_call,
    unary_call,
)
from corral.sdk._envd import CommandOutput, start_command_message
from corral.sdk._errors import EXCEPTION_FOR_CODE, code_for_status, error_from_body
from corral.sdk._git import credential_envs, git_command, git_error, parse_branches, parse_status, redact
from corral.sdk._models import parse_time

# -- Connect -------------------------------------------------------------------------------


def test_envelopes_survive_any_chunking() -> None:
    stream = encode_envelope(b'{"a":1}') + encode_envelope(b"{}", FLAG_END_STREAM)
    for size in (1, 2, 5, len(stream)):
        reader = EnvelopeReader()
        frames = []
        for start in range(0, len(stream), size):
            frames += reader.feed(stream[start : start + size])
        assert frames == [(0, b'{"a":1}'), (FLAG_END_STREAM, b"{}")]
        assert reader.pending == 0


def test_oversized_envelope_is_refused() -> None:
    with pytest.raises(SandboxException, match="limit"):
        EnvelopeReader(max_message_bytes=10).feed(encode_envelope(b"x" * 11))


def test_calls_carry_the_connect_headers() -> None:
    call = unary_call("process.Process/List", {}, timeout=1.5)
    assert call.path == "/process.Process/List"
    assert call.headers["content-type"] == "application/json" and call.headers["connect-timeout-ms"] == "1500"
    assert call.headers["connect-protocol-version"] == "1"
    streaming = stream_call(
        "process.Process/Start", start_command_message("echo", None, None, False), timeout=None
    )
    assert (
        streaming.headers["content-type"] == "application/connect+json"
        and "connect-timeout-ms" not in streaming.headers
    )
    assert EnvelopeReader().feed(streaming.body) == [
        (
            0,
            json.dumps(
                {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo"]}, "stdin": False},
                separators=(",", ":"),
            ).encode(),
        )
    ]


def test_unary_and_stream_errors_map_through_the_table() -> None:
    with pytest.raises(FileNotFoundException, match="stat /x: no such file"):
        parse_unary_response(
            404,
            "application/json",
            b'{"code":"not_found","message":"no such file"}',
            overrides={"not_found": FileNotFoundException},
            context="stat /x",
        )
    assert parse_stream_frame(0, b'{"event":{}}') == {"event": {}}
    assert parse_stream_frame(FLAG_END_STREAM, b"{}") is None
    with pytest.raises(TimeoutException, match="timeout="):
        parse_stream_frame(FLAG_END_STREAM, b'{"error":{"code":"deadline_exceeded","message":"too slow"}}')


def test_every_connect_code_has_an_exception_and_statuses_map_back() -> None:
    assert set(EXCEPTION_FOR_CODE) == set(CODES)
    assert EXCEPTION_FOR_CODE["unauthenticated"] is AuthenticationException
    assert EXCEPTION_FOR_CODE["resource_exhausted"] is RateLimitException
    for status in CODES.values():
        assert CODES[code_for_status(status)] == status
    assert (code_for_status(400), code_for_status(409), code_for_status(502), code_for_status(418)) == (
        "invalid_argument",
        "already_exists",
        "unavailable",
        "unknown",
    )
    assert isinstance(error_from_body(401, b'{"code":401,"message":"bad key"}'), AuthenticationException)
    assert isinstance(
        error_from_body(404, b'{"code":404,"message":"GET /x is not an endpoint of this API"}'),
        NotSupportedException,
    )
    assert isinstance(
        error_from_body(404, b'{"code":404,"message":"sandbox \\"a\\" not found"}'), NotFoundException
    )
    plain = error_from_body(500, b"<html>oops</html>", context="kill sandbox a")
    assert type(plain) is SandboxException and str(plain) == "kill sandbox a: <html>oops</html>"


def test_command_output_decodes_utf8_across_chunks_and_reports_the_end() -> None:
    output = CommandOutput()
    assert output.feed({"event": {"data": {"stdout": "4oI="}}}) == []  # b"\xe2\x82": half a "€"
    assert output.feed({"event": {"data": {"stdout": "rAo="}}}) == [("€\n", None, None)]
    assert output.feed({"event": {"data": {"stderr": "/w=="}}}) == [(None, "\N{REPLACEMENT CHARACTER}", None)]
    assert output.feed({"event": {"end": {"exitCode": 2, "exited": True, "error": "exit status 2"}}}) == []
    with pytest.raises(CommandExitException) as failed:
        output.finish()
    assert (failed.value.stdout, failed.value.exit_code, failed.value.error) == ("€\n", 2, "exit status 2")
    with pytest.raises(SandboxException, match="without an end"):
        CommandOutput().finish()


# -- settings ------------------------------------------------------------------------------


def test_settings_precedence_args_then_corral_then_e2b_then_default() -> None:
    env = {
        "E2B_API_URL": "http://e2b:1",
        "E2B_API_KEY": "e2b-key",
        "CORRAL_API_KEY": "corral-key",
        "E2B_SANDBOX_URL": "http://sb:2",
    }
    config = ConnectionConfig.resolve(env=env)
    assert (config.api_url, config.api_key, config.sandbox_url) == (
        "http://e2b:1",
        "corral-key",
        "http://sb:2",
    )
    assert ConnectionConfig.resolve(api_key="arg", env=env).api_key == "arg"
    assert ConnectionConfig.resolve(api_key=None, env=env).api_key is None  # explicit None: no key
    default = ConnectionConfig.resolve(env={})
    assert (default.api_url, default.sandbox_url, default.api_key, default.request_timeout) == (
        "http://127.0.0.1:3000",
        "http://127.0.0.1:3000",
        None,
        60.0,
    )
    moved = default.override(api_url="http://other:9/", request_timeout=0)
    assert (moved.api_url, moved.sandbox_url, moved.request_timeout) == (
        "http://other:9",
        "http://other:9",
        None,
    )
    assert moved.timeout(5) == 5 and moved.timeout(0) is None and default.timeout() == 60.0
    with pytest.raises(AttributeError):
        default.api_url = "http://x"  # type: ignore[misc]
    with pytest.raises(InvalidArgumentException, match="http"):
        ConnectionConfig.resolve(api_url="localhost:3000", env={})
    with pytest.raises(InvalidArgumentException, match="unknown"):
        default.override(api_kye="typo")


# -- requests ------------------------------------------------------------------------------


def test_create_body_is_the_official_one() -> None:
    request = create_request(
        template="base",
        timeout=30,
        metadata={"a": "b"},
        envs={"X": "1"},
        secure=True,
        allow_internet_access=False,
        network={"deny_out": ["0.0.0.0/0"], "allow_public_traffic": False},
        lifecycle={"on_timeout": "pause", "auto_resume": True},
        volume_mounts={"/mnt/data": "vol1"},
    )
    assert (request.method, request.path) == ("POST", "/sandboxes")
    assert request.json == {
        "templateID": "base",
        "timeout": 30,
        "secure": True,
        "allow_internet_access": False,
        "metadata": {"a": "b"},
        "envVars": {"X": "1"},
        "autoPause": True,
        "autoResume": {"enabled": True},
        "network": {"denyOut": ["0.0.0.0/0"], "allowPublicTraffic": False},
        "volumeMounts": [{"name": "vol1", "path": "/mnt/data"}],
    }
    with pytest.raises(InvalidArgumentException, match="auto_resume"):
        create_request(
            template="base", timeout=1, metadata=None, envs=None, secure=True, allow_internet_access=True,
            network=None, lifecycle={"on_timeout": "kill", "auto_resume": True}, volume_mounts=None,
        )  # fmt: skip


def test_list_query_encoding() -> None:
    query = SandboxQuery(
        metadata={"k": "v w&x"},
        state=[SandboxState.RUNNING],
        started_after=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        template="base",
    )
    request = list_request(query, limit=5, next_token="tok", order="asc")
    assert dict(request.params) == {
        "metadata": "k=v%2520w%2526x",
        "state": "running",
        "startedAfter": "2024-01-02T03:04:05+00:00",
        "template": "base",
        "order": "asc",
        "limit": "5",
        "nextToken": "tok",
    }


def test_signature_matches_the_official_sdk() -> None:
    from e2b.sandbox.signature import get_signature as official

    for user, expiration in ((None, None), ("root", None), ("user", 60)):
        ours, ours_exp = get_signature("/tmp/a b.txt", "read", user, "token123", expiration)
        theirs = official("/tmp/a b.txt", "read", user, "token123", expiration)
        assert (ours, ours_exp) == (theirs["signature"], theirs["expiration"])
    url = file_url(
        "http://h:1", "/tmp/a b", "write", user="root", access_token="t", expiration_in_seconds=None
    )
    assert url.startswith("http://h:1/files?path=%2Ftmp%2Fa%20b&username=root&signature=v1_")
    assert (
        file_url("http://h:1", "x", "read", user=None, access_token=None, expiration_in_seconds=None)
        == "http://h:1/files?path=x"
    )
    with pytest.raises(InvalidArgumentException, match="secure"):
        file_url("http://h:1", "x", "read", user=None, access_token=None, expiration_in_seconds=5)


def test_times_of_any_precision() -> None:
    assert parse_time("2024-01-02T03:04:05.123456789Z") == dt.datetime(
        2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC
    )
    assert parse_time("2024-01-02T03:04:05Z").tzinfo is not None
    assert parse_time("2024-01-02T03:04:05.5+02:00").utcoffset() == dt.timedelta(hours=2)


# -- git -----------------------------------------------------------------------------------


def test_git_status_and_branch_parsers() -> None:
    output = "\0".join(  # noqa: FLY002 - one record per line reads best
        [
            "# branch.oid 0123",
            "# branch.head main",
            "# branch.upstream origin/main",
            "# branch.ab +2 -1",
            "1 .M N... 100644 100644 100644 aaa bbb README.md",
            "1 A. N... 000000 100644 100644 000 ccc new file.txt",
            "2 R. N... 100644 100644 100644 ddd ddd R100 renamed.txt",
            "old.txt",
            "u UU N... 100644 100644 100644 100644 e f g conflict.txt",
            "? untracked.txt",
            "",
        ]
    )
    status = parse_status(output)
    assert (status.current_branch, status.upstream, status.ahead, status.behind, status.detached) == (
        "main",
        "origin/main",
        2,
        1,
        False,
    )
    assert [(f.name, f.status, f.staged, f.renamed_from) for f in status.file_status] == [
        ("README.md", "modified", False, None),
        ("new file.txt", "added", True, None),
        ("renamed.txt", "renamed", True, "old.txt"),
        ("conflict.txt", "conflict", True, None),
        ("untracked.txt", "untracked", False, None),
    ]
    assert parse_status("# branch.oid 1\0# branch.head (detached)\0").detached
    branches = parse_branches(" \tdev\n*\tmain\n")
    assert (branches.branches, branches.current_branch) == (["dev", "main"], "main")


def test_git_credentials_stay_out_of_command_lines_and_errors() -> None:
    envs = credential_envs(None, None, "tok-123")
    assert envs == {
        "GIT_TERMINAL_PROMPT": "0",
        "CORRAL_GIT_USERNAME": "x-access-token",
        "CORRAL_GIT_PASSWORD": "tok-123",
    }
    command = git_command(["clone", "--", "https://example.com/r.git"], with_credentials=True)
    assert "tok-123" not in command and "credential.helper=" in command
    with pytest.raises(InvalidArgumentException):
        credential_envs("alice", None, None)
    with pytest.raises(InvalidArgumentException):
        credential_envs(None, "pw", None)
    assert redact("fatal: https://alice:pw@host/r.git pw", ["pw"]) == "fatal: https://***@host/r.git ***"
    failed = CommandExitException(
        stdout="", stderr="fatal: Authentication failed for 'https://alice:pw@h/r'", exit_code=128
    )
    auth = git_error("clone", failed, ["pw"])
    assert isinstance(auth, GitAuthException) and "pw" not in str(auth)
    no_upstream = CommandExitException(
        stdout="", stderr="fatal: The current branch x has no upstream branch.", exit_code=128
    )
    assert isinstance(git_error("push", no_upstream, []), GitUpstreamException)
    other = git_error(
        "commit", CommandExitException(stdout="pw", stderr="nothing to commit pw", exit_code=1), ["pw"]
    )
    assert isinstance(other, CommandExitException) and other.stdout == "***" and "pw" not in str(other)
