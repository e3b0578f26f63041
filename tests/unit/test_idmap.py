"""User-namespace id maps as data: ranges, slot allocation and the OCI config they produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.node.runtime.idmap import (
    FIRST_BASE,
    SANDBOX_IDS,
    IdMap,
    config_idmap,
    pick_base,
    read_idmap,
    write_idmap,
)
from corral.node.runtime.oci import build_sandbox_config


def test_mapping_both_ways() -> None:
    ids = IdMap(FIRST_BASE)
    assert ids.to_host(0) == FIRST_BASE and ids.to_host(1000) == FIRST_BASE + 1000
    assert ids.from_host(FIRST_BASE + 1000) == 1000
    assert ids.from_host(0) is None and ids.from_host(FIRST_BASE + SANDBOX_IDS) is None
    with pytest.raises(ValueError):
        ids.to_host(SANDBOX_IDS)
    with pytest.raises(ValueError):
        ids.to_host(-1)


def test_slots_are_never_shared_and_reuse_the_lowest_free() -> None:
    assert pick_base([]) == FIRST_BASE
    second = FIRST_BASE + SANDBOX_IDS
    assert pick_base([FIRST_BASE]) == second
    assert pick_base([second]) == FIRST_BASE
    assert FIRST_BASE >= 1 << 20  # above the /etc/subuid ranges of the first login users


def test_persisted_and_in_the_config(tmp_path: Path) -> None:
    assert read_idmap(tmp_path) is None
    write_idmap(tmp_path, IdMap(FIRST_BASE + 2 * SANDBOX_IDS))
    ids = read_idmap(tmp_path)
    assert ids == IdMap(FIRST_BASE + 2 * SANDBOX_IDS)
    config = build_sandbox_config(
        sandbox_id="abc", rootfs="/r", netns_path="/n", init_binary="/i", etc_files={}, cpu_count=1,
        memory_mb=64, pids_limit=64, nofile_hard=1024, cgroups_path="/c/abc", id_map=ids,
    )  # fmt: skip
    assert {"type": "user"} in config["linux"]["namespaces"]
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": ids.base, "size": SANDBOX_IDS}]
    assert config["linux"]["gidMappings"] == config["linux"]["uidMappings"]
    assert config_idmap(config) == ids
    plain = build_sandbox_config(
        sandbox_id="abc", rootfs="/r", netns_path="/n", init_binary="/i", etc_files={}, cpu_count=1,
        memory_mb=64, pids_limit=64, nofile_hard=1024, cgroups_path="/c/abc",
    )  # fmt: skip
    assert config_idmap(plain) is None and {"type": "user"} not in plain["linux"]["namespaces"]
