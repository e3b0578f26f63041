"""The statx shim of gVisor sandboxes: its mount (runsc only), the sandbox's /etc/ld.so.preload, and
reading the template's own file from a hostile rootfs. The shim itself: tests/integration/test_gvisor_statx.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.node.runtime.oci import build_sandbox_config
from corral.node.runtime.runtimes import traits_for
from corral.node.runtime.statx_shim import (
    MAX_PRELOAD_BYTES,
    SHIM_FILE_NAME,
    SHIM_PATH,
    preload_text,
    read_template_preload,
    shim_binary,
)


def _config(**overrides):
    args = {
        "sandbox_id": "abc123",
        "rootfs": "/x/rootfs",
        "netns_path": "/var/run/netns/corral0-abc123",
        "init_binary": "/usr/bin/catatonit",
        "etc_files": {"/etc/hosts": "/x/etc/hosts"},
        "cpu_count": 1,
        "memory_mb": 256,
        "pids_limit": 100,
        "nofile_hard": 1024,
        "cgroups_path": "/corral-corral0/abc123",
    }
    return build_sandbox_config(**(args | overrides))


def test_only_runsc_wants_the_shim() -> None:
    assert traits_for("/usr/bin/runsc").statx_shim
    assert not traits_for("crun").statx_shim and not traits_for("runc").statx_shim


def test_the_shim_is_bound_read_only_and_only_when_asked() -> None:
    assert all(m["destination"] != SHIM_PATH for m in _config()["mounts"])
    (mount,) = [
        m for m in _config(statx_shim="/lib/x/corral-statx.so")["mounts"] if m["destination"] == SHIM_PATH
    ]
    assert mount["source"] == "/lib/x/corral-statx.so" and mount["type"] == "bind"
    assert {"ro", "nosuid", "nodev"} <= set(mount["options"]) and "rw" not in mount["options"]


def test_preload_names_the_shim_first_and_keeps_the_template_lines() -> None:
    assert preload_text("") == f"{SHIM_PATH}\n"
    assert (
        preload_text("/usr/lib/a.so /usr/lib/b.so\n# note\n")
        == f"{SHIM_PATH}\n/usr/lib/a.so /usr/lib/b.so\n# note\n"
    )
    assert preload_text("/usr/lib/a.so") == f"{SHIM_PATH}\n/usr/lib/a.so\n"  # no newline at the end


def test_shim_binary_sits_next_to_the_init(tmp_path: Path) -> None:
    init = tmp_path / "corral-init"
    assert shim_binary(init) is None
    (tmp_path / SHIM_FILE_NAME).write_bytes(b"\x7fELF")
    assert shim_binary(init) == tmp_path / SHIM_FILE_NAME


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    return tmp_path / "rootfs"


def test_template_preload_is_read(rootfs: Path) -> None:
    assert read_template_preload(rootfs) == ""
    (rootfs / "etc" / "ld.so.preload").write_text("/usr/lib/a.so\n")
    assert read_template_preload(rootfs) == "/usr/lib/a.so\n"


def test_a_symlink_resolves_inside_the_rootfs_never_to_host_files(rootfs: Path, tmp_path: Path) -> None:
    """Exfil: a template's /etc/ld.so.preload -> /secret must not copy the host's /secret into the sandbox."""
    (tmp_path / "secret").write_text("host secret\n")
    (rootfs / "etc" / "ld.so.preload").symlink_to(tmp_path / "secret")
    assert read_template_preload(rootfs) == ""
    (rootfs / "etc" / "ld.so.preload").unlink()
    (rootfs / "etc" / "ld.so.preload").symlink_to("../../../../../../../../../../etc/passwd")
    assert read_template_preload(rootfs) == ""  # `..` stops at the rootfs, whose /etc/passwd is absent
    (rootfs / "lib.preload").write_text("/usr/lib/in-rootfs.so\n")
    (rootfs / "etc" / "ld.so.preload").unlink()
    (rootfs / "etc" / "ld.so.preload").symlink_to("/lib.preload")
    assert read_template_preload(rootfs) == "/usr/lib/in-rootfs.so\n"


def test_a_fifo_directory_or_huge_file_reads_as_none(rootfs: Path) -> None:
    """HostDoS: a FIFO would block the boot; a huge file would be copied for every boot."""
    preload = rootfs / "etc" / "ld.so.preload"
    os.mkfifo(preload)
    assert read_template_preload(rootfs) == ""
    preload.unlink()
    preload.mkdir()
    assert read_template_preload(rootfs) == ""
    preload.rmdir()
    preload.write_bytes(b"/a.so\n" * (MAX_PRELOAD_BYTES // 6 + 1))
    assert read_template_preload(rootfs) == ""
