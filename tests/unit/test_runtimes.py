"""Runtime choice: traits per runtime, version parsing, advisories, refusal and the rootfs pre-flight."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.core.errors import FailedPrecondition
from corral.node.runtime.runtimes import (
    Advisory,
    RuntimeVersion,
    check_runtime,
    fill_cpuset_parents,
    open_advisories,
    parse_version,
    refusal_message,
    traits_for,
    unreachable_advisories,
    unsafe_mount_targets,
)


def _version(name: str, version: tuple[int, ...], package: str = "") -> RuntimeVersion:
    return RuntimeVersion(name=name, binary=f"/usr/bin/{name}", version=version, text="", package=package)


def test_parse_version_outputs() -> None:
    assert parse_version("crun version 1.8.1\ncommit: f8a0\n")[:2] == ("crun", (1, 8, 1))
    assert parse_version("runc version 1.1.5+ds1\ncommit: x\nspec: 1.0.2-dev\n")[:2] == ("runc", (1, 1, 5))
    assert parse_version("runsc version 0.0~20221219.0\nspec: 1.0.2-dev\n")[:2] == ("runsc", (20221219, 0))
    assert parse_version("runsc version release-20240801.0\n")[:2] == ("runsc", (20240801, 0))
    assert parse_version("")[1] == ()


def test_advisory_branches() -> None:
    advisory = Advisory("runc", "CVE-X", "x", ((1, 2, 8), (1, 3, 3)))
    assert advisory.affects((1, 1, 5))
    assert not advisory.affects((1, 2, 8)) and advisory.affects((1, 2, 7))
    assert not advisory.affects((1, 3, 3)) and advisory.affects((1, 3, 2))
    assert not advisory.affects((1, 4, 0))
    introduced = Advisory("crun", "CVE-Y", "y", ((1, 27),), introduced_in=(1, 19))
    assert (
        not introduced.affects((1, 8, 1)) and introduced.affects((1, 20)) and not introduced.affects((1, 27))
    )
    assert Advisory("crun", "CVE-Z", "z", ()).affects((9, 9))  # no fixed release known


def test_debian_crun_is_accepted_with_unreachable_advisories_recorded() -> None:
    crun = _version("crun", (1, 8, 1), "1.8.1-1+deb12u1")
    assert open_advisories(crun) == []
    unreachable = {a.cve for a in unreachable_advisories(crun)}
    assert "CVE-2026-47766" in unreachable  # /dev symlink images: our pre-flight makes it unreachable
    assert "CVE-2026-30892" not in unreachable  # 1.8.1 predates it
    assert {a.cve for a in open_advisories(_version("crun", (1, 4, 3)))} >= {"CVE-2022-27650"}


def test_debian_runc_is_refused_and_backports_count() -> None:
    runc = _version("runc", (1, 1, 5), "1.1.5+ds1-1+deb12u1")
    cves = {a.cve for a in open_advisories(runc)}
    assert {"CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881", "CVE-2026-41579"} <= cves
    assert "CVE-2024-21626" not in cves  # Debian backported it
    assert "CVE-2024-21626" in {a.cve for a in open_advisories(_version("runc", (1, 1, 5)))}
    assert open_advisories(_version("runc", (1, 3, 6))) == []
    message = refusal_message(runc, open_advisories(runc))
    assert "CVE-2025-31133" in message and "--allow-vulnerable-runtime" in message


def _fake_runtime(tmp_path: Path, name: str, output: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\n")
    path.chmod(0o755)
    return str(path)


def test_check_runtime_refuses_unless_allowed(tmp_path: Path) -> None:
    runc = _fake_runtime(tmp_path, "runc", "runc version 1.1.5")
    with pytest.raises(FailedPrecondition, match="CVE-2025-31133"):
        check_runtime(runc)
    version, warnings = check_runtime(runc, allow_vulnerable=True)
    assert version.version == (1, 1, 5) and any("ALLOWED" in w for w in warnings)
    unknown = _fake_runtime(tmp_path, "mystery", "something else")
    with pytest.raises(FailedPrecondition, match="cannot tell the version"):
        check_runtime(unknown)
    with pytest.raises(FailedPrecondition, match="not found"):
        check_runtime(str(tmp_path / "absent"))
    fine = _fake_runtime(tmp_path, "crun", "crun version 1.28")
    assert check_runtime(fine)[0].version == (1, 28)


def test_traits() -> None:
    assert traits_for("crun").preserve_fds and traits_for("/usr/bin/crun").files_from_init_root
    runsc = traits_for("/usr/sbin/runsc")
    assert "--network=host" in runsc.global_args and "--file-access=shared" in runsc.global_args
    assert not runsc.preserve_fds and not runsc.files_from_init_root and runsc.bind_tmp
    assert not runsc.setuid_works and not runsc.console_socket and not runsc.fills_cpuset_parents
    assert traits_for("my-crun-wrapper").name == "my-crun-wrapper"


def test_unsafe_mount_targets(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    for sub in ("proc", "sys", "tmp", "run"):
        (root / sub).mkdir(parents=True)
    assert unsafe_mount_targets(root) == []  # missing /dev is fine: the runtime makes it
    os.symlink("/etc", root / "dev")  # the CVE-2026-41579 shape
    (root / "run").rmdir()
    (root / "run").write_text("not a dir")  # a file is allowed (bind targets), a FIFO is not
    os.mkfifo(root / "tmp2")
    assert unsafe_mount_targets(root) == ["/dev"]  # and /dev/pts … are not followed through it
    assert unsafe_mount_targets(root, ("/tmp2",)) == ["/tmp2"]
    os.symlink("/tmp", root / ".corral")
    assert "/.corral" in unsafe_mount_targets(root)


def test_fill_cpuset_parents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cpuset"
    root.mkdir()
    (root / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset.mems").write_text("0\n")
    original_mkdir = Path.mkdir

    def mkdir_with_files(self: Path, *args: object, **kwargs: object) -> None:  # cgroupfs makes these
        original_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (self / name).exists():
                (self / name).write_text("\n")

    monkeypatch.setattr(Path, "mkdir", mkdir_with_files)
    fill_cpuset_parents("/corral-x/sandbox1", root)
    assert (root / "corral-x" / "cpuset.cpus").read_text() == "0-1"
    assert (root / "corral-x" / "cpuset.mems").read_text() == "0"
    assert not (root / "corral-x" / "sandbox1").exists()  # the leaf is the runtime's
    fill_cpuset_parents("/x/y", tmp_path / "no-cpuset")  # no v1 cpuset: nothing to do


def test_a_template_names_a_runtime_never_a_binary() -> None:
    from corral.core.errors import InvalidArgument
    from corral.node.runtime.runtimes import runtime_name

    assert [runtime_name(n) for n in ("crun", "runc", " runsc ")] == ["crun", "runc", "runsc"]
    for bad in ("", "docker", "/usr/bin/runsc", "../crun", "RUNSC", "runsc --debug"):
        with pytest.raises(InvalidArgument, match="unknown runtime"):
            runtime_name(bad)


def test_each_runtime_has_its_own_state_root() -> None:
    from corral.node.runtime.runtimes import state_root_for

    root = Path("/var/lib/corral/runtime")
    assert state_root_for(root, "crun", "crun") == root
    assert state_root_for(root, "crun", "runsc") == Path("/var/lib/corral/runtime-runsc")
    assert state_root_for(root, "runsc", "runsc") == root  # a runsc server's own, as before
    assert state_root_for(root, "runsc", "crun") == Path("/var/lib/corral/runtime-crun")


def test_runtime_record_round_trip(tmp_path: Path) -> None:
    from corral.node.runtime.runtimes import (
        RUNTIME_RECORD_FILE,
        RuntimeRecord,
        read_runtime_record,
        write_runtime_record,
    )

    assert read_runtime_record(tmp_path) is None  # sandboxes from before records: the default
    record = RuntimeRecord("runsc", tmp_path / "runtime-runsc")
    write_runtime_record(tmp_path, record)
    assert read_runtime_record(tmp_path) == record
    for junk in ("{", '{"name": "runsc"}', '{"name": "runsc", "state_root": "relative/dir"}', "[]"):
        (tmp_path / RUNTIME_RECORD_FILE).write_text(junk)
        assert read_runtime_record(tmp_path) is None
