"""The build IR (E2B wire shape ⇄ typed steps), cache keys and the cache stores (pure, no root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.builder.base import base_recipe
from corral.builder.cache import (
    KEY_VERSION,
    CacheEntry,
    FileBuildCache,
    MemoryBuildCache,
    canonical_json,
    finalize_key,
    stack_key,
    step_key,
)
from corral.builder.images import DistroBase, RegistryBase, TemplateBase, resolve_image, split_reference
from corral.builder.steps import (
    BuildContext,
    BuildPlan,
    Copy,
    Env,
    FromImage,
    FromTemplate,
    Run,
    User,
    Workdir,
    plan_from_e2b,
    plan_to_e2b,
    split_copy_source,
)
from corral.core.errors import InvalidArgument

HASH = "ab" * 32

# The body the official SDK posts (e2b-protocol.md §2.3, verified with a capture server).
SDK_BODY = {
    "steps": [
        {"type": "COPY", "args": ["x.txt", "/app/", "", ""], "force": False, "filesHash": HASH},
        {"type": "RUN", "args": ["echo hi", "root"], "force": False},
        {"type": "WORKDIR", "args": ["/app"], "force": False},
        {"type": "USER", "args": ["user"], "force": False},
        {"type": "ENV", "args": ["A", "1", "B", "two words"], "force": True},
        {"type": "COPY", "args": ["bin/*", "/usr/local/bin", "root:staff", "0755"], "force": True,
         "filesHash": "cd" * 32, "forceUpload": True},
    ],
    "force": False,
    "fromTemplate": "base",
    "startCmd": "echo start",
    "readyCmd": "sleep 5",
}  # fmt: skip


# --- E2B wire shape --------------------------------------------------------------------------------


def test_plan_from_the_sdk_body() -> None:
    plan = plan_from_e2b(SDK_BODY)
    assert plan.base == FromTemplate("base")
    assert plan.steps == (
        Copy(src="x.txt", dest="/app/", files_hash=HASH),
        Run(cmd="echo hi", user="root"),
        Workdir(path="/app"),
        User(name="user"),
        Env(values=(("A", "1"), ("B", "two words"))),
        Copy(src="bin/*", dest="/usr/local/bin", user="root:staff", mode=0o755, files_hash="cd" * 32),
    )
    assert (plan.start_cmd, plan.ready_cmd, plan.force) == ("echo start", "sleep 5", False)
    assert plan.steps[5].force and plan.steps[5].force_upload  # type: ignore[union-attr]
    assert plan.forced_from() == 4  # the first forced step; every later one is forced too
    assert plan.copy_hashes() == [HASH, "cd" * 32]


def test_plan_round_trips_through_the_wire_shape() -> None:
    plan = plan_from_e2b(SDK_BODY)
    again = plan_from_e2b(json.loads(json.dumps(plan_to_e2b(plan))))
    assert again == plan
    assert [s.force for s in again.steps] == [s.force for s in plan.steps]
    image = BuildPlan(
        base=FromImage("debian:bookworm", registry={"type": "registry", "username": "u", "password": "p"})
    )
    body = plan_to_e2b(image)
    assert body["fromImage"] == "debian:bookworm" and body["fromImageRegistry"]["username"] == "u"
    assert "p" not in repr(plan_from_e2b(body).base)  # credentials stay out of reprs (and logs)


def test_user_sudo_flag_and_force_on_the_whole_plan() -> None:
    plan = plan_from_e2b(
        {"fromImage": "ubuntu:22.04", "force": True, "steps": [{"type": "USER", "args": ["dev", "true"]}]}
    )
    assert plan.steps == (User(name="dev", sudo=True),)
    assert plan.forced_from() == 0
    assert plan_from_e2b({"fromTemplate": "base", "steps": []}).forced_from() is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"steps": []}, "fromImage or fromTemplate"),
        ({"fromTemplate": "base", "steps": [{"type": "RUN", "args": []}]}, "RUN requires a command"),
        ({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a"]}]}, "COPY requires"),
        (
            {"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["/etc/passwd", "/x"]}]},
            "relative path",
        ),
        ({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a/../../x", "/x"]}]}, "relative path"),
        (
            {"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a", "/x"], "filesHash": "zz"}]},
            "filesHash",
        ),
        ({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a", "/x", "", "9"]}]}, "octal"),
        ({"fromTemplate": "base", "steps": [{"type": "ENV", "args": ["A"]}]}, "key and value"),
        ({"fromTemplate": "base", "steps": [{"type": "ENV", "args": ["1A", "x"]}]}, "variable name"),
        ({"fromTemplate": "base", "steps": [{"type": "USER", "args": ["a b"]}]}, "invalid user name"),
        ({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["x", "$(id)"]}]}, "invalid user name"),
        ({"fromTemplate": "base", "steps": [{"type": "HEALTHCHECK", "args": ["x"]}]}, "unknown instruction"),
        ({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["a\x00b"]}]}, "NUL"),
        ({"fromTemplate": "base", "steps": "RUN x"}, "steps must be a list"),
    ],
)
def test_invalid_bodies_are_refused(body: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        plan_from_e2b(body)


@pytest.mark.parametrize(
    ("src", "base"),
    [
        ("folder/*", "folder"),
        ("folder/**/*.py", "folder"),
        ("*.txt", "."),
        ("x.txt", "x.txt"),
        ("a/b/c.txt", "a/b/c.txt"),
        ("./a/b", "a/b"),
        ("a/[bc]/d", "a"),
        ("dir/", "dir"),
    ],
)
def test_copy_source_base_is_the_part_before_the_first_glob(src: str, base: str) -> None:
    assert split_copy_source(src) == base


def test_describe_reads_like_e2b_logs() -> None:
    assert Run(cmd="ls -l").describe() == "RUN ls -l"
    assert Run(cmd="ls", user="root").describe() == "RUN ls (as root)"
    assert Copy(src="a", dest="/b").describe() == "COPY a /b"
    assert Env(values=(("A", "1"),)).describe() == "ENV A=1"


# --- cache keys ----------------------------------------------------------------------------------------

PARENT = "0" * 64


def test_key_is_sha256_of_canonical_json_and_stable() -> None:
    import hashlib

    step = Run(cmd="echo hi", user="root")
    preimage = {
        "v": KEY_VERSION,
        "type": "RUN",
        "parent": PARENT,
        "spec": {"cmd": "echo hi", "user": "root"},
        "files": None,
    }
    assert (
        step_key(PARENT, step, scope="team") == hashlib.sha256(canonical_json(preimage).encode()).hexdigest()
    )
    assert canonical_json({"b": 1, "a": [1, "x"]}) == '{"a":[1,"x"],"b":1}'


def test_key_ignores_what_does_not_change_the_result() -> None:
    assert step_key(PARENT, Run(cmd="x"), scope="a") == step_key(PARENT, Run(cmd="x", force=True), scope="b")
    plain = Copy(src="a", dest="/b", files_hash=HASH)
    assert step_key(PARENT, plain, scope="t") == step_key(
        PARENT, Copy(src="a", dest="/b", files_hash=HASH, force=True, force_upload=True), scope="t"
    )


@pytest.mark.parametrize(
    "other",
    [
        Run(cmd="echo hi "),
        Run(cmd="echo hi", user="user"),
        Env(values=(("A", "1"),)),
    ],
)
def test_key_changes_with_the_step(other) -> None:
    assert step_key(PARENT, Run(cmd="echo hi"), scope="t") != step_key(PARENT, other, scope="t")


def test_key_changes_with_parent_files_and_scope_of_copies() -> None:
    copy = Copy(src="a", dest="/b", files_hash=HASH)
    key = step_key(PARENT, copy, scope="team-a")
    assert step_key("1" * 64, copy, scope="team-a") != key
    assert step_key(PARENT, Copy(src="a", dest="/b", files_hash="cd" * 32), scope="team-a") != key
    assert step_key(PARENT, copy, scope="team-b") != key  # a client-asserted digest is per team
    assert step_key(PARENT, Copy(src="a", dest="/b", files_hash=HASH, mode=0o755), scope="team-a") != key


def test_stack_and_finalize_keys() -> None:
    ctx = BuildContext(user="user", workdir="/home/user")
    assert stack_key(("a" * 64,), ctx) != stack_key(("b" * 64,), ctx)
    assert stack_key(("a" * 64,), ctx) != stack_key(("a" * 64,), BuildContext(user="root"))
    assert finalize_key(PARENT, "start", "ready") != finalize_key(PARENT, "start", None)
    assert finalize_key(PARENT, None, None) != finalize_key("1" * 64, None, None)


def test_context_env_and_json() -> None:
    ctx = BuildContext().with_env({"A": "1"}).with_env({"B": "2", "A": "3"})
    assert ctx.env_dict() == {"A": "3", "B": "2"}
    assert BuildContext.from_json(json.loads(json.dumps(ctx.to_json()))) == ctx


# --- cache stores (one suite for both) ---------------------------------------------------------------


@pytest.fixture(params=["memory", "file"])
def cache(request, tmp_path: Path):
    return MemoryBuildCache() if request.param == "memory" else FileBuildCache(tmp_path / "cache")


def test_cache_put_get_replace_delete_items(cache) -> None:
    key = "1" * 64
    entry = CacheEntry(layers=("a" * 64,), context=BuildContext(user="user", env=(("A", "1"),)))
    assert cache.get(key) is None
    cache.put(key, entry)
    assert cache.get(key) == entry
    newer = CacheEntry(layers=("a" * 64, "b" * 64), context=BuildContext())
    cache.put(key, newer)
    assert cache.get(key) == newer
    assert list(cache.items()) == [(key, newer)]
    cache.delete(key)
    cache.delete(key)  # idempotent
    assert cache.get(key) is None and list(cache.items()) == []


def test_file_cache_reads_a_torn_entry_as_a_miss(tmp_path: Path) -> None:
    cache = FileBuildCache(tmp_path)
    (tmp_path / ("2" * 64 + ".json")).write_text('{"layers": [')
    assert cache.get("2" * 64) is None
    with pytest.raises(ValueError):
        cache.get("../../etc/passwd")


# --- image references ------------------------------------------------------------------------------------


def test_image_references() -> None:
    assert split_reference("docker.io/library/debian:12-slim") == ("debian", "12-slim", None)
    assert split_reference("localhost:5000/team/app") == ("localhost:5000/team/app", "latest", None)
    assert split_reference("x/y@sha256:" + "a" * 64) == ("x/y", "latest", "sha256:" + "a" * 64)
    assert resolve_image("e2bdev/base") == TemplateBase("base")
    assert resolve_image("debian:bookworm") == DistroBase(base_recipe())
    assert resolve_image("debian:12-slim") == DistroBase(base_recipe())
    trixie = resolve_image("debian:trixie")
    assert isinstance(trixie, DistroBase) and trixie.recipe.suite == "trixie" and trixie.recipe.mirror is None
    python = resolve_image("python:3.11-slim")
    assert isinstance(python, DistroBase) and python.recipe == base_recipe() and "3.11" in (python.note or "")
    assert resolve_image("ghcr.io/acme/tool:1") == RegistryBase("ghcr.io/acme/tool:1")
    assert resolve_image("python:3.13") == RegistryBase("python:3.13")


def test_ubuntu_is_bootstrapped_with_its_keyring_else_pulled(tmp_path: Path) -> None:
    assert resolve_image("ubuntu:22.04", ubuntu_keyring=str(tmp_path / "missing.gpg")) == RegistryBase(
        "ubuntu:22.04"
    )
    (tmp_path / "k.gpg").write_bytes(b"x")
    jammy = resolve_image("ubuntu:22.04", ubuntu_keyring=str(tmp_path / "k.gpg"))
    assert isinstance(jammy, DistroBase)
    assert (jammy.recipe.suite, jammy.recipe.mirror) == ("jammy", "http://archive.ubuntu.com/ubuntu")
    assert jammy.recipe.digest("amd64") != base_recipe().digest("amd64")
