"""envd messages as data: request builders for `process.Process` and `filesystem.Filesystem`, and
the state machine that turns a process's event stream into output and a result. No I/O.

Messages are protobuf-JSON dicts (camelCase keys, base64 bytes, enum names); see
e2b-protocol.md §3.2 and §3.3 for the fields.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from corral.sdk._errors import CommandExitException, CommandResult, FileNotFoundException, SandboxException
from corral.sdk._models import PtySize, b64decode

__all__ = [
    "DOWNLOAD_HEADERS",
    "FILESYSTEM_OVERRIDES",
    "KEEPALIVE_HEADERS",
    "PTY_ENVS",
    "UPLOAD_CHUNK",
    "CommandOutput",
    "Output",
    "close_stdin_message",
    "process_selector",
    "pty_start_message",
    "send_input_message",
    "signal_message",
    "start_command_message",
    "start_pid",
    "supports_octet_stream",
    "update_pty_message",
    "watch_message",
]

# envd sends a keepalive on idle streams every N seconds when asked (§1.3).
KEEPALIVE_HEADERS: Final = {"keepalive-ping-interval": "50"}
# What a PTY's shell gets on top of the caller's envs (as the official SDK sends).
PTY_ENVS: Final = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
# Filesystem calls: a missing path is a FileNotFoundException.
FILESYSTEM_OVERRIDES: Final = {"not_found": FileNotFoundException}

# Downloads: no gzip. envd would compress (httpx asks for gzip by default), which costs both ends
# far more CPU than the bytes it saves on the local or LAN links a sandbox server sits on.
DOWNLOAD_HEADERS: Final = {"accept-encoding": "identity"}
# Uploads are sent in pieces of this size: handing one large `bytes` body to httpx copies what
# is left of it after every partial socket send (quadratic: 100 MB went at ~80 MB/s).
UPLOAD_CHUNK: Final = 1 << 20
_OCTET_STREAM_SINCE = (0, 5, 7)  # envd takes one `application/octet-stream` body per file (§4)


def supports_octet_stream(envd_version: str) -> bool:
    """Whether this envd takes a plain octet-stream upload (`POST /files?path=`)."""
    try:
        parts = tuple(int(p) for p in envd_version.split("-")[0].split(".")[:3])
    except ValueError:
        return False
    return parts >= _OCTET_STREAM_SINCE


# One item of a process's output: exactly one of stdout, stderr (text) or pty (bytes) is set.
Output = tuple[str | None, str | None, bytes | None]


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def _config(cmd: str, args: list[str], envs: Mapping[str, str] | None, cwd: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {"cmd": cmd, "args": args}
    if envs:
        config["envs"] = dict(envs)
    if cwd:
        config["cwd"] = cwd
    return config


def start_command_message(
    cmd: str, envs: Mapping[str, str] | None, cwd: str | None, stdin: bool
) -> dict[str, Any]:
    """`Start` for a command: `/bin/bash -l -c <cmd>`, stdin open only when asked."""
    return {"process": _config("/bin/bash", ["-l", "-c", cmd], envs, cwd), "stdin": stdin}


def pty_start_message(size: PtySize, envs: Mapping[str, str] | None, cwd: str | None) -> dict[str, Any]:
    """`Start` for an interactive login shell on a pseudo-terminal of `size`."""
    return {
        "process": _config("/bin/bash", ["-i", "-l"], {**PTY_ENVS, **(envs or {})}, cwd),
        "pty": {"size": {"cols": size.cols, "rows": size.rows}},
    }


def process_selector(pid: int) -> dict[str, Any]:
    """`{"process": {"pid": N}}`: the selector every per-process call starts with."""
    return {"process": {"pid": pid}}


def signal_message(pid: int) -> dict[str, Any]:
    """`SendSignal` with SIGKILL (what `kill` always sends)."""
    return {**process_selector(pid), "signal": "SIGNAL_SIGKILL"}


def send_input_message(pid: int, data: str | bytes, *, pty: bool) -> dict[str, Any]:
    """`SendInput` to a command's stdin or to a PTY."""
    return {**process_selector(pid), "input": {"pty" if pty else "stdin": _b64(data)}}


def close_stdin_message(pid: int) -> dict[str, Any]:
    """`CloseStdin`: EOF on the command's stdin."""
    return process_selector(pid)


def update_pty_message(pid: int, size: PtySize) -> dict[str, Any]:
    """`Update` a PTY's window size."""
    return {**process_selector(pid), "pty": {"size": {"cols": size.cols, "rows": size.rows}}}


def watch_message(path: str, recursive: bool, include_entry: bool) -> dict[str, Any]:
    """`WatchDir` request."""
    message: dict[str, Any] = {"path": path}
    if recursive:
        message["recursive"] = True
    if include_entry:
        message["includeEntry"] = True
    return message


def _event(message: Mapping[str, Any]) -> tuple[str, Any]:
    """The one set field of a `ProcessEvent` (`start`, `data`, `end`, `keepalive`)."""
    event = message.get("event") or {}
    for kind in ("start", "data", "end", "keepalive"):
        if kind in event:
            return kind, event[kind] or {}
    return "unknown", event


def start_pid(message: Mapping[str, Any], action: str) -> int:
    """The pid of the first stream message, which must be a `start` event."""
    kind, value = _event(message)
    if kind != "start":
        raise SandboxException(
            f"{action}: envd did not answer with a start event (got {kind!r})", code="internal"
        )
    return int(value.get("pid", 0))


@dataclasses.dataclass
class CommandOutput:
    """Collects a process's output from its event stream and knows how it ended.

    Text output is decoded incrementally as UTF-8 (bad bytes become U+FFFD); PTY output stays bytes.
    """

    stdout_chunks: list[str] = dataclasses.field(default_factory=list)
    stderr_chunks: list[str] = dataclasses.field(default_factory=list)
    result: CommandResult | None = None

    def __post_init__(self) -> None:
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }

    @property
    def stdout(self) -> str:
        return "".join(self.stdout_chunks)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_chunks)

    def _text(self, stream: str, data: bytes, final: bool = False) -> list[Output]:
        text = self._decoders[stream].decode(data, final=final)
        if not text:
            return []
        if stream == "stdout":
            self.stdout_chunks.append(text)
            return [(text, None, None)]
        self.stderr_chunks.append(text)
        return [(None, text, None)]

    def flush(self) -> list[Output]:
        """Emit what the decoders still hold (an incomplete sequence becomes U+FFFD)."""
        return self._text("stdout", b"", final=True) + self._text("stderr", b"", final=True)

    def feed(self, message: Mapping[str, Any]) -> list[Output]:
        """Take one stream message; return the output it carries, in order."""
        kind, value = _event(message)
        if kind == "data":
            for stream in ("stdout", "stderr", "pty"):
                if value.get(stream):
                    data = b64decode(value[stream])
                    if stream == "pty":
                        return [(None, None, data)]
                    return self._text(stream, data)
            return []
        if kind == "end":
            flushed = self.flush()
            error = value.get("error")
            self.result = CommandResult(
                stdout=self.stdout,
                stderr=self.stderr,
                exit_code=int(value.get("exitCode", value.get("exit_code", 0)) or 0),
                error=error if isinstance(error, str) and error else None,
            )
            return flushed
        return []

    def finish(self) -> CommandResult:
        """The result; `CommandExitException` for a non-zero exit, an error if the stream had no end."""
        if self.result is None:
            raise SandboxException(
                "the command's output stream ended without an end event", code="unavailable"
            )
        if self.result.exit_code != 0:
            raise CommandExitException(
                stdout=self.result.stdout,
                stderr=self.result.stderr,
                exit_code=self.result.exit_code,
                error=self.result.error,
            )
        return self.result
