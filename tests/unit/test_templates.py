"""Template manifests on disk, base recipe digests and the host-preparation planner (no root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.builder.base import (
    BASE_PACKAGES,
    CUSTOMIZE_SCRIPT,
    base_recipe_digest,
    mmdebstrap_argv,
    recipe_digest,
)
from corral.core.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from corral.core.settings import load_settings
from corral.node.host import (
    CgroupMode,
    HostFacts,
    LoadModule,
    MountCgroupV1,
    WriteProcSys,
    cgroup_mode,
    parse_controllers,
    parse_filesystems,
    parse_mounts,
    plan_host,
)
from corral.node.storage.templates import TemplateManifest, TemplateStore, parse_template_ref

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(load_settings({"home": tmp_path}, env={}))


def manifest(template_id: str = "base", names: tuple[str, ...] = ("base",), **kw) -> TemplateManifest:
    return TemplateManifest(template_id=template_id, names=names, layers=kw.pop("layers", (DIGEST_A,)), **kw)


# --- TemplateStore -------------------------------------------------------------------------------


def test_save_then_get_by_id_name_and_default_tag(store: TemplateStore) -> None:
    saved = manifest("abc123", ("python-dev",), layers=(DIGEST_A, DIGEST_B), cpu_count=4)
    store.save(saved)
    assert store.get("abc123") == saved
    assert store.get("python-dev") == saved
    assert store.get("python-dev:default") == saved
    assert store.get("abc123:default") == saved
    assert store.get("abc123").layers == (DIGEST_A, DIGEST_B)  # order kept: lowest first


@pytest.mark.parametrize("ref", ["missing", "python-dev:v2", "../etc/passwd", "", ":default"])
def test_get_unknown_raises_not_found_naming_the_ref(store: TemplateStore, ref: str) -> None:
    store.save(manifest("abc123", ("python-dev",)))
    with pytest.raises(NotFound, match=f"template '{ref}' not found"):
        store.get(ref)


def test_manifest_file_layout_and_defaults(store: TemplateStore, tmp_path: Path) -> None:
    store.save(manifest())
    data = json.loads((tmp_path / "templates" / "base.json").read_text())
    assert data["template_id"] == "base"
    assert data["names"] == ["base"]
    assert data["layers"] == [DIGEST_A]
    assert (data["cpu_count"], data["memory_mb"], data["disk_size_mb"]) == (2, 512, 2048)
    assert (data["default_user"], data["default_workdir"]) == ("user", None)
    assert data["created_at"].endswith("Z") and "T" in data["created_at"]
    assert len(data["build_id"]) == 36


def test_save_replaces_atomically_and_leaves_no_temp_files(store: TemplateStore, tmp_path: Path) -> None:
    store.save(manifest(memory_mb=512))
    store.save(manifest(memory_mb=1024))
    assert store.get("base").memory_mb == 1024
    assert sorted(p.name for p in (tmp_path / "templates").iterdir()) == ["base.json"]


def test_list_is_sorted_and_ignores_temp_files(store: TemplateStore, tmp_path: Path) -> None:
    assert store.list() == []
    store.save(manifest("t2", ("two",), created_at="2025-01-02T00:00:00.000Z"))
    store.save(manifest("t1", ("one",), created_at="2025-01-01T00:00:00.000Z"))
    (tmp_path / "templates" / ".tmp-123.json").write_text("{half a manif")
    assert [m.template_id for m in store.list()] == ["t1", "t2"]


def test_a_name_belongs_to_one_template(store: TemplateStore) -> None:
    store.save(manifest("t1", ("shared",)))
    with pytest.raises(AlreadyExists, match="'shared'.*'t1'"):
        store.save(manifest("t2", ("shared",)))
    store.save(manifest("t1", ("shared", "other")))  # the owner may re-save it


def test_unknown_keys_are_ignored_and_corrupt_files_are_reported(
    store: TemplateStore, tmp_path: Path
) -> None:
    store.save(manifest())
    path = tmp_path / "templates" / "base.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "from_the_future": 1}))
    assert store.get("base").template_id == "base"
    path.write_text("not json")
    with pytest.raises(Internal, match="unreadable"):
        store.get("base")


def test_delete(store: TemplateStore) -> None:
    store.save(manifest())
    store.delete("base")
    with pytest.raises(NotFound):
        store.get("base")
    with pytest.raises(NotFound):
        store.delete("base")


def test_layer_path_accepts_only_digests(store: TemplateStore, tmp_path: Path) -> None:
    assert store.layer_path(DIGEST_A) == tmp_path / "layers" / DIGEST_A
    for bad in ["../x", "A" * 64, "a" * 63, ""]:
        with pytest.raises(InvalidArgument):
            store.layer_path(bad)


@pytest.mark.parametrize("template_id", ["../evil", "a/b", "", "UPPER", ".hidden"])
def test_manifest_rejects_ids_that_are_not_file_names(template_id: str) -> None:
    with pytest.raises(InvalidArgument):
        manifest(template_id)


def test_manifest_rejects_bad_layer_digests() -> None:
    with pytest.raises(InvalidArgument):
        manifest(layers=("../../etc",))


def test_parse_template_ref() -> None:
    assert parse_template_ref("base") == ("base", "default")
    assert parse_template_ref("base:default") == ("base", "default")
    assert parse_template_ref("base:v1") == ("base", "v1")


# --- base recipe ---------------------------------------------------------------------------------


def _digest(**kw) -> str:
    args = {
        "suite": "bookworm",
        "variant": "minbase",
        "packages": ["git", "curl"],
        "customize_script": "x",
        "arch": "amd64",
    }
    return recipe_digest(**{**args, **kw})


def test_recipe_digest_is_stable_and_ignores_package_order_and_duplicates() -> None:
    assert _digest() == _digest(packages=["curl", "git", "curl"])
    assert len(_digest()) == 64 and int(_digest(), 16) >= 0
    # A pinned value: the digest names layer dirs on disk, so it must not drift by accident.
    assert _digest() == "b5d3393babf077c06ccf3f030bc51181c34273589d2c95569d5b77fe41c5a835"


@pytest.mark.parametrize(
    "change",
    [
        {"suite": "trixie"},
        {"variant": "apt"},
        {"packages": ["git", "curl", "jq"]},
        {"customize_script": "y"},
        {"arch": "arm64"},
    ],
)
def test_recipe_digest_changes_with_every_field(change: dict) -> None:
    assert _digest(**change) != _digest()


def test_base_recipe_has_the_tools_agents_expect() -> None:
    for package in [
        "bash",
        "python3",
        "python3-pip",
        "python3-venv",
        "git",
        "curl",
        "nodejs",
        "npm",
        "sudo",
        "jq",
    ]:
        assert package in BASE_PACKAGES
    assert base_recipe_digest("amd64") != base_recipe_digest("arm64")


def test_mmdebstrap_argv_runs_the_customize_script_in_the_chroot() -> None:
    argv = mmdebstrap_argv(
        suite="bookworm",
        variant="minbase",
        packages=["git", "curl"],
        customize_script=CUSTOMIZE_SCRIPT,
        target="/t",
    )
    assert argv[0] == "mmdebstrap"
    assert argv[-2:] == ["bookworm", "/t"]
    assert "--variant=minbase" in argv and "--format=directory" in argv and "--include=git,curl" in argv
    (hook,) = [a for a in argv if a.startswith("--customize-hook=")]
    assert hook.startswith('--customize-hook=chroot "$1" /bin/sh -c ')
    assert "useradd --uid 1000" in hook and "NOPASSWD: ALL" in hook


# --- host preparation ----------------------------------------------------------------------------

HYBRID_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"


def facts(mounts: str = HYBRID_MOUNTS, controllers: str = "hugetlb\n", **kw) -> HostFacts:
    values = {
        "mounts": tuple(parse_mounts(mounts)),
        "unified_controllers": parse_controllers(controllers),
        "ip_forward": "1",
        "filesystems": frozenset({"ext4", "overlay"}),
        "runtime": "crun",
        "runtime_path": "/usr/bin/crun",
    }
    return HostFacts(**{**values, **kw})


def test_parse_mounts_unescapes_octal_and_keeps_options() -> None:
    (entry,) = parse_mounts("/dev/vda /mnt/my\\040disk ext4 rw,relatime 0 0\n\n")
    assert entry.target == "/mnt/my disk"
    assert entry.options == ("rw", "relatime")


def test_parse_controllers_and_filesystems() -> None:
    assert parse_controllers("") == ()
    assert parse_controllers("cpuset cpu hugetlb\n") == ("cpuset", "cpu", "hugetlb")
    assert parse_filesystems("nodev\tsysfs\n\text4\nnodev\toverlay\n") == {"sysfs", "ext4", "overlay"}


def test_cgroup_mode() -> None:
    assert cgroup_mode(parse_mounts(HYBRID_MOUNTS)) is CgroupMode.HYBRID
    assert cgroup_mode(parse_mounts(V2_MOUNTS)) is CgroupMode.V2
    assert (
        cgroup_mode(parse_mounts(HYBRID_MOUNTS.replace("cgroup2 /sys/fs/cgroup/unified", "x /y")))
        is CgroupMode.V1
    )
    assert cgroup_mode([]) is CgroupMode.NONE


def test_hybrid_with_hugetlb_in_cgroup2_moves_it_to_v1() -> None:
    (change,) = plan_host(facts())
    assert change == MountCgroupV1("hugetlb", "/sys/fs/cgroup/hugetlb", remount_root_rw=False)
    assert change.message == (
        "moved the hugetlb cgroup controller to a v1 hierarchy at /sys/fs/cgroup/hugetlb "
        "(crun refuses hybrid cgroups while cgroup2 holds it)"
    )


def test_read_only_cgroup_tmpfs_is_remounted_for_the_move() -> None:
    mounts = HYBRID_MOUNTS.replace("tmpfs rw,relatime,mode=755", "tmpfs ro,relatime,mode=755")
    (change,) = plan_host(facts(mounts))
    assert isinstance(change, MountCgroupV1) and change.remount_root_rw


def test_every_controller_cgroup2_holds_is_moved() -> None:
    # crun refuses hybrid mode while cgroup.controllers is non-empty, whatever it lists.
    changes = plan_host(facts(controllers="hugetlb misc"))
    assert [c.controller for c in changes] == ["hugetlb", "misc"]


def test_already_moved_or_pure_v2_needs_nothing() -> None:
    assert plan_host(facts(controllers="")) == []
    assert plan_host(facts(V2_MOUNTS, controllers="cpu memory hugetlb")) == []


def test_ip_forward_and_overlay() -> None:
    changes = plan_host(facts(controllers="", ip_forward="0", filesystems=frozenset({"ext4"})))
    assert [type(c) for c in changes] == [WriteProcSys, LoadModule]
    assert changes[0].path == "/proc/sys/net/ipv4/ip_forward" and changes[0].value == "1"
    assert "ip_forward=1" in changes[0].message
    assert changes[1].module == "overlay"


@pytest.mark.parametrize("runtime,package", [("crun", "crun"), ("runsc", "runsc"), ("/opt/bin/runc", "runc")])
def test_missing_runtime_names_the_package(runtime: str, package: str) -> None:
    with pytest.raises(FailedPrecondition, match=f"'{runtime}' not found.*apt-get install {package}"):
        plan_host(facts(runtime=runtime, runtime_path=None))
