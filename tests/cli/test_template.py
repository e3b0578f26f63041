"""`corral template ...` through typer's CliRunner: a real build from a Dockerfile (and one from a
Python file), list, tags, delete, and failures as one line naming the step."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from corral import Sandbox
from corral.cli.main import app
from tests.cli.conftest import Invoke
from tests.conftest import TEST_API_KEY, ServerProcess


def _one_line_error(result: Result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "path", [["template"], ["template", "build"], ["template", "tags"], ["template", "tags", "assign"]]
)
def test_help(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["template", "build", str(tmp_path / "nope"), "--name", "x"])
    _one_line_error(missing, 2, "is not a file")
    (tmp_path / "empty.py").write_text("x = 1\n")
    no_template = runner.invoke(app, ["template", "build", str(tmp_path / "empty.py"), "--name", "x"])
    _one_line_error(no_template, 1, "defines no module-level `template`")
    (tmp_path / "official.py").write_text("import e2b\ntemplate = e2b.Template().from_template('base')\n")
    official = runner.invoke(app, ["template", "build", str(tmp_path / "official.py"), "--name", "x"])
    _one_line_error(official, 1, "import Template from corral")
    (tmp_path / "broken.py").write_text("raise RuntimeError('no\\nway')\n")
    broken = runner.invoke(app, ["template", "build", str(tmp_path / "broken.py"), "--name", "x"])
    _one_line_error(broken, 1, "cannot load", "RuntimeError: no way")
    (tmp_path / "Dockerfile").write_text("RUN echo no FROM\n")
    dockerfile = runner.invoke(app, ["template", "build", str(tmp_path / "Dockerfile"), "--name", "x"])
    _one_line_error(dockerfile, 1, "must start with FROM")


@pytest.mark.integration
def test_build_from_a_dockerfile_then_list_tag_and_delete(
    corral_cli: Invoke, corral_server: ServerProcess, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex
    (tmp_path / "hello.txt").write_text(f"hello {run}\n")
    (tmp_path / "secret.key").write_text("never uploaded")
    (tmp_path / ".dockerignore").write_text("*.key\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM e2bdev/base\nCOPY . /app/\nRUN cat /app/hello.txt && ls -A /app\nENV MODE=test\n"
    )
    name = f"corral-cli-{uuid.uuid4().hex[:10]}"
    built = corral_cli(
        "template", "build", str(tmp_path / "Dockerfile"), "--name", f"{name}:v1", "--cpu", "1"
    )
    assert built.exit_code == 0, built.output + built.stderr
    out = built.stdout
    assert "Uploaded '.'" in out
    assert f"[stdout]: hello {run}" in out  # the build's own output, live
    assert "step 3/7  COPY . /app/" in out and "done" in out  # a row per step
    assert "building" not in out.split("[finalize]")[-1]  # every row ended
    assert f"Built template {name}:v1 (tags: v1): template id " in out

    again = corral_cli(
        "template", "build", str(tmp_path / "Dockerfile"), "--name", f"{name}:v1", "--cpu", "1"
    )
    rows = [line for line in again.stdout.splitlines() if "━" in line]  # base, 7 steps, finalize
    assert again.exit_code == 0 and len(rows) == 9, again.stdout
    assert all(row.startswith("✓") and " cached " in row for row in rows[1:]), again.stdout

    listed = json.loads(corral_cli("template", "list", "--json").stdout)
    (mine,) = [item for item in listed if item["names"] == [name]]
    assert mine["cpu_count"] == 1
    assert name in corral_cli("template", "list").stdout

    assigned = corral_cli("template", "tags", "assign", f"{name}:v1", "prod", "latest")
    assert assigned.exit_code == 0 and "as prod, latest" in assigned.stdout, assigned.output
    tags = json.loads(corral_cli("template", "tags", "list", name, "--json").stdout)
    assert {item["tag"] for item in tags} == {"v1", "prod", "latest"}
    removed = corral_cli("template", "tags", "remove", name, "prod")
    assert removed.exit_code == 0, removed.output
    assert "prod" not in corral_cli("template", "tags", "list", name).stdout

    env = {"api_url": corral_server.url, "api_key": TEST_API_KEY, "sandbox_url": corral_server.url}
    with Sandbox.create(f"{name}:latest", timeout=60, **env) as sandbox:  # type: ignore[arg-type]
        result = sandbox.commands.run("cat /app/hello.txt; ls -A /app")
        assert result.stdout == f"hello {run}\n.dockerignore\nDockerfile\nhello.txt\n"  # no secret.key

    assert corral_cli("template", "delete", name).exit_code == 0
    _one_line_error(corral_cli("template", "delete", name), 1, f"no template '{name}'")
    _one_line_error(corral_cli("template", "tags", "list", name), 1, "not found")


@pytest.mark.integration
def test_a_python_template_and_a_failing_step(corral_cli: Invoke, tmp_path: Path) -> None:
    run = uuid.uuid4().hex  # a step nobody built before: its output shows
    (tmp_path / "helper.py").write_text(f"MESSAGE = 'from a sibling module {run}'\n")
    (tmp_path / "template.py").write_text(
        "from corral import Template\n"
        "from helper import MESSAGE\n"
        "template = (\n"
        "    Template().from_template('base')\n"
        "    .run_cmd(f'echo {MESSAGE}')\n"
        "    .run_cmd('echo oops >&2; exit 3')\n"
        ")\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('the CLI must not run this')\n"
    )
    name = f"corral-cli-{uuid.uuid4().hex[:10]}"
    failed = corral_cli("template", "build", str(tmp_path / "template.py"), "--name", name)
    line = _one_line_error(
        failed,
        1,
        f"building {name} failed: failed to run command 'echo oops >&2; exit 3': exit status 3",
        "[step 2/2: RUN echo oops >&2; exit 3, added at ",
        "template.py:6]",
    )
    assert line.endswith("]")
    assert f"[stdout]: from a sibling module {run}" in failed.stdout
    assert "failed" in failed.stdout  # the failing step's row

    (tmp_path / "fixed.py").write_text(
        "from corral import Template\nbuild_me = Template().from_template('base').run_cmd('echo fixed')\n"
    )
    built = corral_cli(
        "template", "build", str(tmp_path / "fixed.py"), "--object", "build_me", "--name", name, "--json"
    )
    assert built.exit_code == 0, built.output + built.stderr
    assert json.loads(built.stdout)["name"] == name
    assert corral_cli("template", "delete", name).exit_code == 0
