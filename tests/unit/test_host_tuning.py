"""Host tuning for speed: `favordynmods` on the cgroup2 mount, planned only where it applies."""

from __future__ import annotations

import pytest

from corral.core.errors import FailedPrecondition
from corral.node import host
from corral.node.host import HostFacts, RemountCgroup2, parse_mounts, plan_host

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n"


def _facts(mounts: str, kernel: str) -> HostFacts:
    return HostFacts(
        mounts=tuple(parse_mounts(mounts)),
        unified_controllers=(),
        ip_forward="1",
        filesystems=frozenset({"overlay"}),
        runtime="crun",
        runtime_path="/usr/bin/crun",
        kernel_release=kernel,
    )


def test_hybrid_host_gets_favordynmods_on_the_unified_mount() -> None:
    (change,) = plan_host(_facts(HYBRID, "6.18.44-fc"))
    assert change == RemountCgroup2("/sys/fs/cgroup/unified", ("rw", "relatime"))
    assert "favordynmods" in change.message


def test_v2_host_keeps_its_options_when_remounted() -> None:
    (change,) = plan_host(_facts(V2, "6.1.0-18-amd64"))
    assert isinstance(change, RemountCgroup2) and change.target == "/sys/fs/cgroup"
    assert "nsdelegate" in change.options and "memory_recursiveprot" in change.options


@pytest.mark.parametrize("kernel", ["5.10.0-28-amd64", "", "weird"])
def test_old_or_unknown_kernels_are_left_alone(kernel: str) -> None:
    assert plan_host(_facts(HYBRID, kernel)) == []


def test_already_tuned_hosts_need_nothing() -> None:
    assert plan_host(_facts(V2.replace("nsdelegate", "nsdelegate,favordynmods"), "6.18.0")) == []


def test_a_refused_remount_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "gather_facts", lambda settings: _facts(HYBRID, "6.18.0"))

    def refuse(change: object) -> None:
        raise FailedPrecondition("cannot remount /sys/fs/cgroup/unified with favordynmods: nope")

    monkeypatch.setattr(host, "apply_change", refuse)
    (message,) = host.prepare_host(None)  # type: ignore[arg-type]
    assert "nope" in message and "optional" in message
