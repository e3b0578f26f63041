"""corral.node.cgroups: cpusets, what a sandbox is told about its CPUs, usage readings and the freezer,
on fake cgroup trees (v1 and v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.node.cgroups import (
    CgroupPaths,
    FreezeTimeout,
    cpu_online_text,
    cpu_percent,
    filter_cpuinfo,
    format_cpuset,
    freeze,
    freezer_state,
    locate_cgroups,
    parse_cpuset,
    parse_memory_stat,
    pick_cpus,
    read_usage,
    thaw,
)

CPUINFO = "".join(
    f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: cpu {n}\nflags\t\t: fpu vme\n\n"
    for n in range(4)
)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", (0,)), ("0-3", (0, 1, 2, 3)), ("0-1,5,7-8", (0, 1, 5, 7, 8)), ("", ()), (" 2 ,3\n", (2, 3))],
)
def test_cpuset_text_round_trips(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpuset(text) == cpus
    assert parse_cpuset(format_cpuset(cpus)) == cpus


def test_format_cpuset_compresses_ranges() -> None:
    assert format_cpuset([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    with pytest.raises(ValueError):
        parse_cpuset("3-1")


def test_pick_cpus_takes_the_least_loaded() -> None:
    host = (0, 1, 2, 3)
    assert pick_cpus(host, {}, 1) == (0,)
    assert pick_cpus(host, {0: 2, 1: 1}, 2) == (2, 3)
    assert pick_cpus(host, {0: 1, 1: 1, 2: 1, 3: 0}, 1) == (3,)
    assert pick_cpus(host, {}, 9) == host  # more than the host has: all of them
    assert pick_cpus(host, {}, 0) == (0,)
    with pytest.raises(ValueError):
        pick_cpus((), {}, 1)


def test_spreading_one_cpu_sandboxes() -> None:
    load: dict[int, int] = {}
    picked = []
    for _ in range(4):
        (cpu,) = pick_cpus((0, 1), load, 1)
        load[cpu] = load.get(cpu, 0) + 1
        picked.append(cpu)
    assert picked == [0, 1, 0, 1]


def test_filter_cpuinfo_keeps_the_allotted_cpus_renumbered() -> None:
    out = filter_cpuinfo(CPUINFO, (1, 3))
    assert out.count("processor") == 2
    assert "processor\t: 0\n" in out and "processor\t: 1\n" in out
    assert "model name\t: cpu 1" in out and "model name\t: cpu 3" in out
    assert "cpu 0" not in out and "cpu 2" not in out
    assert out.endswith("\n\n")
    assert filter_cpuinfo("no blocks here\n", (0,)) == "no blocks here\n"


def test_cpu_online_text() -> None:
    assert cpu_online_text(1) == "0\n"
    assert cpu_online_text(4) == "0-3\n"


def test_cpu_percent() -> None:
    assert cpu_percent(1_000_000_000, 1.0, 2) == 50.0
    assert cpu_percent(5_000_000_000, 1.0, 1) == 100.0  # clamped
    assert cpu_percent(-1, 1.0, 1) == 0.0
    assert cpu_percent(10, 0.0, 1) == 0.0


def test_parse_memory_stat() -> None:
    assert parse_memory_stat("cache 4096\nrss 8192\nbad line\nx y\n") == {"cache": 4096, "rss": 8192}


def _v1_tree(root: Path, parent: str, sandbox_id: str) -> CgroupPaths:
    for controller in ("memory", "cpuacct", "freezer", "cpu"):
        (root / controller / parent / sandbox_id).mkdir(parents=True)
    paths = locate_cgroups(parent, sandbox_id, root)
    (paths.cpu / "cpuacct.usage").write_text("123456789\n")
    (paths.memory / "memory.usage_in_bytes").write_text("10485760\n")
    (paths.memory / "memory.limit_in_bytes").write_text("268435456\n")
    (paths.memory / "memory.stat").write_text("cache 2048\ntotal_cache 4096\ntotal_inactive_file 1048576\n")
    (paths.freezer / "freezer.state").write_text("THAWED\n")
    return paths


def test_v1_readings(tmp_path: Path) -> None:
    paths = _v1_tree(tmp_path, "corral-br0", "abc")
    assert paths.version == 1 and paths.memory == tmp_path / "memory" / "corral-br0" / "abc"
    usage = read_usage(paths)
    assert (usage.cpu_ns, usage.mem_usage, usage.mem_limit, usage.mem_cache) == (
        123456789,
        10485760,
        268435456,
        4096,
    )
    assert usage.mem_used == 10485760 - 1048576
    (paths.memory / "memory.limit_in_bytes").write_text(str(9223372036854771712))
    assert read_usage(paths).mem_limit is None  # "unlimited"


def test_v2_readings(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    paths = locate_cgroups("corral-br0", "abc", tmp_path)
    assert paths.version == 2 and paths.cpu == paths.memory == tmp_path / "corral-br0" / "abc"
    paths.cpu.mkdir(parents=True)
    (paths.cpu / "cpu.stat").write_text("usage_usec 2000\nuser_usec 1000\n")
    (paths.memory / "memory.current").write_text("4096\n")
    (paths.memory / "memory.max").write_text("max\n")
    (paths.memory / "memory.stat").write_text("file 1024\ninactive_file 512\n")
    usage = read_usage(paths)
    assert (usage.cpu_ns, usage.mem_usage, usage.mem_limit, usage.mem_cache, usage.mem_used) == (
        2_000_000,
        4096,
        None,
        1024,
        3584,
    )


def test_missing_cgroup_is_oserror(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    with pytest.raises(OSError):
        read_usage(locate_cgroups("p", "gone", tmp_path))


async def test_freezer_writes_and_waits(tmp_path: Path) -> None:
    paths = _v1_tree(tmp_path, "p", "s")
    await freeze(paths)
    assert freezer_state(paths) == "FROZEN"
    await thaw(paths)
    assert freezer_state(paths) == "THAWED"


async def test_freezer_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("")
    paths = locate_cgroups("p", "s", tmp_path)
    paths.freezer.mkdir(parents=True)
    (paths.freezer / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    await freeze(paths)
    assert (paths.freezer / "cgroup.freeze").read_text() == "1"
    assert freezer_state(paths) == "FROZEN"


async def test_freeze_that_never_finishes_thaws_again(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("")
    paths = locate_cgroups("p", "s", tmp_path)
    paths.freezer.mkdir(parents=True)
    (paths.freezer / "cgroup.events").write_text("populated 1\nfrozen 0\n")  # the kernel never gets there
    with pytest.raises(FreezeTimeout):
        await freeze(paths, timeout_s=0.05)
    assert (paths.freezer / "cgroup.freeze").read_text() == "0"
