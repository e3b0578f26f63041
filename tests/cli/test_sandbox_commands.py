"""`corral sandbox ...` through typer's CliRunner: output, JSON, exit codes and one-line errors."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from corral.cli.main import app
from tests.cli.conftest import Invoke

COMMANDS = ["create", "list", "info", "kill", "exec", "shell", "logs", "metrics", "pause", "resume"]


@pytest.mark.parametrize(
    "path", [[], ["sandbox"], *(["sandbox", name] for name in COMMANDS), ["server"], ["setup"]]
)
def test_help_everywhere(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_shell_completion_is_available() -> None:
    result = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="corral")
    assert result.exit_code == 0
    assert "_corral_completion" in result.output
    assert "--install-completion" in CliRunner().invoke(app, ["--help"]).output


def _one_line_error(result: object, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output  # type: ignore[attr-defined]
    stderr = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.output and "Traceback" not in stderr  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: ") and needle in lines[0], stderr


def test_errors_are_one_clear_line() -> None:
    unreachable = CliRunner().invoke(app, ["sandbox", "--api-url", "http://127.0.0.1:9", "list"])
    _one_line_error(unreachable, 1, "Corral server running")
    _one_line_error(CliRunner().invoke(app, ["sandbox", "create", "--metadata", "novalue"]), 2, "KEY=VALUE")
    _one_line_error(CliRunner().invoke(app, ["sandbox", "kill"]), 2, "--all")


@pytest.mark.integration
def test_create_list_info_exec_kill(corral_cli: Invoke) -> None:
    tag = uuid.uuid4().hex[:10]
    created = corral_cli(
        "sandbox", "create", "-q", "--metadata", f"tag={tag}", "--timeout", "120", "--env", "GREETING=hey"
    )
    assert created.exit_code == 0, created.output
    sandbox_id = created.stdout.strip()
    assert sandbox_id.isalnum()

    listed = json.loads(corral_cli("sandbox", "list", "--json", "--metadata", f"tag={tag}").stdout)
    assert [(item["sandbox_id"], item["metadata"], item["state"]) for item in listed] == [
        (sandbox_id, {"tag": tag}, "running")
    ]
    table = corral_cli("sandbox", "list").stdout
    assert sandbox_id in table and "running" in table and f"tag={tag}" in table
    info = json.loads(corral_cli("sandbox", "info", sandbox_id, "--json").stdout)
    assert (info["sandbox_id"], info["template_id"]) == (sandbox_id, "base")
    assert sandbox_id in corral_cli("sandbox", "info", sandbox_id).stdout

    shell_code = corral_cli("sandbox", "exec", sandbox_id, "--", "echo $GREETING; echo oops >&2; exit 5")
    assert (shell_code.exit_code, shell_code.stdout, shell_code.stderr) == (5, "hey\n", "oops\n")
    argv = corral_cli("sandbox", "exec", sandbox_id, "--", "printf", "%s|", "a b", "c")
    assert (argv.exit_code, argv.stdout) == (0, "a b|c|")
    as_root = corral_cli(
        "sandbox", "exec", sandbox_id, "--user", "root", "--cwd", "/tmp", "--", "whoami; pwd"
    )
    assert as_root.stdout == "root\n/tmp\n"

    killed = corral_cli("sandbox", "kill", sandbox_id)
    assert killed.exit_code == 0 and f"Killed {sandbox_id}" in killed.stdout
    _one_line_error(corral_cli("sandbox", "kill", sandbox_id), 1, "no such sandbox")
    _one_line_error(corral_cli("sandbox", "info", sandbox_id), 1, "not found")
    _one_line_error(corral_cli("sandbox", "exec", sandbox_id, "--", "true"), 1, "not found")


@pytest.mark.integration
def test_pause_resume_metrics_logs_say_what_the_server_supports(corral_cli: Invoke) -> None:
    sandbox_id = corral_cli("sandbox", "create", "-q", "--timeout", "60").stdout.strip()
    try:
        for command, unsupported in (
            ("pause", "cannot pause"),
            ("metrics", "does not report"),
            ("logs", "does not keep"),
        ):
            result = corral_cli("sandbox", command, sandbox_id)
            if result.exit_code != 0:
                _one_line_error(result, 1, unsupported)
        resumed = corral_cli("sandbox", "resume", sandbox_id)
        assert resumed.exit_code == 0 and "is running" in resumed.stdout or "cannot resume" in resumed.stderr
    finally:
        corral_cli("sandbox", "kill", sandbox_id)


@pytest.mark.integration
def test_kill_all(corral_cli: Invoke) -> None:
    ids = [corral_cli("sandbox", "create", "-q", "--timeout", "60").stdout.strip() for _ in range(2)]
    result = corral_cli("sandbox", "kill", "--all")
    assert result.exit_code == 0
    assert all(f"Killed {sandbox_id}" in result.stdout for sandbox_id in ids)
    assert json.loads(corral_cli("sandbox", "list", "--json").stdout) == []
