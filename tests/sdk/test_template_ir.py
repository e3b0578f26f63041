"""The template builder's pure parts: the wire body (checked against the official e2b SDK), COPY
file selection with `.dockerignore`, the files hash (equal to E2B's), packing, and errors."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import e2b
import pytest
from e2b.template.utils import calculate_files_hash

import corral
from corral import (
    BuildException,
    FileUploadException,
    InvalidArgumentException,
    Template,
    TemplateBuildStatus,
    wait_for_file,
    wait_for_port,
    wait_for_process,
    wait_for_timeout,
    wait_for_url,
)
from corral.builder.steps import Copy, FromImage, FromTemplate, Run
from corral.sdk._template import build_failure, prepare_build
from corral.sdk._template_api import BuildStatusReason, build_error, build_status_from_json
from corral.sdk._template_files import IgnoreRules, files_hash, pack_files, select_files

HERE = Path(__file__).resolve().parent


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "app" / "sub").mkdir(parents=True)
    (tmp_path / "app" / "main.py").write_text("print('hi')\n")
    (tmp_path / "app" / "sub" / "util.py").write_text("X = 1\n")
    (tmp_path / "app" / ".env").write_text("SECRET=1\n")
    (tmp_path / "app" / "debug.log").write_text("log\n")
    os.symlink("main.py", tmp_path / "app" / "entry.py")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (tmp_path / "README.md").write_text("readme\n")
    return tmp_path


def _chain(module: object, context: Path) -> object:
    """The same template written with either SDK's `Template`."""
    template = module.Template(file_context_path=str(context))  # type: ignore[attr-defined]
    return (
        template.from_image("ghcr.io/acme/tool:1", username="u", password="p")
        .copy("app", "/srv/app/", user="user", mode=0o750)
        .copy(["tool.sh", "README.md"], "/usr/local/bin/", force_upload=True)
        .copy("app/**/*.py", "py/")
        .run_cmd(["echo a", "echo b"], user="root")
        .set_envs({"A": "1", "PATH": "/opt/bin:$PATH"})
        .set_workdir("/srv")
        .set_user("worker")
        .apt_install(["curl", "jq"], no_install_recommends=True)
        .pip_install("requests", g=False)
        .npm_install(["left-pad"], g=True, dev=True)
        .git_clone("https://example.invalid/r.git", "/src/r", branch="main", depth=1, user="worker")
        .make_dir(["/a b", "/c"], mode=0o700)
        .make_symlink("/usr/bin/python3", "/usr/local/bin/py", force=True)
        .skip_cache()
        .remove("/tmp/x y", recursive=True, force=True)
        .rename("/a", "/b", force=True)
        .set_start_cmd("python3 -m http.server 8000", module.wait_for_port(8000))  # type: ignore[attr-defined]
    )


def test_the_wire_body_is_the_official_sdks(context: Path) -> None:
    ours = json.loads(Template.to_json(_chain(corral, context)))
    theirs = json.loads(e2b.Template.to_json(_chain(e2b, context)))
    assert ours == theirs
    assert [step["force"] for step in ours["steps"]][-3:] == [False, True, True]  # skip_cache() onwards
    assert ours["fromImageRegistry"] == {"type": "registry", "username": "u", "password": "p"}


def test_skip_cache_before_the_base_forces_everything_like_e2b(context: Path) -> None:
    for module in (corral, e2b):
        body = json.loads(
            module.Template.to_json(  # type: ignore[attr-defined]
                module.Template(file_context_path=str(context))  # type: ignore[attr-defined]
                .skip_cache()
                .from_template("base")
                .run_cmd("true")
            )
        )
        assert body == {
            "steps": [{"type": "RUN", "args": ["true"], "force": True}],
            "force": True,
            "fromTemplate": "base",
        }


def test_from_dockerfile_matches_the_official_sdk(context: Path) -> None:
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(
        "FROM python:3.11\nENV A=1\nWORKDIR /app\nCOPY app/main.py .\nRUN pip install -r x.txt\n"
        'USER nobody\nCMD ["python3", "main.py"]\n'
    )
    ours = json.loads(Template(file_context_path=context).from_dockerfile(str(dockerfile)).to_json())
    theirs = json.loads(
        e2b.Template.to_json(e2b.Template(file_context_path=str(context)).from_dockerfile(str(dockerfile)))
    )
    assert ours == theirs
    with pytest.raises(InvalidArgumentException, match="multi-stage"):
        Template().from_dockerfile("FROM a AS x\nFROM b\n")


def test_ready_commands_are_e2bs() -> None:
    pairs = [
        (wait_for_port(8080), e2b.wait_for_port(8080)),
        (
            wait_for_url("http://localhost:3000/h?x=1", 204),
            e2b.wait_for_url("http://localhost:3000/h?x=1", 204),
        ),
        (wait_for_process("my daemon"), e2b.wait_for_process("my daemon")),
        (wait_for_file("/tmp/ready file"), e2b.wait_for_file("/tmp/ready file")),
        (wait_for_timeout(2500), e2b.wait_for_timeout(2500)),
        (wait_for_timeout(10), e2b.wait_for_timeout(10)),
    ]
    for ours, theirs in pairs:
        assert ours.get_cmd() == theirs.get_cmd()


@pytest.mark.parametrize(
    "src", ["app", "app/*", "app/**/*.py", "*.md", "tool.sh", ".", "app/**", "app/sub/*"]
)
@pytest.mark.parametrize("resolve", [False, True])
def test_files_hash_equals_the_official_sdks(context: Path, src: str, resolve: bool) -> None:
    ours = files_hash(src, "/dest/", context, ["*.log"], resolve_symlinks=resolve)
    assert ours == calculate_files_hash(src, "/dest/", str(context), ["*.log"], resolve, None)


def test_files_hash_changes_with_content_mode_and_names(context: Path) -> None:
    before = files_hash("app", "/d", context)
    (context / "app" / "main.py").write_text("print('changed')\n")
    changed = files_hash("app", "/d", context)
    os.chmod(context / "app" / "main.py", 0o755)
    chmoded = files_hash("app", "/d", context)
    assert len({before, changed, chmoded, files_hash("app", "/other", context)}) == 4
    with pytest.raises(ValueError, match="no files match"):
        files_hash("missing/*", "/d", context)


def test_dockerignore_rules_follow_docker() -> None:
    rules = IgnoreRules(
        ["# comment", "node_modules", "**/*.log", "!keep.log", "/build/", "docs/*.md", "!docs/README.md"]
    )
    assert rules.ignored("node_modules") and rules.ignored(
        "node_modules/x/y.js"
    )  # a directory takes its tree
    assert not rules.ignored("src/node_modules")  # patterns are anchored at the context root
    assert rules.ignored("a/b/c.log") and rules.ignored("c.log") and not rules.ignored("keep.log")
    assert rules.ignored("build/out.bin") and not rules.ignored("builds")
    assert (
        rules.ignored("docs/x.md")
        and not rules.ignored("docs/README.md")
        and not rules.ignored("docs/a/x.md")
    )
    assert not IgnoreRules(["", "  ", "#x"]) and not rules.ignored(".")


def test_select_files_with_dockerignore(context: Path) -> None:
    (context / ".dockerignore").write_text("app/sub\n**/*.log\n.env\n")
    from corral.sdk._template_files import read_dockerignore

    ignore = read_dockerignore(context)
    assert select_files("app", context, ignore) == ["app", "app/.env", "app/entry.py", "app/main.py"]
    assert select_files(".", context, [*ignore, "app", "!app/main.py"]) == [
        ".",
        ".dockerignore",
        "README.md",
        "app/main.py",
        "tool.sh",
    ]
    assert select_files("app/*.py", context) == ["app/entry.py", "app/main.py"]
    assert select_files("nope", context) == []


def test_a_symlink_loop_is_walked_once(context: Path) -> None:
    os.symlink("..", context / "app" / "sub" / "up")
    selected = select_files("app", context, resolve_symlinks=True)
    assert "app/sub/up" in selected and not any(path.startswith("app/sub/up/") for path in selected)


def test_pack_files_keeps_links_names_and_modes(context: Path) -> None:
    os.chmod(context / "tool.sh", 0o755)
    with (
        pack_files("app", context, ["**/*.log"]) as archive,
        tarfile.open(fileobj=archive, mode="r:gz") as tar,
    ):
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["app", "app/.env", "app/entry.py", "app/main.py", "app/sub", "app/sub/util.py"]
    assert members["app/entry.py"].issym() and members["app/entry.py"].linkname == "main.py"
    assert all(m.uid == 0 and m.uname == "" for m in members.values())
    with (
        pack_files("tool.sh", context, gzip=False) as archive,
        tarfile.open(fileobj=archive, mode="r:") as tar,
    ):
        (member,) = tar.getmembers()
    assert (member.name, member.mode) == ("tool.sh", 0o755)
    with (
        pack_files("app/entry.py", context, resolve_symlinks=True) as archive,
        tarfile.open(fileobj=archive, mode="r:gz") as tar,
    ):
        (member,) = tar.getmembers()
        assert member.isfile() and tar.extractfile(member).read() == b"print('hi')\n"  # type: ignore[union-attr]


@pytest.mark.parametrize("src", ["/etc/passwd", "../x", "a/../../x"])
def test_copy_sources_must_stay_in_the_context(src: str) -> None:
    with pytest.raises(InvalidArgumentException, match="absolute|escapes"):
        Template().from_template("base").copy(src, "/x")


def test_a_missing_copy_source_names_its_step_and_line(context: Path) -> None:
    template = Template(file_context_path=context).from_template("base").run_cmd("true")
    template.copy("nope/*", "/x")  # the line the error names
    line = test_a_missing_copy_source_names_its_step_and_line.__code__.co_firstlineno + 2
    with pytest.raises(FileUploadException) as info:
        prepare_build(template)
    error = info.value
    assert isinstance(error, BuildException)
    assert (error.step, error.instruction) == ("2", "COPY nope/* /x")
    assert error.origin is not None and error.origin.endswith(f"test_template_ir.py:{line}")
    assert str(error).startswith("no files match 'nope/*' in ")
    assert str(error).endswith(f"[step 2/2: COPY nope/* /x, added at {error.origin}]")


def test_steps_the_server_would_refuse_fail_before_sending() -> None:
    with pytest.raises(InvalidArgumentException, match="invalid user name"):
        prepare_build(Template().from_template("base").run_cmd("id", user="bad user"))
    with pytest.raises(InvalidArgumentException, match="invalid environment variable name"):
        prepare_build(Template().from_template("base").set_envs({"1X": "y"}))
    with pytest.raises(InvalidArgumentException, match="username and password"):
        Template().from_image("x", username="u")
    with pytest.raises(InvalidArgumentException, match="import Template from corral"):
        prepare_build(e2b.Template().from_template("base"))  # type: ignore[arg-type]


def test_build_failures_name_the_step_and_where_it_was_added() -> None:
    template = Template().from_template("base")
    template.run_cmd("echo ok")
    template.run_cmd("exit 3")  # step 2
    line = test_build_failures_name_the_step_and_where_it_was_added.__code__.co_firstlineno + 3
    error = build_failure(BuildStatusReason("failed to run command 'exit 3': exit status 3", "2"), template)
    assert error.step == "2" and error.instruction == "RUN exit 3"
    assert str(error) == (
        f"failed to run command 'exit 3': exit status 3 [step 2/2: RUN exit 3, added at {error.origin}]"
    )
    assert error.origin is not None and error.origin.endswith(f":{line}")
    base = build_failure(BuildStatusReason("template 'x' not found", "0"), template)
    assert str(base).startswith("template 'x' not found [the base: FROM TEMPLATE base, added at ")
    final = build_failure(
        BuildStatusReason("start command failed", "finalize"), Template().from_template("base")
    )
    assert str(final) == "start command failed [finalize: finishing the template]"
    assert str(build_failure(None, template)) == "the build failed"


def test_to_dockerfile_in_both_forms() -> None:
    template = Template().from_debian_image("bookworm").run_cmd("make", user="nobody").set_workdir("/app")
    text = "FROM debian:bookworm\nUSER nobody\nRUN make\nUSER root\nWORKDIR /app\n"
    assert template.to_dockerfile() == Template.to_dockerfile(template) == text
    plan = template.to_plan()
    assert plan.base == FromImage("debian:bookworm") and plan.steps[0] == Run("make", "nobody")
    with pytest.raises(InvalidArgumentException, match="another template"):
        Template().from_template("base").to_dockerfile()


def test_defaults_and_bases() -> None:
    template = Template()
    assert template.file_context_path == HERE  # the directory of the file that made it
    assert template.to_plan().base == FromImage("e2bdev/base")
    assert Template().from_python_image().to_plan().base == FromImage("python:3")
    assert Template().from_node_image().to_plan().base == FromImage("node:lts")
    assert Template().from_ubuntu_image("24.04").to_plan().base == FromImage("ubuntu:24.04")
    assert Template().from_template("base").to_plan().base == FromTemplate("base")
    step = Template().from_template("base").copy("a.txt", "/x", mode=0).to_plan().steps[0]
    assert step == Copy("a.txt", "/x")


def test_status_answers_and_errors() -> None:
    status = build_status_from_json(
        {
            "templateID": "t",
            "buildID": "b",
            "status": "error",
            "logs": ["x"],
            "logEntries": [
                {
                    "timestamp": "2024-01-01T00:00:00.5Z",
                    "message": "\x1b[31mred\x1b[0m",
                    "level": "error",
                    "step": "1",
                }
            ],
            "reason": {"message": "boom", "step": "1", "logEntries": []},
        }
    )
    assert status.status is TemplateBuildStatus.ERROR
    assert (status.log_entries[0].message, status.log_entries[0].step) == ("red", "1")
    assert status.reason is not None and (status.reason.message, status.reason.step) == ("boom", "1")
    error = build_error(400, b'{"code": 400, "message": "Invalid name"}', "request a build")
    assert isinstance(error, BuildException) and str(error) == "request a build: Invalid name"
    assert not isinstance(build_error(401, b"{}", "x"), BuildException)
    assert isinstance(build_error(404, b"{}", "upload", upload=True), FileUploadException)
