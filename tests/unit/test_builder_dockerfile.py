"""Dockerfile ⇄ BuildPlan: E2B's parsing semantics and the `to_dockerfile` round trip (pure)."""

from __future__ import annotations

import pytest

from corral.builder.dockerfile import parse_dockerfile, to_dockerfile
from corral.builder.steps import BuildPlan, Copy, Env, FromImage, FromTemplate, Run, User, Workdir
from corral.core.errors import InvalidArgument


def test_e2b_sdk_example_with_defaults() -> None:
    # The example of e2b's own test_from_dockerfile, with what its parser produces.
    plan = parse_dockerfile(
        'FROM node:24\nWORKDIR /app\nCOPY package.json .\nRUN npm install\nENTRYPOINT ["sleep", "20"]'
    )
    assert plan.base == FromImage("node:24")
    assert plan.steps == (
        User(name="root"),
        Workdir(path="/"),
        Workdir(path="/app"),
        Copy(src="package.json", dest="."),
        Run(cmd="npm install"),
        User(name="user"),
    )
    assert (plan.start_cmd, plan.ready_cmd) == ("sleep 20", "sleep 20")


def test_defaults_only_where_the_file_sets_none() -> None:
    plan = parse_dockerfile("FROM node:24")
    assert plan.steps[-2:] == (User(name="user"), Workdir(path="/home/user"))
    custom = parse_dockerfile("FROM node:24\nUSER mish\nWORKDIR /home/mish")
    assert custom.steps[-2:] == (User(name="mish"), Workdir(path="/home/mish"))
    assert parse_dockerfile("FROM x", e2b_defaults=False).steps == ()


def test_instructions() -> None:
    text = r"""# escape=\
# a comment
ARG VERSION=1
FROM --platform=linux/amd64 debian:bookworm AS build
ARG X=1
COPY --chown=myuser:mygroup --chmod=755 a.txt "b c.txt" /dest/
COPY ["with space", "/d/"]
ADD local.tar /opt/
RUN apt-get update && \
    apt-get install -y curl
RUN ["echo", "a b"]
RUN <<EOF
echo one
echo two
EOF
ENV A=1 B="two words" C=$PATH D='single $quoted'
ENV LEGACY some value
USER app:app
EXPOSE 80
HEALTHCHECK --interval=5s CMD curl -f localhost
ENTRYPOINT ["node"]
CMD ["app.js"]
"""
    ignored: list[str] = []
    plan = parse_dockerfile(text, e2b_defaults=False, on_ignored=ignored.append)
    assert plan.base == FromImage("debian:bookworm")
    assert plan.steps == (
        Env(values=(("X", "1"),)),
        Copy(src="a.txt", dest="/dest/", user="myuser:mygroup", mode=0o755),
        Copy(src="b c.txt", dest="/dest/", user="myuser:mygroup", mode=0o755),
        Copy(src="with space", dest="/d/"),
        Copy(src="local.tar", dest="/opt/"),
        Run(cmd="apt-get update && apt-get install -y curl"),
        Run(cmd="echo 'a b'"),
        Run(cmd="echo one\necho two"),
        Env(values=(("A", "1"), ("B", "two words"), ("C", "$PATH"), ("D", "single $quoted"))),
        Env(values=(("LEGACY", "some value"),)),
        User(name="app"),
    )
    assert plan.start_cmd == "node app.js"
    assert plan.ready_cmd == "curl -f localhost"
    assert ignored == ["line 19: EXPOSE is ignored"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("RUN x", "must start with FROM"),
        ("FROM a\nFROM b", "multi-stage"),
        ("FROM scratch", "scratch"),
        ("FROM a\nCOPY --from=build /x /y", "--from"),
        ("FROM a\nRUN --mount=type=cache,target=/x make", "--mount"),
        ("FROM a\nADD https://example.com/x /x", "ADD <url>"),
        ("FROM a\nCOPY onlyone", "at least one source"),
        ("FROM a\nFROBNICATE x", "unknown instruction FROBNICATE"),
        ("FROM a\nRUN <<EOF\necho", "not terminated"),
        ("FROM a\nRUN cat <<EOF > /x\nhi\nEOF", "whole RUN command"),
        ("", "must contain a FROM"),
    ],
)
def test_unsupported_dockerfiles_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_dockerfile(text)


PLANS = [
    BuildPlan(base=FromImage("debian:bookworm")),
    BuildPlan(
        base=FromImage("python:3.11"),
        steps=(
            Run(cmd="pip install -r requirements.txt"),
            Copy(src="app", dest="/app/"),
            Copy(src="run.sh", dest="/usr/local/bin/run", user="root:root", mode=0o755),
            Copy(src="dir with space/*", dest="/x y/"),
            Env(values=(("PATH", "/opt/bin:$PATH"), ("QUOTE", 'say "hi" \\ back'))),
            Workdir(path="/app"),
            User(name="user"),
            Run(cmd="for i in 1 2; do\n  echo $i\ndone"),
        ),
        start_cmd="python -m http.server 8000",
        ready_cmd="curl -fs localhost:8000",
    ),
    BuildPlan(base=FromImage("ubuntu:22.04"), steps=(User(name="root"), Run(cmd="echo CORRAL_EOF\necho x"))),
]


@pytest.mark.parametrize("plan", PLANS)
def test_to_dockerfile_round_trip(plan: BuildPlan) -> None:
    assert parse_dockerfile(to_dockerfile(plan), e2b_defaults=False) == plan


def test_to_dockerfile_text_and_run_users() -> None:
    plan = BuildPlan(
        base=FromImage("debian:bookworm"),
        steps=(User(name="user"), Run(cmd="apt-get update", user="root"), Env(values=(("A", "1"),))),
        start_cmd="./serve",
        ready_cmd="sleep 20",
    )
    assert to_dockerfile(plan) == (
        'FROM debian:bookworm\nUSER user\nUSER root\nRUN apt-get update\nUSER user\nENV A="1"\n'
        "HEALTHCHECK CMD sleep 20\nENTRYPOINT ./serve\n"
    )
    # A RUN with its own user comes back as USER steps around a plain RUN.
    steps = parse_dockerfile(to_dockerfile(plan), e2b_defaults=False).steps
    assert steps[1:4] == (User(name="root"), Run(cmd="apt-get update"), User(name="user"))


def test_templates_on_templates_have_no_dockerfile() -> None:
    with pytest.raises(InvalidArgument, match="another template"):
        to_dockerfile(BuildPlan(base=FromTemplate("base")))
