"""One real `corral sandbox shell` session in a real terminal (tmux): type, resize, Ctrl-D."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from corral import Sandbox
from tests.conftest import TEST_API_KEY, ServerProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
]


class Tmux:
    """A private tmux server (its own socket) holding one window."""

    def __init__(self) -> None:
        self.socket = f"corral-test-{os.getpid()}-{time.monotonic_ns()}"

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True
        ).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "shell")

    def wait_for(self, text: str, timeout: float = 20, *, whole_line: bool = False) -> str:
        """Poll the screen until `text` shows (as a whole line, if asked)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            lines = [line.rstrip() for line in screen.splitlines()]
            if (text in lines) if whole_line else (text in screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear; the screen shows:\n{screen}")
            time.sleep(0.1)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    session = Tmux()
    try:
        yield session
    finally:
        subprocess.run(["tmux", "-L", session.socket, "kill-server"], capture_output=True, check=False)


def test_interactive_shell(corral_server: ServerProcess, tmux: Tmux) -> None:
    sandbox = Sandbox.create(timeout=120, api_url=corral_server.url, api_key=TEST_API_KEY)
    try:
        env = f"CORRAL_API_URL={corral_server.url} CORRAL_API_KEY={TEST_API_KEY}"
        command = (
            f"env {env} {shlex.quote(sys.executable)} -m corral.cli.main sandbox shell {sandbox.sandbox_id}"
        )
        # After the shell ends, print its exit code and keep the pane open to read it.
        tmux.run(
            "new-session",
            "-d",
            "-s",
            "shell",
            "-x",
            "100",
            "-y",
            "30",
            f"{command}; echo SHELL-EXIT=$?; sleep 60",
        )
        tmux.wait_for(f"user@{sandbox.sandbox_id}")

        tmux.run("send-keys", "-t", "shell", "echo hello-$((6*7)); tput cols", "Enter")
        tmux.wait_for("hello-42", whole_line=True)
        tmux.wait_for("100", whole_line=True)

        tmux.run("resize-window", "-t", "shell", "-x", "120", "-y", "30")
        deadline = time.monotonic() + 20  # SIGWINCH reaches the client, which resizes the remote terminal
        while True:
            tmux.run("send-keys", "-t", "shell", "clear; tput cols", "Enter")
            try:
                tmux.wait_for("120", timeout=1, whole_line=True)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

        tmux.run("send-keys", "-t", "shell", "C-d")
        tmux.wait_for("SHELL-EXIT=0")
        assert not [p for p in sandbox.commands.list() if p.args == ["-i", "-l"]], (
            "the remote shell outlived the session"
        )
    finally:
        sandbox.kill()
        sandbox.close()
