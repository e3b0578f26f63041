"""corral.node.storage.loop: the LOOP_CONFIGURE argument and the hole-keeping copy; the golden image path."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from corral.node.storage.disk import disk_plan, golden_image
from corral.node.storage.loop import copy_sparse, loop_config


def test_loop_config_matches_the_kernel_struct() -> None:
    raw = loop_config(7, "/var/lib/corral/sandboxes/x/disk.img")
    assert len(raw) == 304  # sizeof(struct loop_config) on 64-bit Linux
    fd, block_size = struct.unpack_from("=II", raw)
    assert (fd, block_size) == (7, 0)
    lo_flags = struct.unpack_from("=I", raw, 8 + 5 * 8 + 3 * 4)[0]
    assert lo_flags == 4  # LO_FLAGS_AUTOCLEAR, and nothing else (not read-only)
    name = raw[8 + 56 : 8 + 56 + 64].rstrip(b"\0")
    assert name == b"/var/lib/corral/sandboxes/x/disk.img"
    assert len(loop_config(3, "x" * 500)) == 304  # long names are cut, not overflowing


def test_copy_sparse_keeps_data_and_holes(tmp_path: Path) -> None:
    source = tmp_path / "src.img"
    with open(source, "wb") as f:
        f.truncate(64 * 2**20)
        f.seek(0)
        f.write(b"superblock" * 100)
        f.seek(40 * 2**20)
        f.write(os.urandom(300_000))
    dest = tmp_path / "copy.img"
    copy_sparse(source, dest)
    assert dest.read_bytes() == source.read_bytes()
    assert os.stat(dest).st_blocks * 512 < 2 * 2**20  # still sparse: ~300 KB of 64 MB allocated
    assert os.stat(dest).st_mode & 0o777 == 0o600


def test_golden_image_is_named_by_size_and_options(tmp_path: Path) -> None:
    assert golden_image(disk_plan(tmp_path / "sb", 2048)) is None
    golden = golden_image(disk_plan(tmp_path / "sb", 2048, tmp_path / "disk-images"))
    assert golden is not None and golden.parent == tmp_path / "disk-images"
    assert golden.name.startswith("ext4-2048m-")
    other = golden_image(disk_plan(tmp_path / "sb", 64, tmp_path / "disk-images"))
    assert other is not None and other != golden
